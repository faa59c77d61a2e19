"""A worker failure on demand, through the trainer's test seam (`kubetune_trainer.callbacks`).

`FAIL_ONCE_AFTER_FIRST_EPOCH` is the environment a run needs for it: the driver and its local Ray workers
import this module (the repository on PYTHONPATH), and rank 0 raises `InjectedFaultError` once, before the first step after
epoch 1's checkpoint, in an attempt that did not itself resume; Ray Train then restarts the workers from
that checkpoint.
"""

from __future__ import annotations

import os
from typing import Any

from kubetune_trainer.callbacks import CALLBACKS_ENV
from tests.support.paths import REPO

FAIL_AFTER_EPOCH = 1


class InjectedFaultError(RuntimeError):
    """The failure the tests inject."""


def fail_once_after_first_epoch(worker: Any, state: Any) -> None:
    """An epoch callback (`loop.Worker`, `loop.TrainState`)."""
    if worker.rank == 0 and state.epoch == FAIL_AFTER_EPOCH and state.resumed_from is None:
        raise InjectedFaultError(f"injected worker failure after epoch {state.epoch}")


def spoil_the_last_epoch(worker: Any, state: Any) -> None:
    """An epoch callback: before the last epoch, seeded noise on every weight (frozen ones too), so the last
    epoch is the worst one and the best checkpoint is an earlier one."""
    import torch

    if state.epoch == worker.config.training.epochs - 1:
        generator = torch.Generator().manual_seed(0)
        with torch.no_grad():
            for parameter in state.model.parameters():
                noise = torch.randn(parameter.shape, generator=generator) * parameter.detach().abs().mean()
                parameter.add_(noise.to(parameter.device) * 3)


def fault_env(callback: Any = fail_once_after_first_epoch) -> dict[str, str]:
    """The environment that makes a `kubetune run --local` (or `python -m kubetune_trainer`) call `callback`
    before each epoch (by default: fail once)."""
    path = os.pathsep.join(p for p in (str(REPO), os.environ.get("PYTHONPATH", "")) if p)
    return {CALLBACKS_ENV: f"{__name__}:{callback.__name__}", "PYTHONPATH": path}


FAIL_ONCE_AFTER_FIRST_EPOCH = fault_env()
SPOIL_THE_LAST_EPOCH = fault_env(spoil_the_last_epoch)
