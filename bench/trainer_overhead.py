"""Trainer overhead: images/s of the trainer's training epochs through Ray Train (one CPU worker) against a
plain single-process PyTorch loop, with the same model, batch, images, steps and CPU threads.

kubetune's side is the trainer as `kubetune run --local` runs it (`run.check_inputs`, `run.prepare`,
`run.train`: TorchTrainer, the per-worker `loop.train_loop`, its `steps.Stepper`), on a local Ray
instance, with the worker given every core of this machine; its figure is the `imagesPerSecond` the
loop records per epoch in `history.json` (the training steps of the epoch, loading included; not
validation or checkpointing). The baseline reads the same images from local disk through
torchvision's ImageFolder and the same timm transforms, and runs forward, loss, backward and AdamW on
the same architecture with the same number of torch threads. The first epoch of each run is a warm-up
and is left out on both sides.
"""

from __future__ import annotations

import dataclasses
import io
import json
import os
import random
import time
import uuid
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import REGION, Row, boto3_client, log, moto_server, s3_environment

NAME = "Trainer overhead"
DATA_BUCKET = "bench-train"
MODEL_BUCKET = "bench-models"
OUT_BUCKET = "bench-runs"


@dataclasses.dataclass(frozen=True)
class Config:
    architecture: str = "resnet18"
    image_size: int = 64
    classes: int = 4
    batch_size: int = 32
    # Epochs long enough that the per-epoch work (a checkpoint after each) weighs as in a real run, and
    # several of them: on a shared machine a median over many epochs resists bursts of load better.
    steps_per_epoch: int = 24
    epochs: int = 6
    repeats: int = 2

    @classmethod
    def full(cls) -> Config:
        return cls()

    @classmethod
    def quick(cls) -> Config:
        return cls(epochs=4, repeats=1)

    @classmethod
    def tiny(cls) -> Config:
        return cls(
            architecture="test_resnet", image_size=32, classes=2, batch_size=4, steps_per_epoch=2, epochs=2, repeats=1
        )

    @property
    def images(self) -> int:
        return self.batch_size * self.steps_per_epoch


def png(rng: random.Random, size: int, label: int) -> bytes:
    import numpy as np
    from PIL import Image

    gen = np.random.default_rng(rng.randrange(2**32))
    pixels = gen.integers(0, 255, (size, size, 3), dtype=np.uint8)
    pixels[..., label % 3] //= 2  # a little signal per class
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, format="PNG")
    return buffer.getvalue()


def make_world(config: Config, local: Path, client: Any, workdir: Path) -> dict[str, str]:
    """The training images on local disk and in S3, a few validation images in S3, random base weights."""
    import timm
    import torch
    from safetensors.torch import save_model

    rng = random.Random(0)
    items: list[tuple[str, str, bytes]] = []
    for n in range(config.images):
        label = n % config.classes
        rel = f"class{label}/{n:05d}.png"
        data = png(rng, config.image_size, label)
        (local / rel).parent.mkdir(parents=True, exist_ok=True)
        (local / rel).write_bytes(data)
        items.append((DATA_BUCKET, f"train/{rel}", data))
    for n in range(config.classes * 2):
        items.append((DATA_BUCKET, f"val/class{n % config.classes}/{n:05d}.png", png(rng, config.image_size, n)))
    torch.manual_seed(0)
    weights = workdir / "base.safetensors"
    save_model(timm.create_model(config.architecture, num_classes=config.classes), str(weights))
    items.append((MODEL_BUCKET, f"base/{config.architecture}.safetensors", weights.read_bytes()))
    for bucket in (DATA_BUCKET, MODEL_BUCKET, OUT_BUCKET):
        client.create_bucket(Bucket=bucket)
    with ThreadPoolExecutor(16) as pool:
        list(pool.map(lambda item: client.put_object(Bucket=item[0], Key=item[1], Body=item[2]), items))
    return {
        "checkpoint": f"s3://{MODEL_BUCKET}/base/{config.architecture}.safetensors",
        "train": f"s3://{DATA_BUCKET}/train/",
        "validation": f"s3://{DATA_BUCKET}/val/",
    }


def trainer_config(config: Config, uris: dict[str, str], endpoint: str, run: str, cpus: int) -> Any:
    from kubetune_trainer.config import TrainerConfig

    return TrainerConfig.model_validate(
        {
            "jobName": run,
            "runName": run,
            "model": {"architecture": config.architecture, "checkpoint": uris["checkpoint"], "strategy": "full"},
            "data": {
                "train": uris["train"],
                "validation": uris["validation"],
                "imageSize": config.image_size,
                "augment": "none",
            },
            "training": {
                "epochs": config.epochs,
                "batchSize": config.batch_size,
                "learningRate": 0.001,
                "optimizer": "adamw",
                "weightDecay": 0.05,
                "precision": "fp32",
            },
            "output": {"path": f"s3://{OUT_BUCKET}/{run}/", "checkpointsToKeep": 1},
            "storage": {"endpoint": endpoint, "region": REGION},
            "scaling": {"workers": 1, "gpusPerWorker": 0, "cpusPerWorker": float(cpus)},
            "maxFailures": 0,
        }
    )


def product_run(config: Config, uris: dict[str, str], endpoint: str, cpus: int) -> list[float]:
    """One `kubetune run --local`-style run; images/s of each epoch after the first."""
    from kubetune_trainer.run import check_inputs, prepare, store_for, train

    run = f"bench-{uuid.uuid4().hex[:8]}"
    trainer = trainer_config(config, uris, endpoint, run, cpus)
    store = store_for(trainer)
    prepared = prepare(trainer, check_inputs(trainer, store), here=True)
    train(trainer, prepared, cpus_per_worker=float(cpus), use_gpu=False)
    from kubetune_trainer.storage import S3Uri

    history = json.loads(store.get_bytes(S3Uri(OUT_BUCKET, f"{run}/history.json")))
    return [float(entry["imagesPerSecond"]) for entry in history[1:]]


def baseline_run(config: Config, local: Path, data_cfg: dict[str, Any], threads: int) -> list[float]:
    """The plain loop: same architecture, images, transforms, batch and steps; images/s after epoch 1."""
    import timm
    import timm.data
    import torch
    import torchvision
    from torch.utils.data import DataLoader

    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        torch.manual_seed(0)
        model = timm.create_model(config.architecture, num_classes=config.classes)
        model.train()
        optimizer = torch.optim.AdamW(model.parameters(), lr=0.001, weight_decay=0.05)
        transform = timm.data.create_transform(
            input_size=tuple(data_cfg["input_size"]),
            interpolation=data_cfg["interpolation"],
            mean=tuple(data_cfg["mean"]),
            std=tuple(data_cfg["std"]),
            crop_pct=data_cfg.get("crop_pct"),
            crop_mode=data_cfg.get("crop_mode"),
            is_training=False,
        )
        dataset = torchvision.datasets.ImageFolder(str(local), transform=transform)
        loader = DataLoader(dataset, batch_size=config.batch_size, shuffle=True, num_workers=0, drop_last=True)
        rates = []
        for _ in range(config.epochs):
            started, seen = time.monotonic(), 0
            for images, labels in loader:
                loss = torch.nn.functional.cross_entropy(model(images), labels)
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                seen += labels.numel()
            rates.append(seen / (time.monotonic() - started))
        return rates[1:]
    finally:
        torch.set_num_threads(previous)


def run(config: Config, workdir: Path) -> list[Row]:
    os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    from kubetune_trainer.config import use_ray_train_env

    use_ray_train_env()  # before ray.init, as `kubetune run --local` does
    import logging

    import ray
    import timm

    from kubetune_trainer.model import data_config

    cpus = os.cpu_count() or 1
    workdir = workdir.resolve()  # Ray workers run in another folder: the node cache path must be absolute
    local = workdir / "local"
    data_cfg = data_config(timm.create_model(config.architecture, num_classes=config.classes), config.image_size)
    product: list[float] = []
    baseline: list[float] = []
    with s3_environment(workdir / "node-cache"), moto_server(workdir / "moto.log") as endpoint:
        uris = make_world(config, local, boto3_client(endpoint), workdir)
        log(
            f"{NAME}: {config.architecture} at {config.image_size}px, batch {config.batch_size}, "
            f"{config.steps_per_epoch} steps x {config.epochs} epochs, {cpus} CPUs, {config.repeats} repeats"
        )
        ray.init(
            address="local",
            num_cpus=cpus,
            include_dashboard=False,
            log_to_driver=False,
            logging_level=logging.WARNING,
        )
        try:
            for repeat in range(config.repeats):
                turns = ("product", "baseline") if repeat % 2 == 0 else ("baseline", "product")
                for turn in turns:
                    if turn == "product":
                        product += product_run(config, uris, endpoint, cpus)
                    else:
                        baseline += baseline_run(config, local, data_cfg, cpus)
                log(f"{NAME}: repeat {repeat + 1}: kubetune {product[-1]:.1f}, plain {baseline[-1]:.1f} images/s")
        finally:
            ray.shutdown()
    note = (
        f"{config.architecture} at {config.image_size}px, batch {config.batch_size}, {config.steps_per_epoch} "
        f"steps/epoch, AdamW, fp32; worker and plain loop both on {cpus} CPUs/torch threads; "
        f"samples are epochs 2..{config.epochs} of {config.repeats} run(s)"
    )
    return [Row(NAME, "training epoch throughput", "images/s", product, baseline, (">=", 0.95), note)]
