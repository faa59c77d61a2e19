"""The progress endpoint of a live operator under a flood: 1,000 forged requests and 500 half-open
connections while the jobs' own trainers keep reporting. Their updates keep landing (the p99 of their
latency is printed, not asserted), and the operator's memory stays bounded."""

from __future__ import annotations

import asyncio
import random
import time
import tracemalloc
import uuid
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from kubetune_operator.progress import MAX_CONNECTIONS, READ_TIMEOUT_S
from kubetune_operator.progress_writes import WRITE_INTERVAL_S
from tests.support.live_operator import Ports, ReviewingApiServer, live_operator
from tests.support.observability_stands import jwt
from tests.support.operator_harness import OperatorHarness, finetunejob

pytestmark = [pytest.mark.asyncio, pytest.mark.slow]

NS = "flood"
JOBS = 8
REAL_UPDATES_PER_JOB = 8
FORGED = 1000
HALF_OPEN = 500
# What the flood may add to the memory Python allocates (traced), all connections open at once.
MEMORY_BOUND = 64 * 2**20


@pytest_asyncio.fixture
async def live() -> AsyncIterator[tuple[OperatorHarness, ReviewingApiServer, Ports]]:
    async with live_operator(NS) as running:
        yield running


def epoch(op: OperatorHarness, job: str) -> Any:
    """The epoch the job's status shows."""
    return (op.job(NS, job) or {}).get("status", {}).get("progress", {}).get("epoch")


def update(epoch: int) -> dict[str, Any]:
    return {"epoch": epoch, "totalEpochs": 100, "step": epoch * 10, "totalSteps": 1000, "percent": epoch}


async def half_open(port: int, held: list[asyncio.StreamWriter]) -> None:
    """A connection that sends half its headers and then nothing."""
    _, writer = await asyncio.open_connection("127.0.0.1", port)
    writer.write(f"POST /v1/progress/{NS}/job-0 HTTP/1.1\r\nHost: operator\r\nAuthorization: Bea".encode())
    await writer.drain()
    held.append(writer)


def forged_token(i: int, repeated: str) -> str:
    """Forged tokens of three kinds: fresh JWTs for made-up jobs, one JWT sent again and again, and junk."""
    if i % 5 < 2:
        return jwt({"aud": [f"kubetune.dev/{uuid.uuid4()}"], "sub": f"system:serviceaccount:{NS}:kubetune-trainer"})
    if i % 5 < 4:
        return repeated
    return f"junk-{i}"


async def forge(session: aiohttp.ClientSession, url: str, i: int, repeated: str) -> int:
    job = f"job-{i % JOBS}" if i % 2 else f"no-such-job-{i}"
    headers = {"Authorization": f"Bearer {forged_token(i, repeated)}"}
    async with session.post(f"{url}/v1/progress/{NS}/{job}", json=update(1), headers=headers) as response:
        await response.read()
        return response.status


async def send(url: str, job: str, token: str, epoch: int) -> tuple[int, str | None]:
    """One update on a connection of its own (as urllib sends them): the status and Retry-After."""
    async with (
        aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=60)) as session,
        session.post(
            f"{url}/v1/progress/{NS}/{job}", json=update(epoch), headers={"Authorization": f"Bearer {token}"}
        ) as response,
    ):
        await response.read()
        return response.status, response.headers.get("Retry-After")


async def trainer(url: str, job: str, token: str, latencies: list[float]) -> list[int]:
    """A job's own trainer: an update a little over a second apart; on a 429, again when Retry-After says
    (the operator paces each job to one update a second, counted when they arrive). The latency of each
    accepted update is its last request's."""
    codes = []
    for epoch in range(1, REAL_UPDATES_PER_JOB + 1):
        began = time.monotonic()
        while True:
            started = time.monotonic()
            code, retry_after = await send(url, job, token, epoch)
            if code != 429:
                break
            await asyncio.sleep(float(retry_after or 1))
        latencies.append(time.monotonic() - started)
        codes.append(code)
        await asyncio.sleep(max(0.0, 1.05 - (time.monotonic() - began)) + random.uniform(0, 0.05))
    return codes


def p99(values: list[float]) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(0.99 * (len(ordered) - 1)))]


async def test_forged_requests_and_half_open_connections_leave_real_updates_flowing(
    live: tuple[OperatorHarness, ReviewingApiServer, Ports], capsys: pytest.CaptureFixture[str]
) -> None:
    op, api, ports = live
    url = f"http://127.0.0.1:{ports.progress}"
    tokens = {}
    for i in range(JOBS):
        await op.create_job(finetunejob(f"job-{i}"), namespace=NS)
    for i in range(JOBS):
        await op.wait_for(lambda i=i: op.rayjob(NS, f"job-{i}"), what=f"RayJob job-{i}")  # type: ignore[misc]
        tokens[f"job-{i}"] = api.issue_token(NS, f"job-{i}")
    assert op.runtime is not None
    (server,) = op.runtime.progress_servers
    repeated = jwt({"aud": [f"kubetune.dev/{uuid.uuid4()}"]})

    tracemalloc.start()
    baseline = tracemalloc.get_traced_memory()[0]
    held: list[asyncio.StreamWriter] = []
    await asyncio.gather(*(half_open(ports.progress, held) for _ in range(HALF_OPEN)))
    latencies: list[float] = []
    async with aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64)) as session:
        flood = asyncio.gather(*(forge(session, url, i, repeated) for i in range(FORGED)))
        real = asyncio.gather(*(trainer(url, job, token, latencies) for job, token in tokens.items()))
        forged_codes, real_codes = await asyncio.gather(flood, real)
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()

    assert set(forged_codes) == {401}
    assert [code for codes in real_codes for code in codes] == [200] * JOBS * REAL_UPDATES_PER_JOB
    # Updates within a job's write interval wait for it (progress_writes.py): the last lands within it.
    deadline = time.monotonic() + 4 * WRITE_INTERVAL_S
    while time.monotonic() < deadline and any(epoch(op, job) != REAL_UPDATES_PER_JOB for job in tokens):
        await asyncio.sleep(0.1)
    for job in tokens:
        assert epoch(op, job) == REAL_UPDATES_PER_JOB, job
    with capsys.disabled():
        print(
            f"\nprogress under a flood of {FORGED} forged requests and {HALF_OPEN} half-open connections: "
            f"{len(latencies)} real updates, p99 {p99(latencies) * 1000:.0f} ms, max {max(latencies) * 1000:.0f} ms; "
            f"{api.reviews} TokenReviews; Python's allocations grew by at most "
            f"{(peak - baseline) / 2**20:.1f} MiB"
        )
    # Bounded: the connections by the cap, the remembered refusals by their cache, the rest by the jobs.
    assert peak - baseline < MEMORY_BOUND
    assert server.connections <= MAX_CONNECTIONS
    assert len(server.reviewer.refused) <= server.reviewer.refused.max_entries
    # A forged JWT for a made-up job costs one review (2 in 5 of them); the one sent again and again one in
    # all, junk none; each real token one per cache lifetime.
    assert api.reviews <= 2 * FORGED // 5 + 1 + 2 * JOBS
    # The half-open connections are closed by the server once their read timeout passes.
    await op.wait_for(lambda: server.connections == 0, timeout=READ_TIMEOUT_S * 3, what="half-open connections closed")
    for writer in held:
        writer.close()
