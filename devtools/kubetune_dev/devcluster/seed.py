"""The demo's data and base weights, made offline from scikit-learn's digits.

- Digits 5-9 as an ImageFolder of PNGs (`<prefix>/<class>/<n>.png`), split into train and validation.
- Base weights: a timm model trained from scratch on digits 0-4 (the "pretrained" model the job
  fine-tunes), saved as safetensors and cached under `.cache/kubetune-demo/` of the working directory
  (the repository root for `make demo`) so only the first run pays for it. torch and timm are imported only here, and only when base weights must be made.
"""

from __future__ import annotations

import io
import logging
import os
import random
from collections.abc import Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np

log = logging.getLogger(__name__)

DEFAULT_CACHE = Path(".cache") / "kubetune-demo"
PRETRAIN_CLASSES = (0, 1, 2, 3, 4)
FINETUNE_CLASSES = (5, 6, 7, 8, 9)


def split_uri(uri: str) -> tuple[str, str]:
    bucket, _, key = uri.removeprefix("s3://").partition("/")
    return bucket, key


def digit_images(classes: Iterable[int], size: int) -> tuple[np.ndarray, np.ndarray]:
    """(images uint8 Nxsizexsizex3, labels) of scikit-learn's digits of `classes`, upscaled to `size`."""
    from PIL import Image
    from sklearn.datasets import load_digits

    digits = load_digits()
    wanted = set(classes)
    images, labels = [], []
    for image, label in zip(digits.images, digits.target, strict=True):
        if int(label) not in wanted:
            continue
        gray = Image.fromarray(np.clip(image * 16, 0, 255).astype(np.uint8), mode="L")
        rgb = gray.resize((size, size), Image.Resampling.BILINEAR).convert("RGB")
        images.append(np.asarray(rgb))
        labels.append(int(label))
    return np.stack(images), np.asarray(labels)


def png(image: np.ndarray) -> bytes:
    from PIL import Image

    buffer = io.BytesIO()
    Image.fromarray(image).save(buffer, format="PNG")
    return buffer.getvalue()


def upload_imagefolder(
    client: Any,
    train_uri: str,
    validation_uri: str | None,
    *,
    classes: Sequence[int] = FINETUNE_CLASSES,
    size: int = 32,
    validation_fraction: float = 0.2,
    seed: int = 0,
) -> dict[str, int]:
    """Upload the digits of `classes` as class folders; returns how many images went where."""
    images, labels = digit_images(classes, size)
    order = list(range(len(labels)))
    random.Random(seed).shuffle(order)
    n_val = int(len(order) * validation_fraction) if validation_uri else 0
    counts = {"train": 0, "validation": 0}
    for rank, index in enumerate(order):
        split = "validation" if rank < n_val else "train"
        bucket, prefix = split_uri(validation_uri if split == "validation" and validation_uri else train_uri)
        key = f"{prefix.rstrip('/')}/{labels[index]}/{index:05d}.png".lstrip("/")
        client.put_object(Bucket=bucket, Key=key, Body=png(images[index]), ContentType="image/png")
        counts[split] += 1
    return counts


def base_weights(architecture: str, image_size: int, cache_dir: Path = DEFAULT_CACHE, *, epochs: int = 8) -> Path:
    """Safetensors of `architecture` trained on digits 0-4 (cached; made on first use, ~seconds on CPU)."""
    cache_dir = cache_dir.resolve()
    cache_dir.mkdir(parents=True, exist_ok=True)
    target = cache_dir / f"{architecture}-digits-0-4-{image_size}px.safetensors"
    if target.exists():
        return target
    import timm
    import torch
    from safetensors.torch import save_file
    from timm.data import resolve_data_config

    torch.manual_seed(0)
    torch.set_num_threads(max(1, min(2, os.cpu_count() or 1)))
    model = timm.create_model(architecture, pretrained=False, num_classes=len(PRETRAIN_CLASSES))
    config = resolve_data_config({}, model=model)
    mean = torch.tensor(config["mean"]).view(1, 3, 1, 1)
    std = torch.tensor(config["std"]).view(1, 3, 1, 1)
    images, labels = digit_images(PRETRAIN_CLASSES, image_size)
    x = (torch.from_numpy(images).permute(0, 3, 1, 2).float() / 255.0 - mean) / std
    y = torch.from_numpy(labels - min(PRETRAIN_CLASSES)).long()
    optimizer = torch.optim.AdamW(model.parameters(), lr=3e-3, weight_decay=0.01)
    model.train()
    for epoch in range(epochs):
        perm = torch.randperm(len(y))
        total = 0.0
        for start in range(0, len(y), 64):
            batch = perm[start : start + 64]
            loss = torch.nn.functional.cross_entropy(model(x[batch]), y[batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            total += loss.item() * len(batch)
        log.info("base weights: epoch %d loss %.3f", epoch + 1, total / len(y))
    model.eval()
    with torch.no_grad():
        accuracy = float((model(x).argmax(1) == y).float().mean())
    log.info("base weights: train accuracy on digits 0-4 %.3f", accuracy)
    tmp = target.with_suffix(f".{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in model.state_dict().items()}, str(tmp))
    tmp.replace(target)
    return target


def seed_demo(client: Any, spec: dict[str, Any], cache_dir: Path = DEFAULT_CACHE) -> dict[str, Any]:
    """Put a job's base weights and dataset where its spec says (buckets made as needed)."""
    from kubetune_dev.devcluster.s3 import ensure_bucket

    model, data, output = spec["model"], spec["data"], spec["output"]
    size = int(data.get("imageSize") or 32)
    for uri in (model["checkpoint"], data["train"], data.get("validation") or data["train"], output["path"]):
        ensure_bucket(client, split_uri(uri)[0])
    weights = base_weights(model["architecture"], size, cache_dir)
    bucket, key = split_uri(model["checkpoint"])
    client.upload_file(str(weights), bucket, key)
    counts = upload_imagefolder(client, data["train"], data.get("validation"), size=size)
    return {"baseWeights": str(weights), **counts}
