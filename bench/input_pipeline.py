"""Input pipeline: images per second the trainer's S3 data path delivers, against the same images read from
local disk by a torch DataLoader.

kubetune's path is what a worker runs: the driver lists the bucket (`data.build_index`), the node fills
its cache (`data.prepare_images`: parallel download, each image decode-checked), and training reads the
cached files through `data.datasets` and a DataLoader. The baseline is torchvision's ImageFolder over a
local copy of the same JPEGs with the same timm transforms, batch and loader settings (no loader
processes, as the trainer has on CPU). Four figures:

- later epochs: the cache is warm, so only loading counts (every epoch after a node's first);
- the cache fill alone against the floor of any S3 path here: one recursive listing and parallel raw
  GETs of the same objects to disk;
- first epoch on a cold node (listing, download, checks and the epoch's loading) against that floor
  followed by one local epoch: what any S3 data path must pay before the first epoch ends;
- the same cold first epoch against one local epoch without S3 at all, for reference: here moto serves
  S3 from the same two cores, so raw GETs alone take longer than a local epoch and no S3 path can reach
  local-disk speed on a cold node.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import os
import random
import shutil
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import REGION, Row, boto3_client, log, moto_server, s3_environment, timed, timed_value

NAME = "Input pipeline"
DOWNLOAD_THREADS = 32  # as many as the trainer's node cache uses (storage.DOWNLOAD_THREADS)
BUCKET = "bench-images"
PREFIX = "pipeline/train"
VAL_PREFIX = "pipeline/val"
VAL_PER_CLASS = 2


@dataclasses.dataclass(frozen=True)
class Config:
    classes: int = 10
    per_class: int = 60
    width: int = 320
    height: int = 240
    image_size: int = 224
    batch_size: int = 32
    repeats: int = 3

    @classmethod
    def full(cls) -> Config:
        return cls()

    @classmethod
    def quick(cls) -> Config:
        return cls(per_class=30, repeats=2)

    @classmethod
    def tiny(cls) -> Config:
        return cls(classes=2, per_class=6, width=48, height=40, image_size=32, batch_size=4, repeats=1)

    @property
    def images(self) -> int:
        return self.classes * self.per_class


def jpeg(rng: random.Random, width: int, height: int) -> bytes:
    """A photo-like JPEG: smooth colour gradients with grain (compresses like a photo, ~25 KB at 320x240)."""
    import numpy as np
    from PIL import Image

    gen = np.random.default_rng(rng.randrange(2**32))
    y, x = np.mgrid[0:height, 0:width].astype(np.float32)
    channels = []
    for _ in range(3):
        fx, fy, phase = gen.uniform(0.005, 0.05), gen.uniform(0.005, 0.05), gen.uniform(0, 6.28)
        channels.append(127 + 100 * np.sin(fx * x + fy * y + phase))
    pixels = np.stack(channels, axis=-1) + gen.normal(0, 12, (height, width, 3))
    buffer = io.BytesIO()
    Image.fromarray(np.clip(pixels, 0, 255).astype(np.uint8)).save(buffer, format="JPEG", quality=90)
    return buffer.getvalue()


def make_dataset(config: Config, local: Path, client: Any) -> None:
    """The same JPEGs on local disk (<local>/<class>/<n>.jpg) and in S3 (<PREFIX>/<class>/<n>.jpg), and a
    few validation images in S3 only (the trainer needs some; the baseline has no use for them)."""
    rng = random.Random(0)
    items = []
    for c in range(config.classes):
        for n in range(config.per_class):
            rel = f"class{c:02d}/{n:04d}.jpg"
            data = jpeg(rng, config.width, config.height)
            path = local / rel
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(data)
            items.append((f"{PREFIX}/{rel}", data))
        for n in range(VAL_PER_CLASS):
            items.append((f"{VAL_PREFIX}/class{c:02d}/{n:04d}.jpg", jpeg(rng, config.width, config.height)))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]), items))


def data_cfg(image_size: int) -> dict[str, Any]:
    """timm's preprocessing of resnet18 at `image_size`, as the trainer derives it (model.data_config)."""
    import timm

    from kubetune_trainer.model import data_config

    return data_config(timm.create_model("resnet18", pretrained=False, num_classes=2), image_size)


def epoch(loader: Any) -> int:
    count = 0
    for images, _labels in loader:
        count += images.shape[0]
    return count


def loader_for(dataset: Any, batch_size: int) -> Any:
    """The trainer's loader settings on CPU: shuffled, no loader processes, last partial batch dropped."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    sampler = RandomSampler(dataset, generator=torch.Generator().manual_seed(0))
    return DataLoader(dataset, batch_size=batch_size, sampler=sampler, num_workers=0, drop_last=True)


@dataclasses.dataclass
class _Paths:
    """kubetune's data path, the local baseline and the raw-S3 floor over one dataset."""

    endpoint: str
    client: Any
    spec: Any
    cfg: dict[str, Any]
    local: Path
    baseline_tf: Any
    batch_size: int
    keys: list[str]

    def fill(self, cache: Path) -> Any:
        """The trainer's cold path up to the first batch: list, fill the node cache, build the dataset."""
        from kubetune_trainer.data import build_index, datasets, prepare_images
        from kubetune_trainer.storage import S3Store

        store = S3Store(self.endpoint, REGION)
        index = build_index(store, self.spec, None, seed=42)
        folder, _corrupt = prepare_images(store, index, root=cache)
        return datasets(folder, index, self.cfg, augment="strong")[0]

    def epoch(self, dataset: Any) -> int:
        return epoch(loader_for(dataset, self.batch_size))

    def baseline_epoch(self) -> int:
        import torchvision

        return epoch(
            loader_for(torchvision.datasets.ImageFolder(str(self.local), transform=self.baseline_tf), self.batch_size)
        )

    def raw_fill(self, into: Path) -> None:
        """The floor of any S3 path: one recursive listing, every object once by parallel GETs, to disk."""
        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="pipeline/")
        keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
        if len(keys) != len(self.keys):
            raise RuntimeError(f"listed {len(keys)} objects, expected {len(self.keys)}")

        def get(key: str) -> None:
            path = into / key
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_bytes(self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read())

        with ThreadPoolExecutor(DOWNLOAD_THREADS) as pool:
            list(pool.map(get, keys))


def run(config: Config, workdir: Path) -> list[Row]:
    import timm.data
    import torch

    from kubetune_trainer.config import DataSpec

    local = workdir / "local"
    cfg = data_cfg(config.image_size)
    # The baseline builds its transform from the same data config, straight from timm.
    baseline_tf = timm.data.create_transform(
        input_size=tuple(cfg["input_size"]),
        interpolation=cfg["interpolation"],
        mean=tuple(cfg["mean"]),
        std=tuple(cfg["std"]),
        is_training=True,
    )
    spec = DataSpec.model_validate(
        {
            "train": f"s3://{BUCKET}/{PREFIX}/",
            "validation": f"s3://{BUCKET}/{VAL_PREFIX}/",
            "imageSize": config.image_size,
            "augment": "strong",
        }
    )
    samples: dict[str, list[float]] = {
        k: [] for k in ("cold", "cold_base", "cold_floor", "fill", "fill_base", "warm", "warm_base")
    }
    threads = torch.get_num_threads()
    torch.set_num_threads(os.cpu_count() or 1)
    try:
        with s3_environment(), moto_server(workdir / "moto.log") as endpoint:
            client = boto3_client(endpoint, max_pool_connections=DOWNLOAD_THREADS)
            client.create_bucket(Bucket=BUCKET)
            make_dataset(config, local, client)
            log(
                f"{NAME}: {config.images} JPEGs {config.width}x{config.height} → {config.image_size}px, "
                f"{config.repeats} repeats"
            )
            keys = sorted(
                item["Key"]
                for page in client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="pipeline/")
                for item in page.get("Contents", [])
            )
            paths = _Paths(endpoint, client, spec, cfg, local, baseline_tf, config.batch_size, keys)
            # One untimed round of each: imports, the page cache and allocators warm up for both alike.
            paths.epoch(paths.fill(workdir / "warmup"))
            paths.baseline_epoch()
            shutil.rmtree(workdir / "warmup", ignore_errors=True)
            for repeat in range(config.repeats):
                first = repeat % 2 == 0  # alternate which path goes first
                cache, raw = workdir / f"cache{repeat}", workdir / f"raw{repeat}"
                # Cold: fill the node cache, then the first epoch; against one local epoch.
                for turn in (True, False) if first else (False, True):
                    if turn:
                        fill_s, train = timed_value(functools.partial(paths.fill, cache))
                        epoch_s, images = timed_value(functools.partial(paths.epoch, train))
                        samples["cold"].append(images / (fill_s + epoch_s))
                        samples["fill"].append(len(keys) / fill_s)
                    else:
                        base_s, base_images = timed_value(paths.baseline_epoch)
                        raw_s = timed(functools.partial(paths.raw_fill, raw))
                        samples["cold_base"].append(base_images / base_s)
                        samples["fill_base"].append(len(keys) / raw_s)
                        samples["cold_floor"].append(base_images / (raw_s + base_s))
                # Warm: a later epoch reads the filled cache.
                for turn in (True, False) if first else (False, True):
                    if turn:
                        seconds, images = timed_value(functools.partial(paths.epoch, train))
                        samples["warm"].append(images / seconds)
                    else:
                        seconds, images = timed_value(paths.baseline_epoch)
                        samples["warm_base"].append(images / seconds)
                shutil.rmtree(cache, ignore_errors=True)
                shutil.rmtree(raw, ignore_errors=True)
    finally:
        torch.set_num_threads(threads)
    note = (
        f"{config.images} JPEGs {config.width}x{config.height} (kubetune also fetches "
        f"{config.classes * VAL_PER_CLASS} validation images), resnet18 training transforms at "
        f"{config.image_size}px, batch {config.batch_size}, no loader processes"
    )
    floor = (
        "kubetune's cache fill (listing, download, decode-check) vs one recursive listing and raw "
        "parallel boto3 GETs of the same objects: the floor of any S3 path here"
    )
    cold_floor = (
        "the first epoch on a cold node vs the best any S3 path could do here: the raw GETs above, then one local epoch"
    )
    return [
        Row(
            NAME, "later epochs: warm node cache", "images/s", samples["warm"], samples["warm_base"], (">=", 0.8), note
        ),
        Row(
            NAME,
            "cache fill vs raw S3 GETs (floor)",
            "objects/s",
            samples["fill"],
            samples["fill_base"],
            None,  # diagnostic: where the cold path's time goes; the targets are on images delivered
            floor,
        ),
        Row(
            NAME,
            "first epoch, cold node vs raw S3 GETs + local epoch",
            "images/s",
            samples["cold"],
            samples["cold_floor"],
            (">=", 0.8),
            cold_floor,
        ),
        Row(
            NAME,
            "first epoch, cold node vs local disk (no S3)",
            "images/s",
            samples["cold"],
            samples["cold_base"],
            None,
            note,
        ),
    ]
