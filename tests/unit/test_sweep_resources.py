"""A sweep's resources and status, operator side: the Ray cluster holds resources.workers for each trial that
trains at once, the spec refuses what one cluster cannot hold, `kubetune render` prints the plan, and a
progress update's trials go to status.sweep, not into status.progress."""

from __future__ import annotations

import subprocess
import sys
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubetune_operator.builders import build_rayjob
from kubetune_operator.messages import format_validation_error
from kubetune_operator.progress import status_patch
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.spec import FineTuneJob, FineTuneJobStatus
from kubetune_trainer.config import MAX_WORKERS
from kubetune_trainer.progress_model import ProgressUpdate
from tests.support.paths import REPO

KUBETUNE = Path(sys.executable).with_name("kubetune")
SETTINGS = OperatorSettings(trainer_image="registry.example/kubetune-trainer:1.2.3")
NOW = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)
LEARNING_RATES = {"field": "training.learningRate", "loguniform": {"min": 0.0001, "max": 0.1}}


def manifest(workers: Any = 2, gpus: int = 1, **sweep: Any) -> dict[str, Any]:
    spec: dict[str, Any] = {
        "model": {"architecture": "resnet18", "checkpoint": "s3://models/base/resnet18.safetensors"},
        "data": {"train": "s3://datasets/flowers/train/"},
        "output": {"path": "s3://runs/flowers/"},
        "training": {"epochs": 10},
        "resources": {"workers": workers, "gpusPerWorker": gpus},
    }
    if sweep:
        spec["sweep"] = {"parameters": [LEARNING_RATES], **sweep}
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "flowers"}, "spec": spec}


def worker_group(doc: dict[str, Any]) -> dict[str, Any]:
    rayjob = build_rayjob(FineTuneJob.from_body(doc), SETTINGS)
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    return {key: group[key] for key in ("replicas", "minReplicas", "maxReplicas")}


def refusal(doc: dict[str, Any]) -> str:
    with pytest.raises(ValidationError) as caught:
        FineTuneJob.from_body(doc)
    (line,) = format_validation_error(caught.value, "job.yaml", model=FineTuneJob)
    return line


# -- the Ray cluster ------------------------------------------------------------------------------------


def test_a_sweep_s_cluster_holds_the_workers_of_each_trial_at_once() -> None:
    assert worker_group(manifest(workers=2, trials=8, maxConcurrentTrials=3)) == dict.fromkeys(
        ("replicas", "minReplicas", "maxReplicas"), 6
    )
    # One trial at once (the default), and a job that sweeps nothing: resources.workers as it is.
    assert worker_group(manifest(workers=2, trials=8))["replicas"] == 2
    assert worker_group(manifest(workers=2))["replicas"] == 2
    assert worker_group(manifest(workers={"min": 2, "max": 4})) == {"replicas": 2, "minReplicas": 2, "maxReplicas": 4}


def test_a_sweep_with_elastic_workers_is_refused_naming_the_field() -> None:
    line = refusal(manifest(workers={"min": 2, "max": 4}, trials=4))
    assert line.startswith("job.yaml: spec.resources.workers: a sweep (spec.sweep) needs a fixed number of workers")
    assert "{min: 2, max: 4}" in line and f"one number from 1 to {MAX_WORKERS}" in line


def test_a_sweep_whose_trials_at_once_outgrow_one_ray_cluster_is_refused() -> None:
    line = refusal(manifest(workers=64, trials=8, maxConcurrentTrials=5))
    assert line.startswith("job.yaml: spec.sweep.maxConcurrentTrials: ")
    assert f"resources.workers * maxConcurrentTrials must be at most {MAX_WORKERS}" in line
    assert "at most 4 with 64 workers per trial (got 5)" in line
    # Exactly a full cluster is fine.
    FineTuneJob.from_body(manifest(workers=64, trials=8, maxConcurrentTrials=4))


# -- kubetune render --------------------------------------------------------------------------------------


def render(doc: dict[str, Any], folder: Path) -> subprocess.CompletedProcess[str]:
    """`kubetune render job.yaml` through the console script, from the repository's root."""
    path = folder / "job.yaml"
    path.write_text(yaml.safe_dump(doc))
    return subprocess.run(
        [str(KUBETUNE), "render", str(path)], cwd=REPO, capture_output=True, text=True, timeout=120, check=False
    )


def test_render_prints_the_sweep_plan_ahead_of_objects_that_still_apply(tmp_path: Path) -> None:
    done = render(manifest(workers=2, gpus=4, trials=8, maxConcurrentTrials=3), tmp_path)
    assert done.returncode == 0, done.stderr
    plan = [line for line in done.stdout.splitlines() if line.startswith("#")]
    assert plan == [
        "# sweep plan of default/flowers: 8 trials, 3 at once",
        "#   per trial: 2 worker(s) x 4 GPUs = 8 GPUs",
        "#   Ray cluster: 6 worker(s), 24 GPUs (resources.workers x trials at once)",
        "#   GPU budget: at most 640 GPU-epochs (8 trials x 10 epochs x 8 GPUs per trial)",
        "#   scheduler: asha (gracePeriod 1, reductionFactor 3): poor trials stop early",
    ]
    assert done.stdout.startswith(plan[0])
    objects = [doc for doc in yaml.safe_load_all(done.stdout) if doc]
    assert [obj["kind"] for obj in objects] == ["ServiceAccount", "Secret", "NetworkPolicy", "RayJob"]
    (group,) = objects[-1]["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert group["replicas"] == 6


def test_render_of_the_example_sweep_from_the_repository_root() -> None:
    """`kubetune render examples/sweep.yaml`, as docs/sweeps.md has users type it."""
    done = subprocess.run(
        [str(KUBETUNE), "render", "examples/sweep.yaml"], cwd=REPO, capture_output=True, text=True, timeout=120
    )
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("# sweep plan of vision/defects-sweep: 12 trials, 3 at once\n")
    assert "#   GPU budget: at most 144 GPU-epochs (12 trials x 12 epochs x 1 GPU per trial)\n" in done.stdout
    rayjob = next(doc for doc in yaml.safe_load_all(done.stdout) if doc and doc["kind"] == "RayJob")
    assert rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["maxReplicas"] == 3


def test_render_says_what_a_cpu_sweep_with_fifo_takes(tmp_path: Path) -> None:
    done = render(manifest(workers=1, gpus=0, trials=2, scheduler={"type": "fifo"}), tmp_path)
    assert done.returncode == 0, done.stderr
    assert "#   GPU budget: CPU only (resources.gpusPerWorker 0): no GPU time\n" in done.stdout
    assert "#   scheduler: fifo: every trial trains all its epochs\n" in done.stdout


def test_render_of_a_job_that_sweeps_nothing_prints_no_plan(tmp_path: Path) -> None:
    done = render(manifest(), tmp_path)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith("apiVersion: v1\n") and "sweep plan" not in done.stdout


# -- status.sweep -----------------------------------------------------------------------------------------


def update(epoch: int, best: str, value: float, **counts: int) -> ProgressUpdate:
    sweep = {"trials": 4, "metric": "valAccuracy", "bestTrial": best, "bestValue": value, **counts}
    sweep["bestParameters"] = {"training.learningRate": f"0.00{epoch}"}
    position = {"epoch": epoch, "totalEpochs": 5, "step": epoch * 10, "totalSteps": 50, "percent": epoch * 20}
    return ProgressUpdate.model_validate({**position, "metrics": {"valAccuracy": value}, "sweep": sweep})


def test_a_sweep_s_trials_go_to_status_sweep_and_never_into_progress() -> None:
    patch = status_patch(None, update(3, "trial-001", 0.7, running=3, pending=1), NOW)
    assert patch is not None
    assert "sweep" not in patch["progress"]
    assert patch["sweep"] == {
        "trials": 4,
        "pending": 1,
        "running": 3,
        "done": 0,
        "stopped": 0,
        "failed": 0,
        "metric": "valAccuracy",
        "bestTrial": "trial-001",
        "bestValue": 0.7,
        "bestParameters": {"training.learningRate": "0.003"},
        "finished": "0/4",
    }
    # What the status model reads back (lenient on read) is what was written.
    read = FineTuneJobStatus.model_validate(patch).model_dump(by_alias=True, exclude_none=True, mode="json")
    assert read == {"conditions": [], **patch}


def test_a_new_best_trial_at_an_earlier_epoch_is_applied_as_sent() -> None:
    first = status_patch(None, update(3, "trial-001", 0.7, running=3, pending=1), NOW)
    later = status_patch(first, update(2, "trial-003", 0.8, running=1, done=1, stopped=2), NOW)
    assert later is not None
    assert (later["progress"]["epoch"], later["progress"]["metrics"]["valAccuracy"]) == (2, 0.8)
    assert (later["sweep"]["bestTrial"], later["sweep"]["finished"]) == ("trial-003", "3/4")
    # A run that sweeps nothing keeps its rule: an older position is ignored.
    single = ProgressUpdate.model_validate({"epoch": 2, "totalEpochs": 5, "step": 20, "totalSteps": 50, "percent": 40})
    assert status_patch({"progress": {"epoch": 3, "step": 30}}, single, NOW) is None
