"""A small detection world made in the test: coloured boxes on noisy backgrounds, boxes known exactly.

Each class is a colour; an image holds 0-3 filled rectangles. `coco(...)` gives the COCO annotation
file users would upload, and `pngs(...)` the images, so tests exercise the same path as real data.
`pretrained_detector()` trains a small SSDlite on the PRETRAIN_CLASSES with plain torch (once: the
weights are cached under the repo's `.cache/`, keyed by a hash of the recipe).
"""

from __future__ import annotations

import hashlib
import io
import json
import os
import random
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
from PIL import Image

from tests.support.paths import REPO
from tests.support.pretraining import torch_threads, train_plainly

COLOURS: dict[str, tuple[int, int, int]] = {
    "red": (220, 30, 30),
    "green": (30, 200, 40),
    "blue": (40, 60, 230),
    "yellow": (230, 220, 30),
    "magenta": (210, 40, 210),
    "cyan": (40, 210, 210),
}


@dataclass
class ShapesSet:
    size: int
    class_names: list[str]
    images: list[np.ndarray] = field(default_factory=list)
    boxes: list[list[tuple[int, int, int, int, int]]] = field(default_factory=list)  # x, y, w, h, class index

    def coco(self, prefix: str = "") -> dict[str, Any]:
        images = [
            {"id": i + 1, "file_name": f"{prefix}img{i:04d}.png", "width": self.size, "height": self.size}
            for i in range(len(self.images))
        ]
        annotations = [
            {
                "id": len(images) * 10 + i * 4 + j,
                "image_id": i + 1,
                "category_id": c + 1,
                "bbox": [x, y, w, h],
                "area": w * h,
                "iscrowd": 0,
            }
            for i, boxes in enumerate(self.boxes)
            for j, (x, y, w, h, c) in enumerate(boxes)
        ]
        categories = [{"id": c + 1, "name": name} for c, name in enumerate(self.class_names)]
        return {"images": images, "annotations": annotations, "categories": categories}

    def pngs(self, prefix: str = "") -> dict[str, bytes]:
        out = {}
        for i, pixels in enumerate(self.images):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            out[f"{prefix}img{i:04d}.png"] = buffer.getvalue()
        return out


def make_shapes(class_names: list[str], count: int, seed: int, size: int = 96, empty_every: int = 8) -> ShapesSet:
    rng = random.Random(seed)
    nprng = np.random.default_rng(seed)
    out = ShapesSet(size=size, class_names=class_names)
    for i in range(count):
        pixels = nprng.integers(90, 150, size=(size, size, 3), dtype=np.uint8)
        boxes: list[tuple[int, int, int, int, int]] = []
        wanted = 0 if empty_every and i % empty_every == empty_every - 1 else rng.randint(1, 3)
        for _ in range(wanted * 10):
            if len(boxes) == wanted:
                break
            w, h = rng.randint(18, 36), rng.randint(18, 36)
            x, y = rng.randint(0, size - w), rng.randint(0, size - h)
            if any(x < bx + bw and bx < x + w and y < by + bh and by < y + h for bx, by, bw, bh, _ in boxes):
                continue
            c = rng.randrange(len(class_names))
            pixels[y : y + h, x : x + w] = COLOURS[class_names[c]]
            boxes.append((x, y, w, h, c))
        out.images.append(pixels)
        out.boxes.append(boxes)
    return out


DETECTOR = "ssdlite320_mobilenet_v3_large"
DETECTOR_SIZE = 64
PRETRAIN_CLASSES = ["red", "green", "blue"]
FINETUNE_CLASSES = ["yellow", "magenta", "cyan"]
# Everything that decides the pretrained weights: change any of it and the cache entry changes.
PRETRAIN_RECIPE: dict[str, Any] = {
    "architecture": DETECTOR,
    "classes": PRETRAIN_CLASSES,
    "images": 384,
    "imageSeed": 10,
    "size": DETECTOR_SIZE,
    "epochs": 20,
    "batch": 16,
    "learningRate": 4e-3,
    "seed": 0,
}
CACHE_DIR = REPO / ".cache" / "kubetune-tests"


def as_tensors(shapes: ShapesSet) -> tuple[list[Any], list[dict[str, Any]]]:
    """Images in [0, 1] and targets as torchvision detectors take them (labels 1..N)."""
    import torch

    images = [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in shapes.images]
    targets = [
        {
            "boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _ in b], dtype=torch.float32).reshape(-1, 4),
            "labels": torch.tensor([c + 1 for *_, c in b], dtype=torch.int64),
        }
        for b in shapes.boxes
    ]
    return images, targets


def recipe_key(recipe: dict[str, Any]) -> str:
    import torch
    import torchvision

    text = json.dumps({**recipe, "torch": torch.__version__, "torchvision": torchvision.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pretrained_detector(cache_dir: Path = CACHE_DIR, recipe: dict[str, Any] = PRETRAIN_RECIPE) -> Path:
    """Safetensors of an SSDlite trained on the pretraining shapes with plain torch (~2 min on 1 CPU,
    once; then read from the cache)."""
    path = cache_dir / f"{recipe['architecture']}-shapes-{recipe_key(recipe)}.safetensors"
    if path.is_file():
        return path
    import torch
    from safetensors.torch import save_file

    from kubetune_trainer.detection_model import create_detector

    # One thread: on a shared machine more threads spin against each other and run slower.
    with torch_threads(1):
        torch.manual_seed(recipe["seed"])
        model = create_detector(recipe["architecture"], len(recipe["classes"]), recipe["size"])
        images, targets = as_tensors(
            make_shapes(recipe["classes"], recipe["images"], recipe["imageSeed"], recipe["size"])
        )

        def batch_loss(chosen: list[int]) -> Any:
            losses = model([images[j] for j in chosen], [targets[j] for j in chosen])
            return torch.stack(list(losses.values())).sum()

        train_plainly(
            model,
            batch_loss,
            len(images),
            epochs=recipe["epochs"],
            batch=recipe["batch"],
            learning_rate=recipe["learningRate"],
            weight_decay=1e-4,
            seed=recipe["seed"],
            drop_last=True,
        )
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(path)
    return path


def random_detector(path: Path, classes: int = len(PRETRAIN_CLASSES), seed: int = 1) -> Path:
    """The same architecture at random initialisation: the baseline's 'base weights'."""
    import torch
    from safetensors.torch import save_file

    from kubetune_trainer.detection_model import create_detector

    torch.manual_seed(seed)
    model = create_detector(DETECTOR, classes, DETECTOR_SIZE)
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(path))
    return path
