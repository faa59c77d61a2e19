"""spec.sweep: each rule refuses what a sweep could not run, naming the field and what is allowed; the plan
of trials is seeded, stratified and the same on every driver start; a trial is the job's spec with its
values set; the records and sweep.json say what each trial did."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune_operator.spec import FineTuneJob
from kubetune_operator.trainer_config import trainer_config
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.sweep_plan import (
    TrialRecord,
    best_trial,
    plan_sweep,
    sweep_document,
    sweep_progress,
    trial_config,
)

JOB: dict[str, Any] = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "flowers", "namespace": "vision"},
    "spec": {
        "model": {"architecture": "resnet50", "checkpoint": "s3://models/base/resnet50.safetensors"},
        "data": {"train": "s3://datasets/flowers/train/"},
        "training": {"epochs": 5, "batchSize": 32},
        "output": {"path": "s3://runs/flowers/"},
    },
}
RATE = {"field": "training.learningRate", "loguniform": {"min": 1e-4, "max": 1e-2}}


def job(sweep: dict[str, Any], **model: Any) -> dict[str, Any]:
    body = copy.deepcopy(JOB)
    body["spec"]["sweep"] = sweep
    body["spec"]["model"].update(model)
    return body


def config(sweep: dict[str, Any], **model: Any) -> TrainerConfig:
    return trainer_config(FineTuneJob.model_validate(job(sweep, **model)))


def refusal(body: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        FineTuneJob.model_validate(body)
    return str(caught.value)


@pytest.mark.parametrize(
    ("sweep", "model", "message"),
    [
        (
            {"parameters": [{"field": "training.learningRate", "loguniform": {"min": 1e-4, "max": 50.0}}]},
            {},
            "sweep.parameters[0]: training.learningRate 50.0 is not a value the field accepts: Input should be "
            "less than or equal to 10",
        ),
        (
            {"parameters": [RATE, {"field": "training.batchSize", "values": [16, 0]}]},
            {},
            "sweep.parameters[1]: training.batchSize 0 is not a value the field accepts",
        ),
        (
            {"parameters": [{"field": "model.strategy", "choices": ["head", "everything"]}]},
            {},
            "sweep.parameters[0]: model.strategy 'everything' is not a value the field accepts: Input should be "
            "'head', 'partial' or 'full'",
        ),
        (
            {"parameters": [{"field": "data.augment", "choices": ["light", "heavy"]}]},
            {},
            "sweep.parameters[0]: data.augment 'heavy' is not a value the field accepts",
        ),
        (
            {"parameters": [{"field": "model.strategy", "choices": ["head", "partial"]}]},
            {},
            "model.strategy 'partial' is not a value the field accepts: trainableLayers: required when strategy is "
            "'partial'",
        ),
        (
            {"parameters": [RATE, RATE]},
            {},
            "sweep.parameters: each field at most once (training.learningRate repeated)",
        ),
        (
            {"parameters": [{"field": "model.trainableLayers", "values": [1, 2]}]},
            {},
            "sweep.parameters: model.trainableLayers only with model.strategy partial",
        ),
        (
            {"parameters": [RATE], "trials": 2, "maxConcurrentTrials": 4},
            {},
            "sweep.maxConcurrentTrials: at most sweep.trials (2) (got 4)",
        ),
        (
            {"parameters": [RATE], "metric": "valMap"},
            {},
            "sweep.metric: with task 'classification' one of valAccuracy, valLoss (got valMap)",
        ),
        (
            {"parameters": [RATE], "metric": "valLoss", "mode": "max"},
            {},
            "sweep.mode: valLoss is best when lowest: min",
        ),
        (
            {"parameters": [RATE], "scheduler": {"gracePeriod": 6}},
            {},
            "sweep.scheduler.gracePeriod: at most training.epochs (5) (got 6)",
        ),
        (
            {"parameters": [{"field": "training.batchSize", "values": [16.5]}]},
            {},
            "training.batchSize: values must be whole numbers",
        ),
    ],
)
def test_a_sweep_that_could_not_run_is_refused_naming_the_field(
    sweep: dict[str, Any], model: dict[str, Any], message: str
) -> None:
    assert message in refusal(job(sweep, **model))
    with pytest.raises(ValidationError, match="sweep"):  # the trainer's own config holds the same rules
        TrainerConfig.model_validate({**config({"parameters": [RATE]}).wire(), "sweep": sweep})


def test_trainable_layers_go_with_the_partial_trials_only() -> None:
    sweep = {
        "parameters": [
            {"field": "model.strategy", "choices": ["head", "partial"]},
            {"field": "model.trainableLayers", "values": [1, 3]},
        ],
        "trials": 4,
    }
    made = config(sweep)
    plan = plan_sweep(made)
    trials = [trial_config(made, plan, trial) for trial in plan.trials]
    assert {(t.model.strategy, t.model.trainable_layers) for t in trials} <= {
        ("head", None),
        ("partial", 1),
        ("partial", 3),
    }
    assert {t.model.strategy for t in trials} == {"head", "partial"}


def test_the_plan_is_seeded_stratified_and_the_same_on_every_start() -> None:
    sweep = {"parameters": [{"field": "training.batchSize", "values": [8, 16, 32]}, RATE], "trials": 6, "seed": 3}
    plan = plan_sweep(config(sweep))
    assert plan == plan_sweep(config(sweep))
    sizes = [t.values["training.batchSize"] for t in plan.trials]
    assert sorted(sizes[:3]) == [8, 16, 32] and sorted(sizes[3:]) == [8, 16, 32]  # each once before any twice
    assert all(isinstance(s, int) for s in sizes)
    rates = [t.values["training.learningRate"] for t in plan.trials]
    assert all(1e-4 <= r <= 1e-2 for r in rates) and len(set(rates)) == 6
    other = plan_sweep(config({**sweep, "seed": 4}))
    assert other.trials != plan.trials and other.sweep_id != plan.sweep_id


def test_a_trial_is_the_job_with_its_values_in_a_folder_of_its_own() -> None:
    made = config({"parameters": [RATE], "trials": 2, "metric": "valLoss"})
    plan = plan_sweep(made)
    trial = trial_config(made, plan, plan.trials[1])
    assert trial.training.learning_rate == plan.trials[1].values["training.learningRate"]
    assert trial.output.path == "s3://runs/flowers/trials/trial-001/"
    assert trial.training.select_by == "valLoss" and plan.mode == "min"
    assert trial.sweep is None and trial.run_name.startswith(made.run_name + ".")
    assert trial.run_name != trial_config(made, plan, plan.trials[0]).run_name


def history(*accuracies: float) -> list[dict[str, Any]]:
    return [{"epoch": i + 1, "valAccuracy": a, "valLoss": 1 - a} for i, a in enumerate(accuracies)]


def test_the_best_is_the_best_done_trial_and_sweep_json_says_what_each_did() -> None:
    made = config({"parameters": [RATE], "trials": 4, "maxConcurrentTrials": 2})
    plan = plan_sweep(made)
    done = {"last": "s3://runs/flowers/trials/x/c2", "best": "s3://runs/flowers/trials/x/c1"}
    records = [
        TrialRecord(
            plan.sweep_id, "trial-000", dict(plan.trials[0].values), "done", history(0.7, 0.8, 0.85, 0.86, 0.9), done
        ),
        TrialRecord(plan.sweep_id, "trial-001", dict(plan.trials[1].values), "stopped", history(0.95)),
        TrialRecord(plan.sweep_id, "trial-002", dict(plan.trials[2].values), "failed", [], reason="out of memory"),
    ]
    assert best_trial(records, "valAccuracy") is records[0]  # the stopped one has no exported checkpoint
    document = sweep_document(plan, made, records)
    assert document["best"] == {"trial": "trial-000", "value": 0.9, "parameters": plan.trials[0].values}
    stopped = document["trials"][1]
    assert stopped["stoppedEarly"] and stopped["epochs"] == 1 and stopped["ofEpochs"] == 5
    assert document["trials"][0]["final"]["valAccuracy"] == 0.9 and document["trials"][0]["curve"][0] == 0.7
    assert document["trials"][2]["reason"] == "out of memory"
    assert TrialRecord.from_wire(records[0].wire()) == records[0]

    progress = sweep_progress(plan, records, 1, ("trial-000", 0.9, plan.trials[0].values))
    assert (progress.trials, progress.pending, progress.running) == (4, 0, 1)
    assert (progress.done, progress.stopped, progress.failed) == (1, 1, 1)
    assert progress.best_trial == "trial-000" and progress.best_value == 0.9
    assert set(progress.best_parameters) == {"training.learningRate"}


class Collected:
    def __init__(self) -> None:
        self.updates: list[Any] = []

    def report(self, update: Any) -> None:
        self.updates.append(update)

    def close(self) -> None:
        pass


def trial_update(epoch: int, accuracy: float, trial_id: str) -> dict[str, Any]:
    from kubetune_trainer.sweep_progress import TRIAL_KEY

    return {
        "epoch": epoch,
        "totalEpochs": 5,
        "step": epoch * 10,
        "totalSteps": 50,
        "percent": epoch * 20.0,
        "metrics": {"valAccuracy": accuracy, "trainLoss": 0.5},
        "phase": "Checkpointing",
        TRIAL_KEY: trial_id,
    }


def test_each_trial_gets_its_console_line_and_the_operator_the_best_trial_with_the_sweep() -> None:
    import io

    from kubetune_trainer.sweep_progress import SweepBoard, SweepRouter

    made = config({"parameters": [RATE], "trials": 3, "maxConcurrentTrials": 2})
    plan = plan_sweep(made)
    board = SweepBoard(plan, [], max_failures=1)
    operator, console = Collected(), io.StringIO()
    router = SweepRouter(board, operator, console)
    board.started("trial-000")
    board.started("trial-001")
    router.handle(trial_update(1, 0.6, "trial-000"))
    router.handle(trial_update(2, 0.9, "trial-001"))
    router.handle(trial_update(2, 0.7, "trial-000"))

    lines = console.getvalue().splitlines()
    assert [line.split(":")[0] for line in lines] == ["trial-000", "trial-001", "trial-000"]
    assert lines[1].startswith("trial-001: epoch 2/5")
    last = operator.updates[-1]
    assert last.epoch == 2 and last.metrics.val_accuracy == 0.9  # the best trial's own, not the latest
    assert (last.sweep.running, last.sweep.pending, last.sweep.best_trial) == (2, 1, "trial-001")
    assert last.sweep.best_value == 0.9
    assert last.sweep.best_parameters == {
        "training.learningRate": f"{plan.trials[1].values['training.learningRate']:.6g}"
    }


def test_a_trials_train_controller_is_held_for_the_driver_to_end_its_run_and_never_shown() -> None:
    """A trial's controller hands the driver its handle (`sweep.controller_handle`): the driver keeps it to
    abort the run when Tune ends the trial (`sweep.end_train_run`), and hands it out once; it is no update."""
    import io

    from kubetune_trainer.relay import EVENT
    from kubetune_trainer.sweep_progress import CONTROLLER_EVENT, TRIAL_KEY, SweepBoard, SweepRouter

    board = SweepBoard(plan_sweep(config({"parameters": [RATE], "trials": 2})), [], max_failures=1)
    operator, console = Collected(), io.StringIO()
    router = SweepRouter(board, operator, console)
    board.started("trial-001")
    handle = object()
    router.handle({EVENT: CONTROLLER_EVENT, "handle": handle, TRIAL_KEY: "trial-001"})

    assert console.getvalue() == "" and operator.updates == []
    assert board.take_controller("trial-000") is None
    assert board.take_controller("trial-001") is handle
    assert board.take_controller("trial-001") is None  # handed out once: the driver holds no ended run


def test_the_driver_reads_a_trials_checkpoints_record_where_the_trial_writes_it() -> None:
    """The trial writes fitted.json in its own output (already trials/<id>/): were the two paths to differ,
    every trial that trained to its end would be taken as stopped, and the sweep would fail with no model."""
    from kubetune_trainer.sweep_plan import TRIAL_FITTED, fitted_file, trial_config, trial_file

    made = config({"parameters": [RATE], "trials": 2})
    plan = plan_sweep(made)
    for trial in plan.trials:
        written = fitted_file(trial_config(made, plan, trial))
        assert written == trial_file(made, trial.id, TRIAL_FITTED)
        assert written.endswith(f"/trials/{trial.id}/fitted.json")


def test_a_record_read_back_counts_only_when_this_sweep_wrote_it_for_that_trial() -> None:
    """Whoever can write the output bucket writes trials/<id>/trial.json too: a record of another trial or
    sweep, one whose checkpoints lie outside its trial's folder (the export would read them as the job's
    model), or no record at all is not taken as finished, and a record's values are the plan's."""
    from kubetune_trainer.sweep_plan import own_record

    made = config({"parameters": [RATE], "trials": 2})
    plan = plan_sweep(made)
    trial = plan.trials[1]
    folder = "s3://runs/flowers/trials/trial-001/checkpoints"
    done = {"last": f"{folder}/checkpoint_2", "best": f"{folder}/checkpoint_1"}
    wire = TrialRecord(plan.sweep_id, trial.id, dict(trial.values), "done", history(0.7), done).wire()
    own = own_record(made, plan, trial, wire)
    assert own is not None and own.checkpoints == done and own.values == trial.values
    # Where the trial's Ray Train run does keep its checkpoints counts as its folder.
    from kubetune_trainer.run import checkpoints_uri
    from kubetune_trainer.sweep_plan import in_trial_folder

    kept = checkpoints_uri(trial_config(made, plan, trial)).join(made.run_name + ".x.001", "checkpoint_000003")
    assert in_trial_folder(made, trial.id, str(kept))

    forged_values = own_record(made, plan, trial, {**wire, "parameters": {"training.learningRate": "x" * 10_000}})
    assert forged_values is not None and forged_values.values == trial.values
    elsewhere = [
        "s3://other-bucket/model/",
        "s3://runs/flowers/trials/trial-000/checkpoints/checkpoint_1",
        f"{folder}/../../trial-000/checkpoints/checkpoint_1",
        "s3://runs/flowers/trials/trial-001-evil/x",
    ]
    for uri in elsewhere:
        assert own_record(made, plan, trial, {**wire, "checkpoints": {**done, "best": uri}}) is None, uri
    for raw in [None, [], "text", {**wire, "id": "trial-000"}, {**wire, "sweepId": "another"}, {**wire, "state": 1}]:
        assert own_record(made, plan, trial, raw) is None, raw
