"""The trainer pods' shared ServiceAccount: made sure of once per namespace, not once per job.

A burst of new jobs in one namespace waits on one get-or-create; a success is trusted for
REMEMBER_SECONDS, then checked again with one read (so an account deleted meanwhile is recreated); a
failure is not remembered, so the next job tries again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any, Protocol

logger = logging.getLogger("kubetune_operator")

REMEMBER_SECONDS = 600.0


class Ensures(Protocol):
    """What `kube.Kube` does: get-or-create an object by its name."""

    async def ensure(self, obj: Mapping[str, Any], *, likely_new: bool = False) -> tuple[dict[str, Any], bool]: ...


class SharedServiceAccounts:
    """Ensures each namespace's shared ServiceAccount exists, one request at a time per namespace."""

    def __init__(
        self, *, remember_seconds: float = REMEMBER_SECONDS, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.remember_seconds = remember_seconds
        self._clock = clock
        self._verified_at: dict[tuple[str, str], float] = {}
        self._in_flight: dict[tuple[str, str], asyncio.Future[bool]] = {}

    async def ensure(self, kube: Ensures, account: Mapping[str, Any]) -> bool:
        """Make sure `account` exists; whether this call (or the one it waited on) created it.

        Raises what the get-or-create raised; every caller waiting on it gets the same error.
        """
        meta = account["metadata"]
        key = (str(meta["namespace"]), str(meta["name"]))
        verified = self._verified_at.get(key)
        if verified is not None and self._clock() - verified < self.remember_seconds:
            return False
        future = self._in_flight.get(key)
        if future is None:
            future = asyncio.ensure_future(self._ensure(kube, account, key))
            self._in_flight[key] = future
            future.add_done_callback(lambda done: self._finished(key, done))
        # Shielded: one caller cancelled (its job deleted, the operator stopping) must not fail the others.
        return await asyncio.shield(future)

    async def _ensure(self, kube: Ensures, account: Mapping[str, Any], key: tuple[str, str]) -> bool:
        _, created = await kube.ensure(account, likely_new=False)
        self._verified_at[key] = self._clock()
        if created:
            logger.info("%s: created ServiceAccount %s, shared by the trainer pods of its jobs", *key)
        return created

    def _finished(self, key: tuple[str, str], done: asyncio.Future[bool]) -> None:
        if self._in_flight.get(key) is done:
            del self._in_flight[key]
        if not done.cancelled():
            done.exception()  # retrieved: callers that were all cancelled must not leave it unreported
