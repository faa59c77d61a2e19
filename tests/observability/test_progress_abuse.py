"""The progress endpoint under abuse, over raw sockets: bodies in pieces, half-sent requests, too many
connections, bodies built to break the parser. The fast checks; test_progress_load.py floods a live operator."""

from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator
from typing import Any

import pytest
import pytest_asyncio
from kubernetes import client

from kubetune_operator.auth import TokenReviewer
from kubetune_operator.kube import Kube
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.progress import ProgressServer
from tests.support.observability_stands import Cluster, FakeClock

pytestmark = pytest.mark.asyncio

NS = "vision"
READ_TIMEOUT_S = 0.5
MAX_CONNECTIONS = 8
UPDATE = {"epoch": 1, "totalEpochs": 5, "step": 10, "totalSteps": 100, "percent": 10.0}


@pytest_asyncio.fixture
async def server(
    kmock: Cluster, api_client: client.ApiClient, metrics: OperatorMetrics, clock: FakeClock
) -> AsyncIterator[tuple[ProgressServer, int]]:
    """A progress server with short read timeouts and a small connection cap."""
    progress = ProgressServer(
        TokenReviewer(api_client),
        Kube(api_client),
        metrics,
        clock=clock,
        read_timeout_s=READ_TIMEOUT_S,
        max_connections=MAX_CONNECTIONS,
    )
    port = await progress.start("127.0.0.1", 0)
    try:
        yield progress, port
    finally:
        await progress.stop()


def head(token: str, length: int, job: str = "cats") -> bytes:
    return (
        f"POST /v1/progress/{NS}/{job} HTTP/1.1\r\nHost: operator\r\nAuthorization: Bearer {token}\r\n"
        f"Content-Type: application/json\r\nContent-Length: {length}\r\n\r\n"
    ).encode()


async def answer(reader: asyncio.StreamReader) -> tuple[int, dict[str, Any]]:
    """The status code and JSON body of one HTTP answer."""
    status = await asyncio.wait_for(reader.readline(), 10)
    headers: dict[str, str] = {}
    while (line := await asyncio.wait_for(reader.readline(), 10)) not in (b"\r\n", b""):
        key, _, value = line.decode().partition(":")
        headers[key.strip().lower()] = value.strip()
    body = await asyncio.wait_for(reader.readexactly(int(headers["content-length"])), 10)
    return int(status.split()[1]), json.loads(body)


async def closed_by_server(reader: asyncio.StreamReader) -> bool:
    """Whether the server closed the connection (rather than leaving it open for 10 s)."""
    try:
        return await asyncio.wait_for(reader.read(), 10) == b""
    except ConnectionResetError:
        return True


async def test_a_body_that_arrives_in_two_segments_is_accepted(
    kmock: Cluster, server: tuple[ProgressServer, int]
) -> None:
    _, port = server
    kmock.add_job(NS, "cats")
    body = json.dumps(UPDATE).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(kmock.issue_token(NS, "cats"), len(body)) + body[:20])
    await writer.drain()
    await asyncio.sleep(0.1)  # the rest comes in a later segment, as it may over any network
    writer.write(body[20:])
    await writer.drain()

    code, reply = await answer(reader)
    writer.close()

    assert (code, reply["applied"]) == (200, True)
    assert kmock.job(NS, "cats")["status"]["progress"]["step"] == 10


async def test_a_request_whose_headers_never_end_is_closed_after_the_read_timeout(
    server: tuple[ProgressServer, int],
) -> None:
    progress, port = server
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(b"POST /v1/progress/vision/cats HTTP/1.1\r\nHost: operator\r\nX-Slow: ")
    await writer.drain()

    assert await closed_by_server(reader)
    writer.close()
    assert progress.connections == 0


async def test_a_body_that_never_ends_is_answered_408_after_the_read_timeout(
    kmock: Cluster, server: tuple[ProgressServer, int], metrics: OperatorMetrics
) -> None:
    _, port = server
    kmock.add_job(NS, "cats")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(kmock.issue_token(NS, "cats"), 1000) + b'{"epoch": 1')
    await writer.drain()

    code, reply = await answer(reader)

    assert code == 408 and "did not arrive" in reply["message"]
    assert await closed_by_server(reader)
    writer.close()
    assert "progress" not in kmock.job(NS, "cats")["status"]
    assert metrics.registry.get_sample_value("kubetune_progress_updates_total", {"result": "rejected", "code": "408"})


async def test_connections_beyond_the_cap_are_closed_and_the_endpoint_serves_again_once_they_go(
    kmock: Cluster, server: tuple[ProgressServer, int]
) -> None:
    progress, port = server
    kmock.add_job(NS, "cats")
    held = [await asyncio.open_connection("127.0.0.1", port) for _ in range(MAX_CONNECTIONS)]
    await asyncio.sleep(0.05)
    assert progress.connections == MAX_CONNECTIONS

    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    assert await closed_by_server(reader)
    writer.close()
    assert progress.connections == MAX_CONNECTIONS

    for _, held_writer in held:
        held_writer.close()
    await asyncio.sleep(0.05)
    body = json.dumps(UPDATE).encode()
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(kmock.issue_token(NS, "cats"), len(body)) + body)
    code, _ = await answer(reader)
    writer.close()
    assert code == 200


@pytest.mark.parametrize(
    ("body", "reason"),
    [
        (b"[" * 5000 + b"]" * 5000, "nested too deeply"),
        (b'{"metrics": ' + b'{"a": ' * 2000 + b"1" + b"}" * 2001, "nested too deeply"),
        (json.dumps({**UPDATE, "epoch": 10**6}).encode(), "epoch"),
        (json.dumps({**UPDATE, "step": 2**70}).encode(), "step"),
        (json.dumps({**UPDATE, "latestCheckpoint": "file:///etc/passwd"}).encode(), "latestCheckpoint"),
        (json.dumps({**UPDATE, "latestCheckpoint": "s3://runs/" + "k" * 1100}).encode(), "latestCheckpoint"),
        (json.dumps({**UPDATE, "phase": "x" * 100}).encode(), "phase"),
    ],
    ids=["nested-list", "nested-object", "epoch-huge", "step-huge", "checkpoint-not-s3", "checkpoint-long", "phase"],
)
async def test_a_body_built_to_break_the_parser_is_a_400(
    kmock: Cluster, server: tuple[ProgressServer, int], body: bytes, reason: str
) -> None:
    _, port = server
    kmock.add_job(NS, "cats")
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(head(kmock.issue_token(NS, "cats"), len(body)) + body)

    code, reply = await answer(reader)
    writer.close()

    assert code == 400 and reason in reply["message"]
    assert "progress" not in kmock.job(NS, "cats")["status"]
