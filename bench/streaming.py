"""Streaming: images per second of a training epoch streamed from WebDataset shards (`data.cache.mode:
stream`) with a sizeLimit of a tenth of the dataset, against raw GETs of the same shards and against the
full cache's warm epoch; and the stream folder's peak size on disk against that limit.

The dataset: small JPEGs dealt into WebDataset shards (`<n>.jpg` + `<n>.cls`) on the moto server. Each
path is what a worker runs: the driver's index (`formats.classification_index`), then the trainer's
DataLoader (`loaders.SeededSamples`, the trainer's transforms at `imageSize`, two loader processes that
decode) over its epoch order: `stream.StreamOrder` through a `stream.Window` (shards fetched ahead within
the limit, dropped after use) for stream mode, `loaders.EpochOrder` over the node cache filled by
`data.prepare_images` for full mode (timed on a later, warm epoch). No model step: the figure is what the
data path delivers, the ceiling of a training epoch's rate. The floor is what any S3 path must pay: one
listing and every shard once by parallel raw boto3 GETs (as many threads as the stream fetches with),
read to memory. Held against it: the stream epoch (the issue's target), the stream's own I/O (the window
walked without decoding: shards read by offset, group files written and dropped), and the full cache's
warm epoch (decoding alone, no S3: the ceiling of any epoch that decodes on this machine). The stream
epoch is also held against that warm epoch: what streaming costs a training epoch. Peak disk is sampled
every few milliseconds (the stream folder's bytes) during the stream epochs.
"""

from __future__ import annotations

import dataclasses
import functools
import io
import random
import shutil
import subprocess
import sys
import tarfile
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import REGION, Row, boto3_client, log, moto_server, s3_environment, timed_value
from bench.input_pipeline import jpeg

NAME = "Streaming"
BUCKET = "bench-shards"
SEED = 42


@dataclasses.dataclass(frozen=True)
class Config:
    images: int = 20_000
    per_shard: int = 250
    classes: int = 10
    side: int = 32
    image_size: int = 32
    batch_size: int = 64
    limit_fraction: float = 0.1
    repeats: int = 3
    loader_processes: int = 2

    @classmethod
    def full(cls) -> Config:
        return cls()

    @classmethod
    def quick(cls) -> Config:
        # 12%: at 10% a window of two 125-image shards plus the loader's prefetch is just over the limit.
        return cls(images=5_000, per_shard=125, repeats=2, limit_fraction=0.12)

    @classmethod
    def tiny(cls) -> Config:
        return cls(images=240, per_shard=20, classes=2, batch_size=8, limit_fraction=0.5, repeats=1, loader_processes=0)

    @property
    def shards(self) -> int:
        return -(-self.images // self.per_shard)


def shard_bytes(members: list[tuple[str, bytes]]) -> bytes:
    body = io.BytesIO()
    with tarfile.open(fileobj=body, mode="w") as tar:
        for name, data in members:
            info = tarfile.TarInfo(name)
            info.size = len(data)
            tar.addfile(info, io.BytesIO(data))
    return body.getvalue()


def make_shards(config: Config, client: Any) -> int:
    """The train shards (and one validation shard) in the bucket; the images' bytes in all."""
    rng = random.Random(0)
    images = [jpeg(rng, config.side, config.side) for _ in range(config.images)]
    shards = []
    for s in range(config.shards):
        members: list[tuple[str, bytes]] = []
        for n in range(s * config.per_shard, min(config.images, (s + 1) * config.per_shard)):
            members += [(f"{n:06d}.jpg", images[n]), (f"{n:06d}.cls", str(n % config.classes).encode())]
        shards.append((f"train/train-{s:05d}.tar", shard_bytes(members)))
    val = [
        (f"v{n:04d}.{ext}", data)
        for n in range(config.classes * 2)
        for ext, data in (("jpg", images[n]), ("cls", str(n % config.classes).encode()))
    ]
    shards.append(("val/val-00000.tar", shard_bytes(val)))
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda kv: client.put_object(Bucket=BUCKET, Key=kv[0], Body=kv[1]), shards))
    return sum(len(i) for i in images)


def trainer_config(config: Config, limit: str) -> Any:
    from kubetune_trainer.config import TrainerConfig

    last = config.shards - 1
    return TrainerConfig.model_validate(
        {
            "jobName": "bench-stream",
            "runName": "bench-stream",
            "model": {"architecture": "resnet18", "checkpoint": f"s3://{BUCKET}/w.safetensors"},
            "data": {
                "format": "webdataset",
                "train": f"s3://{BUCKET}/train/train-{{00000..{last:05d}}}.tar",
                "validation": f"s3://{BUCKET}/val/val-00000.tar",
                "imageSize": config.image_size,
                "augment": "light",
                "cache": {"mode": "stream", "sizeLimit": limit},
            },
            "training": {"batchSize": config.batch_size, "seed": SEED},
            "output": {"path": f"s3://{BUCKET}/out/"},
        }
    )


# The sampler runs in a process of its own: walking the folder every few milliseconds in the measured
# process would take its GIL from the fetch threads and the DataLoader.
_SAMPLER = """
import os, sys, time
folder, stop, peak = sys.argv[1], sys.argv[2], 0
while not os.path.exists(stop):
    total = 0
    for root, _, files in os.walk(folder):
        for name in files:
            try:
                total += os.stat(os.path.join(root, name)).st_size
            except FileNotFoundError:
                pass
    peak = max(peak, total)
    time.sleep(0.003)
print(peak)
"""


class DiskSampler:
    """The bytes under a folder, sampled every few milliseconds by another process; `peak` the largest seen."""

    def __init__(self, folder: Path) -> None:
        self.folder, self.peak = folder, 0
        self.stop = folder.parent / f".{folder.name}.stop"

    def __enter__(self) -> DiskSampler:
        self.stop.unlink(missing_ok=True)
        args = [sys.executable, "-c", _SAMPLER, str(self.folder), str(self.stop)]
        self.proc = subprocess.Popen(args, stdout=subprocess.PIPE, text=True)
        return self

    def __exit__(self, *_: object) -> None:
        self.stop.touch()
        out = self.proc.communicate(timeout=60)[0]
        self.peak = int(out.strip() or 0)
        self.stop.unlink(missing_ok=True)


def epoch_images(loader: Any) -> int:
    return sum(images.shape[0] for images, _ in loader)


@dataclasses.dataclass
class _Paths:
    """The stream epoch, the full cache's warm epoch and the raw-GET floor over one set of shards."""

    config: Config
    store: Any  # the worker's S3Store, made once as a worker makes it (a boto3 client costs ~0.3 s to make)
    client: Any
    trainer: Any
    index: Any
    cfg: dict[str, Any]

    def loader(self, dataset: Any, order: Any, collate: Any = None) -> Any:
        from torch.utils.data import DataLoader

        from kubetune_trainer.loaders import SeededSamples

        return DataLoader(
            SeededSamples(dataset, SEED),
            batch_sampler=order,
            num_workers=self.config.loader_processes,
            collate_fn=collate,
        )

    def stream_epoch(self, epoch: int, cache: Path) -> tuple[int, int, int]:
        """(images, peak bytes on disk, the window's own peak) of one streamed epoch."""
        from kubetune_trainer.data import datasets
        from kubetune_trainer.stream import GroupImages, Readable, ReadableBatches, loader_lag

        order = self.stream_order(epoch, loader_lag(self.config.loader_processes))
        setup = order.window
        folder = setup.fetcher.folder
        train = Readable(GroupImages(setup, datasets(folder, self.index, self.cfg, "light")[0]))
        with DiskSampler(folder) as disk:
            images = epoch_images(self.loader(train, order, ReadableBatches(None)))
        return images, disk.peak, setup.peak

    def fetch_epoch(self, epoch: int) -> int:
        """The stream's own I/O: one epoch's batches through the window (fetched, written, dropped), no decoding."""
        return sum(len(batch) for batch in self.stream_order(epoch, 0))

    def stream_order(self, epoch: int, lag: int) -> Any:
        """A single worker's `StreamOrder` for `epoch`, over a fresh stream folder."""
        from kubetune_trainer.stream import StreamOrder, stream_setup

        setup = stream_setup(self.store, self.trainer, self.index, 0, 1, lag)
        size, batch = len(self.index.train), self.config.batch_size
        order = StreamOrder(
            size, window=setup.train, shuffle=setup.shuffle, seed=SEED, batch_size=batch, reference=1, rank=0, world=1
        )
        order.set_epoch(epoch)
        return order

    def full_cache(self, cache: Path) -> Any:
        from kubetune_trainer.data import datasets, prepare_images

        folder, _ = prepare_images(self.store, self.index, root=cache)
        return datasets(folder, self.index, self.cfg, "light")[0]

    def full_epoch(self, train: Any, epoch: int) -> int:
        from kubetune_trainer.loaders import EpochOrder

        order = EpochOrder(len(train), seed=SEED, batch_size=self.config.batch_size, reference=1, rank=0, world=1)
        order.set_epoch(epoch)
        return epoch_images(self.loader(train, order))

    def raw_gets(self) -> None:
        """One listing, every train shard once by parallel GETs, read to memory."""
        from kubetune_trainer.stream import STREAM_THREADS

        pages = self.client.get_paginator("list_objects_v2").paginate(Bucket=BUCKET, Prefix="train/")
        keys = [item["Key"] for page in pages for item in page.get("Contents", [])]
        with ThreadPoolExecutor(STREAM_THREADS) as pool:
            list(pool.map(lambda key: self.client.get_object(Bucket=BUCKET, Key=key)["Body"].read(), keys))


def run(config: Config, workdir: Path) -> list[Row]:
    import timm

    from kubetune_trainer.formats import classification_index
    from kubetune_trainer.model import data_config
    from kubetune_trainer.storage import S3Store

    samples: dict[str, list[float]] = {k: [] for k in ("stream", "fetch", "full", "raw", "disk", "window")}
    cache = workdir / "cache"
    with s3_environment(cache), moto_server(workdir / "moto.log") as endpoint:
        client = boto3_client(endpoint)
        client.create_bucket(Bucket=BUCKET)
        total = make_shards(config, client)
        limit_bytes = int(total * config.limit_fraction)
        limit = f"{max(1, limit_bytes // 1024)}Ki"
        trainer = trainer_config(config, limit)
        store = S3Store(endpoint, REGION)
        index = classification_index(store, trainer)
        cfg = data_config(timm.create_model("resnet18", pretrained=False, num_classes=2), config.image_size)
        paths = _Paths(config, store, client, trainer, index, cfg)
        log(
            f"{NAME}: {config.images} JPEGs {config.side}px ({total:,} bytes) in {config.shards} shards, sizeLimit {limit}"
        )
        full = paths.full_cache(cache)
        paths.full_epoch(full, 0)  # the cache's first epoch: what follows is warm
        paths.stream_epoch(0, cache)  # one untimed round of each warms imports and the page cache
        for repeat in range(config.repeats):
            for turn in ("stream", "fetch", "full", "raw") if repeat % 2 == 0 else ("raw", "full", "fetch", "stream"):
                if turn == "stream":
                    seconds, (images, disk, window) = timed_value(
                        functools.partial(paths.stream_epoch, repeat + 1, cache)
                    )
                    samples["stream"].append(images / seconds)
                    samples["disk"].append(disk / (limit_bytes // 1024 * 1024))
                    samples["window"].append(window / (limit_bytes // 1024 * 1024))
                elif turn == "fetch":
                    seconds, images = timed_value(functools.partial(paths.fetch_epoch, repeat + 1))
                    samples["fetch"].append(images / seconds)
                elif turn == "full":
                    seconds, images = timed_value(functools.partial(paths.full_epoch, full, repeat + 1))
                    samples["full"].append(images / seconds)
                else:
                    seconds, _ = timed_value(paths.raw_gets)
                    samples["raw"].append(len(index.train) / seconds)
        shutil.rmtree(cache, ignore_errors=True)
    note = (
        f"{config.images} JPEGs {config.side}x{config.side} in {config.shards} WebDataset shards of {config.per_shard}, "
        f"sizeLimit {limit} ({config.limit_fraction:.0%} of the images), transforms at {config.image_size}px, batch "
        f"{config.batch_size}, {config.loader_processes} loader processes"
    )
    return [
        Row(
            NAME,
            "stream epoch vs raw shard GETs (floor)",
            "images/s",
            samples["stream"],
            samples["raw"],
            (">=", 0.8),  # the target; no epoch that decodes reaches it here (the next rows say why)
            note,
        ),
        Row(
            NAME,
            "stream fetch alone (no decode) vs raw shard GETs",
            "images/s",
            samples["fetch"],
            samples["raw"],
            (">=", 0.8),  # the stream's own I/O (fetch by offset, write, drop) against the floor
            note,
        ),
        Row(
            NAME,
            "full cache warm epoch (decode alone, no S3) vs raw shard GETs",
            "images/s",
            samples["full"],
            samples["raw"],
            None,  # diagnostic: the ceiling of any epoch that decodes, on this machine
            note,
        ),
        Row(
            NAME,
            "stream epoch vs full cache, warm epoch",
            "images/s",
            samples["stream"],
            samples["full"],
            (">=", 0.8),
            note,
        ),
        Row(NAME, "peak disk of the stream folder / sizeLimit", "fraction", samples["disk"], [], ("<=", 1.0), note),
        Row(NAME, "the window's own peak count / sizeLimit", "fraction", samples["window"], [], ("<=", 1.0), note),
    ]
