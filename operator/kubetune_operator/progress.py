"""The progress endpoint: trainers POST updates, the operator merges them into `status.progress`.

    POST /v1/progress/{namespace}/{name}     Authorization: Bearer <projected ServiceAccount token>

Answers: 200 applied (or ignored as stale), 400 malformed or larger than MAX_BODY_BYTES, 401 no token, or
none authentic for the job's audience, 403 an authentic token of anyone but the namespace's trainer
ServiceAccount, 404 no such job, 429 more than one update per job per second (Retry-After says when), 503
the API server cannot be asked. Every answer is counted in `kubetune_progress_updates_total{result,code}`.

Only a job's own pods hold a token for its audience, `token_audience(namespace, name, uid)`: the pods of
every job share one ServiceAccount per namespace, so the audience is what tells jobs apart, and the uid in
it what tells a job from an earlier one of the same name.

The merge rule lives in `progress_patch` (pure); reading and patching the job go through the operator's
Kubernetes client (`kube.Kube`, a `JobStatusStore`).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import pydantic
from aiohttp import web

from kubetune_operator.auth import ReviewUnavailableError, TokenReviewer, service_account_username
from kubetune_operator.builders import token_audience
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.settings import DEFAULT_TRAINER_SERVICE_ACCOUNT
from kubetune_operator.spec import ProgressStatus
from kubetune_trainer.progress_model import ProgressUpdate  # pydantic only: no torch or Ray in the operator

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
MIN_INTERVAL_S = 1.0
ROUTE = "/v1/progress/{namespace}/{name}"


class JobStatusStore(Protocol):
    """Reads a FineTuneJob and merge-patches its status subresource: what `kube.Kube` does."""

    async def get_job(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The job's object, or None when there is no such job."""

    async def patch_job_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Merge `status` into the job's status (a JSON merge patch of `{"status": status}`)."""


# -- the merge rule (pure) -----------------------------------------------------------------------------------


def position(progress: Mapping[str, Any] | None) -> tuple[int, int]:
    """Where a run is, for ordering updates: (epoch, step); what is missing counts as 0."""
    progress = progress or {}
    return (int(progress.get("epoch") or 0), int(progress.get("step") or 0))


def progress_patch(current: Mapping[str, Any] | None, update: ProgressUpdate, now: datetime) -> dict[str, Any] | None:
    """The `status.progress` merge patch for `update`, or None when it is older than `current`.

    An update at the same position is applied (an evaluation reports after the last step of its epoch).
    Fields the update leaves out keep their current values, metrics one by one: that is what a JSON merge
    patch of the returned dict does.
    """
    fields = update.model_dump(by_alias=True, exclude_none=True, mode="json")
    if position(fields) < position(current):
        return None
    # The wire message may carry more than the status keeps (e.g. the trainer's own phase); validating
    # against the model the CRD's status schema is generated from keeps exactly what the API server keeps.
    kept = {key: value for key, value in fields.items() if key in _PROGRESS_KEYS and key != "updatedAt"}
    kept["updatedAt"] = now.astimezone(UTC).replace(microsecond=0)
    return ProgressStatus.model_validate(kept).model_dump(by_alias=True, exclude_none=True, mode="json")


_PROGRESS_KEYS = frozenset(field.alias or name for name, field in ProgressStatus.model_fields.items())


def merge_patch(target: Mapping[str, Any] | None, patch: Mapping[str, Any]) -> dict[str, Any]:
    """RFC 7386 JSON merge patch, as the API server applies it (for the metrics of the merged progress)."""
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


def parse_update(body: bytes) -> ProgressUpdate:
    """The update in a request body; raises ValueError with a short reason when it is not one."""

    def no_constants(token: str) -> Any:
        raise ValueError(f"{token} is not a number JSON allows")

    try:
        data = json.loads(body, parse_constant=no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    try:
        update = ProgressUpdate.model_validate(data)
    except pydantic.ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"]) or "body"
        raise ValueError(f"{where}: {first['msg']} ({exc.error_count()} error(s))") from None
    _check_finite(update.model_dump(mode="python"))
    return update


def _check_finite(value: Any) -> None:
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("numbers must be finite")
    if isinstance(value, Mapping):
        for item in value.values():
            _check_finite(item)


# -- the HTTP server ------------------------------------------------------------------------------------------


class ProgressServer:
    """The aiohttp application behind the progress endpoint."""

    def __init__(
        self,
        reviewer: TokenReviewer,
        jobs: JobStatusStore,
        metrics: OperatorMetrics,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        min_interval_s: float = MIN_INTERVAL_S,
        clock: Callable[[], float] = time.monotonic,
        trainer_service_account: str = DEFAULT_TRAINER_SERVICE_ACCOUNT,
    ) -> None:
        self.reviewer = reviewer
        self.trainer_service_account = trainer_service_account
        self.jobs = jobs
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.min_interval_s = min_interval_s
        self._clock = clock
        self._last_update: dict[tuple[str, str], float] = {}
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # Status writes per job, so an update can tell whether the job it read before its review is
        # still what this server last wrote (only this server writes status.progress).
        self._writes: dict[tuple[str, str], int] = {}
        self._runner: web.AppRunner | None = None

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.max_body_bytes)
        app.router.add_post(ROUTE, self.handle)
        return app

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port) and return the port."""
        self._runner = web.AppRunner(self.app(), access_log=None)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        server = site._server
        sockets = getattr(server, "sockets", None) or []
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self) -> None:
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None

    async def handle(self, request: web.Request) -> web.Response:
        namespace, name = request.match_info["namespace"], request.match_info["name"]
        job = f"{namespace}/{name}"

        token = _bearer(request.headers.get("Authorization", ""))
        if token is None:
            return self._answer("rejected", 401, "a bearer token is required", job, authenticate=True)
        key = (namespace, name)
        # The job comes first: its uid is part of the audience its pods' tokens carry.
        writes = self._writes.get(key, 0)
        try:
            obj = await self.jobs.get_job(namespace, name)
        except Exception as exc:
            log.error("progress for %s: cannot read the job: %s", job, exc)
            return self._answer("error", 503, "the operator cannot read the job right now", job, retry_after=5)
        if obj is None:
            return self._answer("rejected", 404, f"no FineTuneJob {job}", job)
        uid = (obj.get("metadata") or {}).get("uid")
        try:
            refusal = await self._authorize(token, namespace, name, str(uid) if uid else None)
        except ReviewUnavailableError as exc:
            log.error("progress for %s: cannot review its token: %s", job, exc)
            return self._answer("error", 503, "the operator cannot check tokens right now", job, retry_after=5)
        if refusal == 401:
            return self._answer("rejected", 401, "the token is not valid for this job", job, authenticate=True)
        if refusal == 403:
            return self._answer("rejected", 403, f"this token may not report progress for {job}", job)

        now = self._clock()
        last = self._last_update.get(key)
        if last is not None and now - last < self.min_interval_s:
            wait = max(1, math.ceil(self.min_interval_s - (now - last)))
            return self._answer("throttled", 429, "at most one update per second", job, retry_after=wait)
        self._last_update[key] = now
        self._forget_idle(now)

        body = await _read_limited(request, self.max_body_bytes)
        if body is None:
            return self._answer("rejected", 400, f"the body exceeds {self.max_body_bytes} bytes", job)
        try:
            update = parse_update(body)
        except ValueError as exc:
            return self._answer("rejected", 400, str(exc), job)

        async with self._locks.setdefault(key, asyncio.Lock()):
            try:
                # The job read above is current unless another update was written since.
                fresh = obj if self._writes.get(key, 0) == writes else await self.jobs.get_job(namespace, name)
                return await self._apply(namespace, name, fresh, update)
            except Exception as exc:
                log.error("progress for %s: cannot update the status: %s", job, exc)
                return self._answer("error", 503, "the operator cannot update the job right now", job, retry_after=5)

    async def _authorize(self, token: str, namespace: str, name: str, uid: str | None) -> int | None:
        """None when `token` may report for the job; else 401 (not authentic for it) or 403 (someone else's)."""
        identity = await self.reviewer.authenticate(token, token_audience(namespace, name, uid))
        if identity is None:
            return 401
        if identity.username != service_account_username(namespace, self.trainer_service_account):
            log.warning("progress for %s/%s refused: sent by %s", namespace, name, identity.username)
            return 403
        return None

    async def _apply(
        self, namespace: str, name: str, obj: Mapping[str, Any] | None, update: ProgressUpdate
    ) -> web.Response:
        job = f"{namespace}/{name}"
        if obj is None:
            return self._answer("rejected", 404, f"no FineTuneJob {job}", job)
        current = (obj.get("status") or {}).get("progress")
        self.metrics.mark_alive(namespace, name)
        try:
            patch = progress_patch(current, update, datetime.now(UTC))
        except pydantic.ValidationError as exc:
            return self._answer("rejected", 400, f"not a valid status.progress: {exc.errors()[0]['msg']}", job)
        if patch is None:
            log.debug("progress for %s: ignored an update older than the status", job)
            return self._answer("stale", 200, "older than the current progress; ignored", job, applied=False)
        status: dict[str, Any] = {"progress": patch}
        if "latestCheckpoint" in patch:
            # A resumed or retried run continues from here; the status is where the operator finds it.
            status["latestCheckpoint"] = patch["latestCheckpoint"]
        try:
            await self.jobs.patch_job_status(namespace, name, status)
        finally:
            # Counted once the write is done (or failed, perhaps applied): a read that began before
            # then may not show it.
            self._writes[(namespace, name)] = self._writes.get((namespace, name), 0) + 1
        self.metrics.observe_progress(namespace, name, merge_patch(current, patch))
        return self._answer("accepted", 200, "applied", job, applied=True)

    def _answer(
        self,
        result: str,
        code: int,
        message: str,
        job: str,
        *,
        applied: bool | None = None,
        retry_after: int | None = None,
        authenticate: bool = False,
    ) -> web.Response:
        self.metrics.count_progress_update(result, code)
        if result in ("rejected", "throttled"):
            log.info("progress for %s: %d %s", job, code, message)
        headers = {}
        if retry_after is not None:
            headers["Retry-After"] = str(retry_after)
        if authenticate:
            headers["WWW-Authenticate"] = 'Bearer realm="kubetune.dev"'
        body: dict[str, Any] = {"result": result, "message": message}
        if applied is not None:
            body["applied"] = applied
        return web.json_response(body, status=code, headers=headers)

    def _forget_idle(self, now: float) -> None:
        # Bounded memory: forget the rate-limit state of jobs that have not reported for a minute.
        if len(self._last_update) < 1024:
            return
        for key in [key for key, at in self._last_update.items() if now - at > 60]:
            del self._last_update[key]
            self._writes.pop(key, None)
            lock = self._locks.get(key)
            if lock is not None and not lock.locked():
                del self._locks[key]


def _bearer(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None


async def _read_limited(request: web.Request, limit: int) -> bytes | None:
    """The body, or None when it is longer than `limit` (without reading more than that)."""
    if request.content_length is not None and request.content_length > limit:
        return None
    body = await request.content.read(limit + 1)
    return None if len(body) > limit else body
