"""When the loop checkpoints: after every epoch or every `training.checkpointEvery`, and on a preemption
notice, decided alike on every worker.

Every worker must checkpoint the same step (the checkpoint is one collective `ray.train.report`, and
DDP needs every worker at every step), but only some know there is a reason: rank 0's clock says a
time-based checkpoint is due, and a notice may reach one worker only (SIGTERM to its process). So after
each step every worker votes, and the votes are combined with an all-reduce (MAX) on a gloo group of
its own, started without waiting (`async_op`) and read one step later: its latency hides behind a
step, and every worker reads the same result after the same step. On one worker there is nothing to
combine. At an epoch's end the vote is read at once.

A time-based checkpoint is not due while the previous one is still uploading (`uploads_busy`): a
checkpoint never waits for S3, it comes a little later instead.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import torch
import torch.distributed as dist

from kubetune_trainer.preemption import local_notice

PREEMPT, DUE = 0, 1  # positions in the vote


@dataclass(frozen=True)
class Decision:
    """What the workers agreed on after a step: checkpoint now (`due`), because of a preemption (`preempt`)."""

    preempt: bool = False
    due: bool = False

    @property
    def checkpoint(self) -> bool:
        return self.preempt or self.due

    def __or__(self, other: Decision) -> Decision:
        return Decision(self.preempt or other.preempt, self.due or other.due)


NOTHING = Decision()


class Cadence:
    """The checkpoint cadence of one worker; `interval_s` None checkpoints per epoch only."""

    def __init__(
        self,
        *,
        interval_s: float | None,
        rank: int,
        world: int,
        uploads_busy: Callable[[], bool] = lambda: False,
        notice: Callable[[], Any] = local_notice,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.interval_s = interval_s
        self.rank = rank
        self.uploads_busy = uploads_busy
        self.notice = notice
        self.clock = clock
        self.last = clock()
        self.group = _vote_group() if world > 1 else None
        self._pending: tuple[Any, torch.Tensor] | None = None

    def checkpointed(self) -> None:
        """A checkpoint was just taken: the interval starts again."""
        self.last = self.clock()

    def _votes(self, *, epoch_end: bool) -> torch.Tensor:
        votes = torch.zeros(2, dtype=torch.int32)
        votes[PREEMPT] = int(self.notice() is not None)
        if self.rank == 0:
            if self.interval_s is None:
                votes[DUE] = int(epoch_end)
            else:
                votes[DUE] = int(self.clock() - self.last >= self.interval_s and not self.uploads_busy())
        return votes

    def _collect(self) -> Decision:
        if self._pending is None:
            return NOTHING
        work, votes = self._pending
        self._pending = None
        work.wait()
        return Decision(bool(votes[PREEMPT]), bool(votes[DUE]))

    def after_step(self) -> Decision:
        """After a training step: the workers' decision on the previous step's votes (this step's are sent)."""
        votes = self._votes(epoch_end=False)
        if self.group is None:
            return Decision(bool(votes[PREEMPT]), bool(votes[DUE]))
        decision = self._collect()
        self._pending = (dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.group, async_op=True), votes)
        return decision

    def at_epoch_end(self) -> Decision:
        """After an epoch's last step: every vote still pending, and this moment's, read at once."""
        votes = self._votes(epoch_end=True)
        if self.group is None:
            return Decision(bool(votes[PREEMPT]), bool(votes[DUE]))
        decision = self._collect()
        dist.all_reduce(votes, op=dist.ReduceOp.MAX, group=self.group)
        return decision | Decision(bool(votes[PREEMPT]), bool(votes[DUE]))


def _vote_group() -> Any:
    """A gloo group for the votes, apart from the training's (NCCL on GPUs): CPU tensors, no GPU sync."""
    if not (dist.is_available() and dist.is_initialized()):
        return None
    return dist.new_group(backend="gloo")
