"""Checkpoint blocking: how long training steps wait for checkpoints taken every few steps, as a share of
the training time, with the trainer's asynchronous upload against a synchronous one.

Both sides train the same model with AdamW on the same random batches (no data loading: the figure is
about checkpoints) and checkpoint every `every` steps into the same moto S3 server. kubetune's side is
the loop's `save`: wait while a second snapshot is still uploading (`SnapshotUploads.wait(at_most=1)`),
copy the state off the live tensors (`checkpoint.take_snapshot`), and hand it to an upload thread (Ray
Train's `checkpoint_upload_mode=ASYNC` pool, one thread here) that writes and uploads it
(`SnapshotUploads.send`). The baseline is the synchronous path the trainer had before: write the
checkpoint (`checkpoint.write_checkpoint`) and upload it (`S3Store.upload_dir`) on the training thread.
The blocked time is the time the training thread spends in the checkpoint; the training time is the
whole loop's. The last checkpoint's upload is waited for after the loop, as Ray Train does before the
run ends, and not counted: no step waits for it.
"""

from __future__ import annotations

import dataclasses
import shutil
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

from bench.common import REGION, Row, boto3_client, log, moto_server, s3_environment

NAME = "Checkpoint blocking"
BUCKET = "bench-blocking"
TARGET_PERCENT = 2.0


@dataclasses.dataclass(frozen=True)
class Config:
    architecture: str = "resnet18"
    image_size: int = 64
    batch_size: int = 32
    steps: int = 40
    every: int = 8  # steps between checkpoints
    repeats: int = 3

    @classmethod
    def full(cls) -> Config:
        return cls()

    @classmethod
    def quick(cls) -> Config:
        return cls(steps=24, repeats=2)

    @classmethod
    def tiny(cls) -> Config:
        return cls(architecture="test_resnet", image_size=32, batch_size=4, steps=6, every=2, repeats=1)


@dataclasses.dataclass
class Training:
    """The model, optimizer and schedule one run trains, and its batches."""

    model: Any
    optimizer: Any
    scheduler: Any
    batches: list[tuple[Any, Any]]

    @classmethod
    def make(cls, config: Config) -> Training:
        import timm
        import torch

        torch.manual_seed(0)
        model = timm.create_model(config.architecture, num_classes=10)
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3)
        scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
        shape = (config.batch_size, 3, config.image_size, config.image_size)
        batches = [(torch.randn(shape), torch.randint(0, 10, (config.batch_size,))) for _ in range(4)]
        return cls(model, optimizer, scheduler, batches)

    def step(self, index: int) -> None:
        import torch

        inputs, targets = self.batches[index % len(self.batches)]
        loss = torch.nn.functional.cross_entropy(self.model(inputs), targets)
        self.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        self.optimizer.step()
        self.scheduler.step()

    def state(self, step: int) -> dict[str, Any]:
        progress = {"epoch": 0, "step": step, "history": []}
        return {
            "rank": 0,
            "model": self.model,
            "optimizer": self.optimizer,
            "scheduler": self.scheduler,
            "scaler": None,
            "progress": progress,
        }


def train(config: Config, checkpoint: Any) -> tuple[float, float]:
    """(seconds the loop took, seconds its checkpoints blocked it) for one run."""
    training = Training.make(config)
    training.step(0)  # warm-up: the first step allocates the optimizer state
    blocked = 0.0
    started = time.perf_counter()
    for index in range(1, config.steps + 1):
        training.step(index)
        if index % config.every == 0:
            began = time.perf_counter()
            checkpoint(training, index)
            blocked += time.perf_counter() - began
    return time.perf_counter() - started, blocked


def run(config: Config, workdir: Path) -> list[Row]:
    from kubetune_trainer.checkpoint import SnapshotUploads, take_snapshot, write_checkpoint
    from kubetune_trainer.storage import S3Store, S3Uri

    log(f"{NAME}: {config.architecture}, {config.steps} steps, a checkpoint every {config.every}")
    shares: dict[str, list[float]] = {"async": [], "sync": []}
    totals: dict[str, list[float]] = {"async": [], "sync": []}
    with s3_environment(), moto_server(workdir / "moto.log") as endpoint:
        store = S3Store(endpoint, REGION)
        boto3_client(endpoint).create_bucket(Bucket=BUCKET)
        uploads = SnapshotUploads(store)
        pool = ThreadPoolExecutor(1, thread_name_prefix="bench-upload")

        def asynchronous(training: Training, step: int) -> None:
            uploads.wait(at_most=1)
            snapshot = take_snapshot(**training.state(step))
            uploads.begin()
            local = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=workdir))
            pool.submit(uploads.send, snapshot, local, S3Uri(BUCKET, f"async/step-{step:08d}"))

        def synchronous(training: Training, step: int) -> None:
            local = Path(tempfile.mkdtemp(prefix="bench-ckpt-", dir=workdir))
            try:
                write_checkpoint(local, **training.state(step))
                store.upload_dir(local, S3Uri(BUCKET, f"sync/step-{step:08d}"))
            finally:
                shutil.rmtree(local, ignore_errors=True)

        try:
            for repeat in range(config.repeats):
                # Alternate the order, so neither side always runs on a warmer machine.
                sides = [("async", asynchronous), ("sync", synchronous)]
                for name, checkpoint in sides if repeat % 2 == 0 else sides[::-1]:
                    seconds, blocked = train(config, checkpoint)
                    uploads.wait()  # the last upload ends before the next run (Ray Train's end of run)
                    shares[name].append(100.0 * blocked / seconds)
                    totals[name].append(seconds)
        finally:
            pool.shutdown(wait=True)
    note = (
        f"{config.architecture} + AdamW at {config.image_size}px, batch {config.batch_size}, CPU; a checkpoint every "
        f"{config.every} steps into moto S3; async (kubetune) vs synchronous write and upload on the training thread"
    )
    return [
        Row(
            NAME,
            "steps blocked by checkpoints, % of training time",
            "%",
            shares["async"],
            shares["sync"],
            ("<=", TARGET_PERCENT),
            note,
            absolute=True,
        ),
        Row(NAME, "training time with checkpoints", "s", totals["async"], totals["sync"], None, note),
    ]
