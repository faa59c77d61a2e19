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


def backward_and_step(
    loss: torch.Tensor, optimizer: torch.optim.Optimizer, scaler: Any, scheduler: Any, weight: float = 1.0
) -> torch.Tensor:
    """Backward of the loss times `weight` (the worker's share of the global batch, `EpochOrder.loss_weight`;
    through the grad scaler, a no-op unless fp16), optimizer and schedule step; the loss, unweighted and
    still on the device (reading it would synchronise the GPU every step)."""
    optimizer.zero_grad(set_to_none=True)
    scaler.scale(loss if weight == 1.0 else loss * weight).backward()
    scaler.step(optimizer)
    scaler.update()
    scheduler.step()
    return loss.detach()


@dataclass
class Stepper:
    """One optimizer step of image classification, and exact evaluation sums."""

    model: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    autocast: Autocast
    channels_last: bool

    def _input(self, images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if self.channels_last else images

    def train_step(self, images: torch.Tensor, labels: torch.Tensor, weight: float = 1.0) -> torch.Tensor:
        """Forward, backward (of the loss times `weight`), optimizer and schedule step; returns the batch's
        loss, still on the device (reading it would synchronise the GPU every step)."""
        with self.autocast():
            loss = nn.functional.cross_entropy(self.model(self._input(images)), labels)
        return backward_and_step(loss, self.optimizer, self.scaler, self.scheduler, weight)

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

    def train_step(
        self, images: Sequence[torch.Tensor], targets: Sequence[dict[str, torch.Tensor]], weight: float = 1.0
    ) -> torch.Tensor:
        """Like `Stepper.train_step`; images may differ in size (the model's transform batches them)."""
        images = [image.to(self.device, non_blocking=True) for image in images]
        targets = [{k: v.to(self.device, non_blocking=True) for k, v in t.items()} for t in targets]
        with self.autocast():
            losses = self.model(images, targets)
        loss = torch.stack([value.float() for value in losses.values()]).sum()
        return backward_and_step(loss, self.optimizer, self.scaler, self.scheduler, weight)
