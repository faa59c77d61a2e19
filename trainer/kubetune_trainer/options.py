"""The training options of `training` (TrainingSpec) beyond the optimizer and schedule, each built here from
the spec, with timm's own implementations where timm has one; every one is off by default.

- `accumulateSteps`: `grouped` batches into one optimizer step (`steps.accumulated_step`), and the
  steps an epoch then has (`optimizer_steps`);
- `gradientClipNorm`: `steps.optimizer_step` clips;
- `labelSmoothing`, `mixupAlpha`, `cutmixAlpha` (classification): `classification_loss` and `batch_mixer`
  (timm's LabelSmoothingCrossEntropy, Mixup and SoftTargetCrossEntropy); `randAugment`: `augment.py`;
- `emaDecay`: `weight_average` (timm's ModelEmaV3, with its warm-up), which the loop updates after each
  optimizer step, validates, checkpoints and exports;
- `earlyStopping`: `stopped_early`, a function of the history alone, so a resumed run decides as the
  interrupted one would have.

What is random in them is the training process's: Mixup draws from numpy's generator, which the loop
seeds and a checkpoint saves with the others (`checkpoint.rng_state`), so a resumed run mixes as the
interrupted one would have.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Iterator, Mapping, Sequence
from typing import Any, TypeVar

import torch
from torch import nn

from kubetune_trainer.config import LOWER_IS_BETTER, TrainingSpec

Batch = TypeVar("Batch")
# Why a run ended before its last epoch (progress, model.json, the operator's condition reason).
EARLY_STOPPED = "EarlyStopped"


def grouped(batches: Iterable[Batch], size: int) -> Iterator[list[Batch]]:
    """`batches` in consecutive groups of `size` (the last may be smaller): one optimizer step each."""
    group: list[Batch] = []
    for batch in batches:
        group.append(batch)
        if len(group) == size:
            yield group
            group = []
    if group:
        yield group


def optimizer_steps(batches_per_epoch: int, accumulate: int) -> int:
    """Optimizer steps in an epoch of `batches_per_epoch` batches, `accumulate` per step (the last step of an
    epoch takes the batches that are left)."""
    return math.ceil(batches_per_epoch / accumulate)


def batch_mixer(training: TrainingSpec, num_classes: int) -> Callable[[torch.Tensor, torch.Tensor], Any] | None:
    """timm's Mixup for mixupAlpha/cutmixAlpha (each batch one or the other, half and half, when both are
    on), which also smooths the mixed targets by labelSmoothing; None when neither is on."""
    if not training.mixes:
        return None
    from timm.data import Mixup

    return Mixup(
        mixup_alpha=training.mixup_alpha,
        cutmix_alpha=training.cutmix_alpha,
        label_smoothing=training.label_smoothing,
        num_classes=num_classes,
    )


def classification_loss(training: TrainingSpec) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """The training loss: timm's SoftTargetCrossEntropy for mixed (soft) targets, its
    LabelSmoothingCrossEntropy for labelSmoothing alone, plain cross-entropy otherwise."""
    if training.mixes:
        from timm.loss import SoftTargetCrossEntropy

        return SoftTargetCrossEntropy()
    if training.label_smoothing > 0:
        from timm.loss import LabelSmoothingCrossEntropy

        return LabelSmoothingCrossEntropy(smoothing=training.label_smoothing)
    return nn.functional.cross_entropy


def weight_average(model: nn.Module, training: TrainingSpec) -> nn.Module | None:
    """timm's ModelEmaV3 of `model` (the unwrapped one) at emaDecay, with its warm-up (the decay grows from 0
    over the first steps, so a short fine-tune's average is not held back by the base weights); None
    when emaDecay is omitted. The loop calls `update(model, step=<optimizer steps done>)` after each step."""
    if training.ema_decay is None:
        return None
    from timm.utils import ModelEmaV3

    return ModelEmaV3(model, decay=training.ema_decay, use_warmup=True)


def early_stopping_metric(training: TrainingSpec, selected: str) -> str:
    """The history key earlyStopping watches: its metric, or the one selectBy picks the export by."""
    stopping = training.early_stopping
    return stopping.metric if stopping is not None and stopping.metric is not None else selected


def stopped_early(history: Sequence[Mapping[str, Any]], training: TrainingSpec, selected: str) -> bool:
    """Whether earlyStopping ends the run after the last epoch of `history`, before training.epochs: its
    metric (`early_stopping_metric`) has not improved on its best by more than minDelta for `patience`
    epochs (an epoch without a finite figure does not improve)."""
    stopping = training.early_stopping
    if stopping is None or len(history) >= training.epochs:
        return False
    metric = early_stopping_metric(training, selected)
    sign = -1.0 if metric in LOWER_IS_BETTER else 1.0
    best, waited = -math.inf, 0
    for entry in history:
        value = entry.get(metric)
        score = sign * float(value) if isinstance(value, int | float) and math.isfinite(value) else -math.inf
        if score > best + stopping.min_delta:
            best, waited = score, 0
        else:
            waited += 1
    return waited >= stopping.patience
