"""Progress status writes, coalesced: at most one write per job per `interval_s` on average, whatever the push rate.

The endpoint accepts every update (one a second per job at most) at once: the metrics see it then. The
status patch is written at once when the job's schedule allows it, or when the update is news the
operator or a user acts on (`must_write_now`: a new checkpoint, a worker failure or preemption, the last
step). Otherwise it waits, merged with any later update of the same job (the latest wins, field by field,
as the API server would merge the patches one after another), and the flusher writes it when the
schedule allows: it sleeps until the earliest waiting write is due. So with 1,000 jobs reporting every
second the API server sees at most 200 progress writes a second, and the status is never more than
`interval_s` behind.

The schedule is a token bucket (GCRA): each write moves the job's next slot an interval on from the
later of its slot and now, and a write may come up to `early_s` (a fifth of the interval) before its
slot. So writes are at most one per interval over any longer stretch, and never two within
`interval_s - early_s`. The slack is what keeps the status current when the trainer pushes exactly as
often as the interval: with a strict interval since the last write, every push that comes a little
early (the network, the API server's answer) waits, its delay carries into each later write of the job,
and the status falls further behind with every push (measured in bench/findings.md).

Nothing accepted is dropped: a write that fails is kept and tried again an interval later (unless the job
is gone: 404), and `close()` writes whatever is still waiting when the operator stops.
"""

from __future__ import annotations

import asyncio
import contextlib
import heapq
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

from kubetune_operator.kube import is_not_found

log = logging.getLogger(__name__)

# Seconds between two progress writes of one job (the status lags pushes by at most this much).
WRITE_INTERVAL_S = 5.0
# How far ahead of its slot a job's write may be made, as a share of the interval (see the docstring).
EARLY_SHARE = 0.2
# Writes the flusher makes at once (each is one PATCH to the API server).
MAX_WRITES_AT_ONCE = 32

Key = tuple[str, str]  # (namespace, name)
Write = Callable[[str, str, Mapping[str, Any]], Awaitable[None]]
# Counts whose change is news: the driver restarted workers (a failure or a preemption), or resized them.
NEWS_COUNTS = ("workerFailures", "preemptions", "preemptionStepsLost", "workers")


def must_write_now(before: Mapping[str, Any] | None, patch: Mapping[str, Any]) -> bool:
    """Whether a progress patch is news to write at once: a new latest checkpoint (where a restart resumes),
    a changed count of failures, preemptions or workers, early stopping, or the run's last step."""
    before = before or {}
    if any(key in patch and patch[key] != before.get(key) for key in ("latestCheckpoint", *NEWS_COUNTS)):
        return True
    if patch.get("earlyStopped") is True:
        return True
    total = patch.get("totalSteps") or before.get("totalSteps") or 0
    return bool(total) and int(patch.get("step") or 0) >= int(total)


def merge_patch(target: Mapping[str, Any] | None, patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch, as the API server applies it: the progress after a write (for the metrics),
    and two waiting writes as one (progress patches hold no nulls, so `patch` after `target` is one patch)."""
    out = dict(target or {})
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, Mapping):
            current = out.get(key)
            out[key] = merge_patch(current if isinstance(current, Mapping) else None, value)
        else:
            out[key] = value
    return out


class CoalescedWrites:
    """The progress writes of every job: written now, or kept (merged) until the job's interval is up."""

    def __init__(
        self,
        write: Write,
        lock: Callable[[Key], asyncio.Lock],
        *,
        interval_s: float = WRITE_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self._write = write
        self._lock = lock  # the job's lock, shared with the endpoint: one write of a job at a time
        self.interval_s = interval_s
        self.early_s = interval_s * EARLY_SHARE
        self._clock = clock
        self._slot: dict[Key, float] = {}  # when each job's next write is due on its schedule
        self._pending: dict[Key, dict[str, Any]] = {}
        # (when, job) for each waiting write: the flusher's schedule. An entry whose job was written
        # meanwhile is skipped, one whose job wrote again since is put back at its new time.
        self._due: list[tuple[float, Key]] = []
        self._kept = asyncio.Event()  # a write was kept: the flusher looks at its schedule again
        self._task: asyncio.Task[None] | None = None
        self.writes = 0  # status writes made (for the tests and the benchmark)

    def pending(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The status patch accepted for the job and not yet written."""
        return self._pending.get((namespace, name))

    async def offer(self, namespace: str, name: str, status: Mapping[str, Any], *, urgent: bool = False) -> bool:
        """Write `status` (merged with what is waiting) now, or keep it for the flusher; whether it was
        written. Called under the job's lock. A write that fails here raises, and nothing is kept: the
        trainer is told to retry, and sends its update again."""
        key = (namespace, name)
        merged = merge_patch(self._pending.pop(key, None), status)
        allowed, now = self._allowed_at(key), self._clock()
        if urgent or now >= allowed:
            await self._write(namespace, name, merged)
            self._wrote(key, now)
            return True
        self._keep(key, merged, allowed)
        return False

    def _allowed_at(self, key: Key) -> float:
        slot = self._slot.get(key)
        return float("-inf") if slot is None else slot - self.early_s

    def _keep(self, key: Key, status: dict[str, Any], when: float) -> None:
        if key not in self._pending:
            heapq.heappush(self._due, (when, key))
            if self._due[0] == (when, key):  # due before what the flusher sleeps for
                self._kept.set()
        self._pending[key] = status

    def due(self) -> list[Key]:
        """The jobs whose waiting write may be made now."""
        now = self._clock()
        keys: dict[Key, None] = {}
        while self._due and self._due[0][0] <= now:
            _, key = heapq.heappop(self._due)
            if key not in self._pending:
                continue  # written meanwhile (at once, or by close)
            ready = self._allowed_at(key)
            if ready > now:
                heapq.heappush(self._due, (ready, key))
            else:
                keys[key] = None
        return list(keys)

    async def flush(self, keys: list[Key] | None = None) -> None:
        """Write what waits for `keys` (default: every job whose interval is up), some at once."""
        slots = asyncio.Semaphore(MAX_WRITES_AT_ONCE)

        async def one(key: Key) -> None:
            async with slots, self._lock(key):
                status = self._pending.pop(key, None)
                if status is None:
                    return
                now = self._clock()
                try:
                    await self._write(*key, status)
                except Exception as exc:
                    if is_not_found(exc):  # the job is gone, and its progress with it
                        self._slot.pop(key, None)
                        return
                    log.warning("progress for %s/%s: cannot write the status, will retry: %s", *key, exc)
                    retry_at = self._clock() + self.interval_s  # try again in an interval, not at once
                    self._slot[key] = retry_at + self.early_s
                    self._keep(key, merge_patch(status, self._pending.pop(key, {})), retry_at)
                    return
                self._wrote(key, now)

        await asyncio.gather(*(one(key) for key in (self.due() if keys is None else keys)))
        self._forget_idle()

    def start(self) -> None:
        """Run the flusher in the background (until `close`)."""
        if self._task is None:
            self._task = asyncio.create_task(self._run(), name="progress-writes")

    async def close(self) -> None:
        """Stop the flusher and write everything still waiting."""
        if self._task is not None:
            self._task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._task
            self._task = None
        await self.flush(list(self._pending))

    async def _run(self) -> None:
        while True:
            await self._until_due()
            try:
                await self.flush()
            except Exception:  # never let one bad round stop the flusher
                log.exception("progress writes: the flusher failed a round")

    async def _until_due(self) -> None:
        """Sleep until the earliest waiting write is due, or until a write is kept (it may be due sooner)."""
        self._kept.clear()
        if not self._due:
            await self._kept.wait()
            return
        delay = self._due[0][0] - self._clock()
        if delay > 0:
            with contextlib.suppress(TimeoutError):
                await asyncio.wait_for(self._kept.wait(), delay)

    def _wrote(self, key: Key, now: float) -> None:
        """A write of the job was made (decided at `now`; one write of a job at a time): its next slot an
        interval on."""
        self._slot[key] = max(self._slot.get(key, now), now) + self.interval_s
        self.writes += 1

    def _forget_idle(self) -> None:
        # Bounded memory: a job whose slot has passed writes at once next time anyway.
        now = self._clock()
        if len(self._slot) < 1024:
            return
        for key in [k for k, at in self._slot.items() if at <= now and k not in self._pending]:
            del self._slot[key]
