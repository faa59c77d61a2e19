"""Nothing the operator waits for can hold it for ever: an S3 endpoint that drips one byte a second ends
the preflight at its deadline, one namespace's preflights cannot take every slot, and an API server that
stops answering ends each Kubernetes call and TokenReview at the request timeout."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator

import pytest

from kubetune_operator.auth import ReviewUnavailableError, TokenReviewer
from kubetune_operator.kube import Kube
from tests.support.operator_harness import SECRETS, OperatorHarness, fast_settings, finetunejob, running_operator
from tests.support.s3_world import ACCESS_KEY, SECRET_KEY, S3World

pytestmark = pytest.mark.asyncio

CREDENTIALS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
DEADLINE = 1.5
ANSWER = b"HTTP/1.1 200 OK\r\nContent-Length: 100000\r\n\r\n" + b" " * 100_000


class DrippingS3:
    """An "S3 endpoint" that reads a request and answers it one byte a second: every read gets a byte in
    time, so no per-read timeout ever fires and only a deadline on the whole preflight ends it."""

    def __init__(self) -> None:
        self.open = 0
        self.most_open = 0
        self.connections = 0
        self.left_by_client = 0

    async def _drip(self, reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        self.open += 1
        self.most_open = max(self.most_open, self.open)
        try:
            await reader.readuntil(b"\r\n\r\n")
            for byte in ANSWER:
                if reader.at_eof():
                    break
                writer.write(bytes([byte]))
                await writer.drain()
                await asyncio.sleep(1.0)
            self.left_by_client += reader.at_eof()
        except (ConnectionError, asyncio.IncompleteReadError):
            self.left_by_client += 1
        finally:
            self.open -= 1
            writer.close()

    @contextlib.asynccontextmanager
    async def serving(self) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._drip, "127.0.0.1", 0)
        port = server.sockets[0].getsockname()[1]
        async with server:
            yield f"http://127.0.0.1:{port}"
            server.close()


async def submit(op: OperatorHarness, namespace: str, name: str, endpoint: str, uris: dict[str, str]) -> None:
    if op.get(SECRETS, namespace, "s3-creds") is None:
        await op.create_secret(namespace, "s3-creds", CREDENTIALS)
    manifest = finetunejob(name, uris=uris, endpoint=endpoint, credentials_secret="s3-creds")
    await op.create_job(manifest, namespace=namespace)


def launched_reason(op: OperatorHarness, namespace: str, name: str) -> str | None:
    launched = op.condition(namespace, name, "Launched") or {}
    return launched.get("reason")


async def test_an_endpoint_that_drips_a_byte_a_second_ends_the_preflight_at_its_deadline(s3: S3World) -> None:
    dripping = DrippingS3()
    settings = fast_settings(
        s3_timeout_seconds=3.0,
        preflight_deadline_seconds=DEADLINE,
        preflight_backoff_seconds=30.0,
        preflight_backoff_max_seconds=30.0,
    )
    async with dripping.serving() as endpoint, running_operator(settings) as op:
        await submit(op, "default", "slow", endpoint, s3.seed())
        job = await op.wait_for_phase("default", "slow", "Pending", timeout=DEADLINE + 10)
        launched = next(c for c in job["status"]["conditions"] if c["type"] == "Launched")
        assert launched["reason"] == "StorageUnavailable"
        assert f"did not answer the preflight within {DEADLINE:g}s" in launched["message"]
        assert op.rayjob("default", "slow") is None
        # The preflight let go of the connection: the endpoint holds nothing of the operator's.
        await op.wait_for(lambda: dripping.open == 0, timeout=5, what="the dripping connection closed")
    assert dripping.connections == 1 and dripping.left_by_client == 1


async def test_one_namespaces_stuck_preflights_leave_the_others_theirs(s3: S3World) -> None:
    """Four jobs of one namespace at a dripping endpoint hold at most two preflight slots; a job of another
    namespace gets one of the rest and launches meanwhile."""
    dripping = DrippingS3()
    settings = fast_settings(
        preflight_deadline_seconds=4 * DEADLINE,
        preflights_at_once=3,
        preflights_per_namespace=2,
        preflight_backoff_seconds=30.0,
        preflight_backoff_max_seconds=30.0,
    )
    async with dripping.serving() as endpoint, running_operator(settings) as op:
        uris = s3.seed()
        for i in range(4):
            await submit(op, "greedy", f"stuck-{i}", endpoint, uris)
        await op.wait_for(lambda: dripping.open == 2, timeout=5, what="two preflights at the dripping endpoint")
        await submit(op, "default", "fine", s3.endpoint, uris)
        await op.wait_for(lambda: op.rayjob("default", "fine"), timeout=5, what="the other namespace's job launched")
        assert dripping.most_open == 2
        assert all(op.rayjob("greedy", f"stuck-{i}") is None for i in range(4))
        assert [launched_reason(op, "greedy", f"stuck-{i}") for i in range(4)].count("StorageUnavailable") <= 2


@contextlib.asynccontextmanager
async def silent_api_server() -> AsyncIterator[str]:
    """An "API server" that accepts connections and never answers."""
    held: list[asyncio.StreamWriter] = []

    async def hold(_: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        held.append(writer)

    server = await asyncio.start_server(hold, "127.0.0.1", 0)
    async with server:
        yield f"http://127.0.0.1:{server.sockets[0].getsockname()[1]}"
        for writer in held:
            writer.close()
        server.close()


async def test_kubernetes_calls_and_token_reviews_end_at_the_request_timeout() -> None:
    async with silent_api_server() as url:
        kube = Kube.for_server(url)
        kube.request_timeout = (0.2, 0.2)
        reviewer = TokenReviewer(kube.api_client, request_timeout=(0.2, 0.2))
        try:
            with pytest.raises(Exception, match=r"(?i)timed? ?out"):
                await asyncio.wait_for(kube.get_job("default", "flowers"), 30)
            with pytest.raises(ReviewUnavailableError, match=r"(?i)timed? ?out"):
                await asyncio.wait_for(reviewer.authenticate("a.b.c", "kubetune.dev/uid"), 30)
        finally:
            kube.close()
