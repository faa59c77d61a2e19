"""The parts of checkpointing on preemption that run without Ray: the resumable training order, the
checkpoint cadence, the steps a preemption lost, and what the pods' preStop hook signals."""

from __future__ import annotations

import logging

import pytest

from kubetune_trainer.cadence import Cadence
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.loaders import EpochOrder, steps_per_epoch
from kubetune_trainer.preemption import deadline_ms, is_preemptible
from kubetune_trainer.relay import CHECKPOINT_EVENT, EVENT, PREEMPTION_EVENT, RunProgress
from kubetune_trainer.reporting import ProgressUpdate


def shares(
    size: int, world: int, epoch: int, skip: int = 0, *, batch: int = 4, reference: int | None = None
) -> list[list[int]]:
    """Each rank's images of the epoch, step by step concatenated."""
    orders = [
        EpochOrder(size, seed=42, batch_size=batch, reference=reference or world, rank=rank, world=world)
        for rank in range(world)
    ]
    for order in orders:
        order.set_epoch(epoch, skip)
    return [[index for batch in order for _, index in batch] for order in orders]


@pytest.mark.parametrize("world", [1, 2, 3])
def test_a_resumed_epoch_continues_with_the_very_images_it_would_have_had(world: int) -> None:
    size, batch, done_steps = 101, 4, 5
    whole = shares(size, world, epoch=1)
    resumed = shares(size, world, epoch=1, skip=done_steps * batch * world)
    for rank in range(world):
        assert resumed[rank] == whole[rank][done_steps * batch :]
    # Every image at most once per epoch, all but the last partial global batch (dropped: a batch of one
    # breaks BatchNorm), in another order each epoch.
    trained = [index for share in whole for index in share]
    assert len(trained) == len(set(trained)) == (size // (batch * world)) * batch * world
    assert shares(size, world, epoch=2) != whole


def test_steps_per_epoch_follow_the_last_partial_batch_rule() -> None:
    assert steps_per_epoch(EpochOrder(101, seed=0, batch_size=4, reference=2, rank=0, world=2)) == 12  # 51 per worker
    assert steps_per_epoch(EpochOrder(6, seed=0, batch_size=4, reference=2, rank=0, world=2)) == 1  # one short batch


def step_batches(size: int, batch: int, reference: int, world: int, skip: int = 0) -> list[list[list[int]]]:
    """[step][rank] -> the images of that rank in that step, at `world` workers (global batch at `reference`)."""
    orders = [
        EpochOrder(size, seed=7, batch_size=batch, reference=reference, rank=rank, world=world) for rank in range(world)
    ]
    for order in orders:
        order.set_epoch(3, skip)
    per_rank = [[[index for _, index in step] for step in order] for order in orders]
    return [list(step) for step in zip(*per_rank, strict=True)]


@pytest.mark.parametrize(("before", "after"), [(1, 2), (2, 1), (2, 3), (3, 2)])
def test_an_epoch_resumed_at_another_worker_count_trains_every_image_once_in_the_same_global_batches(
    before: int, after: int
) -> None:
    """Elastic policy: the global batch stays batchSize * workers.min (here 2 * 4 = 8) at any count, so a run
    that grows or shrinks mid-epoch goes on with the very global batches, every image once in the epoch."""
    size, batch, reference, done = 101, 4, 2, 5
    first = step_batches(size, batch, reference, before)[:done]
    rest = step_batches(size, batch, reference, after, skip=done * batch * reference)
    whole_at_reference = step_batches(size, batch, reference, reference)
    steps = first + rest
    assert len(steps) == len(whole_at_reference) == 101 // 8  # as many steps at any worker count
    assert [sorted(i for share in step for i in share) for step in steps] == [
        sorted(i for share in step for i in share) for step in whole_at_reference
    ]
    trained = [index for step in steps for share in step for index in share]
    assert len(trained) == len(set(trained))  # none twice
    # Each step's images split near-evenly: no worker has more than one image more than another.
    for step in rest:
        assert max(map(len, step)) - min(map(len, step)) <= 1


def test_uneven_shares_weigh_every_image_of_the_global_batch_alike() -> None:
    """DDP averages the workers' mean losses; weighting each by its share makes that the global batch's mean."""
    batch, reference, world = 4, 2, 3  # 8 images a step over 3 workers: 3, 3, 2
    orders = [EpochOrder(40, seed=0, batch_size=batch, reference=reference, rank=r, world=world) for r in range(world)]
    counts = [len(next(iter(order))) for order in orders]
    assert counts == [3, 3, 2]
    losses = [[1.0, 2.0, 3.0], [4.0, 5.0, 6.0], [7.0, 8.0]]  # per-image losses of each worker
    ddp = sum(o.loss_weight(c) * sum(own) / c for o, c, own in zip(orders, counts, losses, strict=True)) / world
    assert ddp == pytest.approx(sum(sum(own) for own in losses) / 8)
    even = EpochOrder(40, seed=0, batch_size=batch, reference=reference, rank=0, world=reference)
    assert even.loss_weight(batch) == 1.0  # a fixed worker count trains exactly as before


def test_a_step_too_small_for_the_workers_is_refused_naming_the_field() -> None:
    with pytest.raises(ConfigError, match=r"data\.train: a step's 3 images cannot give each of 4 workers one"):
        EpochOrder(3, seed=0, batch_size=8, reference=1, rank=0, world=4)


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


def test_checkpoints_come_by_the_clock_never_while_one_uploads_and_at_once_on_a_notice() -> None:
    clock, busy, notice = Clock(), [False], [None]
    cadence = Cadence(
        interval_s=60, rank=0, world=1, uploads_busy=lambda: busy[0], notice=lambda: notice[0], clock=clock
    )
    assert not cadence.after_step().checkpoint
    clock.now = 61
    busy[0] = True
    assert not cadence.after_step().checkpoint  # the previous one still uploads: it comes a little later
    busy[0] = False
    assert cadence.after_step().due
    cadence.checkpointed()
    clock.now = 62
    assert not cadence.after_step().checkpoint
    notice[0] = object()  # type: ignore[assignment]
    decision = cadence.after_step()
    assert decision.preempt and decision.checkpoint


def test_per_epoch_checkpoints_come_at_the_epoch_end_only() -> None:
    cadence = Cadence(interval_s=None, rank=0, world=1, notice=lambda: None, clock=Clock())
    assert not cadence.after_step().checkpoint
    assert cadence.at_epoch_end().due


def update(step: int, phase: str | None = None) -> dict[str, object]:
    return dict(ProgressUpdate(epoch=2, total_epochs=3, step=step, total_steps=30, percent=50, phase=phase).wire())


def test_a_preemption_counts_the_steps_done_since_the_checkpoint_resumed_from(caplog: pytest.LogCaptureFixture) -> None:
    progress = RunProgress(max_failures=3)
    progress.handle(update(12))
    progress.handle(update(12, phase="Preempted"))
    assert not progress.saved_on_notice()
    progress.handle({EVENT: CHECKPOINT_EVENT, "uri": "s3://r/c/run/epoch-0001-step-00000012", "step": 12})
    assert progress.saved_on_notice()

    with caplog.at_level(logging.WARNING, logger="kubetune_trainer.relay"):
        shown = progress.handle({EVENT: PREEMPTION_EVENT, "restarted": True})

    assert shown is not None and (shown.preemptions, shown.preemption_steps_lost, shown.worker_failures) == (1, 0, 0)
    assert "preemption 1: Ray Train restarts the workers from s3://r/c/run/epoch-0001-step-00000012 (step 12)" in (
        caplog.text
    )
    # No checkpoint in time, and no preemptions left: the workers had gone 3 steps past the committed one.
    progress.handle(update(15))
    with caplog.at_level(logging.WARNING, logger="kubetune_trainer.relay"):
        shown = progress.handle({EVENT: PREEMPTION_EVENT, "restarted": False})
    assert shown is not None and (shown.preemptions, shown.preemption_steps_lost) == (2, 3)
    assert "preemption 2: no restarts left (spec.runPolicy.maxPreemptions); 3 step(s) lost" in caplog.text


@pytest.mark.parametrize(
    ("argv", "preemptible"),
    [
        (["ray::RayTrainWorker.run_train_fn"], True),
        (["/venv/bin/python", "-m", "kubetune_trainer"], True),
        (["python3.11", "-u", "-m", "kubetune_trainer", "--config", "c.json"], True),
        (["/bin/sh", "-c", "python -m kubetune_trainer"], False),  # ending the shell would end the Ray job
        (["/venv/bin/python", "-m", "kubetune_trainer.preemption", "60"], False),  # the hook itself
        (["ray::IDLE"], False),
        ([], False),
    ],
)
def test_the_prestop_hook_signals_train_workers_and_the_driver_only(argv: list[str], preemptible: bool) -> None:
    assert is_preemptible(argv) is preemptible


def test_ray_train_restarts_the_workers_before_the_kubelet_kills_the_pod() -> None:
    assert deadline_ms(60, now=1000.0) == (1000 + 60 - 5) * 1000
    assert deadline_ms(10, now=0.0) == int((10 - 2.5) * 1000)  # a short grace keeps three quarters
