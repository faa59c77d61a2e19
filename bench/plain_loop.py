"""The baseline of the quality benchmark: the fine-tuning loop a user writes in plain PyTorch.

From the same base weights (the classifier replaced, as kubetune does), every parameter trains with AdamW
at one constant learning rate (torch's default weight decay), no augmentation, no warm-up or schedule,
the same batch size and epochs as kubetune's run. Images are resized to the task's size and normalised
with the model's mean and std; validation uses the same transform. Classification reports top-1
accuracy, detection COCO mAP@[.5:.95] (`detection_eval.mean_average_precision`, as the trainer).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn

from bench.worlds import LabelledImages


def _tensors(data: LabelledImages, size: int, mean: Sequence[float], std: Sequence[float]) -> torch.Tensor:
    from torchvision.transforms import functional as tf

    images = torch.from_numpy(np.stack(data.images)).permute(0, 3, 1, 2).float().div(255)
    if images.shape[-1] != size:
        images = tf.resize(images, [size, size], antialias=True)
    return tf.normalize(images, list(mean), list(std))


@dataclass(frozen=True)
class Budget:
    """What both sides of a comparison get: the image size, epochs, batch size and seed, and the plain
    loop's one learning rate."""

    size: int
    epochs: int
    batch: int
    lr: float
    seed: int


def classification(
    architecture: str, weights: Path | None, train: LabelledImages, validation: LabelledImages, budget: Budget
) -> float:
    """Top-1 validation accuracy after the plain loop's epochs (`weights` None: random initialisation)."""
    from kubetune_trainer.model import create_model, data_config, load_base_weights, read_state_dict

    torch.manual_seed(budget.seed)
    model = create_model(architecture, len(train.class_names))
    if weights is not None:
        load_base_weights(model, read_state_dict(weights, str(weights)), str(weights))
    cfg = data_config(model, budget.size)
    x, y = _tensors(train, budget.size, cfg["mean"], cfg["std"]), torch.tensor(train.labels)
    _train(model, len(x), budget, lambda chosen: nn.functional.cross_entropy(model(x[chosen]), y[chosen]))
    model.eval()
    vx, vy = _tensors(validation, budget.size, cfg["mean"], cfg["std"]), torch.tensor(validation.labels)
    with torch.no_grad():
        correct = sum(int((model(vx[i : i + 256]).argmax(1) == vy[i : i + 256]).sum()) for i in range(0, len(vx), 256))
    return correct / len(vx)


def detection(
    architecture: str,
    weights: Path | None,
    train: tuple[list[Any], list[Any]],
    validation: tuple[list[Any], list[Any]],
    classes: int,
    budget: Budget,
) -> float:
    """COCO mAP@[.5:.95] on the validation images after the plain loop's epochs; images in [0, 1] and
    torchvision targets (labels 1..classes), as `DetectionFiles` gives them."""
    from kubetune_trainer.detection_eval import mean_average_precision, predict
    from kubetune_trainer.detection_model import build_detector

    torch.manual_seed(budget.seed)
    model, _ = build_detector(architecture, classes, weights, str(weights), budget.size)
    images, targets = train

    def batch_loss(chosen: torch.Tensor) -> torch.Tensor:
        losses = model([images[j] for j in chosen.tolist()], [targets[j] for j in chosen.tolist()])
        return torch.stack(list(losses.values())).sum()

    _train(model, len(images), budget, batch_loss)
    predictions, truths = predict(model, [validation], torch.device("cpu"))
    return mean_average_precision(predictions, truths)["valMap"]


def _train(model: nn.Module, samples: int, budget: Budget, batch_loss: Callable[[torch.Tensor], torch.Tensor]) -> None:
    """AdamW over every parameter at `budget.lr`, full batches in a seeded order each epoch (the last
    partial one dropped, unless there is only one)."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=budget.lr)
    generator = torch.Generator().manual_seed(budget.seed)
    batch = budget.batch
    for _ in range(budget.epochs):
        model.train()
        order = torch.randperm(samples, generator=generator)
        for i in range(0, samples - batch + 1 if samples > batch else 1, batch):
            loss = batch_loss(order[i : i + batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
