"""The optimizer and the learning-rate schedule of a run, from `training` (TrainingSpec)."""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from typing import Any

import torch

from kubetune_trainer.config import WARMUP_FRACTION, TrainingSpec
from kubetune_trainer.model import TrainablePlan, stage_scales


def warmup_steps(training: TrainingSpec, steps_per_epoch: int) -> int:
    """Steps of linear warm-up: `warmupEpochs` epochs, or the first WARMUP_FRACTION of the run without it.

    Measured on the quality benchmark: without a warm-up, the rates a range test finds make some runs
    collapse in their first steps (a new head's large gradients through pretrained features).
    """
    if training.warmup_epochs is not None:
        return training.warmup_epochs * steps_per_epoch
    return round(WARMUP_FRACTION * training.epochs * steps_per_epoch)


def lr_factor(training: TrainingSpec, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning-rate multiplier per optimizer step: linear warm-up, then cosine, constant or step decay.

    `step` decays tenfold at 1/3 and 2/3 of the epochs after warm-up.
    """
    warmup = warmup_steps(training, steps_per_epoch)
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
    """AdamW or SGD with Nesterov momentum over `model.param_groups` (each group carries its own rate)."""
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=groups[0]["lr"], momentum=0.9, nesterov=True)
    # On CPU, torch's default AdamW updates one parameter tensor at a time (its multi-tensor path is for
    # accelerators): profiled, that was about a fifth of a resnet18 epoch's CPU time. The fused kernel makes
    # the same update ~3-7x cheaper (bench/findings.md, "Where the time goes"). Accelerators keep torch's
    # default.
    on_cpu = all(param.device.type == "cpu" for group in groups for param in group["params"])
    return torch.optim.AdamW(groups, lr=groups[0]["lr"], fused=True if on_cpu else None)


def make_schedule(
    optimizer: torch.optim.Optimizer,
    training: TrainingSpec,
    steps_per_epoch: int,
    factor: Callable[[int], float] | None = None,
) -> Any:
    """The per-step schedule of `lr_factor` (or `factor`: the range test's sweep), saved in checkpoints."""
    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor or lr_factor(training, steps_per_epoch))


def effective_training(
    training: TrainingSpec,
    trainable: TrainablePlan,
    rates: tuple[float, float],
    steps_per_epoch: int,
    augment: Mapping[str, Any],
    range_test: Mapping[str, Any] | None = None,
) -> dict[str, Any]:
    """What the run trains with, as model.json (`effectiveTraining`) and the status (`progress.training`)
    say it: the head's peak rate and where it came from, each trained backbone stage's (input side
    first), the warm-up, and the augmentation."""
    learning_rate, backbone_scale = rates  # the head's, and the top backbone stage's share of it
    scales = stage_scales(len(trainable.backbone_stages), backbone_scale, training.layer_decay)
    out: dict[str, Any] = {
        "learningRate": learning_rate,
        "learningRateSource": "rangeTest" if range_test is not None else "spec",
        "backboneLearningRates": [learning_rate * scale for scale in scales],
        "warmupSteps": warmup_steps(training, steps_per_epoch),
        "totalSteps": training.epochs * steps_per_epoch,
        "augment": dict(augment),
    }
    if range_test is not None:
        out["rangeTest"] = dict(range_test)
    return out
