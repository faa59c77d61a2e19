"""The optimizer and the learning-rate schedule of a run, from `training` (TrainingSpec)."""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import torch

from kubetune_trainer.config import TrainingSpec


def lr_factor(training: TrainingSpec, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning-rate multiplier per optimizer step: linear warm-up, then cosine, constant or step decay.

    `step` decays tenfold at 1/3 and 2/3 of the epochs after warm-up.
    """
    warmup = training.warmup_epochs * steps_per_epoch
    total = max(1, training.epochs * steps_per_epoch - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / total)
        if training.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if training.scheduler == "step":
            return 0.1 ** math.floor(progress * 3)
        return 1.0

    return factor


def make_optimizer(groups: list[dict[str, Any]], training: TrainingSpec) -> torch.optim.Optimizer:
    """AdamW or SGD with Nesterov momentum over `model.param_groups`."""
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=training.learning_rate, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=training.learning_rate)


def make_schedule(optimizer: torch.optim.Optimizer, training: TrainingSpec, steps_per_epoch: int) -> Any:
    """The per-step schedule of `lr_factor` (stepped by the step, saved in checkpoints)."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(training, steps_per_epoch))
