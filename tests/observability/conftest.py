"""Fixtures of the observability tests: kmock answering TokenReviews, and the real progress server."""

from __future__ import annotations

from collections.abc import AsyncIterator, Iterator
from typing import Any

import pytest
import pytest_asyncio
from kubernetes import client

from kubetune_operator.auth import TokenReviewer
from kubetune_operator.kube import Kube
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.progress import ProgressServer
from tests.support.observability_stands import Cluster, FakeClock


@pytest.fixture
def kmock_options(kmock_options: dict[str, Any]) -> dict[str, Any]:
    return {**kmock_options, "cls": Cluster}


@pytest.fixture
def api_client(kmock: Cluster) -> Iterator[client.ApiClient]:
    config = client.Configuration()
    config.host = str(kmock.url).rstrip("/")
    with client.ApiClient(config) as api:
        yield api


@pytest.fixture
def metrics() -> OperatorMetrics:
    return OperatorMetrics(process_collectors=False)


@pytest.fixture
def clock() -> FakeClock:
    return FakeClock()


@pytest_asyncio.fixture
async def progress_server(
    kmock: Cluster, api_client: client.ApiClient, metrics: OperatorMetrics, clock: FakeClock
) -> AsyncIterator[tuple[ProgressServer, str]]:
    server = ProgressServer(TokenReviewer(api_client), Kube(api_client), metrics, clock=clock)
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, f"http://127.0.0.1:{port}"
    finally:
        await server.stop()
