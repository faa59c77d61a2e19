"""Fixtures every test folder may use (the helpers behind them are in tests/support/).

- `moto_endpoint` (session): moto's S3 server over real HTTP, the one S3 of the tests that need no dev
  cluster (`s3_endpoint` is the same server, by the name the trainer tests give it).
- `s3`: an `S3World` on it (tests.support.s3_world): seeded buckets, IAM users, IAM enforced on demand.
- `operator_settings`, `op`: the real operator (main.build_registry/build_runtime/kopf_settings) against
  kmock's API server, as an `OperatorHarness` (tests.support.operator_harness: create/patch/delete
  objects, play KubeRay, read objects and Events, wait for phases, and `operator_requests()` for the API
  calls the operator made). Override `operator_settings` to change its OperatorSettings for a module or a
  test. The operator runs on its own thread and loop; the API server shares the test's loop, so never
  block that loop (`asyncio.to_thread` for blocking calls). Tests that use `op` are asyncio tests: mark
  them `@pytest.mark.asyncio` (or a module-level `pytestmark`).
- `one_torch_thread` (autouse): torch in the test process computes on one thread (Ray workers and
  console-script runs set their own).
"""

from __future__ import annotations

import sys
from collections.abc import AsyncIterator, Iterator

import pytest
import pytest_asyncio
from moto.server import ThreadedMotoServer

from kubetune_operator.settings import OperatorSettings
from tests.support.operator_harness import FAST_SETTINGS, OperatorHarness, running_operator
from tests.support.s3_world import S3World


@pytest.fixture(autouse=True)
def one_torch_thread() -> None:
    """One intra-op thread for torch in this process, set again before each test (a benchmark sets its own).

    On 2 cores, two torch threads spin-wait for each other on small tensors whenever anything else runs
    (the S3 server, a test's Ray or cluster): tests/trainer/test_lr_range.py took 37 s with two threads at
    load 2.5, 5.5 s with one; the trainer's and bench's fast tests, at load 1, 122 s and 125 s. Large
    convolutions still gain from two (digits_world's pretraining, test_quality.py ask for them). Not
    imported here: where no test imported torch, nothing is set."""
    torch = sys.modules.get("torch")
    if torch is not None:
        torch.set_num_threads(1)


@pytest.fixture(scope="session")
def moto_endpoint() -> Iterator[str]:
    server = ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    try:
        yield f"http://{host}:{port}"
    finally:
        server.stop()


@pytest.fixture(scope="session")
def s3_endpoint(moto_endpoint: str) -> str:
    return moto_endpoint


@pytest.fixture
def s3(moto_endpoint: str) -> S3World:
    return S3World(moto_endpoint)


@pytest.fixture
def operator_settings() -> OperatorSettings:
    return FAST_SETTINGS


@pytest_asyncio.fixture
async def op(operator_settings: OperatorSettings) -> AsyncIterator[OperatorHarness]:
    async with running_operator(operator_settings) as harness:
        yield harness
