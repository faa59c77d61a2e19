"""The per-worker training loop that Ray Train runs on every worker, for every task.

Each worker builds the same model from the node-cached base weights, wraps it for DDP, reads its shard
of the node-cached images, and per epoch: trains, evaluates exactly (validation sharded without
padding; sums all-reduced, or detections gathered), writes a checkpoint and reports it. What differs
between classification and detection (model, data, step, metrics) comes from a `tasks.Task`. On GPU it
trains in bf16 (or fp16 with a grad scaler) autocast (classification also channels_last); on CPU in
fp32 with torch using the worker's CPUs.
A restarted worker, or a restarted driver with the same run name, resumes from the latest checkpoint:
weights, optimizer, schedule, RNG, history and epoch, so `history.json` never doubles an epoch.
"""

from __future__ import annotations

import math
import os
import random
import tempfile
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset

from kubetune_trainer.cache import cached_object
from kubetune_trainer.checkpoint import (
    check_identity,
    checkpoint_dir_name,
    download_checkpoint,
    read_progress,
    restore_checkpoint,
    s3_uploader,
    unwrap,
    write_checkpoint,
)
from kubetune_trainer.config import TrainerConfig, TrainingSpec
from kubetune_trainer.data import DatasetIndex, prepare_images
from kubetune_trainer.model import param_groups, set_train_mode
from kubetune_trainer.reporting import ProgressMetrics, ProgressUpdate, worker_reporters
from kubetune_trainer.steps import autocast_for, configure_backends
from kubetune_trainer.storage import ObjectInfo, S3Store, S3Uri
from kubetune_trainer.tasks import Task, task_for

# Test-only fault injection: the driver copies this variable into the plan; rank 0 then raises once,
# in the first step after epoch N's checkpoint, in an attempt that did not itself resume.
FAULT_ENV = "KUBETUNE_TEST_FAIL_AFTER_EPOCH"
REPORT_INTERVAL_S = 1.0


class InjectedFaultError(RuntimeError):
    """Raised by the test-only fault hook (KUBETUNE_TEST_FAIL_AFTER_EPOCH)."""


@dataclass
class RunPlan:
    """What the driver worked out once, for every worker: data, preprocessing, base weights, resources."""

    index: DatasetIndex
    data_config: dict[str, Any]
    weights: ObjectInfo
    threads: int = 1
    loader_workers: int = 0
    fault_after_epoch: int | None = None
    relay: Any = field(default=None, repr=False)
    # Detection runs: the DetectionIndex (boxes per image) on the wire; `index` then lists the images only.
    detection: dict[str, Any] | None = field(default=None, repr=False)

    def loop_config(self, config: TrainerConfig) -> dict[str, Any]:
        return {
            "config": config.wire(),
            "index": self.index.wire(),
            "dataConfig": self.data_config,
            "weights": [self.weights.key, self.weights.size, self.weights.etag],
            "threads": self.threads,
            "loaderWorkers": self.loader_workers,
            "faultAfterEpoch": self.fault_after_epoch,
            "relay": self.relay,
            "detection": self.detection,
        }

    @classmethod
    def from_loop_config(cls, raw: Mapping[str, Any]) -> tuple[TrainerConfig, RunPlan]:
        key, size, etag = raw["weights"]
        plan = cls(
            index=DatasetIndex.from_wire(raw["index"]),
            data_config=dict(raw["dataConfig"]),
            weights=ObjectInfo(key, int(size), etag),
            threads=int(raw["threads"]),
            loader_workers=int(raw["loaderWorkers"]),
            fault_after_epoch=raw.get("faultAfterEpoch"),
            relay=raw.get("relay"),
            detection=raw.get("detection"),
        )
        return TrainerConfig.model_validate(raw["config"]), plan


def lr_factor(training: TrainingSpec, steps_per_epoch: int) -> Callable[[int], float]:
    """Learning-rate multiplier per optimizer step: linear warm-up, then cosine, constant or step decay.

    `step` decays tenfold at 1/3 and 2/3 of the epochs after warm-up.
    """
    warmup = training.warmup_epochs * steps_per_epoch
    total = max(1, training.epochs * steps_per_epoch - warmup)

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        progress = min(1.0, (step - warmup) / total)
        if training.scheduler == "cosine":
            return 0.5 * (1.0 + math.cos(math.pi * progress))
        if training.scheduler == "step":
            return 0.1 ** math.floor(progress * 3)
        return 1.0

    return factor


def make_optimizer(groups: list[dict[str, Any]], training: TrainingSpec) -> torch.optim.Optimizer:
    if training.optimizer == "sgd":
        return torch.optim.SGD(groups, lr=training.learning_rate, momentum=0.9, nesterov=True)
    return torch.optim.AdamW(groups, lr=training.learning_rate)


def identity(config: TrainerConfig, index: DatasetIndex) -> dict[str, Any]:
    return {
        "architecture": config.model.architecture,
        "classNames": index.class_names,
        "strategy": config.model.strategy,
        "trainableLayers": config.model.trainable_layers,
    }


class _Sums:
    """Per-worker sums, all-reduced across workers when read."""

    def __init__(self, device: torch.device, names: tuple[str, ...]) -> None:
        self.names = names
        self.values = torch.zeros(len(names), dtype=torch.float64, device=device)

    def add(self, **values: torch.Tensor | float) -> None:
        for name, value in values.items():
            self.values[self.names.index(name)] += value.detach().double() if isinstance(value, torch.Tensor) else value

    def total(self) -> dict[str, float]:
        values = self.values.clone()
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(values)
        return dict(zip(self.names, values.tolist(), strict=True))


def _train_loader(
    dataset: Any, batch_size: int, seed: int, workers: int, cuda: bool, collate_fn: Any = None
) -> tuple[DataLoader[Any], Any]:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    sampler: Any
    if world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator())
    per_worker = math.ceil(len(dataset) / world)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=workers > 0,
        collate_fn=collate_fn,
        # A last batch of one image breaks BatchNorm in training mode.
        drop_last=per_worker > batch_size,
    )
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False), sampler


def _eval_loader(dataset: Any, batch_size: int, workers: int, cuda: bool, collate_fn: Any = None) -> DataLoader[Any]:
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    # Every image exactly once across workers (a DistributedSampler would pad with repeats).
    shard = Subset(dataset, list(range(ctx.get_world_rank(), len(dataset), ctx.get_world_size())))
    loader = DataLoader(
        shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=cuda, collate_fn=collate_fn
    )
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)


def _set_epoch(sampler: Any, seed: int, epoch: int) -> None:
    # Same order for an epoch whether or not the run was resumed before it.
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
        sampler.generator.manual_seed(seed * 1000 + epoch)


def train_loop(raw: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker."""
    import ray.train
    import ray.train.torch

    config, plan = RunPlan.from_loop_config(raw)
    training = config.training
    ctx = ray.train.get_context()
    rank, world = ctx.get_world_rank(), ctx.get_world_size()
    # Ray starts workers with one torch thread whatever their CPUs; use what the worker was given.
    torch.set_num_threads(plan.threads)
    device = ray.train.torch.get_device()
    cuda = device.type == "cuda"
    configure_backends(device)

    store = S3Store(config.storage.endpoint, config.storage.region)
    weights_uri = S3Uri.parse(config.model.checkpoint)
    task: Task = task_for(config, plan.index, plan.data_config, plan.detection)
    torch.manual_seed(training.seed)
    random.seed(training.seed + rank)
    model, strategy = task.build_model(cached_object(store, weights_uri, plan.weights), device)
    model = ray.train.torch.prepare_model(model)

    folder, _ = prepare_images(store, plan.index)
    train_set, val_set = task.datasets(folder)
    train_loader, sampler = _train_loader(
        train_set, training.batch_size, training.seed, plan.loader_workers, cuda, task.collate
    )
    val_loader = _eval_loader(val_set, training.batch_size, plan.loader_workers, cuda, task.collate)
    steps_per_epoch = max(1, len(train_loader))

    # Parameter names as the model knows them, not as the DDP wrapper prefixes them ("module.").
    groups = param_groups(unwrap(model), strategy, training.learning_rate, training.weight_decay)
    optimizer = make_optimizer(groups, training)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor(training, steps_per_epoch))
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and training.precision == "fp16")
    stepper = task.stepper(model, optimizer, scheduler, scaler, autocast_for(device, training.precision), device)

    run_identity = identity(config, plan.index)
    history: list[dict[str, Any]] = []
    start_epoch = step = 0
    latest: str | None = None
    resumed = ray.train.get_checkpoint()
    if resumed is not None:
        with tempfile.TemporaryDirectory(prefix="kubetune-restore-") as tmp:
            local = download_checkpoint(store, resumed, Path(tmp))
            check_identity(read_progress(local), run_identity, str(S3Uri.from_fs_path(resumed.path)))
            progress = restore_checkpoint(
                local, rank=rank, model=model, optimizer=optimizer, scheduler=scheduler, scaler=scaler
            )
        start_epoch, step, history = int(progress["epoch"]), int(progress["step"]), list(progress["history"])
        latest = str(S3Uri.from_fs_path(resumed.path))

    reporter = worker_reporters(plan.relay, rank)
    clock = _Clock(total_steps=training.epochs * steps_per_epoch, done=step)
    # The last finished epoch's validation figures, keyed as in history.json (and ProgressMetrics' wire names).
    last_val: dict[str, float] = {k: history[-1][k] for k in task.metric_keys if k in history[-1]} if history else {}
    uploader = s3_uploader(store)

    def update(epoch: int, phase: str, train_loss: float | None, ips: float | None) -> ProgressUpdate:
        return ProgressUpdate(
            epoch=epoch,
            total_epochs=training.epochs,
            step=step,
            total_steps=clock.total_steps,
            percent=min(100.0, 100.0 * step / max(1, clock.total_steps)),
            eta_seconds=clock.eta(step),
            metrics=ProgressMetrics.model_validate(
                {
                    **{k: v for k, v in last_val.items() if math.isfinite(v)},
                    "trainLoss": train_loss if train_loss is None or math.isfinite(train_loss) else None,
                    "imagesPerSecond": ips,
                    "learningRate": max(scheduler.get_last_lr()),
                }
            ),
            latest_checkpoint=latest,
            phase=phase,
        )

    if resumed is not None and rank == 0:
        print(f"kubetune: resumed from {latest} after epoch {start_epoch}", flush=True)
        reporter.report(update(start_epoch, "Resumed", None, None))

    for epoch in range(start_epoch, training.epochs):
        _set_epoch(sampler, training.seed, epoch)
        set_train_mode(model, strategy)
        sums = _Sums(device, ("loss", "count"))
        started = last_report = time.monotonic()
        seen = 0
        for i, (inputs, targets) in enumerate(train_loader):
            if plan.fault_after_epoch == epoch and start_epoch == 0 and rank == 0 and i == 0 and epoch > 0:
                raise InjectedFaultError(f"injected worker failure after epoch {epoch} ({FAULT_ENV})")
            loss = stepper.train_step(inputs, targets)
            step += 1
            count = len(inputs)  # images in the batch: a tensor's first dimension, or a list (detection)
            seen += count
            sums.add(loss=loss * count, count=float(count))
            now = time.monotonic()
            if rank == 0 and now - last_report >= REPORT_INTERVAL_S:
                last_report = now
                running = sums.values.tolist()  # rank 0's running mean: no collective mid-epoch
                ips = seen * world / max(now - started, 1e-9)
                reporter.report(update(epoch + 1, "Training", running[0] / max(running[1], 1.0), ips))
        seconds = time.monotonic() - started
        train = sums.total()
        last_val = task.evaluate(stepper, val_loader, device)
        entry: dict[str, Any] = {
            "epoch": epoch + 1,
            "trainLoss": train["loss"] / max(train["count"], 1.0),
            **last_val,
            "imagesPerSecond": train["count"] / max(seconds, 1e-9),
            "learningRate": max(scheduler.get_last_lr()),
            "seconds": seconds,
        }
        history.append(entry)
        progress = {**run_identity, "epoch": epoch + 1, "step": step, "history": history}
        with tempfile.TemporaryDirectory(prefix="kubetune-ckpt-") as tmp:
            if rank == 0 and epoch + 1 == training.epochs:
                progress["final"] = task.final_files(unwrap(model), val_set, device, Path(tmp))
            write_checkpoint(
                Path(tmp),
                rank=rank,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                scaler=scaler,
                progress=progress,
            )
            name = checkpoint_dir_name(epoch + 1)
            ray.train.report(
                dict(entry),
                checkpoint=ray.train.Checkpoint.from_directory(tmp),
                checkpoint_dir_name=name,
                checkpoint_upload_fn=uploader,
            )
        # `latest` stays the checkpoint this attempt resumed from: the driver's relay names each new one
        # once Ray Train has committed it.
        if rank == 0:
            reporter.report(update(epoch + 1, "Checkpointing", entry["trainLoss"], entry["imagesPerSecond"]))
    reporter.close()


@dataclass
class _Clock:
    """ETA from the pace of this attempt (a resumed run does not count the steps it skipped)."""

    total_steps: int
    done: int
    started: float = field(default_factory=time.monotonic)

    def eta(self, step: int) -> float | None:
        ran = step - self.done
        if ran <= 0:
            return None
        return (time.monotonic() - self.started) / ran * max(0, self.total_steps - step)


def fault_from_env() -> int | None:
    value = os.environ.get(FAULT_ENV)
    return int(value) if value else None
