"""Synthetic image worlds for the fine-tuning quality benchmark (and the tests): made offline, seeded, small.

Each world is a family of images with labels, drawn with numpy and PIL in milliseconds:

- `textures`: full-frame patterns (gratings at four orientations, checkerboards, dots, smooth and fine
  noise) in random colours: the family a far-domain base model is pretrained on;
- `shapes`: one filled shape (circle, square, triangle, plus; random size, rotation, colour, position)
  on a noisy background: a far-domain task for a textures base (the issue's 64 px, 4 classes);
- `small_digits`: scikit-learn's 8x8 digits, scaled up (the benchmark: 18-26 px) and dropped anywhere in
  a 32 px noisy frame of another colour: small images whose object is off-centre;
- `digits`: scikit-learn's digits as 32 px images: the near-domain pair (0-4 for the base, 5-9 new).

`pretrained_classifier(recipe)` trains a timm model on one world with plain torch and caches its
safetensors under `.cache/kubetune-bench/`, keyed by a hash of the recipe (and the torch/timm versions),
so a recipe costs its minute of CPU once per machine.
"""

from __future__ import annotations

import hashlib
import importlib
import io
import json
import math
import os
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from types import ModuleType
from typing import Any

import numpy as np
from PIL import Image, ImageDraw

CACHE_DIR = Path(__file__).resolve().parent.parent / ".cache" / "kubetune-bench"
TEXTURE_CLASSES = ("grating-0", "grating-45", "grating-90", "grating-135", "checker", "dots", "blobs", "grain")
SHAPE_CLASSES = ("circle", "square", "triangle", "plus")
DIGIT_CLASSES = tuple(str(d) for d in range(10))

# Base models (`pretrained_classifier` recipes): test_resnet on textures, the base of the far-domain and
# small-image tasks, and on digits 0-4, the near-domain task's.
TEXTURES_BASE: dict[str, Any] = {
    "architecture": "test_resnet",
    "world": "textures",
    "images": 6400,
    "imageSeed": 100,
    "size": 64,
    "epochs": 12,
    "batch": 64,
    "learningRate": 3e-3,
    "seed": 0,
}
# Half the images and epochs (about half a minute, once): the tests' textures base.
TEXTURES_LIGHT_BASE: dict[str, Any] = {**TEXTURES_BASE, "images": 3200, "epochs": 6}
DIGITS_0_4_BASE: dict[str, Any] = {
    "architecture": "test_resnet",
    "world": "digits-0-4",
    "size": 32,
    "epochs": 3,
    "batch": 32,
    "learningRate": 3e-3,
    "seed": 0,
    "flip": False,
}


@dataclass
class LabelledImages:
    """Images (RGB uint8 arrays) with class indices into `class_names`."""

    class_names: tuple[str, ...]
    images: list[np.ndarray]
    labels: list[int]

    def __len__(self) -> int:
        return len(self.images)

    def pil(self, i: int) -> Image.Image:
        return Image.fromarray(self.images[i])

    def pngs(self, prefix: str) -> dict[str, bytes]:
        """ImageFolder layout: {"<prefix>/<class>/<n>.png": PNG bytes}."""
        out: dict[str, bytes] = {}
        for i, (pixels, label) in enumerate(zip(self.images, self.labels, strict=True)):
            buffer = io.BytesIO()
            Image.fromarray(pixels).save(buffer, format="PNG")
            out[f"{prefix}/{self.class_names[label]}/{i:05d}.png"] = buffer.getvalue()
        return out


def _colour(rng: np.random.Generator) -> np.ndarray:
    return rng.uniform(0, 255, 3)


def _far_colour(rng: np.random.Generator, other: np.ndarray, distance: float = 120.0) -> np.ndarray:
    """A random colour at least `distance` away from `other` (in RGB), so the object stays visible."""
    for _ in range(50):
        colour = _colour(rng)
        if np.linalg.norm(colour - other) >= distance:
            return colour
    return 255.0 - other


def _mix(rng: np.random.Generator, pattern: np.ndarray, noise: float = 8.0) -> np.ndarray:
    """Two random colours blended by `pattern` (values in [0, 1]), plus grain: an RGB uint8 image."""
    a, b = _colour(rng), _colour(rng)
    pixels = a + pattern[..., None] * (b - a) + rng.normal(0, noise, (*pattern.shape, 3))
    return np.clip(pixels, 0, 255).astype(np.uint8)


# -- textures (a base model's pretraining family) ------------------------------------------------------


def _texture_pattern(kind: int, size: int, rng: np.random.Generator) -> np.ndarray:
    y, x = np.mgrid[0:size, 0:size].astype(np.float32)
    if kind < 4:  # gratings: orientation is the class, frequency and phase are random
        angle = math.radians(45 * kind + rng.uniform(-12, 12))
        freq = rng.uniform(0.15, 0.6)
        wave = np.sin(freq * (x * math.cos(angle) + y * math.sin(angle)) + rng.uniform(0, 2 * math.pi))
        return 0.5 + 0.5 * wave
    if kind == 4:  # checkerboard, random period and slight rotation
        period, angle = rng.uniform(4, 12), math.radians(rng.uniform(-20, 20))
        u, v = x * math.cos(angle) + y * math.sin(angle), -x * math.sin(angle) + y * math.cos(angle)
        return ((np.floor(u / period) + np.floor(v / period)) % 2).astype(np.float32)
    if kind == 5:  # dots on a jittered grid
        period = rng.uniform(6, 14)
        radius = rng.uniform(0.2, 0.4) * period
        cx, cy = (x + rng.uniform(0, period)) % period, (y + rng.uniform(0, period)) % period
        return (np.hypot(cx - period / 2, cy - period / 2) < radius).astype(np.float32)
    scale = 8 if kind == 6 else 2  # smooth blobs (low frequency) or fine grain (high frequency)
    small = rng.uniform(0, 1, (size // scale + 2, size // scale + 2)).astype(np.float32)
    big = np.asarray(Image.fromarray(small).resize((size + 2 * scale, size + 2 * scale), Image.Resampling.BICUBIC))
    return np.clip(big[scale : scale + size, scale : scale + size], 0, 1)


def textures(count: int, seed: int, size: int = 64) -> LabelledImages:
    """`count` texture images, classes in turn (balanced)."""
    rng = np.random.default_rng(seed)
    out = LabelledImages(TEXTURE_CLASSES, [], [])
    for i in range(count):
        kind = i % len(TEXTURE_CLASSES)
        out.images.append(_mix(rng, _texture_pattern(kind, size, rng)))
        out.labels.append(kind)
    return out


# -- shapes (a far-domain task) ------------------------------------------------------------------------


def _shape_points(kind: int, cx: float, cy: float, r: float, angle: float) -> list[tuple[float, float]]:
    corners: list[tuple[float, float]]
    if kind == 1:  # square
        corners = [(-1.0, -1.0), (1.0, -1.0), (1.0, 1.0), (-1.0, 1.0)]
        scale = r / math.sqrt(2) * 1.15
    elif kind == 2:  # triangle
        corners = [(math.cos(a), math.sin(a)) for a in (-math.pi / 2, math.pi / 6, 5 * math.pi / 6)]
        scale = r
    else:  # plus: a cross of two bars a third of its size wide
        t = 1 / 3
        corners = [(-t, -1), (t, -1), (t, -t), (1, -t), (1, t), (t, t), (t, 1), (-t, 1), (-t, t), (-1, t), (-1, -t), (-t, -t)]  # fmt: skip
        scale = r
    cos, sin = math.cos(angle), math.sin(angle)
    return [(cx + scale * (u * cos - v * sin), cy + scale * (u * sin + v * cos)) for u, v in corners]


def shapes(
    count: int,
    seed: int,
    size: int = 64,
    min_size: float = 0.22,
    max_size: float = 0.55,
    rotation: float = 180.0,
    noise: float = 18.0,
) -> LabelledImages:
    """`count` images of one filled shape each (classes in turn), its size a random fraction of the frame."""
    rng = np.random.default_rng(seed)
    out = LabelledImages(SHAPE_CLASSES, [], [])
    for i in range(count):
        kind = i % len(SHAPE_CLASSES)
        background = _colour(rng)
        pixels = np.clip(background + rng.normal(0, noise, (size, size, 3)), 0, 255).astype(np.uint8)
        image = Image.fromarray(pixels)
        r = rng.uniform(min_size, max_size) * size / 2
        cx, cy = rng.uniform(r, size - r), rng.uniform(r, size - r)
        fill = tuple(int(c) for c in _far_colour(rng, background))
        draw = ImageDraw.Draw(image)
        if kind == 0:
            draw.ellipse((cx - r, cy - r, cx + r, cy + r), fill=fill)
        else:
            draw.polygon(_shape_points(kind, cx, cy, r, math.radians(rng.uniform(-rotation, rotation))), fill=fill)
        out.images.append(np.asarray(image))
        out.labels.append(kind)
    return out


# -- digits (near domain) and small digits in a frame (small images) ----------------------------------


def _sklearn_digits() -> tuple[np.ndarray, np.ndarray]:
    from sklearn.datasets import load_digits

    data = load_digits()
    return data.images.astype(np.float32) / 16.0, data.target.astype(int)


def digits(labels: Sequence[int], size: int = 32) -> LabelledImages:
    """scikit-learn's digits of `labels` as `size` px grey RGB images; class names are the digits."""
    pixels, targets = _sklearn_digits()
    names = tuple(str(d) for d in labels)
    out = LabelledImages(names, [], [])
    for image, target in zip(pixels, targets, strict=True):
        if int(target) in labels:
            grey = Image.fromarray((image * 255).astype(np.uint8), mode="L")
            out.images.append(np.asarray(grey.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")))
            out.labels.append(list(labels).index(int(target)))
    return out


def small_digits(
    seed: int, size: int = 32, digit_px: tuple[int, int] = (10, 16), noise: float = 15.0
) -> LabelledImages:
    """Every scikit-learn digit, 10-16 px, coloured, anywhere in a `size` px noisy frame of another colour."""
    rng = np.random.default_rng(seed)
    pixels, targets = _sklearn_digits()
    out = LabelledImages(DIGIT_CLASSES, [], [])
    for image, target in zip(pixels, targets, strict=True):
        side = int(rng.integers(digit_px[0], digit_px[1] + 1))
        glyph = np.asarray(
            Image.fromarray((image * 255).astype(np.uint8), mode="L").resize((side, side), Image.Resampling.BILINEAR)
        )
        background = _colour(rng)
        frame = background + rng.normal(0, noise, (size, size, 3))
        x, y = (int(v) for v in rng.integers(0, size - side + 1, 2))
        alpha = glyph[..., None].astype(np.float32) / 255
        colour = _far_colour(rng, background)
        frame[y : y + side, x : x + side] = frame[y : y + side, x : x + side] * (1 - alpha) + colour * alpha
        out.images.append(np.clip(frame, 0, 255).astype(np.uint8))
        out.labels.append(int(target))
    return out


def split(images: LabelledImages, validation: float, seed: int) -> tuple[LabelledImages, LabelledImages]:
    """A seeded split into (train, validation)."""
    order = np.random.default_rng(seed).permutation(len(images))
    n_val = round(len(images) * validation)
    parts = []
    for chosen in (order[n_val:], order[:n_val]):
        parts.append(
            LabelledImages(images.class_names, [images.images[i] for i in chosen], [images.labels[i] for i in chosen])
        )
    return parts[0], parts[1]


def subset(images: LabelledImages, count: int) -> LabelledImages:
    """The first `count` images."""
    return LabelledImages(images.class_names, images.images[:count], images.labels[:count])


def per_class(images: LabelledImages, count: int) -> LabelledImages:
    """The first `count` images of each class, in their order."""
    seen: dict[int, int] = {}
    chosen = []
    for i, label in enumerate(images.labels):
        seen[label] = seen.get(label, 0) + 1
        if seen[label] <= count:
            chosen.append(i)
    return LabelledImages(images.class_names, [images.images[i] for i in chosen], [images.labels[i] for i in chosen])


# -- pretrained base models -------------------------------------------------------------------------


WORLDS: dict[str, Callable[..., LabelledImages]] = {
    "textures": lambda r: textures(r["images"], r["imageSeed"], r["size"]),
    "digits-0-4": lambda r: digits(range(5), r["size"]),
}


def recipe_key(recipe: dict[str, Any]) -> str:
    import timm
    import torch

    text = json.dumps({**recipe, "torch": torch.__version__, "timm": timm.__version__}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:16]


def pretrained_classifier(recipe: dict[str, Any], cache_dir: Path = CACHE_DIR) -> Path:
    """Safetensors of `recipe["architecture"]` trained on `recipe["world"]` with plain torch (AdamW,
    one-cycle schedule, flips and small shifts); made once, then read from the cache."""
    path = cache_dir / f"{recipe['architecture']}-{recipe['world']}-{recipe_key(recipe)}.safetensors"
    if path.is_file():
        return path
    import timm
    import torch
    from safetensors.torch import save_model

    data = WORLDS[recipe["world"]](recipe)
    torch.manual_seed(recipe["seed"])
    model = timm.create_model(recipe["architecture"], num_classes=len(data.class_names))
    x = torch.from_numpy(np.stack(data.images)).permute(0, 3, 1, 2).float().div(255).sub(0.5).div(0.5)
    y = torch.tensor(data.labels)
    batch, epochs = recipe["batch"], recipe["epochs"]
    optimizer = torch.optim.AdamW(model.parameters(), lr=recipe["learningRate"], weight_decay=0.05)
    steps = epochs * (len(x) // batch)
    schedule = torch.optim.lr_scheduler.OneCycleLR(optimizer, recipe["learningRate"], total_steps=steps, pct_start=0.1)
    generator = torch.Generator().manual_seed(recipe["seed"])
    model.train()
    for _ in range(epochs):
        order = torch.randperm(len(x), generator=generator)
        for i in range(0, len(x) - batch + 1, batch):
            idx = order[i : i + batch]
            inputs = x[idx]
            if recipe.get("flip", True):
                inputs = torch.where(torch.rand(len(idx), 1, 1, 1, generator=generator) < 0.5, inputs.flip(-1), inputs)
            loss = torch.nn.functional.cross_entropy(model(inputs), y[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
    cache_dir.mkdir(parents=True, exist_ok=True)
    tmp = path.with_suffix(f".{os.getpid()}.tmp")
    save_model(model, str(tmp))
    tmp.replace(path)
    return path


def random_classifier(architecture: str, num_classes: int, path: Path, seed: int = 1) -> Path:
    """The architecture at random initialisation, as base weights (the 'no pretraining' reference)."""
    import timm
    import torch
    from safetensors.torch import save_model

    torch.manual_seed(seed)
    save_model(timm.create_model(architecture, num_classes=num_classes), str(path))
    return path


# -- the tests' detection world ----------------------------------------------------------------------


def detection_world() -> ModuleType:
    """tests/support/shapes_world.py: coloured boxes on noise, and an SSDlite pretrained on three colours
    (cached under .cache/kubetune-tests/); the detection task of the benchmark fine-tunes it to three others."""
    return importlib.import_module("tests.support.shapes_world")
