"""What every handler shares while the operator runs: settings, clients, the status writer, timers, servers.

`main.build_runtime` makes one `Runtime`; kopf hands it to each handler as `memo.runtime` (`runtime_of`).
It owns what lives as long as the operator: the Kubernetes client, the one `StatusWriter`, the namespaces'
shared ServiceAccounts, the in-process timers (TTL expiry, progress checks), the Prometheus metrics and
the two HTTP servers (metrics and progress), which `start` and `close` bring up and down, and the
slots that bound the S3 preflights and the launches running at once.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any
from wsgiref.simple_server import WSGIServer

from kubetune_operator.accounts import SharedServiceAccounts
from kubetune_operator.auth import TokenReviewer
from kubetune_operator.hooks import Hooks
from kubetune_operator.kube import Kube
from kubetune_operator.metrics import OperatorMetrics, serve_metrics
from kubetune_operator.progress import ROUTE, ProgressServer
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.status_writer import StatusWriter

logger = logging.getLogger("kubetune_operator")

# Launches creating their children at once. A burst of 5,000 new jobs otherwise has all 5,000 in flight,
# each holding its built RayJob and the server's answer (~150 KB per job; 855 MB peak at 5,000 jobs,
# bench/findings.md), all finishing late together; in turn, each job's launch ends in its burst's order.
# Four times the client's threads (kube.KUBE_THREADS) keeps every thread busy.
LAUNCHES_AT_ONCE = 64


def utc_now() -> datetime:
    return datetime.now(UTC)


class Timers:
    """One in-process timer per key (a job's uid); each runs its action once, when due.

    In-process timers instead of kopf timers or daemons: those put a finalizer on every job, and a job
    with a finalizer cannot be deleted while the operator is down. After a restart, the initial listing
    of jobs schedules every timer again. A timer's action that raises is logged, never lost.
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._timers: dict[str, tuple[float, asyncio.Task[None]]] = {}

    def schedule(self, key: str, delay: float, action: Callable[[], Awaitable[None]]) -> None:
        due = time.monotonic() + delay
        current = self._timers.get(key)
        if current and not current[1].done() and abs(current[0] - due) < 1.0:
            return  # the same deadline, seen again in a later event
        self.cancel(key)

        async def fire() -> None:
            await asyncio.sleep(delay)
            try:
                await action()
            except Exception:
                logger.exception("The %s timer of %s failed", self.name, key)

        self._timers[key] = (due, asyncio.create_task(fire(), name=f"kubetune-{self.name}-{key}"))

    def cancel(self, key: str) -> None:
        timer = self._timers.pop(key, None)
        if timer and not timer[1].done():
            timer[1].cancel()

    async def close(self) -> None:
        tasks = [task for _, task in self._timers.values()]
        self._timers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


class Slots:
    """At most `per_key` holders per key (a namespace) and `total` in all, each waiting its turn.

    A namespace waits for a slot of its own before one of the shared ones, so however many jobs one
    namespace starts at once, it holds at most `per_key` of them and the other namespaces the rest.
    """

    def __init__(self, total: int, per_key: int) -> None:
        self.per_key = per_key
        self._total = asyncio.Semaphore(total)
        self._keys: dict[str, tuple[asyncio.Semaphore, int]] = {}  # key → (its slots, holders and waiters)

    @contextlib.asynccontextmanager
    async def hold(self, key: str) -> AsyncIterator[None]:
        own, users = self._keys.get(key) or (asyncio.Semaphore(self.per_key), 0)
        self._keys[key] = (own, users + 1)
        try:
            async with own, self._total:
                yield
        finally:
            own, users = self._keys[key]
            if users == 1:
                del self._keys[key]  # bounded: only keys in use are remembered
            else:
                self._keys[key] = (own, users - 1)


@dataclass
class Runtime:
    """What every handler shares; see the module's docstring."""

    settings: OperatorSettings
    kube: Kube
    metrics: OperatorMetrics
    hooks: Hooks = field(default_factory=Hooks)
    clock: Callable[[], datetime] = utc_now
    # The trainer pods' ServiceAccount, made sure of once per namespace rather than once per job.
    accounts: SharedServiceAccounts = field(default_factory=SharedServiceAccounts)
    expiry: Timers = field(default_factory=lambda: Timers("expiry"))  # ttlSecondsAfterFinished
    progress_checks: Timers = field(default_factory=lambda: Timers("progress-check"))  # ProgressReporting
    # The S3 preflights running at once, in all and per namespace (from the settings).
    preflight_slots: Slots = field(init=False)
    launch_slots: asyncio.Semaphore = field(default_factory=lambda: asyncio.Semaphore(LAUNCHES_AT_ONCE))
    status: StatusWriter = field(init=False)
    _metrics_servers: list[WSGIServer] = field(default_factory=list)
    _progress_servers: list[ProgressServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.status = StatusWriter(self.kube)
        self.preflight_slots = Slots(self.settings.preflights_at_once, self.settings.preflights_per_namespace)

    @property
    def progress_servers(self) -> tuple[ProgressServer, ...]:
        """The progress endpoint's servers while the operator runs (none before `start`, or without a port)."""
        return tuple(self._progress_servers)

    def forget(self, namespace: str, name: str, uid: str) -> None:
        """A job is gone: its timers, cached state and metrics with it."""
        self.expiry.cancel(uid)
        self.progress_checks.cancel(uid)
        self.status.forget(namespace, name)
        self.hooks.deleted(namespace, name)

    async def start(self) -> None:
        """Serve the metrics and the progress endpoint on the settings' ports (none where a port is None)."""
        if self.settings.metrics_port is not None:
            server, _thread = serve_metrics(self.metrics.registry, self.settings.metrics_port)
            self._metrics_servers.append(server)
            logger.info("Serving Prometheus metrics on port %d at /metrics", server.server_port)
        if self.settings.progress_port is not None:
            progress = ProgressServer(
                TokenReviewer(self.kube.api_client, request_timeout=self.kube.request_timeout),
                self.kube,
                self.metrics,
                trainer_service_account=self.settings.trainer_service_account,
                view=self.status.jobs,
            )
            port = await progress.start("0.0.0.0", self.settings.progress_port)
            self._progress_servers.append(progress)
            logger.info("Serving the progress endpoint on port %d at %s", port, ROUTE)

    async def close(self) -> None:
        """Stop the timers and the servers (the operator is stopping)."""
        await self.expiry.close()
        await self.progress_checks.close()
        while self._progress_servers:
            await self._progress_servers.pop().stop()
        while self._metrics_servers:
            server = self._metrics_servers.pop()
            await asyncio.to_thread(server.shutdown)
            server.server_close()


def runtime_of(memo: Any) -> Runtime:
    """The operator's `Runtime`, from the memo kopf hands every handler."""
    runtime: Runtime = memo["runtime"]
    return runtime
