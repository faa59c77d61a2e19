"""The one writer of the status fields `lifecycle` computes: one job at a time, from the job as last seen.

Each write takes the job's lock, computes the change from the cached job (`jobcache.JobCache`: the
watch's record with the operator's own earlier writes laid over it, read from the server only when the
watch has not delivered the job yet), patches the status, records the patch in the cache and posts the
change's Events. So the RayJob watcher, the TTL and progress timers and the job's own handlers never
overwrite each other with stale views, and a write needs no fresh read of the job.

It also owns kopf's diff base for new jobs (`diffbase.py`): the launch handler offers it
(`offer_diffbase`), and the write that ends that launch carries it, so kopf has nothing left to write.
"""

from __future__ import annotations

import asyncio
import logging
from collections import OrderedDict
from collections.abc import Callable, Mapping
from typing import Any, Protocol

import kopf

from kubetune_operator.diffbase import MAX_CARRIED, CarriedDiffBase, uid_of
from kubetune_operator.incoming import JobMeta, JobRecord, receive
from kubetune_operator.jobcache import JobCache
from kubetune_operator.kube import is_not_found
from kubetune_operator.lifecycle import NO_CHANGE, Event, StatusChange

logger = logging.getLogger("kubetune_operator")

Compute = Callable[[JobRecord], StatusChange]


class JobStatusClient(Protocol):
    """What the writer asks of `kube.Kube`."""

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None: ...

    async def patch_job_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None: ...

    def post_event(self, job: Mapping[str, Any], event: Event) -> None: ...


class StatusWriter:
    def __init__(self, kube: JobStatusClient) -> None:
        self.kube = kube
        self.jobs = JobCache()
        # kopf's diff-base storage, when the launch's status write may carry the diff base (main.kopf_settings).
        self.diffbase: CarriedDiffBase | None = None
        self._offered: OrderedDict[str, str] = OrderedDict()  # job uid → diff base its launch may carry
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}

    # -- what the watch delivers ---------------------------------------------------------------------------

    def seen(self, record: JobRecord) -> None:
        self.jobs.seen(record)

    def received(self, body: Mapping[str, Any]) -> JobRecord:
        """The record of a job's body, sharing the parsed spec of the watch's record when that is of the same
        body (kopf runs the event handlers before the launch's). So a burst's launches waiting for their
        slot (`runtime.LAUNCHES_AT_ONCE`) hold no parsed job of their own: 5,000 of them held ~85 MB."""
        meta = JobMeta.of(body)
        return receive(body, parsed=self.jobs.last_seen(meta.namespace, meta.name))

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)
        self.jobs.forget(namespace, name)

    def cached(self, namespace: str, name: str) -> JobRecord | None:
        """The job as last seen with the operator's writes laid over it, without waiting for a write in
        flight (whose watch event may have come before the write's answer did)."""
        return self.jobs.get(namespace, name)

    async def current(self, namespace: str, name: str) -> JobRecord | None:
        """The job as the next write would see it: after any write to it in flight."""
        async with self._lock(namespace, name):
            return await self._current(namespace, name)

    # -- kopf's diff base ------------------------------------------------------------------------------------

    def offer_diffbase(self, body: kopf.Body, *, new: bool) -> None:
        """Before a launch: a new job's launch (kopf's creation handler) may carry kopf's diff base."""
        uid = uid_of(body)
        if self.diffbase is None or not uid:
            return
        if not new:
            self._offered.pop(uid, None)
            return
        self._offered[uid] = self.diffbase.encoded(body)
        self._offered.move_to_end(uid)
        while len(self._offered) > MAX_CARRIED:
            self._offered.popitem(last=False)

    def launched_already(self, record: JobRecord) -> bool:
        """Whether this spec's launch already wrote its diff base: the event is one from before that write
        (kopf, finding no diff base in it, takes the job for a new one again)."""
        uid = record.meta.uid or ""
        offered = self._offered.get(uid)
        cached = self.cached(record.meta.namespace, record.meta.name) or record
        if self.diffbase is None or offered is None or CarriedDiffBase.written_in(cached.status) != offered:
            return False
        del self._offered[uid]
        self.diffbase.carried(uid, offered)
        return True

    # -- writing ---------------------------------------------------------------------------------------------

    async def update(self, namespace: str, name: str, compute: Compute, *, ends_launch: bool = False) -> StatusChange:
        """Compute the job's status change, write it and post its Events (one job at a time).

        `ends_launch`: this write ends a successful launch (or shows its RayJob exists), so it carries the
        diff base offered for the job, if any (kopf then takes the job as handled, and has nothing to store
        itself).
        """
        async with self._lock(namespace, name):
            record = await self._current(namespace, name)
            if record is None or record.meta.deleting:
                return NO_CHANGE
            change = compute(record)
            carry = self._offered.pop(record.meta.uid or "", None) if ends_launch else None
            if change.patch:
                patch = {**change.patch, **CarriedDiffBase.status_fields(carry)} if carry else change.patch
                try:
                    await self.kube.patch_job_status(namespace, name, patch)
                except Exception as exc:
                    if is_not_found(exc):  # deleted since the watch last delivered it
                        return NO_CHANGE
                    raise
                self.jobs.wrote(namespace, name, record.meta.uid, patch)
                if carry and self.diffbase is not None:
                    self.diffbase.carried(record.meta.uid, carry)
            for event in change.events:
                self.kube.post_event(record.meta.reference(), event)
            if change.phase_changed:
                message = change.patch.get("message", "")
                logger.info(
                    "%s/%s: %s -> %s: %s", namespace, name, change.old_phase or "new", change.new_phase, message
                )
            return change

    def _lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    async def _current(self, namespace: str, name: str) -> JobRecord | None:
        """The cached job; read from the server only when the watch has not delivered it yet (e.g. a RayJob
        seen before its job after a restart)."""
        cached = self.cached(namespace, name)
        if cached is not None:
            return cached
        body = await self.kube.get_job(namespace, name)
        return receive(body) if body is not None else None
