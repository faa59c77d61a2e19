"""Faults on demand, through the trainer's test seam (`kubetune_trainer.callbacks`).

Each constant is the environment a run needs for its fault: the driver and its local Ray workers import
this module (the repository on PYTHONPATH).

- `FAIL_ONCE_AFTER_FIRST_EPOCH`: rank 0 raises `InjectedFaultError` once, before the first step after
  epoch 1's checkpoint and once Ray Train has committed it, in an attempt that did not itself resume;
  Ray Train then restarts the workers from that checkpoint.
- `SIGTERM_LAST_RANK_MID_EPOCH_2`: the last rank sends its own process SIGTERM (a preemption notice, as
  the pods' preStop hook sends it) after the second step of epoch 2, in an attempt that did not resume.
- `MARK_MID_EPOCH_2`: rank 0 writes the file MARK_ENV names after the second step of epoch 2 (in an
  attempt that did not resume) and pauses until the preemption notice the test then sends reaches it (at
  most NOTICE_WAIT_S), so that the notice lands at that step however slowly a loaded machine passes it
  on. Without MARK_ENV set it does nothing: a test world can install it for every job and set MARK_ENV
  (not a KUBETUNE_ name, so a FineTuneJob's podTemplate may) on the one job it wants to pause.
- `HOLD_FOR_RESIZE`: from epoch 2 on, the workers of an elastic run hold (take no step) at each worker
  count until Ray Train replaces them, after rank 0 wrote `w<count>` into the folder ELASTIC_MARKS_ENV
  names; once 2 have trained, 1 goes on to the end. So the run cannot end before a test has grown it to 2
  workers and shrunk it back to 1, however fast the machine trains. Each hold comes after a pause of a
  second at the attempt's first step, so a mid-epoch checkpoint (`checkpointEvery: 1s`) precedes it.
"""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from kubetune_trainer.callbacks import CALLBACKS_ENV, STEP_CALLBACKS_ENV
from tests.support.paths import REPO

FAIL_AFTER_EPOCH = 1
COMMIT_WAIT_S = 300.0  # the longest the fault waits for Ray Train to commit epoch 1's checkpoint


class InjectedFaultError(RuntimeError):
    """The failure the tests inject."""


def fail_once_after_first_epoch(worker: Any, state: Any) -> None:
    """An epoch callback (`loop.Worker`, `loop.TrainState`)."""
    if worker.rank == 0 and state.epoch == FAIL_AFTER_EPOCH and state.resumed_from is None:
        # After epoch 1's checkpoint: it uploads in the background (CheckpointUploadMode.ASYNC), and Ray
        # Train commits it once every worker's report arrived; a failure before that would restart from
        # scratch, and this attempt-keyed fault would fire again in every attempt. Ray's controller answers
        # once it has processed every report this worker made (not after a guessed pause: a loaded machine
        # takes longer).
        import ray.train

        ray.train.get_all_reported_checkpoints(ray.train.CheckpointConsistencyMode.COMMITTED, timeout_s=COMMIT_WAIT_S)
        raise InjectedFaultError(f"injected worker failure after epoch {state.epoch}")


SPOILED_EPOCH = 3


def spoil_the_third_epoch(worker: Any, state: Any) -> None:
    """An epoch callback: before epoch 3 (SPOILED_EPOCH), seeded noise on every weight (frozen ones too),
    so it and every epoch after it are worse than the first two: the best checkpoint is an earlier one, and
    early stopping ends the run."""
    import torch

    if state.epoch == SPOILED_EPOCH - 1:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in state.model.parameters():
                noise = torch.randn(parameter.shape, generator=generator) * parameter.detach().abs().mean()
                parameter.add_(noise.to(parameter.device) * 3)


MID_EPOCH_BATCH = 2  # of epoch 2 (1-based): the fault comes after this many of its steps
MARK_ENV = "TEST_PAUSE_MARK"  # not KUBETUNE_: spec.podTemplate refuses those
NOTICE_WAIT_S = 120.0  # the longest the pause at the mark waits for the notice (then the run goes on)


def _mid_epoch_2(worker: Any, state: Any) -> bool:
    """In epoch 2 of a first attempt, right after its MID_EPOCH_BATCH-th step."""
    per_step = worker.world * worker.config.training.batch_size
    return state.epoch == 1 and state.resumed_from is None and state.epoch_samples == MID_EPOCH_BATCH * per_step


def sigterm_last_rank_mid_epoch_2(worker: Any, state: Any) -> None:
    """A step callback (`loop.Worker`, `loop.TrainState`)."""
    if worker.rank == worker.world - 1 and _mid_epoch_2(worker, state):
        os.kill(os.getpid(), signal.SIGTERM)


def mark_mid_epoch_2(worker: Any, state: Any) -> None:
    """A step callback: the mark (written whole: the test reads the step as soon as the file exists), then
    a pause until this worker holds the notice the test sends on seeing it (a SIGTERM to it, or the driver's
    through the GCS, which the worker polls every few seconds)."""
    from kubetune_trainer.preemption import local_notice

    mark = os.environ.get(MARK_ENV)
    if mark and worker.rank == 0 and _mid_epoch_2(worker, state):
        staged = Path(f"{mark}.partial")
        staged.write_text(str(state.step))
        staged.replace(mark)
        deadline = time.monotonic() + NOTICE_WAIT_S
        while local_notice() is None and time.monotonic() < deadline:
            time.sleep(0.1)


def fault_env(variable: str, function: Any) -> dict[str, str]:
    """The environment that makes a `kubetune run --local` (or `python -m kubetune_trainer`) call `function`."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {variable: f"{__name__}:{function.__name__}", "PYTHONPATH": path}


FAIL_ONCE_AFTER_FIRST_EPOCH = fault_env(CALLBACKS_ENV, fail_once_after_first_epoch)
SIGTERM_LAST_RANK_MID_EPOCH_2 = fault_env(STEP_CALLBACKS_ENV, sigterm_last_rank_mid_epoch_2)
MARK_MID_EPOCH_2 = fault_env(STEP_CALLBACKS_ENV, mark_mid_epoch_2)
SPOIL_THE_THIRD_EPOCH = fault_env(CALLBACKS_ENV, spoil_the_third_epoch)


ELASTIC_MARKS_ENV = "TEST_ELASTIC_MARKS"  # not KUBETUNE_: spec.podTemplate refuses those
# The longest a hold waits for Ray Train to replace the workers (then the run goes on). A hold ends as they
# are replaced, so only a run that went wrong waits it out: the margin (90 s before) is for a loaded
# machine, where the elastic job trains beside two others (busy_world.MAX_TRAINING) while a node joins.
HOLD_S = 300.0
HOLD_AFTER_STEPS = 3  # of an attempt: the first, a pause, then a step or two for the checkpoint's vote
_attempt_steps = 0  # steps this worker process took in epoch 2 or later (a Ray Train worker is one attempt)


def hold_for_resize(worker: Any, state: Any) -> None:
    """A step callback (`loop.Worker`, `loop.TrainState`); see the module's docstring."""
    global _attempt_steps
    folder = os.environ.get(ELASTIC_MARKS_ENV)
    if not folder or state.epoch < 1 or (worker.world == 1 and (Path(folder) / "w2").exists()):
        return
    _attempt_steps += 1
    if _attempt_steps == 1:
        time.sleep(1.2)  # checkpointEvery 1s: the cadence checkpoints this step or the next
    if _attempt_steps != HOLD_AFTER_STEPS:
        return
    if worker.rank == 0:
        (Path(folder) / f"w{worker.world}").write_text(str(state.step))
    time.sleep(HOLD_S)


HOLD_FOR_RESIZE = fault_env(STEP_CALLBACKS_ENV, hold_for_resize)
