"""Preemption: a notice mid-epoch checkpoints that step, and the run resumes from it as if never stopped.

One uninterrupted run is the reference; the same job interrupted mid-epoch (SIGTERM to a Ray Train worker,
in the same run of the driver; SIGTERM to the driver, resumed by running it again) must end with the
same weights, within float tolerance, and exactly one history entry per epoch. The interrupted runs
also checkpoint every second (`checkpointEvery: 1s`): checkpoints uploaded in the background while
training goes on change nothing either. Every training option is on (`OPTIONS`): each one's state (the
weights' moving average, the numpy generator mixup draws from, the position of an epoch in accumulated
steps) must come back from the checkpoint too.
"""

from __future__ import annotations

import json
import re
import signal
import time
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import torch
from safetensors.torch import load

from tests.support.digits_world import DigitsWorld
from tests.support.trainer_faults import MARK_ENV, MARK_MID_EPOCH_2, SIGTERM_LAST_RANK_MID_EPOCH_2

pytestmark = pytest.mark.slow
EPOCHS = 3
# Every training option that keeps state or draws random numbers (docs/trainer.md, "Training options").
OPTIONS = {
    "accumulateSteps": 2,
    "gradientClipNorm": 5.0,
    "labelSmoothing": 0.1,
    "mixupAlpha": 0.2,
    "cutmixAlpha": 1.0,
    "randAugment": "rand-m5-n1",
    "emaDecay": 0.9,
}
# Two DDP workers of one CPU: the notice reaches one of them, both must checkpoint the same step.
# augment: each image's augmentation must come out the same after a resume.
SPEC: dict[str, Any] = {
    "training": OPTIONS,
    "validation": None,
    "epochs": EPOCHS,
    "strategy": "full",
    "trainable_layers": None,
    "batch_size": 16,
    "workers": 2,
    "cpus_per_worker": 1,
    "augment": True,
    "run_policy": {"preemptionGraceSeconds": 30},
}
MID_EPOCH = re.compile(r"/epoch-0001-step-(\d{8})")


def weights(world: DigitsWorld, output: str) -> dict[str, torch.Tensor]:
    return load(world.get(f"{output}/model.safetensors"))


def assert_same_training(world: DigitsWorld, output: str, reference: str) -> None:
    """The same weights and history as the uninterrupted run (timings aside)."""
    got, want = weights(world, output), weights(world, reference)
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)
    history = json.loads(world.get(f"{output}/history.json"))
    expected = json.loads(world.get(f"{reference}/history.json"))
    assert [e["epoch"] for e in history] == list(range(1, EPOCHS + 1))
    for entry, want_entry in zip(history, expected, strict=True):
        for key in ("trainLoss", "valLoss", "valAccuracy", "learningRate"):
            assert entry[key] == pytest.approx(want_entry[key], rel=1e-5, abs=1e-7), (entry["epoch"], key)


def run_reference(world: DigitsWorld, small_digits: str) -> str:
    output = "s3://results/preemption/reference"
    run = world.kubetune_run(world.job("preempt-reference", output=output, train=small_digits, **SPEC), timeout=500)
    assert run.returncode == 0, run.stderr
    return output


@pytest.fixture(scope="module")
def reference(pretrained: DigitsWorld, small_digits: str) -> Iterator[Future[str]]:
    """The uninterrupted run, in the background beside the first interrupted one (each with its own local
    Ray: much of a run is Ray starting and stopping, which two runs overlap); `.result()` is its output."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(run_reference, pretrained, small_digits)


def test_sigterm_to_a_worker_checkpoints_the_step_and_the_run_resumes_from_it(
    pretrained: DigitsWorld, small_digits: str, reference: Future[str]
) -> None:
    output = "s3://results/preemption/worker"
    spec = {**SPEC, "output": output, "train": small_digits, "checkpoint_every": "1s"}
    manifest = pretrained.job("preempt-worker", **spec)

    run = pretrained.kubetune_run(manifest, timeout=500, **SIGTERM_LAST_RANK_MID_EPOCH_2)  # beside the reference

    assert run.returncode == 0, run.stderr
    assert "preemption notice" in run.stderr, run.stderr
    # The workers checkpointed a step of epoch 2 and Ray Train restarted them from it: a preemption, not a
    # worker failure, and no step lost.
    resumed = re.search(rf"resumed from {re.escape(pretrained.run_uri('preempt-worker', **spec))}(\S+)", run.stderr)
    assert resumed and MID_EPOCH.fullmatch(resumed[1]), run.stderr
    assert re.search(
        r"preemption 1: Ray Train restarts the workers from \S+ \(step \d+\); 0 step\(s\) lost", run.stderr
    )
    assert "worker failure" not in run.stderr
    assert_same_training(pretrained, output, reference.result())


def test_sigterm_to_the_driver_checkpoints_the_step_and_a_new_run_resumes_from_it(
    pretrained: DigitsWorld, small_digits: str, reference: Future[str], tmp_path: Path
) -> None:
    output = "s3://results/preemption/driver"
    spec = {**SPEC, "output": output, "train": small_digits, "checkpoint_every": "1s"}
    manifest = pretrained.job("preempt-driver", **spec)
    mark = tmp_path / "mark"

    first = pretrained.kubetune_popen(manifest, **MARK_MID_EPOCH_2, **{MARK_ENV: str(mark)})
    deadline = time.monotonic() + 300
    while not mark.exists() and first.poll() is None and time.monotonic() < deadline:
        time.sleep(0.1)
    first.send_signal(signal.SIGTERM)  # the driver alone, as the head pod's preStop hook does
    out, _ = first.communicate(timeout=120)

    assert first.returncode == 143, out
    stopped = re.search(
        r"kubetune: preempted: SIGTERM: the workers checkpointed the current step; the run resumes from (\S+)", out
    )
    assert stopped and MID_EPOCH.search(stopped[1]), out

    second = pretrained.kubetune_run(manifest)

    assert second.returncode == 0, second.stderr
    assert f"resumed from {stopped[1]} after epoch 1" in second.stderr
    assert_same_training(pretrained, output, reference.result())
