"""Resume: a killed driver and a failed worker both continue from the last checkpoint in S3.

Either way the run ends with exactly `epochs` entries in history.json (none lost, none doubled).
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor

import pytest
import torch
from safetensors.torch import load

from tests.support.digits_world import PRETRAINED, SMALL_TRAIN, DigitsWorld
from tests.support.trainer_faults import FAIL_ONCE_AFTER_FIRST_EPOCH


def wait_for_checkpoint(world: DigitsWorld, prefix: str, proc_alive: object, timeout: float = 300) -> None:
    """Until Ray Train has recorded a checkpoint of the run at `prefix` (its snapshot names it)."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        keys = world.keys(prefix)
        if any(k.endswith("/checkpoint_manager_snapshot.json") for k in keys) and any(
            k.endswith("/progress.json") for k in keys
        ):
            return
        assert callable(proc_alive) and proc_alive(), "the run ended before its first checkpoint"
        time.sleep(0.1)
    raise AssertionError(f"no checkpoint under {prefix} after {timeout}s")


def kill_group(pid: int) -> None:
    """SIGKILL the driver and the local Ray instance it started (they share a process group)."""
    os.killpg(pid, signal.SIGKILL)
    for _ in range(100):
        try:
            os.killpg(pid, 0)
        except ProcessLookupError:
            return
        time.sleep(0.1)


@pytest.mark.slow
def test_killed_driver_resumes_from_its_last_checkpoint(pretrained: DigitsWorld, small_digits: str) -> None:
    output, epochs = "s3://results/resume/driver", 4
    spec = {
        "output": output,
        "train": small_digits,
        "validation": None,
        "epochs": epochs,
        "strategy": "full",
        "trainable_layers": None,
    }
    manifest = pretrained.job("resume-driver", **spec)
    run = pretrained.run_uri("resume-driver", **spec)
    first = pretrained.kubetune_popen(manifest)
    try:
        wait_for_checkpoint(pretrained, run, lambda: first.poll() is None)
    finally:
        kill_group(first.pid)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    assert "resume/driver/model.json" not in pretrained.keys(output)

    second = pretrained.kubetune_run(manifest, timeout=500)  # beside the failed-worker run

    assert second.returncode == 0, second.stderr
    resumed = re.search(rf"resumed from {re.escape(run)}/epoch-(\d+) after epoch (\d+)", second.stderr)
    assert resumed, second.stderr
    assert 1 <= int(resumed[2]) < epochs, "the first run was killed only after it had finished training"
    history = json.loads(pretrained.get(f"{output}/history.json"))
    assert [e["epoch"] for e in history] == list(range(1, epochs + 1))
    card = json.loads(pretrained.get(f"{output}/model.json"))
    assert card["epochs"] == epochs and card["metrics"]["valAccuracy"] == history[-1]["valAccuracy"]

    # The same job with `model.resume: never` starts over beside the finished run (a run of its own), and
    # so does every run of it.
    never = pretrained.job("resume-driver", **spec, resume="never")
    third = pretrained.kubetune_run(never)

    assert third.returncode == 0, third.stderr
    assert "resumed from" not in third.stderr
    folder = re.search(r"checkpoints under (s3://\S+?)/?$", third.stderr, re.MULTILINE)
    assert folder and folder[1].startswith(f"{run}.") and len(folder[1]) > len(run) + 30, third.stderr


WORKER_OUTPUT, WORKER_EPOCHS = "s3://results/resume/worker", 3
# Two DDP workers of one CPU each: rank 0 fails, the whole group restarts from the checkpoint.
WORKER_SPEC = {
    "output": WORKER_OUTPUT,
    "train": SMALL_TRAIN,
    "validation": None,
    "epochs": WORKER_EPOCHS,
    "strategy": "head",
    "trainable_layers": None,
    "workers": 2,
    "cpus_per_worker": 1,
}


@pytest.fixture(scope="module", autouse=True)
def worker_failure(pretrained: DigitsWorld, small_digits: str) -> Iterator[Future[subprocess.CompletedProcess[str]]]:
    """The failed-worker run, started with the module so that it trains beside the killed-driver test's
    runs (each run with its own local Ray: much of a run is Ray starting and stopping, which two overlap)."""
    manifest = pretrained.job("resume-worker", **WORKER_SPEC)
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(pretrained.kubetune_run, manifest, timeout=500, **FAIL_ONCE_AFTER_FIRST_EPOCH)


@pytest.mark.slow
def test_failed_worker_restarts_from_checkpoint_and_frozen_layers_stay(
    pretrained: DigitsWorld, worker_failure: Future[subprocess.CompletedProcess[str]]
) -> None:
    output, epochs = WORKER_OUTPUT, WORKER_EPOCHS
    run_uri = pretrained.run_uri("resume-worker", **WORKER_SPEC)

    run = worker_failure.result()

    assert run.returncode == 0, run.stderr
    assert f"resumed from {run_uri}/epoch-0001 after epoch 1" in run.stderr
    # The driver saw the failure through Ray Train's controller and said what happens next.
    assert "worker failure 1 (rank 0): InjectedFaultError" in run.stderr, run.stderr
    assert "Ray Train restarts the workers from the latest checkpoint" in run.stderr
    history = json.loads(pretrained.get(f"{output}/history.json"))
    assert [e["epoch"] for e in history] == list(range(1, epochs + 1))
    checkpoint = pretrained.keys(f"{run_uri}/epoch-0003")
    assert {k.rsplit("/", 1)[1] for k in checkpoint} >= {"model.safetensors", "rng-rank0.pt", "rng-rank1.pt"}
    card = json.loads(pretrained.get(f"{output}/model.json"))
    assert card["data"]["trainImages"] + card["data"]["validationImages"] == 300

    # strategy head: everything but the classifier is bit-identical to the base weights (BatchNorm
    # statistics included), even across the restart.
    base = load(pretrained.get(PRETRAINED))
    tuned = load(pretrained.get(f"{output}/model.safetensors"))
    assert set(tuned) == set(base)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {"fc.weight", "fc.bias"}
