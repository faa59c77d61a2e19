"""The driver: check inputs, prepare once, run Ray Train, export the model.

1. Checks that need no worker (`check_inputs`): architecture known, base weights and output bucket
   reachable, the task's data found (`tasks.find_task`: the dataset listed and split; detection: the
   COCO files read, sanitised and matched to the listed images). Each failure is a TrainerError naming
   the field or URI.
2. `prepare_node`: base weights and images into the node cache, images decode-checked, base weights
   loaded into the architecture. It runs on a node that will host workers — this process for a local
   run, a Ray task on a cluster — so deterministic failures (an unsafe pickle, too many corrupt images)
   end the run at once instead of being retried as worker failures. On a cluster it runs beside Ray
   Train's start-up where a node can host a worker (`prepare_in_cluster`, `Preparing`: the workers wait
   for its result, and its failure aborts the training run), before training otherwise.
3. `train`: TorchTrainer with S3 storage `<output.path>/checkpoints`, run name `config.run_name`
   (namespace, name and the digest of the run-shaping spec): a new driver with the same name resumes
   the run from its latest checkpoint, and FailureConfig restarts failed workers from it (`maxRetries`)
   and preempted ones from the checkpoint they saved on the notice (`maxPreemptions`, apart). SIGTERM to
   the driver makes the workers checkpoint the current step, then ends the run (`PreemptedError`).
4. `export`: the best checkpoint by `training.selectBy` (Ray Train keeps it: `selection`; a mid-epoch
   checkpoint never ranks), judged once on the test split (or validation) where the node preparation ran
   (`evaluation.step`: evaluation.json, report.html, detection's detections.png, the other formats of
   output.formats), then model.safetensors, history.json, training-curves.png and model.json; and the
   hand-off to MLflow when output.mlflow asks for it.

Classification and detection share every step; the run's `tasks.Task` decides the data, the model and
the card.
"""

from __future__ import annotations

import _thread
import logging
import signal
import threading
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any

import torch

from kubetune_trainer.cache import cached_object
from kubetune_trainer.callbacks import STEP_CALLBACKS_ENV, callback_names_from_env
from kubetune_trainer.checkpoint import MODEL_FILE
from kubetune_trainer.config import OUTPUT_FILES, TrainerConfig, use_ray_train_env
from kubetune_trainer.data import check_corrupt, prepare_images
from kubetune_trainer.errors import PreemptedError, TrainerError, error_line
from kubetune_trainer.evaluation.step import judge_node
from kubetune_trainer.export import PUBLISHED_FILES, export_model, read_progress_json, with_effective_training
from kubetune_trainer.loop import RunPlan, train_loop
from kubetune_trainer.model import WeightsReport
from kubetune_trainer.options import EARLY_STOPPED, early_stopping_metric, stopped_early
from kubetune_trainer.preemption import DriverNotice, worker_callback
from kubetune_trainer.relay import Relay, driver_reporters, run_events, run_states
from kubetune_trainer.reporting import ProgressReporter
from kubetune_trainer.selection import best_entry, checkpoint_config
from kubetune_trainer.startup import mark, model_imports_callback, node_task
from kubetune_trainer.storage import ObjectInfo, S3Store, S3Uri
from kubetune_trainer.stream import cache_line, streams
from kubetune_trainer.tasks import Task, Trained, check_architecture, find_task, task_from_wire

log = logging.getLogger(__name__)

CHECKPOINTS_DIR = "checkpoints"


@dataclass
class Inputs:
    """What the driver found in S3 before anything heavy ran: the task with its data, the base weights."""

    task: Task
    weights: ObjectInfo


@dataclass
class Prepared:
    """What preparing a node found: the base weights' fit, preprocessing, unreadable images (dropped
    from the task's data)."""

    task: Task
    weights: ObjectInfo
    weights_report: WeightsReport
    data_config: dict[str, Any]
    trainable_parameters: int
    total_parameters: int
    stages: tuple[int, int]
    # Where the node preparation ran (this process, or a Ray task with these resources): the evaluation
    # after training runs the same way.
    placement: Placement


@dataclass(frozen=True)
class Placement:
    here: bool
    cpus: float = 1
    gpus: int = 0


@dataclass(frozen=True)
class Fitted:
    """What training left: the last checkpoint (its progress.json holds the whole history) and the one to
    export, the best by training.selectBy."""

    last: S3Uri
    best: S3Uri


@dataclass
class Outcome:
    model: S3Uri  # the weights under output.path
    metrics: dict[str, Any]  # the exported (best) epoch's history entry
    epochs: int
    # Beside the weights: the card, history and curves, then what the evaluation after training wrote
    # (evaluation.json, report.html, the task's pictures, the other formats of output.formats).
    files: tuple[str, ...]
    best_epoch: int = 0
    evaluation: dict[str, Any] | None = None  # the judged split and its headline figures
    report: S3Uri | None = None  # report.html under output.path
    mlflow: str | None = None  # what the MLflow hand-off did, in a line
    stopped: dict[str, Any] | None = None  # model.json's `stopped`: why training ended before its last epoch
    sweep: str | None = None  # a sweep's: which trial was exported, of how many, in a line


def store_for(config: TrainerConfig) -> S3Store:
    return S3Store.for_spec(config.storage)


def check_inputs(config: TrainerConfig, store: S3Store) -> Inputs:
    check_architecture(config)
    weights = store.head(S3Uri.parse(config.model.checkpoint))
    store.check_bucket(S3Uri.parse(config.output.path), "write the model to")
    return Inputs(find_task(config, store), weights)


def prepare_node(config_wire: Mapping[str, Any], task_wire: Mapping[str, Any], weights: ObjectInfo) -> dict[str, Any]:
    """Fill this node's cache and load the base weights once, side by side (the fill mostly waits on S3,
    the load on this process's imports and CPU); the result is plain data (crosses Ray)."""
    mark("node task imports done")
    config = TrainerConfig.model_validate(config_wire)
    task = task_from_wire(config, task_wire)
    store = store_for(config)
    pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="cache-fill")
    filling = pool.submit(fill_cache, config, task, store, weights.size)
    try:
        path = cached_object(store, S3Uri.parse(config.model.checkpoint), weights)
        model, report, plan = task.build_model(path, torch.device("cpu"))
        mark("base weights loaded")
        corrupt = filling.result()
    finally:
        # Base weights that fail (an unsafe pickle) end the task at once; the fill ends on its own (a local
        # run's process exits once it has).
        pool.shutdown(wait=False)
    check_corrupt(task.images, corrupt)
    mark("data cache filled")
    params = dict(model.named_parameters())
    return {
        "weights": report.wire(),
        "dataConfig": task.preprocessing(model),
        "corrupt": corrupt,
        "trainable": sum(params[n].numel() for n in plan.trainable),
        "total": sum(p.numel() for p in params.values()),
        "stages": [plan.stages_trained, plan.stages_total],
    }


def fill_cache(config: TrainerConfig, task: Task, store: S3Store, weights_bytes: int) -> dict[str, str]:
    """The node cache filled with the task's images, decode-checked; the unreadable ones (key → why)."""
    if streams(config, task.images, weights_bytes):  # the workers meet the images as they train
        return dict(task.images.corrupt)
    return prepare_images(store, task.images)[1]


def prepare(config: TrainerConfig, inputs: Inputs, *, here: bool, cpus: float = 1, gpus: int = 0) -> Prepared:
    """prepare_node on this process (`here`) or as a Ray task with one worker's resources."""
    placement = Placement(here, cpus, gpus)
    wires = (config.wire(), inputs.task.wire(), inputs.weights)
    found = on_node(placement, prepare_node, "preparing a node", *wires, milestone="node task started")
    return prepared_from(config, inputs, found, placement)


def prepared_from(config: TrainerConfig, inputs: Inputs, found: Mapping[str, Any], placement: Placement) -> Prepared:
    """What prepare_node found (plain data), read back and logged."""
    prepared = Prepared(
        task=inputs.task.without_corrupt(found["corrupt"]),
        weights=inputs.weights,
        weights_report=WeightsReport.from_wire(found["weights"]),
        data_config=found["dataConfig"],
        trainable_parameters=int(found["trainable"]),
        total_parameters=int(found["total"]),
        stages=(int(found["stages"][0]), int(found["stages"][1])),
        placement=placement,
    )
    log_prepared(config, prepared)
    return prepared


def on_node(
    placement: Placement,
    function: Callable[..., dict[str, Any]],
    what: str,
    *args: Any,
    milestone: str | None = None,
) -> dict[str, Any]:
    """`function(*args)` in this process, or as a Ray task with one worker's resources, after the start-up
    mark `milestone` (if any); a failure is the TrainerError behind it, or one naming `what`."""
    call = (milestone, function.__module__, function.__name__, *args)
    if placement.here:
        return dict(node_task(*call))
    import ray

    options = {"num_cpus": placement.cpus, "num_gpus": placement.gpus}
    return node_result(ray.remote(node_task).options(**options, **task_options(function)).remote(*call), what)


def task_options(function: Callable[..., Any]) -> dict[str, Any]:
    """A node task's options but its resources: never retried (its failures are deterministic), named."""
    return {"max_retries": 0, "name": function.__name__}


def node_result(ref: Any, what: str) -> dict[str, Any]:
    """A node task's result, or the TrainerError behind its failure (or one naming `what`)."""
    import ray

    try:
        found: dict[str, Any] = ray.get(ref)
    except ray.exceptions.RayTaskError as error:
        raise failure_reason(error) or TrainerError(f"{what} failed: {error_line(error)}") from None
    return found


@dataclass
class Preparing:
    """prepare_node still running on a worker node, beside Ray Train's start-up (`prepare_in_cluster`).

    The workers get `node` (the task's ObjectRef) and wait for it before they build the model
    (`loop.with_node`). A thread here waits for it too (`await_node`): it logs what the node found, and
    when the preparation fails it ends the run at once, with the node's TrainerError, by Ray Train's own
    abort (SIGINT to this process while `fit` runs): a deterministic failure is not retried as a worker's.
    """

    inputs: Inputs
    placement: Placement
    node: Any
    done: threading.Event = field(default_factory=threading.Event)
    lock: threading.Lock = field(default_factory=threading.Lock)
    result: Prepared | None = None
    failure: TrainerError | None = None
    fitting: bool = False

    def wait(self) -> Prepared:
        """What the node found, once it has; its failure raised."""
        self.done.wait()
        if self.failure is not None:
            raise self.failure
        assert self.result is not None  # done without a failure
        return self.result

    def fit_starts(self) -> None:
        """From now on a failure aborts Ray Train's run; one that came before is raised here."""
        with self.lock:
            if self.failure is not None:
                raise self.failure
            self.fitting = True

    def fit_ended(self) -> None:
        with self.lock:
            self.fitting = False


def prepare_in_cluster(config: TrainerConfig, inputs: Inputs, *, cpus: float, gpus: int) -> Prepared | Preparing:
    """The node preparation on a cluster: beside Ray Train's start-up where a node that can host a worker is up
    (the task takes no resources there: the worker group starts meanwhile), before it otherwise (the task
    takes a worker's resources, so it waits for a node) and for a sweep (its trials need a `Prepared`)."""
    placement = Placement(False, cpus, gpus)
    node_id = worker_node(cpus, gpus) if config.sweep is None else None
    if node_id is None:
        prepared = prepare(config, inputs, here=False, cpus=cpus, gpus=gpus)
        mark("node prepared")
        return prepared
    import ray
    from ray.util.scheduling_strategies import NodeAffinitySchedulingStrategy

    beside = {"num_cpus": 0, "scheduling_strategy": NodeAffinitySchedulingStrategy(node_id, soft=False)}
    task = ray.remote(node_task).options(**beside, **task_options(prepare_node))
    wires = (config.wire(), inputs.task.wire(), inputs.weights)
    ref = task.remote("node task started", prepare_node.__module__, prepare_node.__name__, *wires)
    preparing = Preparing(inputs, placement, ref)
    threading.Thread(target=await_node, args=(config, preparing), name="kubetune-node", daemon=True).start()
    return preparing


def worker_node(cpus: float, gpus: int) -> str | None:
    """The id of a live Ray node with the resources of a worker (the head has none on a kubetune cluster)."""
    import ray

    for node in ray.nodes():
        have = node.get("Resources") or {}
        if node.get("Alive") and have.get("CPU", 0) >= cpus and have.get("GPU", 0) >= gpus:
            return str(node["NodeID"])
    return None


def await_node(config: TrainerConfig, preparing: Preparing) -> None:
    """`Preparing`'s thread: the node's result read back and logged, or its failure kept and the run aborted."""
    try:
        found = node_result(preparing.node, "preparing a node")
        preparing.result = prepared_from(config, preparing.inputs, found, preparing.placement)
        mark("node prepared")
    except Exception as error:  # a TrainerError; anything else (Ray going away) named as the preparation's
        failure = error if isinstance(error, TrainerError) else TrainerError(f"preparing a node failed: {error}")
        with preparing.lock:
            preparing.failure = failure
            if preparing.fitting:  # SIGINT: TorchTrainer.fit's handler aborts the run (Ray Train's Ctrl-C)
                _thread.interrupt_main(signal.SIGINT)
    finally:
        preparing.done.set()


def node_failure(prepared: Prepared | Preparing) -> TrainerError | None:
    """The node preparation's failure, when training ran beside it and it failed."""
    return prepared.failure if isinstance(prepared, Preparing) else None


def ready(prepared: Prepared | Preparing) -> Prepared:
    return prepared.wait() if isinstance(prepared, Preparing) else prepared


def log_prepared(config: TrainerConfig, prepared: Prepared) -> None:
    """What the run trains on and what trains, before any worker starts."""
    for line in prepared.weights_report.log_lines():
        log.info("%s", line)
    index = prepared.task.images
    log.info(
        "data: %d classes, %d training and %d validation images%s",
        len(index.class_names),
        len(index.train),
        len(index.validation),
        f", {len(index.corrupt)} unreadable skipped" if index.corrupt else "",
    )
    for line in prepared.task.summary():
        log.info("%s", line)
    log.info("%s", cache_line(config, index, prepared.weights.size))
    log.info(
        "model: %s, strategy %s, %d of %d stages and the head train: %s of %s parameters",
        config.model.architecture,
        config.model.strategy,
        prepared.stages[0],
        prepared.stages[1],
        f"{prepared.trainable_parameters:,}",
        f"{prepared.total_parameters:,}",
    )


def failure_reason(error: BaseException) -> TrainerError | None:
    """The TrainerError behind a Ray Train failure (worker or controller), if one caused it."""
    seen: set[int] = set()
    todo: list[BaseException | None] = [error]
    while todo:
        current = todo.pop()
        if current is None or id(current) in seen:
            continue
        seen.add(id(current))
        if isinstance(current, TrainerError):
            return TrainerError(current.message)
        todo.extend(getattr(current, "worker_failures", {}).values())
        todo += [getattr(current, "controller_failure", None), getattr(current, "cause", None)]
        todo += [current.__cause__, current.__context__]
    return None


def train(
    config: TrainerConfig,
    prepared: Prepared | Preparing,
    *,
    cpus_per_worker: float,
    use_gpu: bool,
    reporter: ProgressReporter | None = None,
) -> Outcome:
    """Run the training on the connected Ray cluster and export the model (`prepared`: what the node
    preparation found, or the preparation still running beside the training's start-up)."""
    if config.sweep is not None:  # Ray Tune over trials of this same training (sweep.py)
        from kubetune_trainer.sweep import train_sweep

        return train_sweep(config, ready(prepared), cpus_per_worker=cpus_per_worker, use_gpu=use_gpu, reporter=reporter)
    use_ray_train_env()  # read by Ray Train's controller as it starts, in this (the driver's) process
    relay = Relay(driver_reporters(config, reporter), config.max_failures)
    notice = DriverNotice(config.preemption_grace_seconds, relay.progress.saved_on_notice)
    notice.install()
    try:
        plan = run_plan(prepared, relay, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu)
        trainer = torch_trainer(config, plan, relay.queue, cpus_per_worker=cpus_per_worker, use_gpu=use_gpu)
        fitted = fit_beside(trainer, config, prepared)
    except (KeyboardInterrupt, SystemExit, TrainerError):
        if (failure := node_failure(prepared)) is not None:  # the abort `Preparing` asked for
            raise failure from None
        if not notice.preempted:  # Ctrl-C, or a failure of its own
            raise
        raise PreemptedError(preempted_message(config, relay)) from None
    finally:
        notice.uninstall()
        relay.close()  # the last updates shown and sent before the export's lines
    return export(config, ready(prepared), fitted)


def fit_beside(trainer: Any, config: TrainerConfig, prepared: Prepared | Preparing) -> Fitted:
    """`fit`; beside a node preparation, one whose failure aborts the run (`Preparing`) and is raised."""
    if isinstance(prepared, Prepared):
        return fit(trainer, config)
    prepared.fit_starts()
    try:
        fitted = fit(trainer, config)
    except BaseException:  # however Ray Train's abort ends `fit`, the node's failure is the reason
        if prepared.failure is not None:
            raise prepared.failure from None
        raise
    finally:
        prepared.fit_ended()
    prepared.wait()  # done: the workers waited for it
    return fitted


def preempted_message(config: TrainerConfig, relay: Relay) -> str:
    """What a driver ended by SIGTERM leaves: the checkpoint to resume from."""
    progress = relay.progress
    where = progress.committed or f"{checkpoints_uri(config)}/{config.run_name}/ (none committed yet)"
    saved = "the workers checkpointed the current step" if progress.saved_on_notice() else "no new checkpoint in time"
    return f"SIGTERM: {saved}; the run resumes from {where} when it runs again"


def run_plan(prepared: Prepared | Preparing, relay: Relay, *, cpus_per_worker: float, use_gpu: bool) -> RunPlan:
    """What every worker gets: the task, preprocessing, base weights, threads and loader processes (beside a
    node preparation: the task as listed and the preparation's ObjectRef, which the workers apply)."""
    threads = max(1, int(cpus_per_worker))
    if isinstance(prepared, Preparing):
        task, data_config, weights, node = prepared.inputs.task, {}, prepared.inputs.weights, prepared.node
    else:
        task, data_config, weights, node = prepared.task, prepared.data_config, prepared.weights, None
    return RunPlan(
        task=task,
        data_config=data_config,
        weights=weights,
        threads=threads,
        # On CPU the decoding would take cores from the training threads; on GPU it must keep up.
        loader_workers=min(8, threads - 1) if use_gpu else 0,
        callbacks=callback_names_from_env(),
        step_callbacks=callback_names_from_env(STEP_CALLBACKS_ENV),
        relay=relay.queue,
        node=node,
    )


def torch_trainer(
    config: TrainerConfig,
    plan: RunPlan,
    queue: Any,
    *,
    cpus_per_worker: float,
    use_gpu: bool,
    callbacks: Sequence[Any] = (),
    notices: bool = True,
) -> Any:
    """Ray Train's TorchTrainer for the run: workers, S3 checkpoints under the run name, restarts; the
    controller's events on the relay's `queue`, and `callbacks` too (a sweep's trial: Tune's); `notices`: the
    workers take SIGTERM as a preemption notice (`preemption.WorkerNotices`)."""
    import ray.train
    from ray.train.torch import TorchTrainer

    resources: dict[str, float] = {"CPU": cpus_per_worker}
    preemptions = -1 if config.max_preemptions is None else config.max_preemptions
    if use_gpu:
        resources["GPU"] = float(config.scaling.gpus_per_worker or 1)
    return TorchTrainer(
        train_loop,
        train_loop_config=plan.loop_config(config),
        # num_workers (min, max): elastic, resized from the latest checkpoint (mypy sees Train V1's config).
        scaling_config=ray.train.ScalingConfig(  # type: ignore[call-arg]
            num_workers=config.scaling.num_workers(),  # type: ignore[arg-type]
            use_gpu=use_gpu,
            resources_per_worker=resources,
            elastic_resize_monitor_interval_s=config.scaling.resize_interval_s,
        ),
        run_config=ray.train.RunConfig(
            name=config.run_name,
            storage_path=checkpoints_uri(config).fs_path,
            storage_filesystem=store_for(config).arrow_filesystem(),
            # The best checkpointsToKeep by selectBy, and the latest: the best is never deleted.
            checkpoint_config=ray.train.CheckpointConfig(
                **checkpoint_config(config.output.checkpoints_to_keep, config.selected_metric)
            ),
            # Preemptions have a budget of their own (-1: no limit), apart from the failures'.
            failure_config=ray.train.FailureConfig(  # type: ignore[call-arg]  # V1 to mypy
                max_failures=config.max_failures, max_preemption_failures=preemptions
            ),
            logging_config=ray.train.LoggingConfig(log_level="WARNING"),
            callbacks=[
                run_events(queue),
                run_states(queue),
                # Off for a sweep's trials: when the sweep stops a trial, its workers get SIGTERM and must end
                # at once (a notice would keep them, and their CPUs, for the grace period).
                *([worker_callback(config.preemption_grace_seconds)] if notices else []),
                model_imports_callback(plan.task.model_modules),
                *callbacks,
            ],
        ),
    )


def checkpoints_uri(config: TrainerConfig) -> S3Uri:
    return S3Uri.parse(config.output.path).join(CHECKPOINTS_DIR)


def fit(trainer: Any, config: TrainerConfig) -> Fitted:
    """Train; the last and the best checkpoint, or the TrainerError that ended the run."""
    import ray.train

    checkpoints = checkpoints_uri(config)
    log.info("training run %s: checkpoints under %s/%s/", config.run_name, checkpoints, config.run_name)
    try:
        result = trainer.fit()
    except ray.train.TrainingFailedError as error:
        raise failure_reason(error) or TrainerError(f"training failed: {error_line(error)}") from None
    if result.checkpoint is None:
        raise TrainerError(f"training finished without a checkpoint under {checkpoints}/{config.run_name}/")
    last = S3Uri.from_fs_path(result.checkpoint.path)
    return Fitted(last=last, best=best_checkpoint(result.best_checkpoints or [], config.selected_metric) or last)


def best_checkpoint(kept: Sequence[tuple[Any, Mapping[str, Any]]], metric: str) -> S3Uri | None:
    """Of the checkpoints Ray Train kept (checkpoint, reported figures), the best by `metric`."""
    best = best_entry([figures for _, figures in kept], metric)
    for checkpoint, figures in kept:
        if figures is best:
            return S3Uri.from_fs_path(checkpoint.path)
    return None


def export(
    config: TrainerConfig, prepared: Prepared, fitted: Fitted, extra_card: Mapping[str, Any] | None = None
) -> Outcome:
    """The best checkpoint judged, then its weights, card, history and curves under output.path (the card
    with `extra_card`'s keys too: a sweep's)."""
    store = store_for(config)
    last = read_progress_json(store, fitted.last)
    history = list(last["history"])
    epoch = int(read_progress_json(store, fitted.best)["epoch"])
    log.info("exporting epoch %d of %d (the best by %s): %s", epoch, len(history), config.selected_metric, fitted.best)
    task = prepared.task
    judged = on_node(
        prepared.placement,
        judge_node,
        "evaluating the exported model",
        config.wire(),
        task.wire(),
        prepared.weights,
        prepared.data_config,
        str(fitted.best),
        history,
        epoch,
    )
    trained = Trained(prepared.data_config, prepared.weights_report, history, epoch, judged["card"], datetime.now(UTC))
    card = task.card(trained) | {"evaluation": evaluation_summary(judged), "exports": judged["exports"]}
    card = with_effective_training(card, last.get("effective")) | dict(extra_card or {})
    stopped = early_stop_summary(config, history)
    if stopped is not None:
        card["stopped"] = stopped
    output = export_model(store, config, fitted.best, card, history, task.panels)
    outcome = Outcome(
        output.join(MODEL_FILE),
        metrics=dict(history[epoch - 1]),
        epochs=len(history),
        files=(*PUBLISHED_FILES, *judged["files"]),
        best_epoch=epoch,
        evaluation=evaluation_summary(judged),
        report=output.join(OUTPUT_FILES["report"]),
        stopped=stopped,
    )
    if config.output.mlflow is not None:  # imported only when asked for: MLflow is an optional extra
        from kubetune_trainer.handoff import hand_off

        outcome.mlflow = hand_off(config, store, output, card, history)
    return outcome


def evaluation_summary(judged: Mapping[str, Any]) -> dict[str, Any]:
    """model.json's `evaluation`: the split judged, its headline figures, where the details are."""
    return {
        "split": judged["split"],
        "metrics": dict(judged["headline"]),
        "files": {"evaluation": OUTPUT_FILES["evaluation"], "report": OUTPUT_FILES["report"]},
    }


def early_stop_summary(config: TrainerConfig, history: Sequence[Mapping[str, Any]]) -> dict[str, Any] | None:
    """model.json's `stopped` when earlyStopping ended training before its last epoch: why, after which epoch,
    and the rule; None for a run that trained every epoch."""
    training = config.training
    if training.early_stopping is None or not stopped_early(history, training, config.selected_metric):
        return None
    return {
        "reason": EARLY_STOPPED,
        "afterEpoch": len(history),
        "epochs": training.epochs,
        "metric": early_stopping_metric(training, config.selected_metric),
        "patience": training.early_stopping.patience,
        "minDelta": training.early_stopping.min_delta,
    }
