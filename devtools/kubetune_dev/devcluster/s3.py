"""S3 on 127.0.0.1: moto's server, behind a small proxy that can inject faults.

Clients get the proxy's URL. The proxy forwards every request unchanged unless a fault is active:
`fail_for(seconds, status)` answers S3 errors (503 SlowDown by default, which clients retry),
`drop_for(seconds)` cuts connections without an answer (the endpoint "disappears"), `slow_for(seconds,
delay)` answers each request `delay` seconds late, and
`deny(prefix)` answers AccessDenied for keys under an s3:// prefix until `clear()`. Each fault can
be limited to some methods (e.g. only PUTs, i.e. checkpoint writes) and to keys under an s3://
prefix (one job's files, while other jobs use the same S3). `starts_on=PREFIX` starts a window at
the first request for a key under PREFIX rather than now, so a test can hit "the next checkpoint
write" without knowing when that is.

moto keeps its buckets in process-global state: servers started in one process share them.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass, field

import aiohttp
import aiohttp.web
from moto.server import ThreadedMotoServer

from kubetune_dev.devcluster.processes import free_port

log = logging.getLogger(__name__)

HOP_BY_HOP = {"connection", "keep-alive", "transfer-encoding", "te", "trailer", "upgrade", "content-length", "host"}
DEMO_CREDENTIALS = {"AWS_ACCESS_KEY_ID": "kubetune-demo", "AWS_SECRET_ACCESS_KEY": "kubetune-demo-secret"}


@dataclass
class Fault:
    kind: str  # "fail" | "drop" | "deny" | "slow"
    until: float | None = None  # None: until cleared, or (with `window`) not started yet
    status: int = 503
    code: str = "SlowDown"
    prefix: str | None = None  # "bucket/key-prefix" of the keys it applies to (None: all)
    methods: frozenset[str] | None = None
    hits: int = 0
    starts_on: str | None = None  # "bucket/key-prefix": the window starts at the first request under it
    window: float = 0.0  # the window's length once it starts (with starts_on)
    started: float | None = None
    delay: float = 0.0  # a "slow" fault's added latency

    def arm(self, bucket_key: str, now: float) -> None:
        if self.starts_on is not None and self.started is None and bucket_key.startswith(self.starts_on):
            self.started, self.until = now, now + self.window

    def applies(self, method: str, bucket_key: str, now: float) -> bool:
        if self.starts_on is not None and self.started is None:
            return False  # waiting for its first request
        if self.until is not None and now >= self.until:
            return False
        if self.methods is not None and method not in self.methods:
            return False
        return self.prefix is None or bucket_key.startswith(self.prefix)

    @property
    def over(self) -> bool:
        """Whether the fault's window has passed (one still waiting to start is not over)."""
        return self.until is not None and time.monotonic() >= self.until


@dataclass
class FaultyS3Proxy:
    """An HTTP proxy in front of an S3 endpoint, with switchable faults."""

    upstream: str
    faults: list[Fault] = field(default_factory=list)
    requests: int = 0
    _session: aiohttp.ClientSession | None = None
    _runner: aiohttp.web.AppRunner | None = None
    port: int = 0

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    # --- fault switches (thread-safe enough: each is one list operation) ---------------------

    def fail_for(
        self,
        seconds: float,
        status: int = 503,
        *,
        methods: Iterable[str] | None = None,
        prefix: str | None = None,
        starts_on: str | None = None,
    ) -> Fault:
        code = {503: "SlowDown", 500: "InternalError", 403: "AccessDenied"}.get(status, "ServiceUnavailable")
        fault = Fault("fail", status=status, code=code, methods=_methods(methods), prefix=_bucket_key(prefix))
        self._add(fault, seconds, starts_on)
        return fault

    def drop_for(
        self,
        seconds: float,
        *,
        methods: Iterable[str] | None = None,
        prefix: str | None = None,
        starts_on: str | None = None,
    ) -> Fault:
        fault = Fault("drop", methods=_methods(methods), prefix=_bucket_key(prefix))
        self._add(fault, seconds, starts_on)
        return fault

    def slow_for(self, seconds: float, delay: float, *, methods: Iterable[str] | None = None) -> Fault:
        """Each request in the next `seconds` is answered `delay` seconds late (then served normally)."""
        fault = Fault("slow", methods=_methods(methods), delay=delay)
        self._add(fault, seconds, None)
        return fault

    def _add(self, fault: Fault, seconds: float, starts_on: str | None) -> None:
        if starts_on is not None:
            fault.starts_on, fault.window = _bucket_key(starts_on), seconds
        else:
            fault.started = time.monotonic()
            fault.until = fault.started + seconds
        self.faults.append(fault)

    def deny(self, s3_prefix: str, *, methods: Iterable[str] | None = None) -> Fault:
        fault = Fault("deny", status=403, code="AccessDenied", prefix=_bucket_key(s3_prefix), methods=_methods(methods))
        self.faults.append(fault)
        return fault

    def clear(self) -> None:
        self.faults.clear()

    # --- serving -----------------------------------------------------------------------------

    async def start(self, port: int = 0) -> None:
        app = aiohttp.web.Application(client_max_size=1024**3)
        app.router.add_route("*", "/{tail:.*}", self._handle)
        self._runner = aiohttp.web.AppRunner(app, access_log=None, shutdown_timeout=1.0)
        await self._runner.setup()
        site = aiohttp.web.TCPSite(self._runner, "127.0.0.1", port or free_port())
        await site.start()
        self.port = int(self._runner.addresses[0][1])
        self._session = aiohttp.ClientSession(auto_decompress=False)

    async def stop(self) -> None:
        if self._session is not None:
            await self._session.close()
        if self._runner is not None:
            await self._runner.cleanup()

    async def _handle(self, request: aiohttp.web.Request) -> aiohttp.web.StreamResponse:
        self.requests += 1
        body = await request.read()
        bucket_key = request.path.lstrip("/")
        now = time.monotonic()
        faults = list(self.faults)
        for fault in faults:
            fault.arm(bucket_key, now)
        for fault in faults:
            if fault.applies(request.method, bucket_key, now):
                fault.hits += 1
                if fault.kind == "slow":
                    await asyncio.sleep(fault.delay)
                    continue
                if fault.kind == "drop":
                    if request.transport is not None:
                        request.transport.abort()  # the client sees the connection reset, no answer
                    return aiohttp.web.Response(status=503)
                return _s3_error(fault.status, fault.code, bucket_key)
        assert self._session is not None
        headers = {k: v for k, v in request.headers.items() if k.lower() not in HOP_BY_HOP}
        headers["Host"] = request.host
        try:
            async with self._session.request(
                request.method, self.upstream + request.path_qs, headers=headers, data=body, allow_redirects=False
            ) as upstream:
                payload = await upstream.read()
                out_headers = {k: v for k, v in upstream.headers.items() if k.lower() not in HOP_BY_HOP}
                response = aiohttp.web.Response(status=upstream.status, headers=out_headers, body=payload)
                if request.method == "HEAD" and "Content-Length" in upstream.headers:
                    # A HEAD answer carries the object's length but no body.
                    response = aiohttp.web.Response(status=upstream.status, headers=out_headers)
                    response.headers["Content-Length"] = upstream.headers["Content-Length"]
                return response
        except aiohttp.ClientError as exc:  # the upstream is down (an operator restarting, behind the soak's proxy)
            return aiohttp.web.Response(status=502, text=f"upstream unreachable: {exc}")


def _bucket_key(s3_prefix: str | None) -> str | None:
    """The "bucket/key-prefix" (as request paths read) of an s3:// prefix."""
    return s3_prefix.removeprefix("s3://") if s3_prefix is not None else None


def _methods(methods: Iterable[str] | None) -> frozenset[str] | None:
    return frozenset(m.upper() for m in methods) if methods is not None else None


def _s3_error(status: int, code: str, resource: str) -> aiohttp.web.Response:
    body = (
        '<?xml version="1.0" encoding="UTF-8"?>\n'
        f"<Error><Code>{code}</Code><Message>Injected fault: {code}</Message>"
        f"<Resource>/{resource}</Resource><RequestId>{uuid.uuid4().hex[:16]}</RequestId></Error>"
    )
    return aiohttp.web.Response(status=status, text=body, content_type="application/xml")


class MotoS3:
    """moto's S3 server on a free port of 127.0.0.1 (a thread of this process)."""

    def __init__(self) -> None:
        self.port = free_port()
        self._server = ThreadedMotoServer(ip_address="127.0.0.1", port=self.port, verbose=False)

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    def start(self) -> None:
        logging.getLogger("werkzeug").setLevel(logging.WARNING)  # one access-log line per S3 call otherwise
        self._server.start()

    def stop(self) -> None:
        with contextlib.suppress(Exception):
            self._server.stop()


def s3_client(endpoint: str, region: str = "us-east-1"):  # type: ignore[no-untyped-def]
    """A boto3 S3 client for the embedded S3 (path-style, the demo's credentials)."""
    import boto3
    from botocore.config import Config

    return boto3.client(
        "s3",
        endpoint_url=endpoint,
        region_name=region,
        aws_access_key_id=DEMO_CREDENTIALS["AWS_ACCESS_KEY_ID"],
        aws_secret_access_key=DEMO_CREDENTIALS["AWS_SECRET_ACCESS_KEY"],
        config=Config(s3={"addressing_style": "path"}, retries={"max_attempts": 5, "mode": "standard"}),
    )


def ensure_bucket(client, bucket: str) -> None:  # type: ignore[no-untyped-def]
    try:
        client.create_bucket(Bucket=bucket)
    except client.exceptions.BucketAlreadyOwnedByYou:
        pass
    except client.exceptions.BucketAlreadyExists:
        pass
