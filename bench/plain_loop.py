"""The baseline of the quality benchmark: the fine-tuning loop a user writes in plain PyTorch.

From the same base weights (the classifier replaced, as kubetune does), every parameter trains with AdamW
at one constant learning rate (torch's default weight decay), no augmentation, no warm-up or schedule,
the same batch size and epochs as kubetune's run. Images are resized to the task's size and normalised
with the model's mean and std; validation uses the same transform. Classification reports top-1
accuracy, detection COCO mAP@[.5:.95] (`detection_eval.mean_average_precision`, as the trainer).
"""

from __future__ import annotations

from collections.abc import Sequence
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


def classification(
    architecture: str,
    weights: Path | None,
    train: LabelledImages,
    validation: LabelledImages,
    *,
    size: int,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
) -> float:
    """Top-1 validation accuracy after `epochs` of the plain loop (`weights` None: random initialisation)."""
    from kubetune_trainer.model import create_model, data_config, load_base_weights, read_state_dict

    torch.manual_seed(seed)
    model = create_model(architecture, len(train.class_names))
    if weights is not None:
        load_base_weights(model, read_state_dict(weights, str(weights)), str(weights))
    cfg = data_config(model, size)
    x, y = _tensors(train, size, cfg["mean"], cfg["std"]), torch.tensor(train.labels)
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x) - batch + 1 if len(x) > batch else 1, batch):
            chosen = order[i : i + batch]
            loss = nn.functional.cross_entropy(model(x[chosen]), y[chosen])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    model.eval()
    vx, vy = _tensors(validation, size, cfg["mean"], cfg["std"]), torch.tensor(validation.labels)
    with torch.no_grad():
        correct = sum(int((model(vx[i : i + 256]).argmax(1) == vy[i : i + 256]).sum()) for i in range(0, len(vx), 256))
    return correct / len(vx)


def detection(
    architecture: str,
    weights: Path | None,
    train: tuple[list[Any], list[Any]],
    validation: tuple[list[Any], list[Any]],
    *,
    classes: int,
    size: int,
    epochs: int,
    batch: int,
    lr: float,
    seed: int,
) -> float:
    """COCO mAP@[.5:.95] on the validation images after `epochs` of the plain loop; images in [0, 1] and
    torchvision targets (labels 1..classes), as `DetectionFiles` gives them."""
    from kubetune_trainer.detection_eval import mean_average_precision, predict
    from kubetune_trainer.detection_model import build_detector

    torch.manual_seed(seed)
    model, _ = build_detector(architecture, classes, weights, str(weights), size)
    images, targets = train
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    generator = torch.Generator().manual_seed(seed)
    for _ in range(epochs):
        model.train()
        order = torch.randperm(len(images), generator=generator).tolist()
        for i in range(0, len(images) - batch + 1, batch):
            chosen = order[i : i + batch]
            losses = model([images[j] for j in chosen], [targets[j] for j in chosen])
            loss = torch.stack(list(losses.values())).sum()
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
    predictions, truths = predict(model, [validation], torch.device("cpu"))
    return mean_average_precision(predictions, truths)["valMap"]
