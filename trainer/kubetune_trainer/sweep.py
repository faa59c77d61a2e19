"""A sweep's driver: Ray Tune over the run's own training (spec.sweep; docs/sweeps.md).

1. `plan_sweep` draws the trials from the seed; the trials whose record (`trials/<id>/trial.json`) this
   sweep already wrote are finished and not run again (the resume after a driver restart).
2. Ray Tune runs the others, at most maxConcurrentTrials at once, ASHA (or fifo) deciding after each epoch.
   Each trial is `trial_function`: a Ray Train run of the trial's config (`sweep_plan.trial_config`) through
   the same `run.torch_trainer` and `loop.train_loop` as a single run, checkpoints under
   `<output.path>/trials/<id>/checkpoints/`; Ray Train restarts failed workers from them (maxRetries), and a
   trial started again (after a driver restart) resumes from its latest. Ray Train's `TuneReportCallback`
   hands each epoch's figures to Tune; the workers report every epoch in a sweep (`RunPlan.report_epochs`).
3. As each trial ends, the driver writes its record (`SweepCallback`): done (trained to its end: its last
   and best checkpoints), stopped (by ASHA) or failed (past its retries).
4. The best done trial is exported to output.path by `run.export`, as a single run is (model.json also
   names the sweep, the trial and its values), then sweep.json and sweep.png.

The node data cache is filled once before the sweep (`run.prepare`), and every trial's workers read it.
This module imports Ray Tune: `run.train` imports it only for a sweep.
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping
from typing import Any

from ray.tune import Callback

from kubetune_trainer.config import TrainerConfig, use_ray_train_env
from kubetune_trainer.errors import StorageError, TrainerError, error_line
from kubetune_trainer.export import read_progress_json
from kubetune_trainer.loop import RunPlan
from kubetune_trainer.relay import EVENT, driver_reporters
from kubetune_trainer.reporting import ProgressReporter
from kubetune_trainer.run import (
    Fitted,
    Outcome,
    Prepared,
    export,
    failure_reason,
    fit,
    run_plan,
    store_for,
    torch_trainer,
)
from kubetune_trainer.storage import S3Store, S3Uri
from kubetune_trainer.sweep_figures import plot_sweep
from kubetune_trainer.sweep_plan import (
    SWEEP_FIGURE,
    SWEEP_FILE,
    TRIAL_FITTED,
    TRIAL_RECORD,
    SweepPlan,
    Trial,
    TrialRecord,
    best_trial,
    fitted_file,
    in_trial_folder,
    own_record,
    plan_sweep,
    sweep_document,
    trial_config,
    trial_file,
)
from kubetune_trainer.sweep_progress import (
    CONTROLLER_EVENT,
    SweepBoard,
    SweepRelay,
    SweepRouter,
    TrialQueue,
    sweep_reporters,
)

log = logging.getLogger(__name__)

# What the Tune trial itself (the Ray Train run's driver) reserves: a sliver, so it never takes a worker's CPU.
TRIAL_DRIVER_CPUS = 0.01
# How long the driver waits for a stopped trial's Ray Train run to release its workers (`end_train_run`).
ABORT_TIMEOUT_S = 60.0


def record_uri(config: TrainerConfig, trial_id: str, name: str = TRIAL_RECORD) -> S3Uri:
    return S3Uri.parse(trial_file(config, trial_id, name))


def finished_records(store: S3Store, config: TrainerConfig, plan: SweepPlan) -> list[TrialRecord]:
    """The records this sweep (same sweep id) wrote for its trials, in trial order."""
    listed = {info.key for info in store.list_objects(S3Uri.parse(config.output.path).join("trials"))}
    records = []
    for trial in plan.trials:
        uri = record_uri(config, trial.id)
        if uri.key not in listed:
            continue
        record = own_record(config, plan, trial, read_json(store, uri))
        if record is not None:
            records.append(record)
        else:
            log.info("sweep: %s is not this sweep's record of %s: the trial runs", uri, trial.id)
    return records


def read_json(store: S3Store, uri: S3Uri) -> Any:
    """A small JSON file the driver wrote (within storage.MAX_READ_BYTES); None when it is not JSON."""
    try:
        return json.loads(store.get_bytes(uri))
    except (UnicodeDecodeError, json.JSONDecodeError, RecursionError):
        return None


def put_json(store: S3Store, uri: S3Uri, document: Any) -> None:
    store.put_bytes(uri, json.dumps(document, indent=2).encode(), "application/json")


def trial_function(params: Mapping[str, Any], *, shared: Mapping[str, Any]) -> None:
    """One Tune trial: the trial's config trained by Ray Train, like a single run; its last and best
    checkpoints recorded (trials/<id>/fitted.json) once it trained to its end."""
    from ray.tune.integration.ray_train import TuneReportCallback

    use_ray_train_env()  # read by the Ray Train controller this process starts
    trial_id = str(params["trial"])
    raw = {**shared["loop"], "config": shared["configs"][trial_id], "relay": TrialQueue(shared["queue"], trial_id)}
    config, plan = RunPlan.from_loop_config(raw)
    trainer = torch_trainer(
        config,
        plan,
        plan.relay,
        cpus_per_worker=float(shared["cpus"]),
        use_gpu=bool(shared["gpu"]),
        callbacks=[TuneReportCallback(), controller_handle(plan.relay)],
        notices=False,  # ASHA's stop ends the trial's workers by SIGTERM: they must go at once
    )
    fitted = fit(trainer, config)
    put_json(
        store_for(config),
        S3Uri.parse(fitted_file(config)),
        {"sweepId": shared["sweepId"], "last": str(fitted.last), "best": str(fitted.best)},
    )


def controller_handle(queue: Any) -> Any:
    """A Ray Train ControllerCallback (DeveloperAPI) that hands the trial's controller, its actor handle, to
    the driver (on `queue`), which ends the run through it when Tune ends the trial (`end_train_run`)."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class ControllerHandle(ControllerCallback):
        def __init__(self, queue: Any) -> None:
            self.queue = queue

        def after_controller_start(self, train_run_context: Any) -> None:
            import ray

            try:
                self.queue.put({EVENT: CONTROLLER_EVENT, "handle": ray.get_runtime_context().current_actor}, timeout=5)
            except Exception:  # the trial still trains; only its end is left to Ray's own cleanup
                log.warning("sweep: the trial's Ray Train controller could not reach the driver", exc_info=True)

    return ControllerHandle(queue)


def end_train_run(trial_id: str, controller: Any) -> None:
    """Abort a trial's Ray Train run if it is still going, and wait until it has: its workers gone and their
    placement group removed.

    Tune ends a trial it stops (ASHA) by killing the trial's actor, and Ray kills the Train controller the
    trial owns with it, before the controller can shut its worker group down. The placement group holding the
    workers' CPUs (or GPUs) is the job's, not the controller's: it outlives them, and only Ray Train's
    PlacementGroupCleaner would remove it, by polling the State API — which a local Ray without a dashboard
    does not have (it never does), and which on a cluster answers only after the next trial asked for the
    same CPUs. Tune calls its callbacks' `on_trial_complete` before it stops the trial's actor, so this abort
    (Ray Train's own, as on Ctrl-C) releases the workers first: the next trial finds them free. A run that
    already ended (a trial done or failed) has nothing to abort."""
    if controller is None:
        return
    import ray

    try:
        ray.get(controller.abort.remote(), timeout=ABORT_TIMEOUT_S)
    except ray.exceptions.RayActorError:
        pass  # abort ends the controller's actor; or the run had ended, and its actor with it
    except Exception as error:
        log.warning("sweep: %s: its Ray Train run did not abort: %s", trial_id, error_line(error))


class SweepCallback(Callback):
    """A Tune Callback (in the driver) that keeps the board and writes each ended trial's record."""

    def __init__(self, config: TrainerConfig, plan: SweepPlan, board: SweepBoard, relay: SweepRelay) -> None:
        self.config, self.plan, self.board, self.relay = config, plan, board, relay
        self.store = store_for(config)
        self.by_id = {t.id: t for t in plan.trials}

    def __getstate__(self) -> dict[str, Any]:
        # Tune pickles its run config (callbacks included) into its scratch state, never read back here: the
        # board's lock and the relay's thread stay behind.
        return {}

    def __copy__(self) -> SweepCallback:  # a copy is this very callback: one board, one relay
        return self

    def __deepcopy__(self, memo: dict[int, Any]) -> SweepCallback:
        return self

    def on_trial_start(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        trial_id = str(trial.config["trial"])
        self.board.started(trial_id)
        log.info("sweep: %s started: %s", trial_id, values_line(self.by_id[trial_id]))
        self.relay.push()

    def on_trial_complete(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.ended(trial, None)

    def on_trial_error(self, iteration: int, trials: list[Any], trial: Any, **info: Any) -> None:
        self.ended(trial, failure_of(info.get("error")))

    def ended(self, tune_trial: Any, failure: str | None) -> None:
        trial = self.by_id[str(tune_trial.config["trial"])]
        end_train_run(trial.id, self.board.take_controller(trial.id))
        record = ended_record(self.store, self.config, self.plan, trial, tune_trial.last_result or {}, failure)
        put_json(self.store, record_uri(self.config, trial.id), record.wire())
        self.board.ended(record)
        log.info("sweep: %s %s after %d epoch(s)", trial.id, record.state, len(record.history))
        self.relay.push()


def ended_record(
    store: S3Store,
    config: TrainerConfig,
    plan: SweepPlan,
    trial: Trial,
    last_result: Mapping[str, Any],
    failure: str | None,
) -> TrialRecord:
    """What an ended trial left: done when it recorded its checkpoints, failed on an error, else stopped."""
    record = TrialRecord(plan.sweep_id, trial.id, dict(trial.values), "stopped")
    try:
        fitted = read_json(store, record_uri(config, trial.id, TRIAL_FITTED))
    except StorageError:
        fitted = None
    if (
        isinstance(fitted, dict)
        and fitted.get("sweepId") == plan.sweep_id  # not another sweep's, in the same folder
        and all(in_trial_folder(config, trial.id, fitted.get(which)) for which in ("last", "best"))
    ):
        record.state, record.checkpoints = "done", {"last": fitted["last"], "best": fitted["best"]}
        record.history = list(read_progress_json(store, S3Uri.parse(fitted["last"]))["history"])
        return record
    if failure is not None:
        record.state, record.reason = "failed", failure
    latest = last_result.get("checkpoint_path")
    try:  # the epochs its latest checkpoint holds (a stopped trial's are in sweep.json, never exported)
        if isinstance(latest, str):
            record.history = list(read_progress_json(store, S3Uri.from_fs_path(latest))["history"])
    except StorageError as error:
        log.warning("sweep: %s: cannot read its latest checkpoint's history: %s", trial.id, error)
    return record


def failure_of(error: Any) -> str:
    """A failed trial's reason in a line: the TrainerError behind it, or the error's last line."""
    if not isinstance(error, BaseException):
        return "failed"
    reason = failure_reason(error)
    return reason.message if reason is not None else error_line(error)


def values_line(trial: Trial) -> str:
    return ", ".join(f"{field} {value}" for field, value in trial.values.items())


def asha(config: TrainerConfig, plan: SweepPlan, records: list[TrialRecord]) -> Any:
    """Ray Tune's ASHA by the sweep's metric over epochs, with two changes: a trial's last epoch is never a
    stop decision (it is ending anyway, and must end as done, with its checkpoints recorded), and the rungs
    start with the finished trials' epochs, so a resumed sweep stops trials as the first driver would have."""
    from types import SimpleNamespace

    from ray.tune.schedulers import ASHAScheduler, TrialScheduler

    sweep = config.sweep
    assert sweep is not None
    epochs = config.training.epochs

    class SweepASHA(ASHAScheduler):
        def on_trial_result(self, tune_controller: Any, trial: Any, result: dict[str, Any]) -> str:
            if int(result.get("epoch", 0)) >= epochs:
                return str(TrialScheduler.CONTINUE)
            return str(super().on_trial_result(tune_controller, trial, result))

    scheduler = SweepASHA(
        time_attr="epoch",  # mid-epoch checkpoints report no epoch: ASHA decides at epoch ends only
        metric=plan.metric,
        mode=plan.mode,
        max_t=epochs,
        grace_period=sweep.scheduler.grace_period,
        reduction_factor=sweep.scheduler.reduction_factor,
        stop_last_trials=False,
    )
    sign = 1.0 if plan.mode == "max" else -1.0
    try:  # ASHA's rungs are internal (Ray 2.60: one bracket); without them the rungs start empty
        for record in records:
            for entry in record.history:
                if isinstance(entry.get(plan.metric), int | float):
                    earlier: Any = SimpleNamespace(trial_id=f"before-{record.id}")  # ASHA reads its id only
                    scheduler._brackets[0].on_result(earlier, int(entry["epoch"]), sign * entry[plan.metric])
    except (AttributeError, IndexError):
        log.warning("sweep: ASHA's rungs start empty (the finished trials' epochs could not be entered)")
    return scheduler


def tuner(
    config: TrainerConfig,
    plan: SweepPlan,
    trials: tuple[list[Trial], list[TrialRecord]],
    scratch: str,
    shared: dict[str, Any],
    callback: Any,
) -> Any:
    """Ray Tune over the trials to run (`trials`: those, their ids the grid, and the finished ones' records),
    ASHA or fifo, maxConcurrentTrials at once; Tune's own state in `scratch`."""
    todo, records = trials
    from ray import tune
    from ray.tune.schedulers import FIFOScheduler

    sweep = config.sweep
    assert sweep is not None
    scheduler = asha(config, plan, records) if sweep.scheduler.type == "asha" else FIFOScheduler()
    trainable = tune.with_resources(tune.with_parameters(trial_function, shared=shared), {"CPU": TRIAL_DRIVER_CPUS})
    return tune.Tuner(
        trainable,
        param_space={"trial": tune.grid_search([t.id for t in todo])},
        tune_config=tune.TuneConfig(scheduler=scheduler, max_concurrent_trials=sweep.max_concurrent_trials),
        run_config=tune.RunConfig(
            name=f"sweep-{plan.sweep_id}",
            # Tune's own state is scratch: the resume record is the trials' records in S3.
            storage_path=scratch,
            callbacks=[callback],
            failure_config=tune.FailureConfig(max_failures=0),  # Ray Train retries the workers; a trial fails once
            verbose=0,
        ),
    )


def train_sweep(
    config: TrainerConfig,
    prepared: Prepared,
    *,
    cpus_per_worker: float,
    use_gpu: bool,
    reporter: ProgressReporter | None = None,
) -> Outcome:
    """Run the sweep's unfinished trials, then export the best and write sweep.json and sweep.png."""
    use_ray_train_env()
    store = store_for(config)
    plan = plan_sweep(config)
    records = finished_records(store, config, plan)
    todo = [t for t in plan.trials if t.id not in {r.id for r in records}]
    log.info(
        "sweep %s: %d trials by %s (%s), %d finished before, %d to run",
        plan.sweep_id,
        len(plan.trials),
        plan.metric,
        plan.mode,
        len(records),
        len(todo),
    )
    board = SweepBoard(plan, records, config.max_failures)
    router = SweepRouter(board, sweep_reporters(driver_reporters(config, reporter)))
    relay = SweepRelay(router, config.max_failures)
    try:
        if todo:
            run_trials(
                config, prepared, plan, (todo, records), board, relay, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu
            )
    finally:
        relay.close()
    return finish(config, prepared, plan, finished_records(store, config, plan))


def run_trials(
    config: TrainerConfig,
    prepared: Prepared,
    plan: SweepPlan,
    trials: tuple[list[Trial], list[TrialRecord]],
    board: SweepBoard,
    relay: SweepRelay,
    *,
    cpus_per_worker: float,
    use_gpu: bool,
) -> None:
    """Ray Tune over the trials to run (`trials`: those, and the records of the finished ones); each trial's
    config carried to its trial function as plain data."""
    todo, records = trials
    loop = run_plan(prepared, relay, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu)
    loop.report_epochs = True
    shared = {
        "loop": {**loop.loop_config(config), "relay": None},
        "configs": {t.id: trial_config(config, plan, t).wire() for t in todo},
        "queue": relay.queue,
        "sweepId": plan.sweep_id,
        "cpus": cpus_per_worker,
        "gpu": use_gpu,
    }
    try:
        with tempfile.TemporaryDirectory(prefix="kubetune-tune-") as scratch:
            tuner(config, plan, (todo, records), scratch, shared, SweepCallback(config, plan, board, relay)).fit()
    except Exception as error:  # Tune's own failure (not a trial's): the sweep cannot go on
        raise TrainerError(f"the sweep failed: {error_line(error)}") from None


def finish(config: TrainerConfig, prepared: Prepared, plan: SweepPlan, records: list[TrialRecord]) -> Outcome:
    """sweep.json and sweep.png, then the best trial exported as the job's model."""
    store = store_for(config)
    output = S3Uri.parse(config.output.path)
    document = sweep_document(plan, config, records)
    put_json(store, output.join(SWEEP_FILE), document)
    store.put_bytes(
        output.join(SWEEP_FIGURE), plot_sweep(document, f"{config.job_name}: sweep by {plan.metric}"), "image/png"
    )
    best = best_trial(records, plan.metric)
    if best is None:
        states = ", ".join(f"{r.id} {r.state}" for r in records) or "none ended"
        raise TrainerError(f"the sweep has no trial that trained to its end ({states}); see {output.join(SWEEP_FILE)}")
    trial = next(t for t in plan.trials if t.id == best.id)
    chosen = trial_config(config, plan, trial)
    chosen = chosen.model_copy(update={"output": config.output})
    log.info("sweep: exporting %s (%s), the best by %s", best.id, values_line(trial), plan.metric)
    fitted = Fitted(last=S3Uri.parse(best.checkpoints["last"]), best=S3Uri.parse(best.checkpoints["best"]))
    card = {"sweep": {"id": plan.sweep_id, "trial": best.id, "parameters": best.values, "file": SWEEP_FILE}}
    outcome = export(chosen, prepared, fitted, extra_card=card)
    outcome.files = (*outcome.files, SWEEP_FILE, SWEEP_FIGURE)
    ended = [r.state for r in records]
    outcome.sweep = (
        f"{best.id} is the best of {len(plan.trials)} trials ({ended.count('done')} done, {ended.count('stopped')} "
        f"stopped early, {ended.count('failed')} failed) by {plan.metric}: {document['best']['value']:.4f} with "
        f"{values_line(trial)}"
    )
    return outcome
