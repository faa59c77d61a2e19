"""The kopf handlers: each parses what kopf hands it once (a job body becomes an `incoming.JobRecord`)
and calls one step in `reconcile`.

`register(registry)` puts them on a registry (main.py's, or a test's), so handlers are never registered
twice by importing this module. The shared `Runtime` reaches them as `memo.runtime`; its servers
(metrics, progress) start and stop with the operator.
"""

from __future__ import annotations

import functools
from collections.abc import Awaitable, Callable, Mapping
from typing import Any

import kopf

from kubetune_operator import reconcile
from kubetune_operator.builders import MANAGED_BY, MANAGED_BY_LABEL
from kubetune_operator.incoming import receive
from kubetune_operator.kube import RAY_GROUP, RAY_PLURAL, RAY_VERSION
from kubetune_operator.runtime import runtime_of
from kubetune_operator.spec import GROUP, PLURAL, VERSION

FINETUNEJOBS = (GROUP, VERSION, PLURAL)
RAYJOBS = (RAY_GROUP, RAY_VERSION, RAY_PLURAL)


def plain(value: Any) -> Any:
    """kopf's read-only body views as plain dicts and lists (a copy), which the strict spec models accept."""
    kind = type(value)
    # Decoded JSON under the views: exact-type checks first, as every watch event of every job goes
    # through here (isinstance against the ABCs was most of this function's time in a burst).
    if kind is dict:
        return {k: plain(v) for k, v in value.items()}
    if kind is list:
        return [plain(v) for v in value]
    if kind is str or kind is int or kind is float or kind is bool or value is None:
        return value
    if isinstance(value, Mapping):
        return {str(k): plain(v) for k, v in value.items()}
    if isinstance(value, list | tuple):
        return [plain(v) for v in value]
    return value


Handler = Callable[..., Awaitable[None]]


def _counted(name: str) -> Callable[[Handler], Handler]:
    """Report a handler's failures to the hooks (reconcile-error metrics), then let kopf handle them."""

    def wrap(fn: Handler) -> Handler:
        @functools.wraps(fn)
        async def wrapper(*args: Any, memo: Any, **kwargs: Any) -> None:
            try:
                await fn(*args, memo=memo, **kwargs)
            except Exception:
                runtime_of(memo).hooks.failed(name)
                raise

        return wrapper

    return wrap


def register(registry: kopf.OperatorRegistry) -> None:
    """Put every FineTuneJob and RayJob handler on `registry`."""

    @kopf.on.startup(registry=registry)
    async def start(memo: kopf.Memo, **_: Any) -> None:
        rt = runtime_of(memo)
        await rt.start()
        await reconcile.check_kuberay(rt)

    @kopf.on.cleanup(registry=registry)
    async def stop(memo: kopf.Memo, **_: Any) -> None:
        await runtime_of(memo).close()

    @kopf.on.resume(*FINETUNEJOBS, registry=registry)
    @kopf.on.create(*FINETUNEJOBS, registry=registry)
    @_counted("launch")
    async def launch(body: kopf.Body, retry: int, reason: str, memo: kopf.Memo, **_: Any) -> None:
        rt = runtime_of(memo)
        # A new job's launch writes kopf's diff base with its status: one write per new job, not two.
        rt.status.offer_diffbase(body, new=reason == kopf.Reason.CREATE)
        await reconcile.launch(rt, rt.status.received(plain(body)), retry=retry)

    @kopf.on.update(*FINETUNEJOBS, registry=registry)
    @_counted("spec_change")
    async def spec_change(body: kopf.Body, diff: kopf.Diff, memo: kopf.Memo, **_: Any) -> None:
        await reconcile.apply_spec_change(runtime_of(memo), receive(plain(body)), plain(list(diff)))

    @kopf.on.event(*FINETUNEJOBS, registry=registry)
    @_counted("job_event")
    async def job_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await reconcile.observe_job(runtime_of(memo), type, receive(plain(body)))

    @kopf.on.event(*RAYJOBS, labels={MANAGED_BY_LABEL: MANAGED_BY}, registry=registry)
    @_counted("rayjob_event")
    async def rayjob_event(type: str | None, body: kopf.Body, memo: kopf.Memo, **_: Any) -> None:
        await reconcile.follow_rayjob(runtime_of(memo), plain(body), deleted=type == "DELETED")
