"""Resume: a killed driver and a failed worker both continue from the last checkpoint in S3.

Either way the run ends with exactly `epochs` entries in history.json (none lost, none doubled).
"""

from __future__ import annotations

import json
import os
import signal
import time

import pytest
import torch
from digits_world import PRETRAINED, DigitsWorld
from safetensors.torch import load

from kubetune_trainer.loop import FAULT_ENV


def wait_for_checkpoint(world: DigitsWorld, run: str, output: str, proc_alive: object, timeout: float = 300) -> None:
    """Until Ray Train has recorded a checkpoint of `run` (its snapshot names it)."""
    deadline = time.monotonic() + timeout
    prefix = f"{output}/checkpoints/{run}"
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
def test_killed_driver_resumes_from_its_last_checkpoint(pretrained: DigitsWorld) -> None:
    output, epochs = "s3://results/resume/driver", 5
    manifest = pretrained.job(
        "resume-driver", output=output, epochs=epochs, validation=None, strategy="full", trainable_layers=None
    )
    first = pretrained.kubetune_popen(manifest)
    try:
        wait_for_checkpoint(pretrained, "resume-driver", output, lambda: first.poll() is None)
    finally:
        kill_group(first.pid)
        first.wait(timeout=30)
    assert first.returncode == -signal.SIGKILL
    assert "resume/driver/model.json" not in pretrained.keys(output)

    second = pretrained.kubetune_run(manifest)

    assert second.returncode == 0, second.stderr
    assert f"resumed from {output}/checkpoints/resume-driver/epoch-000" in second.stderr
    history = json.loads(pretrained.get(f"{output}/history.json"))
    assert [e["epoch"] for e in history] == list(range(1, epochs + 1))
    card = json.loads(pretrained.get(f"{output}/model.json"))
    assert card["epochs"] == epochs and card["metrics"]["valAccuracy"] == history[-1]["valAccuracy"]


@pytest.mark.slow
def test_failed_worker_restarts_from_checkpoint_and_frozen_layers_stay(pretrained: DigitsWorld) -> None:
    output, epochs = "s3://results/resume/worker", 3
    manifest = pretrained.job(
        "resume-worker", output=output, epochs=epochs, validation=None, strategy="head", trainable_layers=None
    )

    run = pretrained.kubetune_run(manifest, **{FAULT_ENV: "1"})

    assert run.returncode == 0, run.stderr
    assert f"resumed from {output}/checkpoints/resume-worker/epoch-0001 after epoch 1" in run.stderr
    history = json.loads(pretrained.get(f"{output}/history.json"))
    assert [e["epoch"] for e in history] == list(range(1, epochs + 1))

    # strategy head: everything but the classifier is bit-identical to the base weights (BatchNorm
    # statistics included), even across the restart.
    base = load(pretrained.get(PRETRAINED))
    tuned = load(pretrained.get(f"{output}/model.safetensors"))
    assert set(tuned) == set(base)
    changed = {k for k in base if not torch.equal(base[k], tuned[k])}
    assert changed == {"fc.weight", "fc.bias"}
