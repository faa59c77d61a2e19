"""A small detection world made in the test: coloured boxes on noisy backgrounds, boxes known exactly.

Each class is a colour; an image holds 0-3 filled rectangles. `coco(...)` gives the COCO annotation
file users would upload, and `pngs(...)` the images, so tests exercise the same path as real data.
"""

from __future__ import annotations

import io
import random
from dataclasses import dataclass, field
from typing import Any

import numpy as np
from PIL import Image

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
