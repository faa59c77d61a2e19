"""The per-worker training loop that Ray Train runs on every worker, for every task.

In the manner of timm's train.py: `train_loop` sets the worker up (`start_worker`), builds its
`TrainState` (model wrapped for DDP, optimizer, schedule, grad scaler, step, epoch, history, where in
the epoch it is), resumed from the latest checkpoint when there is one, then per epoch calls
`train_one_epoch`, `evaluate` (exact: validation sharded without padding; sums all-reduced, or
detections gathered) and `save` (its part of the checkpoint, reported to Ray Train). What differs
between classification and detection (model, data, step, metrics) comes from a `tasks.Task`. On GPU it
trains in bf16 (or fp16 with a grad scaler) autocast (classification also channels_last); on CPU in
fp32 with torch using the worker's CPUs.

Checkpoints come after every epoch, or every `training.checkpointEvery` mid-epoch too, and on a
preemption notice (`cadence.Cadence` decides, alike on every worker, after each step); a step waits for
a copy of the state only, S3 never (`checkpoint.SnapshotUploads`). A restarted worker, or a restarted
driver with the same run name, resumes from the latest checkpoint: weights, optimizer, schedule, RNG,
history, epoch and the position in it, so the run goes on with the very batches it would have had and
`history.json` never doubles an epoch.

The training options (`options.py`) live in the same state: a step may take several batches
(`accumulateSteps`), the weights' moving average (`emaDecay`) is updated after each step, validated and
checkpointed with them, and early stopping (`earlyStopping`) ends the loop after an epoch, with a
checkpoint, as a function of the history alone.
"""

from __future__ import annotations

import copy
import dataclasses
import logging
import random
import shutil
import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from functools import partial
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from kubetune_trainer import preemption
from kubetune_trainer.cache import cached_object
from kubetune_trainer.cadence import Cadence, Decision
from kubetune_trainer.callbacks import STEP_CALLBACKS_ENV, EpochCallback, load_callbacks
from kubetune_trainer.checkpoint import (
    SnapshotUploads,
    check_identity,
    checkpoint_dir_name,
    download_checkpoint,
    read_progress,
    remove_stale_staging,
    restore_checkpoint,
    staging_folder,
    take_snapshot,
    unwrap,
)
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import MAX_CORRUPT_FRACTION, prepare_images
from kubetune_trainer.device_decode import device_batches, device_collate
from kubetune_trainer.errors import DataError, TrainerError, error_line
from kubetune_trainer.export import RANGE_TEST_FILE
from kubetune_trainer.loaders import EpochOrder, coverage_hashes, eval_loader, steps_per_epoch, train_loader
from kubetune_trainer.lr_range import START_LR, RangeTest, cycle, find_learning_rate, plot_range_test
from kubetune_trainer.model import TrainablePlan, param_groups, set_train_mode
from kubetune_trainer.optim import effective_training, make_optimizer, make_schedule
from kubetune_trainer.options import grouped, optimizer_steps, stopped_early, weight_average
from kubetune_trainer.progress_model import history_entry
from kubetune_trainer.selection import unranked
from kubetune_trainer.startup import mark
from kubetune_trainer.steps import autocast_for, configure_backends
from kubetune_trainer.storage import ObjectInfo, S3Store, S3Uri
from kubetune_trainer.stream import (
    ReadableBatches,
    StreamEval,
    StreamOrder,
    StreamSetup,
    loader_lag,
    stream_datasets,
    stream_setup,
    streams,
)
from kubetune_trainer.tasks import Stepping, Task, task_from_wire
from kubetune_trainer.worker_progress import REPORT_INTERVAL_S, WorkerProgress

log = logging.getLogger(__name__)

# How long past the grace period a preempted worker waits for Ray Train's restart before it fails.
RESTART_WAIT_S = 60.0


@dataclass
class RunPlan:
    """What the driver worked out once, for every worker: the task and its data, preprocessing, base
    weights, resources, and the test seam's callbacks (`callbacks` before each epoch, `step_callbacks`
    after each step)."""

    task: Task
    data_config: dict[str, Any]
    weights: ObjectInfo
    threads: int = 1
    loader_workers: int = 0
    callbacks: tuple[str, ...] = ()
    step_callbacks: tuple[str, ...] = ()
    relay: Any = field(default=None, repr=False)
    # A sweep's trial: every epoch's figures reported to Ray Train (and so to Tune's scheduler), also the
    # epochs that end without a checkpoint (checkpointEvery a duration).
    report_epochs: bool = False
    # The ObjectRef of the node's preparation when the driver started training beside it (`run.Preparing`):
    # `task` still holds every image and `data_config` is empty until the worker applies its result (`with_node`).
    node: Any = field(default=None, repr=False)

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
            "stepCallbacks": list(self.step_callbacks),
            "relay": self.relay,
            "reportEpochs": self.report_epochs,
            "node": self.node,
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
            step_callbacks=tuple(raw.get("stepCallbacks", ())),
            relay=raw.get("relay"),
            report_epochs=bool(raw.get("reportEpochs", False)),
            node=raw.get("node"),
        )
        return config, plan


@dataclass
class Worker:
    """This worker's part of the run: what it learns, who it is among the workers, where it trains, and
    its checkpoints on their way to S3."""

    config: TrainerConfig
    plan: RunPlan
    rank: int
    world: int
    device: torch.device
    store: S3Store
    uploads: SnapshotUploads = field(init=False)

    def __post_init__(self) -> None:
        self.uploads = SnapshotUploads(self.store)

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
    sampler: EpochOrder
    validation: Any
    steps_per_epoch: int
    keys: list[str] = field(default_factory=list)  # the training images' keys, by index (the accounting's)


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
    saved_step: int = -1  # the step of the latest checkpoint this attempt saved or resumed from
    # Where the epoch in progress stands: images of its order consumed (all workers), and its training
    # figures so far over all workers (loss sum, images, seconds), as the latest mid-epoch checkpoint saw them.
    epoch_samples: int = 0
    epoch_so_far: dict[str, float] = field(default_factory=dict)
    # The trainer's own account of each finished epoch's images (`coverage_entry`): how many it trained, the
    # sums of their keys' `coverage_hashes`, and how many of those did not decode.
    coverage: list[dict[str, int]] = field(default_factory=list)
    # What the run trains with (`optim.effective_training`): model.json and the status report it.
    effective: dict[str, Any] = field(default_factory=dict)
    # The weights' moving average (timm's ModelEmaV3, training.emaDecay), or None.
    ema: Any = None
    # Whether earlyStopping ended the run after the last epoch of the history.
    stopped_early: bool = False

    @property
    def averaged(self) -> nn.Module | None:
        """The moving average's model, when the run keeps one."""
        return None if self.ema is None else self.ema.module

    @property
    def learning_rate(self) -> float:
        return float(max(self.scheduler.get_last_lr()))

    def progress(self) -> dict[str, Any]:
        """progress.json of the checkpoint: what the run is, epochs and steps done, the history so far, and
        the position in the epoch in progress (0 images for an epoch's end)."""
        return {
            **self.identity,
            "epoch": self.epoch,
            "step": self.step,
            "history": self.history,
            "epochSamples": self.epoch_samples,
            "epochSoFar": self.epoch_so_far,
            "coverage": self.coverage,
            "effective": self.effective,
        }


@dataclass
class EpochTraining:
    """One epoch's training figures (so far), over all workers."""

    loss: float
    images_per_second: float
    seconds: float
    loss_sum: float = 0.0
    count: float = 0.0
    sums: dict[str, float] = field(default_factory=dict)  # every figure of `SUMS`, over all workers


# What a worker sums over an epoch's steps: the loss (weighted by images), the images trained, and the
# accounting (`coverage_entry`): images handed out, their keys' hash sums, the unreadable among them.
SUMS = ("loss", "count", "samples", "hashA", "hashB", "unreadable")


def coverage_entry(epoch: int, sums: Mapping[str, float]) -> dict[str, int]:
    """Epoch `epoch`'s accounting in checkpoint progress (`TrainState.coverage`)."""
    return {
        "epoch": epoch,
        "samples": round(sums.get("samples", 0.0)),
        "hashA": round(sums.get("hashA", 0.0)),
        "hashB": round(sums.get("hashB", 0.0)),
        "unreadable": round(sums.get("unreadable", 0.0)),
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


def first_worker_mark(worker: Worker, milestone: str) -> None:
    """A start-up milestone in the driver's log (startup.py): rank 0's alone, the others' would repeat it."""
    if worker.rank == 0:
        mark(milestone)


def train_loop(raw: dict[str, Any]) -> None:
    """Ray Train's train_loop_per_worker: set up, build or resume the state, then train epoch by epoch."""
    worker = start_worker(raw)
    first_worker_mark(worker, "worker started")
    with_node(worker)
    model, trainable = build_model(worker)
    first_worker_mark(worker, "model built")
    loaders = make_loaders(worker)
    first_worker_mark(worker, "data loaders ready")
    training = worker.config.training
    state = new_state(worker, model, trainable, loaders.steps_per_epoch, training.learning_rate)
    resume(worker, state)
    if state.resumed_from is None and training.learning_rate is None:
        state = new_state(worker, model, trainable, loaders.steps_per_epoch, None, range_test(worker, state, loaders))
    progress = WorkerProgress(
        worker.plan.relay,
        worker.rank,
        training.epochs,
        loaders.steps_per_epoch,
        worker.task.metric_keys,
        state,
        worker.config.selected_metric,
        world=worker.world,
    )
    epoch = Epoch(
        worker,
        state,
        loaders,
        progress,
        Cadence(
            interval_s=training.checkpoint_interval_s,
            rank=worker.rank,
            world=worker.world,
            uploads_busy=worker.uploads.busy,
        ),
        load_callbacks(worker.plan.step_callbacks, STEP_CALLBACKS_ENV),
    )
    callbacks = load_callbacks(worker.plan.callbacks)
    if state.resumed_from is not None:
        progress.resumed(state)
    while state.epoch < training.epochs and not state.stopped_early:
        for callback in callbacks:
            callback(worker, state)
        trained = epoch.train()
        decision = epoch.cadence.at_epoch_end()
        if decision.preempt:  # before the validation: it may take longer than the grace period
            epoch.checkpoint(trained, decision)
        validation = evaluate(worker, state, loaders)
        record_epoch(state, trained, validation)
        state.stopped_early = stopped_early(state.history, training, worker.config.selected_metric)
        saved = decision.due or state.epoch == training.epochs or state.stopped_early
        if saved:
            save(worker, state)
            epoch.cadence.checkpointed()
        elif worker.plan.report_epochs:
            report_figures(worker, state)
        progress.epoch_done(state, validation, saved=saved)
    progress.close()


def start_worker(raw: Mapping[str, Any]) -> Worker:
    """The plan from the driver, this worker's rank and device, torch threads and backends set."""
    import ray.train
    import ray.train.torch

    config, plan = RunPlan.from_loop_config(raw)
    remove_stale_staging()  # checkpoints staged by workers stopped before their upload
    ctx = ray.train.get_context()
    # Ray starts workers with one torch thread whatever their CPUs; use what the worker was given.
    torch.set_num_threads(plan.threads)
    device = ray.train.torch.get_device()
    configure_backends(device)
    store = S3Store.for_spec(config.storage)
    return Worker(config, plan, ctx.get_world_rank(), ctx.get_world_size(), device, store)


def with_node(worker: Worker) -> None:
    """The worker's plan with the node preparation's verdict applied, when the driver started training beside
    it (`run.Preparing`): wait for it, then drop the images that did not decode and take its preprocessing.
    A failed preparation fails the worker with its error, but the driver's wait for the same result has
    already aborted the run (Ray Train does not retry it)."""
    if worker.plan.node is None:
        return
    import ray

    try:
        found = ray.get(worker.plan.node)
    except Exception as error:  # the task's TrainerError, wrapped by Ray
        raise TrainerError(f"preparing a node failed: {error_line(error)}") from None
    task = worker.plan.task.without_corrupt(found["corrupt"])
    worker.plan = dataclasses.replace(worker.plan, task=task, data_config=dict(found["dataConfig"]), node=None)
    first_worker_mark(worker, "node prepared, on the worker")


def build_model(worker: Worker) -> tuple[nn.Module, TrainablePlan]:
    """The task's model from the node-cached base weights, seeded, wrapped for DDP on its device."""
    import ray.train.torch

    seed = worker.config.training.seed
    torch.manual_seed(seed)
    random.seed(seed + worker.rank)
    np.random.seed((seed + worker.rank) % 2**32)  # timm's Mixup draws from numpy's generator
    weights = cached_object(worker.store, S3Uri.parse(worker.config.model.checkpoint), worker.plan.weights)
    model, _, trainable = worker.task.build_model(weights, worker.device)
    return ray.train.torch.prepare_model(model), trainable


def make_loaders(worker: Worker) -> Loaders:
    """Loaders over the node-cached images, or streamed ones (`stream.py`): this worker's training shard
    and validation shard."""
    training, task = worker.config.training, worker.task
    workers = worker.plan.loader_workers
    eval_batches, collate = None, task.collate
    make_order: Callable[..., EpochOrder] = EpochOrder
    if streams(worker.config, task.images, worker.plan.weights.size):
        setup = stream_setup_for(worker)
        train_set, val_set = stream_datasets(setup, task.datasets(setup.train.fetcher.folder, worker.plan.data_config))
        make_order = partial(StreamOrder, window=setup.train, shuffle=setup.shuffle)
        eval_batches = StreamEval(setup.validation, training.batch_size, worker.rank, worker.world)
        collate = ReadableBatches(task.collate)
    else:
        folder, _ = prepare_images(worker.store, task.images)
        train_set, val_set = task.datasets(folder, worker.plan.data_config, worker.device)
    # The global batch is batchSize * workers.min at any worker count (elastic workers: docs/trainer.md).
    train, order = train_loader(
        train_set,
        training.batch_size,
        training.seed,
        workers,
        worker.cuda,
        device_collate(train_set, collate),
        reference=worker.config.scaling.workers,
        make_order=make_order,
    )
    val_collate = device_collate(val_set, collate)
    validation = eval_loader(val_set, training.batch_size, workers, worker.cuda, val_collate, eval_batches)
    steps = optimizer_steps(steps_per_epoch(order), training.accumulate_steps)
    train, validation = (
        device_batches(train, train_set, worker.device),
        device_batches(validation, val_set, worker.device),
    )
    return Loaders(train, order, validation, steps, task.train_keys())


def stream_setup_for(worker: Worker) -> StreamSetup:
    import ray.train

    lag = loader_lag(worker.plan.loader_workers)
    local_world = ray.train.get_context().get_local_world_size()
    images = worker.task.images
    return stream_setup(worker.store, worker.config, images, worker.rank, local_world, lag, worker.plan.weights.size)


def new_state(
    worker: Worker,
    model: nn.Module,
    trainable: TrainablePlan,
    steps_per_epoch: int,
    learning_rate: float | None,
    tested: RangeTest | None = None,
) -> TrainState:
    """Optimizer, schedule, grad scaler and the task's step around `model`, at step 0, at `learning_rate`
    or the range test's choice (`tested`); with neither, a placeholder until `resume` or the test sets it."""
    training = worker.config.training
    rate = learning_rate if learning_rate is not None else tested.chosen if tested is not None else START_LR
    # Parameter names as the model knows them, not as the DDP wrapper prefixes them ("module.").
    groups = param_groups(
        unwrap(model),
        trainable,
        rate,
        training.weight_decay,
        training.backbone_scale(worker.config.task),
        training.layer_decay,
    )
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
    augment = worker.task.augmentation(worker.plan.data_config)
    effective = effective_training(
        training,
        trainable,
        (rate, training.backbone_scale(worker.config.task)),
        steps_per_epoch,
        augment,
        tested.wire() if tested is not None else None,
    )
    state = TrainState(model, trainable, optimizer, scheduler, scaler, stepper, identity, effective=effective)
    state.ema = weight_average(unwrap(model), training)
    return state


def range_test(worker: Worker, state: TrainState, loaders: Loaders) -> RangeTest:
    """The learning-rate range test on this run's model and data (every worker in step, each step's loss
    averaged over them, so all choose the same rate); rank 0 publishes its curve under output.path."""

    def mean_across_workers(loss: float) -> float:
        if worker.world == 1:
            return loss
        value = torch.tensor([loss], dtype=torch.float64, device=worker.device)
        dist.all_reduce(value)
        return float(value.item()) / worker.world

    batches = cycle(loaders.train, lambda epoch: loaders.sampler.set_epoch(epoch))
    tested = find_learning_rate(
        worker.task,
        worker.config,
        state.model,
        state.trainable,
        batches,
        worker.device,
        steps_per_epoch(loaders.sampler),
        mean_across_workers,
    )
    if worker.rank == 0:
        title = f"{worker.config.job_name}: learning-rate range test ({len(tested.losses)} steps)"
        picture = S3Uri.parse(worker.config.output.path).join(RANGE_TEST_FILE)
        worker.store.put_bytes(picture, plot_range_test(tested, title), "image/png")
    return tested


def resume(worker: Worker, state: TrainState) -> None:
    """Restore the latest checkpoint Ray Train has for this run, if any (another run's is refused)."""
    import ray.train

    checkpoint = ray.train.get_checkpoint()
    if checkpoint is None:
        return
    where = str(S3Uri.from_fs_path(checkpoint.path))
    tmp = staging_folder()  # like a checkpoint's staging: a worker stopped mid-download leaves none behind
    try:
        local = download_checkpoint(worker.store, checkpoint, tmp)
        check_identity(read_progress(local), state.identity, where)
        progress = restore_checkpoint(
            local,
            rank=worker.rank,
            model=state.model,
            optimizer=state.optimizer,
            scheduler=state.scheduler,
            scaler=state.scaler,
            ema=state.averaged,
        )
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    state.epoch, state.step, state.history = int(progress["epoch"]), int(progress["step"]), list(progress["history"])
    state.epoch_samples = int(progress.get("epochSamples", 0))
    state.epoch_so_far = {k: float(v) for k, v in dict(progress.get("epochSoFar") or {}).items()}
    state.coverage = [dict(entry) for entry in progress.get("coverage") or []]
    state.resumed_from, state.saved_step = where, state.step
    state.effective = dict(progress.get("effective") or state.effective)
    state.stopped_early = stopped_early(state.history, worker.config.training, worker.config.selected_metric)
    state.resumed_from = where


class Epoch:
    """Trains the epochs of one worker's attempt, step by step, and checkpoints a step when the workers
    agree to (`cadence`): when one is due, and on a preemption notice, after which it waits for Ray Train
    to restart the workers from it."""

    def __init__(
        self,
        worker: Worker,
        state: TrainState,
        loaders: Loaders,
        progress: WorkerProgress,
        cadence: Cadence,
        step_callbacks: list[EpochCallback],
    ) -> None:
        self.worker, self.state, self.loaders, self.progress = worker, state, loaders, progress
        self.cadence, self.step_callbacks = cadence, step_callbacks
        self.sums = _Sums(worker.device, SUMS)
        self.started = time.monotonic()
        self.stepped = False  # whether this worker has trained a step since it started

    def train(self) -> EpochTraining:
        """The rest of the epoch `state.epoch` in its seeded order, from where a checkpoint left it."""
        worker, state, loaders = self.worker, self.state, self.loaders
        loaders.sampler.set_epoch(state.epoch, state.epoch_samples)
        set_train_mode(state.model, state.trainable)
        self.sums = _Sums(worker.device, SUMS)
        so_far = state.epoch_so_far
        if worker.rank == 0 and so_far:  # the figures of the epoch's steps before a resume, counted once
            self.sums.add(loss=so_far["lossSum"], count=so_far["count"])
            self.sums.add(**{name: so_far[name] for name in SUMS[2:] if name in so_far})
        self.started = time.monotonic() - so_far.get("seconds", 0.0)
        rank0, seen, last_report = worker.rank == 0, 0, time.monotonic()
        for batches in grouped(loaders.train, worker.config.training.accumulate_steps):
            # Images in each batch: a tensor's first dimension, or a list's length (detection); each batch's
            # loss weighted by this worker's share of its global batch (`EpochOrder.loss_weight`).
            counts = [len(inputs) for inputs, _ in batches]
            loss = state.stepper.train_steps(batches, [loaders.sampler.loss_weight(c) for c in counts])
            count = sum(counts)
            self.account(len(batches), count)
            state.step += 1
            if state.ema is not None:
                state.ema.update(unwrap(state.model), step=state.step)
            state.epoch_samples += loaders.sampler.step_size * len(batches)
            seen += count
            self.sums.add(loss=loss * count, count=float(count))
            now = time.monotonic()
            # The first step is reported at once (the status shows training has begun), then once a second.
            if rank0 and (now - last_report >= REPORT_INTERVAL_S or not self.stepped):
                if not self.stepped:
                    mark("first step")
                self.stepped, last_report = True, now
                running = self.sums.values.tolist()  # rank 0's running mean: no collective mid-epoch
                self.progress.training(
                    state, running[0] / max(running[1], 1.0), seen * worker.world / (now - self.started)
                )
            for callback in self.step_callbacks:
                callback(worker, state)
            decision = self.cadence.after_step()
            if decision.checkpoint:
                self.checkpoint(self.totals(), decision)
        return self.totals()

    def account(self, batches: int, trained: int) -> None:
        """The accounting of `batches` batches just trained (`trained` images of them decoded)."""
        ids = [i for _ in range(batches) for i in self.loaders.sampler.handed.popleft()]
        hashes = [coverage_hashes(self.loaders.keys[i]) for i in ids]
        self.sums.add(
            samples=len(ids),
            hashA=sum(a for a, _ in hashes),
            hashB=sum(b for _, b in hashes),
            unreadable=len(ids) - trained,
        )

    def totals(self) -> EpochTraining:
        """The epoch's training figures so far, over all workers (a collective: every worker calls it)."""
        seconds = time.monotonic() - self.started
        train = self.sums.total()
        return EpochTraining(
            loss=train["loss"] / max(train["count"], 1.0),
            images_per_second=train["count"] / max(seconds, 1e-9),
            seconds=seconds,
            loss_sum=train["loss"],
            count=train["count"],
            sums=train,
        )

    def checkpoint(self, so_far: EpochTraining, decision: Decision) -> None:
        """A checkpoint of this step of the epoch; on a preemption, then wait for Ray Train's restart."""
        state = self.state
        state.epoch_so_far = {
            "lossSum": so_far.loss_sum,
            "count": so_far.count,
            "seconds": so_far.seconds,
            **{name: so_far.sums[name] for name in SUMS[2:]},
        }
        if state.step != state.saved_step:
            save(self.worker, state, mid_epoch=True, wait=decision.preempt)
        self.cadence.checkpointed()
        if decision.preempt:
            self.await_restart()

    def await_restart(self) -> None:
        """The notice's checkpoint is saved: Ray Train restarts the workers from it now (and so ends this
        process); should it not, the worker fails rather than train on past the deadline."""
        self.progress.preempted(self.state)
        preemption.restart_now()
        grace = self.worker.config.preemption_grace_seconds
        time.sleep(grace + RESTART_WAIT_S)
        raise TrainerError(f"preempted at step {self.state.step}, but Ray Train did not restart the workers")


def evaluate(worker: Worker, state: TrainState, loaders: Loaders) -> dict[str, float]:
    """The task's validation figures over the whole validation set (every worker gets the same), of the
    weights' moving average when the run keeps one (it is what is ranked and exported)."""
    stepper = state.stepper
    if state.averaged is not None:
        stepper = copy.copy(stepper)
        stepper.model = rank0_buffers(state.averaged)
    return worker.task.evaluate(stepper, loaders.validation, worker.device)


def rank0_buffers(model: nn.Module) -> nn.Module:
    """`model` with rank 0's buffers on every worker. Each worker's moving average follows its own BatchNorm
    statistics (they drift apart in training); rank 0's average is the one checkpointed and exported, and
    the one a resumed run restores on every worker, so every worker validates with it."""
    if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
    return model


def record_epoch(state: TrainState, trained: EpochTraining, validation: Mapping[str, float]) -> None:
    """The finished epoch into the history (history.json's entry, in its key order); the next one starts."""
    state.epoch += 1
    state.epoch_samples, state.epoch_so_far = 0, {}
    state.coverage.append(coverage_entry(state.epoch, trained.sums))
    check_unreadable(state.coverage[-1])
    figures = {
        "trainLoss": trained.loss,
        **validation,
        "imagesPerSecond": trained.images_per_second,
        "learningRate": state.learning_rate,
    }
    state.history.append(history_entry(state.epoch, figures, trained.seconds))


def check_unreadable(entry: Mapping[str, int]) -> None:
    """Stream mode meets unreadable images as it trains: more than data.MAX_CORRUPT_FRACTION of an epoch's
    fails the run, as the full cache's check does before training; fewer are logged."""
    unreadable, samples = entry["unreadable"], max(entry["samples"], 1)
    if unreadable / samples > MAX_CORRUPT_FRACTION:
        raise DataError(
            f"{unreadable} of the {samples} images of epoch {entry['epoch']} ({unreadable / samples:.1%}) are "
            f"corrupt or unreadable, more than the {MAX_CORRUPT_FRACTION:.0%} allowed"
        )
    if unreadable:
        log.warning("epoch %d: skipped %d unreadable image(s) of %d", entry["epoch"], unreadable, samples)


def save(worker: Worker, state: TrainState, *, mid_epoch: bool = False, wait: bool = False) -> None:
    """This worker's part of a checkpoint, reported to Ray Train with its figures (`checkpoint_figures`: the
    retention ranks checkpoints by one of them, training.selectBy), which commits it once every worker has
    reported. The step waits for a copy of the state only: Ray Train's upload thread writes and uploads it
    (`wait`: before returning, for a preemption's)."""
    import ray.train

    worker.uploads.wait(at_most=1)  # one more behind the one uploading, not a queue of snapshots
    progress = state.progress()
    folder = staging_folder()
    snapshot = take_snapshot(
        rank=worker.rank,
        model=state.model,
        optimizer=state.optimizer,
        scheduler=state.scheduler,
        scaler=state.scaler,
        progress=progress,
        ema=state.averaged,
    )
    mode = ray.train.CheckpointUploadMode.SYNC if wait else ray.train.CheckpointUploadMode.ASYNC
    ray.train.report(
        checkpoint_figures(state, worker.task.metric_keys, mid_epoch=mid_epoch),
        checkpoint=ray.train.Checkpoint.from_directory(str(folder)),
        checkpoint_dir_name=checkpoint_dir_name(state.epoch, state.step if mid_epoch else None),
        checkpoint_upload_mode=mode,
        delete_local_checkpoint_after_upload=False,  # the upload function does, once it has written and sent it
        checkpoint_upload_fn=worker.uploads.uploader(snapshot),
    )
    state.saved_step = state.step


def report_figures(worker: Worker, state: TrainState) -> None:
    """The epoch's figures to Ray Train without a checkpoint (a sweep's scheduler decides on them)."""
    import ray.train

    ray.train.report(checkpoint_figures(state, worker.task.metric_keys, mid_epoch=False))


def checkpoint_figures(state: TrainState, metric_keys: Sequence[str], *, mid_epoch: bool) -> dict[str, Any]:
    """What a checkpoint reports to Ray Train: an epoch end's history entry (the figures selectBy ranks it
    by), or, mid-epoch, the worst figures (`selection.unranked`): a checkpoint without validation of its own
    is never the best one (it is kept while it is the latest)."""
    if mid_epoch or not state.history:
        return {**unranked(metric_keys), "step": state.step}
    return {**state.history[-1], "step": state.step}
