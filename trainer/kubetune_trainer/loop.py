"""The per-worker training loop that Ray Train runs on every worker, for every task.

In the manner of timm's train.py: `train_loop` sets the worker up (`start_worker`), builds its
`TrainState` (model wrapped for DDP, optimizer, schedule, grad scaler, step, epoch, history), resumed
from the latest checkpoint when there is one, then per epoch calls `train_one_epoch`, `evaluate`
(exact: validation sharded without padding; sums all-reduced, or detections gathered) and `save` (its
part of the checkpoint, reported to Ray Train). What differs between classification and detection
(model, data, step, metrics) comes from a `tasks.Task`. On GPU it trains in bf16 (or fp16 with a grad
scaler) autocast (classification also channels_last); on CPU in fp32 with torch using the worker's CPUs.
A restarted worker, or a restarted driver with the same run name, resumes from the latest checkpoint:
weights, optimizer, schedule, RNG, history and epoch, so `history.json` never doubles an epoch.
"""

from __future__ import annotations

import random
import tempfile
import time
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kubetune_trainer.cache import cached_object
from kubetune_trainer.callbacks import load_callbacks
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
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import prepare_images
from kubetune_trainer.loaders import eval_loader, set_epoch, train_loader
from kubetune_trainer.model import TrainablePlan, param_groups, set_train_mode
from kubetune_trainer.optim import make_optimizer, make_schedule
from kubetune_trainer.progress_model import history_entry
from kubetune_trainer.steps import autocast_for, configure_backends
from kubetune_trainer.storage import ObjectInfo, S3Store, S3Uri
from kubetune_trainer.tasks import Stepping, Task, task_from_wire
from kubetune_trainer.worker_progress import REPORT_INTERVAL_S, WorkerProgress


@dataclass
class RunPlan:
    """What the driver worked out once, for every worker: the task and its data, preprocessing, base
    weights, resources, and the test seam's epoch callbacks (`callbacks`)."""

    task: Task
    data_config: dict[str, Any]
    weights: ObjectInfo
    threads: int = 1
    loader_workers: int = 0
    callbacks: tuple[str, ...] = ()
    relay: Any = field(default=None, repr=False)

    def loop_config(self, config: TrainerConfig) -> dict[str, Any]:
        """Plain data for Ray Train's `train_loop_config` (the relay queue is a Ray actor handle)."""
        return {
            "config": config.wire(),
            "task": self.task.wire(),
            "dataConfig": self.data_config,
            "weights": [self.weights.key, self.weights.size, self.weights.etag],
            "threads": self.threads,
            "loaderWorkers": self.loader_workers,
            "callbacks": list(self.callbacks),
            "relay": self.relay,
        }

    @classmethod
    def from_loop_config(cls, raw: Mapping[str, Any]) -> tuple[TrainerConfig, RunPlan]:
        config = TrainerConfig.model_validate(raw["config"])
        key, size, etag = raw["weights"]
        plan = cls(
            task=task_from_wire(config, raw["task"]),
            data_config=dict(raw["dataConfig"]),
            weights=ObjectInfo(key, int(size), etag),
            threads=int(raw["threads"]),
            loader_workers=int(raw["loaderWorkers"]),
            callbacks=tuple(raw.get("callbacks", ())),
            relay=raw.get("relay"),
        )
        return config, plan


@dataclass
class Worker:
    """This worker's part of the run: what it learns, who it is among the workers, where it trains."""

    config: TrainerConfig
    plan: RunPlan
    rank: int
    world: int
    device: torch.device
    store: S3Store

    @property
    def task(self) -> Task:
        return self.plan.task

    @property
    def cuda(self) -> bool:
        return self.device.type == "cuda"


@dataclass
class Loaders:
    """This worker's data: its training shard (and the sampler that orders it) and its validation shard."""

    train: Any
    sampler: Any
    validation: Any

    @property
    def steps_per_epoch(self) -> int:
        return max(1, len(self.train))


@dataclass
class TrainState:
    """Everything that changes as the run trains; a checkpoint saves and restores it."""

    model: nn.Module
    trainable: TrainablePlan
    optimizer: torch.optim.Optimizer
    scheduler: Any
    scaler: torch.amp.GradScaler
    stepper: Stepping
    # What must match for a checkpoint to be resumed by this run (`checkpoint.IDENTITY_KEYS`).
    identity: dict[str, Any]
    epoch: int = 0  # epochs finished
    step: int = 0  # optimizer steps done in the whole run
    history: list[dict[str, Any]] = field(default_factory=list)
    resumed_from: str | None = None  # the checkpoint this attempt resumed from

    @property
    def learning_rate(self) -> float:
        return float(max(self.scheduler.get_last_lr()))

    def progress(self) -> dict[str, Any]:
        """progress.json of the checkpoint: what the run is, epochs and steps done, the history so far."""
        return {**self.identity, "epoch": self.epoch, "step": self.step, "history": self.history}


@dataclass
class EpochTraining:
    """One epoch's training figures, over all workers."""

    loss: float
    images_per_second: float
    seconds: float


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


def train_loop(raw: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: set up, build or resume the state, then train epoch by epoch."""
    worker = start_worker(raw)
    model, trainable = build_model(worker)
    loaders = make_loaders(worker)
    state = new_state(worker, model, trainable, loaders.steps_per_epoch)
    resume(worker, state)
    training = worker.config.training
    progress = WorkerProgress(
        worker.plan.relay,
        worker.rank,
        training.epochs,
        loaders.steps_per_epoch,
        worker.task.metric_keys,
        state,
        worker.config.selected_metric,
    )
    callbacks = load_callbacks(worker.plan.callbacks)
    if state.resumed_from is not None:
        progress.resumed(state)
    while state.epoch < training.epochs:
        for callback in callbacks:
            callback(worker, state)
        trained = train_one_epoch(worker, state, loaders, progress)
        validation = evaluate(worker, state, loaders)
        record_epoch(state, trained, validation)
        save(worker, state)
        progress.checkpointed(state, validation)
    progress.close()


def start_worker(raw: Mapping[str, Any]) -> Worker:
    """The plan from the driver, this worker's rank and device, torch threads and backends set."""
    import ray.train
    import ray.train.torch

    config, plan = RunPlan.from_loop_config(raw)
    ctx = ray.train.get_context()
    # Ray starts workers with one torch thread whatever their CPUs; use what the worker was given.
    torch.set_num_threads(plan.threads)
    device = ray.train.torch.get_device()
    configure_backends(device)
    store = S3Store(config.storage.endpoint, config.storage.region)
    return Worker(config, plan, ctx.get_world_rank(), ctx.get_world_size(), device, store)


def build_model(worker: Worker) -> tuple[nn.Module, TrainablePlan]:
    """The task's model from the node-cached base weights, seeded, wrapped for DDP on its device."""
    import ray.train.torch

    seed = worker.config.training.seed
    torch.manual_seed(seed)
    random.seed(seed + worker.rank)
    weights = cached_object(worker.store, S3Uri.parse(worker.config.model.checkpoint), worker.plan.weights)
    model, _, trainable = worker.task.build_model(weights, worker.device)
    return ray.train.torch.prepare_model(model), trainable


def make_loaders(worker: Worker) -> Loaders:
    """Loaders over the node-cached images: this worker's training shard and validation shard."""
    training, task = worker.config.training, worker.task
    folder, _ = prepare_images(worker.store, task.images)
    train_set, val_set = task.datasets(folder, worker.plan.data_config)
    workers = worker.plan.loader_workers
    train, sampler = train_loader(train_set, training.batch_size, training.seed, workers, worker.cuda, task.collate)
    validation = eval_loader(val_set, training.batch_size, workers, worker.cuda, task.collate)
    return Loaders(train, sampler, validation)


def new_state(worker: Worker, model: nn.Module, trainable: TrainablePlan, steps_per_epoch: int) -> TrainState:
    """Optimizer, schedule, grad scaler and the task's step around `model`, at step 0."""
    training = worker.config.training
    # Parameter names as the model knows them, not as the DDP wrapper prefixes them ("module.").
    groups = param_groups(unwrap(model), trainable, training.learning_rate, training.weight_decay)
    optimizer = make_optimizer(groups, training)
    scheduler = make_schedule(optimizer, training, steps_per_epoch)
    scaler = torch.amp.GradScaler("cuda", enabled=worker.cuda and training.precision == "fp16")
    autocast = autocast_for(worker.device, training.precision)
    stepper = worker.task.stepper(model, optimizer, scheduler, scaler, autocast, worker.device)
    spec = worker.config.model
    identity = {
        "architecture": spec.architecture,
        "classNames": worker.task.images.class_names,
        "strategy": spec.strategy,
        "trainableLayers": spec.trainable_layers,
    }
    return TrainState(model, trainable, optimizer, scheduler, scaler, stepper, identity)


def resume(worker: Worker, state: TrainState) -> None:
    """Restore the latest checkpoint Ray Train has for this run, if any (another run's is refused)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    where = str(S3Uri.from_fs_path(checkpoint.path))
    with tempfile.TemporaryDirectory(prefix="kubetune-restore-") as tmp:
        local = download_checkpoint(worker.store, checkpoint, Path(tmp))
        check_identity(read_progress(local), state.identity, where)
        progress = restore_checkpoint(
            local,
            rank=worker.rank,
            model=state.model,
            optimizer=state.optimizer,
            scheduler=state.scheduler,
            scaler=state.scaler,
        )
    state.epoch, state.step, state.history = int(progress["epoch"]), int(progress["step"]), list(progress["history"])
    state.resumed_from = where


def train_one_epoch(worker: Worker, state: TrainState, loaders: Loaders, progress: WorkerProgress) -> EpochTraining:
    """One pass over this worker's shard, in the epoch's seeded order; rank 0 reports as it goes."""
    set_epoch(loaders.sampler, worker.config.training.seed, state.epoch)
    set_train_mode(state.model, state.trainable)
    stepper, rank0, world = state.stepper, worker.rank == 0, worker.world
    sums = _Sums(worker.device, ("loss", "count"))
    started = last_report = time.monotonic()
    seen = 0
    for inputs, targets in loaders.train:
        loss = stepper.train_step(inputs, targets)
        state.step += 1
        count = len(inputs)  # images in the batch: a tensor's first dimension, or a list (detection)
        seen += count
        sums.add(loss=loss * count, count=float(count))
        now = time.monotonic()
        if rank0 and now - last_report >= REPORT_INTERVAL_S:
            last_report = now
            running = sums.values.tolist()  # rank 0's running mean: no collective mid-epoch
            progress.training(state, running[0] / max(running[1], 1.0), seen * world / max(now - started, 1e-9))
    seconds = time.monotonic() - started
    train = sums.total()
    return EpochTraining(
        loss=train["loss"] / max(train["count"], 1.0),
        images_per_second=train["count"] / max(seconds, 1e-9),
        seconds=seconds,
    )


def evaluate(worker: Worker, state: TrainState, loaders: Loaders) -> dict[str, float]:
    """The task's validation figures over the whole validation set (every worker gets the same)."""
    return worker.task.evaluate(state.stepper, loaders.validation, worker.device)


def record_epoch(state: TrainState, trained: EpochTraining, validation: Mapping[str, float]) -> None:
    """The finished epoch into the history (history.json's entry, in its key order)."""
    state.epoch += 1
    figures = {
        "trainLoss": trained.loss,
        **validation,
        "imagesPerSecond": trained.images_per_second,
        "learningRate": state.learning_rate,
    }
    state.history.append(history_entry(state.epoch, figures, trained.seconds))


def save(worker: Worker, state: TrainState) -> None:
    """This worker's part of the epoch's checkpoint, reported to Ray Train with the epoch's figures (the
    retention ranks checkpoints by one of them, training.selectBy); Ray commits it once every worker has
    reported."""
    import ray.train

    progress = state.progress()
    with tempfile.TemporaryDirectory(prefix="kubetune-ckpt-") as tmp:
        write_checkpoint(
            Path(tmp),
            rank=worker.rank,
            model=state.model,
            optimizer=state.optimizer,
            scheduler=state.scheduler,
            scaler=state.scaler,
            progress=progress,
        )
        ray.train.report(
            dict(state.history[-1]),
            checkpoint=ray.train.Checkpoint.from_directory(tmp),
            checkpoint_dir_name=checkpoint_dir_name(state.epoch),
            checkpoint_upload_fn=s3_uploader(worker.store),
        )
