"""The progress endpoint: trainers POST updates, the operator merges them into `status.progress`.

    POST /v1/progress/{namespace}/{name}     Authorization: Bearer <projected ServiceAccount token>

Answers: 200 applied (or ignored as stale); 400 a path whose namespace or name is no DNS name, a body that
is malformed, nested too deeply or larger than MAX_BODY_BYTES; 401 no token, or none authentic for the job;
403 an authentic token of anyone but the namespace's trainer ServiceAccount; 404 no such job (told only to
a caller whose token is authentic for it); 408 a body not sent within READ_TIMEOUT_S; 429 more than one
update per job per second (Retry-After says when); 503 the API server cannot be asked. Every answer is
counted in `kubetune_progress_updates_total{result,code}`.

Only a job's own pods hold a token for its audience, `token_audience(namespace, name, uid)`: the pods of
every job share one ServiceAccount per namespace, so the audience is what tells jobs apart, and the uid in
it what tells a job from an earlier one of the same name. The request is authenticated (auth.py) before
the job is looked up, so whoever has no token learns nothing about which jobs exist, and a forged request
costs no API call beyond one TokenReview (none when the token is not even a JWT for a kubetune audience).

Abuse is bounded: the path is checked first; at most MAX_CONNECTIONS connections are open at once (more
are closed on arrival); a connection must send its request line and headers, and then its body, within
READ_TIMEOUT_S each (aiohttp's keep-alive timer closes one that has not sent a whole request); the body
is read whole, at most MAX_BODY_BYTES; every per-job table is keyed by authenticated jobs only.

The merge rule lives in `progress_patch` (pure); patching the job goes through the operator's Kubernetes
client (`kube.Kube`, a `JobStatusStore`). The job is read from the operator's watch cache
(`jobcache.JobCache`, a `JobView`), not from the API server: the endpoint is the only writer of the status
fields it patches, so it lays each of its writes over the cached job, and the cache's status is current
for them even before the watch delivers the write. Only a job the cache has not seen, or has under another
uid (deleted and made again since), is read from the API server. At 1,000 jobs that is one request per
update fewer. What the cache gives away: after a job is deleted and made again under its name, the old
job's tokens are still taken for the job until the watch delivers the deletion (normally well under a
second; a write waiting in `progress_writes` goes by name, as it did before the cache).
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import re
import time
from collections.abc import Awaitable, Callable, Mapping
from datetime import UTC, datetime
from typing import Any, Protocol

import pydantic
from aiohttp import web
from aiohttp.web_protocol import RequestHandler

from kubetune_operator.auth import ReviewUnavailableError, TokenReviewer, claimed_job_uid, service_account_username
from kubetune_operator.builders import token_audience
from kubetune_operator.incoming import JobRecord, receive
from kubetune_operator.lifecycle import Event, preemption_event, preemptions_added
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.pod_additions import service_account_name
from kubetune_operator.pod_names import HEAD
from kubetune_operator.progress_writes import WRITE_INTERVAL_S, CoalescedWrites, merge_patch, must_write_now
from kubetune_operator.settings import DEFAULT_TRAINER_SERVICE_ACCOUNT
from kubetune_operator.spec import (
    DNS_LABEL,
    FINISHED_STATES,
    MAX_NAME_LENGTH,
    NAME_PATTERN,
    FineTuneJob,
    ProgressStatus,
    SweepStatus,
)
from kubetune_trainer.progress_model import ProgressUpdate, SweepProgress  # pydantic only: no torch or Ray

log = logging.getLogger(__name__)

MAX_BODY_BYTES = 16 * 1024
MIN_INTERVAL_S = 1.0
# Connections open at once: far more than the trainers of every job in a cluster (each sends one update a
# second on a connection of its own), few enough that their buffers stay small (aiohttp's per connection
# limits: request line and header fields 8 KiB each, 128 headers).
MAX_CONNECTIONS = 1024
# Seconds a connection has to send its request line and headers (from when it opens, or since its last
# answer), and then its body.
READ_TIMEOUT_S = 10.0
LINGERING_TIME_S = 1.0
ROUTE = "/v1/progress/{namespace}/{name}"
_ROUTE = re.compile(r"^/v1/progress/([^/]+)/([^/]+)$")


class JobStatusStore(Protocol):
    """Reads a FineTuneJob and merge-patches its status subresource: what `kube.Kube` does."""

    async def get_job(self, namespace: str, name: str) -> Mapping[str, Any] | None:
        """The job's object, or None when there is no such job."""

    async def patch_job_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Merge `status` into the job's status (a JSON merge patch of `{"status": status}`)."""

    async def create_event(self, job: Mapping[str, Any], event: Event) -> None:
        """An Event on the job (`job`: its apiVersion, kind and metadata, as `JobMeta.reference` gives them)."""


class JobView(Protocol):
    """The jobs as the operator's watch last delivered them, with the operator's own status writes laid over
    them: what `jobcache.JobCache` keeps."""

    def get(self, namespace: str, name: str) -> JobRecord | None:
        """The job as last seen; None when the watch has not delivered it."""

    def wrote(self, namespace: str, name: str, uid: str | None, status_patch: Mapping[str, Any]) -> None:
        """Top-level status fields the operator wrote to the job with `uid` (their whole new values)."""


# -- the merge rule (pure) -----------------------------------------------------------------------------------


def position(progress: Mapping[str, Any] | None) -> tuple[int, int]:
    """Where a run is, for ordering updates: (epoch, step); what is missing counts as 0."""
    progress = progress or {}
    return (int(progress.get("epoch") or 0), int(progress.get("step") or 0))


def progress_patch(current: Mapping[str, Any] | None, update: ProgressUpdate, now: datetime) -> dict[str, Any] | None:
    """The `status.progress` merge patch for `update`, or None when it is older than `current`.

    A sweep's update (`update.sweep`) is never older: it speaks for the sweep's best trial so far, and its
    trials go to status.sweep (`status_patch`), not here. An update at the same position is applied (an evaluation reports after the last step of its epoch).
    Fields the update leaves out keep their current values, metrics one by one: that is what a JSON merge
    patch of the returned dict does. An older update still brings its new counts (COUNTS): workers
    restarted from a checkpoint report from behind the furthest point, and the restart is news.
    """
    fields = update.model_dump(by_alias=True, exclude_none=True, mode="json")
    # A sweep's update follows its best trial, which may be at an earlier point than the last best one:
    # the driver sends them in order, and each is applied as sent.
    if update.sweep is None and position(fields) < position(current):
        counts = {key: fields[key] for key in COUNTS if key in fields and fields[key] != (current or {}).get(key)}
        if not counts:
            return None
        fields = {**(current or {}), **counts}
    # The wire message may carry more than the status keeps (e.g. the trainer's own phase); validating
    # against the model the CRD's status schema is generated from keeps exactly what the API server keeps.
    kept = {key: value for key, value in fields.items() if key in _PROGRESS_KEYS and key != "updatedAt"}
    kept["updatedAt"] = now.astimezone(UTC).replace(microsecond=0)
    return ProgressStatus.model_validate(kept).model_dump(by_alias=True, exclude_none=True, mode="json")


# What the driver counts in an attempt, and the workers the run now has: an update from behind the furthest
# point (workers restarted from a checkpoint, after a failure, a preemption or an elastic resize) still
# carries them.
COUNTS = ("workerFailures", "preemptions", "preemptionStepsLost", "workers")
_PROGRESS_KEYS = frozenset(field.alias or name for name, field in ProgressStatus.model_fields.items())


def sweep_status(sweep: SweepProgress) -> dict[str, Any]:
    """`status.sweep` for a sweep's progress: the trainer's counts and best trial, and how many trials
    finished of all (the Trials printer column)."""
    finished = sum(getattr(sweep, state) for state in FINISHED_STATES)
    fields = {
        **sweep.model_dump(by_alias=True, exclude_none=True, mode="json"),
        "finished": f"{finished}/{sweep.trials}",
    }
    return SweepStatus.model_validate(fields).model_dump(by_alias=True, exclude_none=True, mode="json")


def status_patch(current: Mapping[str, Any] | None, update: ProgressUpdate, now: datetime) -> dict[str, Any] | None:
    """The status merge patch for `update` given the job's `current` status: `progress`
    (`progress_patch`), the latest checkpoint, which a resumed or retried run continues from, and a
    sweep's `sweep` (every trial sets the same swept fields, so a new best trial's parameters replace the
    last one's key by key); None when the update brings nothing (older than the current progress)."""
    progress = progress_patch((current or {}).get("progress"), update, now)
    if progress is None:
        return None
    status: dict[str, Any] = {"progress": progress}
    if "latestCheckpoint" in progress:
        status["latestCheckpoint"] = progress["latestCheckpoint"]
    if update.sweep is not None:
        status["sweep"] = sweep_status(update.sweep)
    return status


# An update is two levels deep (metrics); anything far deeper is built to hurt the validator, not sent.
MAX_DEPTH = 8


def _depth(data: Any) -> int:
    """How deeply `data` nests, walked without recursion (a parsed body may be thousands of levels deep)."""
    deepest, stack = 0, [(data, 1)]
    while stack:
        value, depth = stack.pop()
        deepest = max(deepest, depth)
        if depth > MAX_DEPTH:
            break
        children = value.values() if isinstance(value, dict) else value if isinstance(value, list) else ()
        stack.extend((child, depth + 1) for child in children if isinstance(child, dict | list))
    return deepest


def parse_update(body: bytes) -> ProgressUpdate:
    """The update in a request body; raises ValueError with a short reason when it is not one."""

    def no_constants(token: str) -> Any:
        raise ValueError(f"{token} is not a number JSON allows")

    try:
        data = json.loads(body, parse_constant=no_constants)
    except (UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise ValueError(f"body is not JSON: {exc}") from None
    except RecursionError:
        raise ValueError("body is nested too deeply") from None
    if not isinstance(data, dict):
        raise ValueError("body must be a JSON object")
    if _depth(data) > MAX_DEPTH:
        raise ValueError(f"body is nested too deeply (more than {MAX_DEPTH} levels)")
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
    items = value.values() if isinstance(value, Mapping) else value if isinstance(value, list) else ()
    for item in items:  # a list too: JSON's 1e999 parses as infinity, and no API server stores that
        _check_finite(item)


# -- the HTTP server ------------------------------------------------------------------------------------------


class _CappedServer(web.Server):
    """aiohttp's low-level server, closing each connection that arrives while `max_connections` are open."""

    def __init__(
        self, handler: Callable[[web.BaseRequest], Awaitable[web.StreamResponse]], max_connections: int, **kwargs: Any
    ) -> None:
        super().__init__(handler, **kwargs)
        self.max_connections = max_connections
        self.refused = 0

    def connection_made(self, handler: RequestHandler, transport: asyncio.Transport) -> None:
        if len(self.connections) >= self.max_connections:
            self.refused += 1
            if self.refused == 1 or self.refused % 1000 == 0:
                log.warning(
                    "progress endpoint: %d connections open, the most allowed; refused %d so far",
                    self.max_connections,
                    self.refused,
                )
            transport.close()
            return
        super().connection_made(handler, transport)


class ProgressServer:
    """The HTTP server behind the progress endpoint (aiohttp's low-level server: one route)."""

    def __init__(
        self,
        reviewer: TokenReviewer,
        jobs: JobStatusStore,
        metrics: OperatorMetrics,
        *,
        max_body_bytes: int = MAX_BODY_BYTES,
        min_interval_s: float = MIN_INTERVAL_S,
        max_connections: int = MAX_CONNECTIONS,
        read_timeout_s: float = READ_TIMEOUT_S,
        clock: Callable[[], float] = time.monotonic,
        trainer_service_account: str = DEFAULT_TRAINER_SERVICE_ACCOUNT,
        write_interval_s: float = WRITE_INTERVAL_S,
        view: JobView | None = None,
    ) -> None:
        self.reviewer = reviewer
        self.trainer_service_account = trainer_service_account
        self.jobs = jobs
        self.view = view  # the operator's watch cache; without one, every update reads the job from the server
        self.reads = 0  # jobs read from the API server (for the tests and the benchmark)
        self.metrics = metrics
        self.max_body_bytes = max_body_bytes
        self.min_interval_s = min_interval_s
        self.max_connections = max_connections
        self.read_timeout_s = read_timeout_s
        self._clock = clock
        self._last_update: dict[str, float] = {}  # by the job uid a token was authentic for
        self._locks: dict[tuple[str, str], asyncio.Lock] = {}
        # The status writes: at most one per job per write_interval_s (progress_writes.py).
        self.writes = CoalescedWrites(self._write_status, self._lock, interval_s=write_interval_s, clock=clock)
        self.server: _CappedServer | None = None
        self._runner: web.ServerRunner | None = None

    async def start(self, host: str, port: int) -> int:
        """Listen on host:port (0 picks a free port) and return the port."""
        # keepalive_timeout: aiohttp closes a connection that has not sent a whole request line and
        # headers this long after it opened (or after its last answer): the header read timeout.
        # lingering_time: after an answer to a request whose body was not read whole (too big, too slow),
        # how long the rest is read and dropped before the connection closes (so the client sees the
        # answer, not a reset); aiohttp's default is 10 s.
        self.server = _CappedServer(
            self.handle,
            self.max_connections,
            keepalive_timeout=self.read_timeout_s,
            lingering_time=LINGERING_TIME_S,
            access_log=None,
        )
        self._runner = web.ServerRunner(self.server)
        await self._runner.setup()
        site = web.TCPSite(self._runner, host, port)
        await site.start()
        sockets = getattr(site._server, "sockets", None) or []
        self.writes.start()
        return int(sockets[0].getsockname()[1]) if sockets else port

    async def stop(self) -> None:
        """Stop serving, then write every update accepted and not yet written."""
        if self._runner is not None:
            await self._runner.cleanup()
            self._runner = None
        await self.writes.close()

    def _lock(self, where: tuple[str, str]) -> asyncio.Lock:
        """The job's lock: one update (or write) of a job at a time."""
        return self._locks.setdefault(where, asyncio.Lock())

    @property
    def connections(self) -> int:
        """Connections open now."""
        return len(self.server.connections) if self.server is not None else 0

    async def handle(self, request: web.BaseRequest) -> web.StreamResponse:
        match = _ROUTE.match(request.path)
        if match is None:
            return self._answer(
                "rejected", 404, "not found; progress goes to POST /v1/progress/<namespace>/<name>", "-"
            )
        if request.method != "POST":
            return self._answer("rejected", 405, "only POST", "-")
        namespace, name = match.groups()
        if not _is_job_name(namespace, name):
            return self._answer(
                "rejected", 400, "the path names no FineTuneJob: <namespace> and <name> must be DNS labels", "-"
            )
        job = f"{namespace}/{name}"
        token = _bearer(request.headers.get("Authorization", ""))
        if token is None:
            return self._answer("rejected", 401, "a bearer token is required", job, authenticate=True)
        try:
            uid, refusal = await self._authenticate(token, namespace, name)
        except ReviewUnavailableError as exc:
            log.error("progress for %s: cannot review its token: %s", job, exc)
            return self._answer("error", 503, "the operator cannot check tokens right now", job, retry_after=5)
        if refusal is not None:
            return refusal
        throttled = self._throttle(uid, job)
        if throttled is not None:
            return throttled
        body = await self._read_body(request, job)
        if isinstance(body, web.StreamResponse):
            return body
        try:
            update = parse_update(body)
        except ValueError as exc:
            return self._answer("rejected", 400, str(exc), job)
        async with self._lock((namespace, name)):
            try:
                return await self._apply(namespace, name, uid, update)
            except Exception as exc:
                log.error("progress for %s: cannot update the status: %s", job, exc)
                return self._answer("error", 503, "the operator cannot update the job right now", job, retry_after=5)

    async def _authenticate(self, token: str, namespace: str, name: str) -> tuple[str, web.Response | None]:
        """(the uid of the job `token` is authentic for, None), or ("", the 401 or 403 to answer).

        The token's claims say which job it is for; the TokenReview for that job's audience decides.
        """
        job = f"{namespace}/{name}"
        uid = claimed_job_uid(token)
        identity = await self.reviewer.authenticate(token, token_audience(namespace, name, uid)) if uid else None
        if uid is None or identity is None:
            return "", self._answer("rejected", 401, "the token is not valid for this job", job, authenticate=True)
        sender = identity.username
        if sender != service_account_username(namespace, self.trainer_service_account) and (
            sender != service_account_username(namespace, await self._reporting_account(namespace, name))
        ):
            log.warning("progress for %s refused: sent by %s", job, identity.username)
            return "", self._answer("rejected", 403, f"this token may not report progress for {job}", job)
        return uid, None

    async def _reporting_account(self, namespace: str, name: str) -> str:
        """The account the job's head pod runs as (spec.podTemplate's, else the shared trainer account); read
        only once the token is authentic for the job, and only when a pod has an account of its own."""
        try:
            record = await self._job(namespace, name)
        except Exception:
            return self.trainer_service_account
        return reporting_account(record, self.trainer_service_account)

    async def _job(self, namespace: str, name: str, uid: str | None = None) -> JobRecord | None:
        """The job from the watch cache; from the API server when the cache has not seen it, or has it under
        another uid than `uid` (made again since, or the watch not there yet)."""
        record = self.view.get(namespace, name) if self.view is not None else None
        if record is not None and (uid is None or record.meta.uid == uid):
            return record
        self.reads += 1
        body = await self.jobs.get_job(namespace, name)
        return receive(body) if body is not None else None

    async def _write_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """One status write (under the job's lock), laid over the cached job: the fields' whole new values."""
        await self.jobs.patch_job_status(namespace, name, status)
        record = self.view.get(namespace, name) if self.view is not None else None
        if self.view is not None and record is not None:
            after = merge_patch(record.status, status)
            self.view.wrote(namespace, name, record.meta.uid, {key: after.get(key) for key in status})

    def _throttle(self, uid: str, job: str) -> web.Response | None:
        """The 429 to answer when the job (by its authenticated uid) reported less than a second ago."""
        now = self._clock()
        last = self._last_update.get(uid)
        if last is not None and now - last < self.min_interval_s:
            wait = max(1, math.ceil(self.min_interval_s - (now - last)))
            return self._answer("throttled", 429, "at most one update per second", job, retry_after=wait)
        self._last_update[uid] = now
        self._forget_idle(now)
        return None

    async def _read_body(self, request: web.BaseRequest, job: str) -> bytes | web.Response:
        """The whole body (however many segments it arrives in), or the 400 or 408 to answer."""
        too_big = f"the body exceeds {self.max_body_bytes} bytes"
        if request.content_length is not None and request.content_length > self.max_body_bytes:
            return self._answer("rejected", 400, too_big, job, close=True)
        try:
            async with asyncio.timeout(self.read_timeout_s):
                return await request.clone(client_max_size=self.max_body_bytes).read()
        except web.HTTPRequestEntityTooLarge:
            return self._answer("rejected", 400, too_big, job, close=True)
        except TimeoutError:
            message = f"the body did not arrive within {self.read_timeout_s:g}s"
            return self._answer("rejected", 408, message, job, close=True)

    async def _apply(self, namespace: str, name: str, uid: str, update: ProgressUpdate) -> web.Response:
        job = f"{namespace}/{name}"
        record = await self._job(namespace, name, uid)
        if record is None:
            return self._answer("rejected", 404, f"no FineTuneJob {job}", job)
        if record.meta.uid != uid:
            # Authentic, but for another job: one of another name, or an earlier one of this name.
            return self._answer("rejected", 401, "the token is not valid for this job", job, authenticate=True)
        waiting = self.writes.pending(namespace, name) or {}
        current = merge_patch(record.status, waiting)
        self.metrics.mark_alive(namespace, name)
        try:
            patch = status_patch(current, update, datetime.now(UTC))
        except pydantic.ValidationError as exc:
            return self._answer("rejected", 400, f"not a valid status: {exc.errors()[0]['msg']}", job)
        if patch is None:
            log.debug("progress for %s: ignored an update older than the status", job)
            return self._answer("stale", 200, "older than the current progress; ignored", job, applied=False)
        progress = patch["progress"]
        written = await self.writes.offer(
            namespace, name, patch, urgent=must_write_now(current.get("progress"), progress)
        )
        merged = merge_patch(current, patch)
        self.metrics.observe_progress(namespace, name, merged["progress"])
        if "sweep" in merged:
            self.metrics.observe_sweep(namespace, name, merged["sweep"])
        await self._announce_preemption(record, current.get("progress"), merged["progress"])
        message = "applied" if written else f"applied; in the status within {self.writes.interval_s:g}s"
        return self._answer("accepted", 200, message, job, applied=True)

    async def _announce_preemption(
        self, record: JobRecord, before: Mapping[str, Any] | None, after: Mapping[str, Any]
    ) -> None:
        """A preemption the update counted: its Event and kubetune_job_preemptions_total (best effort)."""
        event = preemption_event(before, after)
        if event is None:
            return
        self.metrics.count_preemptions(record.meta.namespace, preemptions_added(before, after))
        try:
            await self.jobs.create_event(record.meta.reference(), event)
        except Exception as exc:  # the status says it already; the Event is the news
            log.warning("progress for %s: cannot post the preemption Event: %s", record.meta.source, exc)

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
        close: bool = False,
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
        response = web.json_response(body, status=code, headers=headers)
        if close:  # the rest of the body, if any, is never read: the connection cannot carry another request
            response.force_close()
        return response

    def _forget_idle(self, now: float) -> None:
        # Bounded memory: forget the rate-limit state of jobs that have not reported for a minute.
        if len(self._last_update) < 1024:
            return
        for key in [key for key, at in self._last_update.items() if now - at > 60]:
            del self._last_update[key]
        for where in [w for w, lock in self._locks.items() if not lock.locked() and not self.writes.pending(*w)]:
            del self._locks[where]


def _is_job_name(namespace: str, name: str) -> bool:
    """Whether `namespace` and `name` could name a FineTuneJob (the spec's own patterns and lengths)."""
    return (
        len(namespace) <= 63
        and len(name) <= MAX_NAME_LENGTH
        and re.match(DNS_LABEL, namespace) is not None
        and re.match(NAME_PATTERN, name) is not None
    )


def reporting_account(record: JobRecord | None, default: str) -> str:
    """The ServiceAccount the job's head pod runs as (its driver reports progress): the podTemplate's, else
    the shared trainer account. A job gone, or whose spec no longer parses, reports as the shared account."""
    if record is None or not isinstance(record.job, FineTuneJob):
        return default
    return service_account_name(record.job, HEAD, default)


def _bearer(header: str) -> str | None:
    scheme, _, token = header.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
