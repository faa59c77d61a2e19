"""What every handler shares while the operator runs: settings, clients, the status writer, timers, servers.

`main.build_runtime` makes one `Runtime`; kopf hands it to each handler as `memo.runtime` (`runtime_of`).
It owns what lives as long as the operator: the Kubernetes client, the one `StatusWriter`, the namespaces'
shared ServiceAccounts, the in-process timers (TTL expiry, progress checks), the Prometheus metrics and
the two HTTP servers (metrics and progress), which `start` and `close` bring up and down, and the
threads of the S3 preflight.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import time
from collections.abc import Awaitable, Callable
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
    # S3 preflight calls may each wait for a timeout; a pool of their own keeps them from delaying the rest.
    preflight_pool: concurrent.futures.ThreadPoolExecutor = field(
        default_factory=lambda: concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="kubetune-preflight")
    )
    status: StatusWriter = field(init=False)
    _metrics_servers: list[WSGIServer] = field(default_factory=list)
    _progress_servers: list[ProgressServer] = field(default_factory=list)

    def __post_init__(self) -> None:
        self.status = StatusWriter(self.kube)

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
                TokenReviewer(self.kube.api_client),
                self.kube,
                self.metrics,
                trainer_service_account=self.settings.trainer_service_account,
            )
            port = await progress.start("0.0.0.0", self.settings.progress_port)
            self._progress_servers.append(progress)
            logger.info("Serving the progress endpoint on port %d at %s", port, ROUTE)

    async def close(self) -> None:
        """Stop the timers and the servers (the operator is stopping)."""
        await self.expiry.close()
        await self.progress_checks.close()
        self.preflight_pool.shutdown(wait=False, cancel_futures=True)
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
