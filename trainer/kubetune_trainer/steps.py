"""The training and evaluation steps, in plain torch (no Ray, no S3): what the loop runs per batch.

Kept apart so the benchmark can time exactly the trainer's step against a plain loop. `Stepper` is
classification's step, `DetectionStepper` detection's (`tasks` picks one; the loop around them is
shared). On GPU a step runs under bf16 (or fp16 with a grad scaler) autocast (classification on
channels_last inputs); on CPU in fp32.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

Autocast = Callable[[], contextlib.AbstractContextManager[Any]]


def configure_backends(device: torch.device) -> None:
    """On CUDA, let cuDNN time its convolution algorithms once per input shape and keep the fastest: the
    training batches share one shape (the last partial batch is dropped), so this is paid once."""
    if device.type == "cuda":
        torch.backends.cudnn.benchmark = True


def autocast_for(device: torch.device, precision: str) -> Autocast:
    """Mixed precision on CUDA as asked (bf16/fp16); fp32 elsewhere or when asked."""
    if device.type != "cuda" or precision == "fp32":
        return contextlib.nullcontext
    dtype = torch.bfloat16 if precision == "bf16" else torch.float16
    return lambda: torch.autocast(device_type="cuda", dtype=dtype)


Loss = Callable[[torch.Tensor, torch.Tensor], torch.Tensor]
# A batch's forward pass under autocast, to its loss.
BatchLoss = Callable[[Any, Any], torch.Tensor]


def optimizer_step(optimizer: torch.optim.Optimizer, scaler: Any, scheduler: Any, clip_norm: float | None) -> None:
    """The optimizer and schedule step on the gradients accumulated so far (through the grad scaler, a no-op
    unless fp16), first clipped to the total L2 norm `clip_norm` (training.gradientClipNorm) when set."""
    if clip_norm is not None:
        scaler.unscale_(optimizer)  # clip the true gradients, not fp16's scaled ones
        params = [p for group in optimizer.param_groups for p in group["params"] if p.grad is not None]
        torch.nn.utils.clip_grad_norm_(params, clip_norm)
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()


def accumulated_step(
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scaler: Any,
    scheduler: Any,
    batches: Sequence[tuple[Any, Any]],
    batch_loss: BatchLoss,
    clip_norm: float | None = None,
    weights: Sequence[float] | None = None,
) -> torch.Tensor:
    """One optimizer step on `batches` (training.accumulateSteps of them): each batch's loss, divided by
    their number, back-propagated in turn, so the gradients are those of their mean loss, as one batch of
    all their images would give; then `optimizer_step`. Each batch's loss is first weighted by `weights`
    (this worker's share of that global batch, `EpochOrder.loss_weight`: 1 when the workers' shares are
    equal). DDP averages the gradients across workers only at the last batch (`no_sync` before it).
    Returns the mean unweighted loss, still on the device (reading it would synchronise the GPU every step)."""
    optimizer.zero_grad(set_to_none=True)
    share = len(batches)
    total: torch.Tensor | None = None
    for index, (inputs, targets) in enumerate(batches):
        last = index == share - 1
        scale = (weights[index] if weights is not None else 1.0) / share
        no_sync = getattr(model, "no_sync", None)
        with no_sync() if no_sync is not None and not last else contextlib.nullcontext():
            loss = batch_loss(inputs, targets)
            scaler.scale(loss if scale == 1.0 else loss * scale).backward()
        total = loss.detach() if total is None else total + loss.detach()
    optimizer_step(optimizer, scaler, scheduler, clip_norm)
    assert total is not None, "a step needs at least one batch"
    return total if share == 1 else total / share


@dataclass
class Stepper:
    """One optimizer step of image classification, and exact evaluation sums."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    autocast: Autocast
    channels_last: bool
    clip_norm: float | None = None  # training.gradientClipNorm
    # The training loss (`options.classification_loss`: cross-entropy unless label smoothing or mixing), and
    # the mixer of images and labels (timm's Mixup, for mixupAlpha/cutmixAlpha) applied before it.
    loss: Loss = nn.functional.cross_entropy
    mix: Callable[[torch.Tensor, torch.Tensor], tuple[torch.Tensor, torch.Tensor]] | None = None

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def batch_loss(self, images: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        """The training loss of one batch (mixed first when mixup or CutMix is on)."""
        if self.mix is not None:
            images, labels = self.mix(images, labels)
        with self.autocast():
            return self.loss(self.model(self._input(images)), labels)

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """Forward, backward (of the loss times `weight`), optimizer and schedule step; returns the batch's
        loss, still on the device (reading it would synchronise the GPU every step)."""
        return self.train_steps([(images, labels)], [weight])

    def train_steps(
        self, batches: Sequence[tuple[torch.Tensor, torch.Tensor]], weights: Sequence[float] | None = None
    ) -> torch.Tensor:
        """One optimizer step on the gradients of `batches` (`accumulated_step`); their mean loss."""
        model, optimizer = self.model, self.optimizer
        return accumulated_step(
            model, optimizer, self.scaler, self.scheduler, batches, self.batch_loss, self.clip_norm, weights
        )

    def eval_sums(self, batches: Iterable[tuple[torch.Tensor, torch.Tensor]], device: torch.device) -> torch.Tensor:
        """[summed loss, correct, count] over `batches`, in float64 on `device`, for an all-reduce."""
        self.model.eval()
        sums = torch.zeros(3, dtype=torch.float64, device=device)
        with torch.no_grad():
            for images, labels in batches:
                with self.autocast():
                    logits = self.model(self._input(images))
                sums[0] += nn.functional.cross_entropy(logits.float(), labels, reduction="sum").double()
                sums[1] += (logits.argmax(1) == labels).sum()
                sums[2] += labels.numel()
        return sums


@dataclass
class DetectionStepper:
    """One optimizer step of a torchvision detector: in training mode it takes images and targets and
    returns its losses (classification, box regression, objectness…), which are summed."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    autocast: Autocast
    device: torch.device
    clip_norm: float | None = None  # training.gradientClipNorm

    def batch_loss(self, images: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]]) -> torch.Tensor:
        """The summed losses of one batch; images may differ in size (the model's transform batches them)."""
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with self.autocast():
            losses = self.model(images, targets)
        return torch.stack([value.float() for value in losses.values()]).sum()

    def train_step(
        self, images: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]], weight: float = 1.0
    ) -> torch.Tensor:
        """Like `Stepper.train_step`."""
        return self.train_steps([(images, targets)], [weight])

    def train_steps(self, batches: Sequence[tuple[Any, Any]], weights: Sequence[float] | None = None) -> torch.Tensor:
        """Like `Stepper.train_steps`."""
        model, optimizer = self.model, self.optimizer
        return accumulated_step(
            model, optimizer, self.scaler, self.scheduler, batches, self.batch_loss, self.clip_norm, weights
        )
