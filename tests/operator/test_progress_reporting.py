"""A Running job whose trainer never reports says so in its status (ProgressReporting), instead of a silent 0%."""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from kubetune_operator.auth import Identity, service_account_username
from kubetune_operator.kube import Kube
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.progress import ProgressServer
from kubetune_operator.settings import OperatorSettings
from tests.support.operator_harness import OperatorHarness, fast_settings, finetunejob

pytestmark = pytest.mark.asyncio

NS = "default"
# Seconds of Running without an accepted update before the status says so. Status times are whole
# seconds, so the wait is between GRACE - 1 and GRACE.
GRACE = 1.0
CHATTY_GRACE = 3.0
POD_TOKEN = "token-of-the-jobs-pods"


@pytest.fixture
def operator_settings() -> OperatorSettings:
    return fast_settings(progress_grace_seconds=GRACE)


class PodTokens:
    """TokenReview as the API server answers it for the jobs' pods (kmock's API server has no TokenReview)."""

    async def authenticate(self, token: str, audience: str) -> Identity | None:
        return Identity(service_account_username(NS, "kubetune-trainer")) if token == POD_TOKEN else None


@pytest_asyncio.fixture
async def progress_endpoint(op: OperatorHarness) -> AsyncIterator[str]:
    """The real progress endpoint, writing to the same API server the operator watches."""
    kube = Kube.for_server(str(op.api.url))
    server = ProgressServer(PodTokens(), kube, OperatorMetrics(process_collectors=False))  # type: ignore[arg-type]
    port = await server.start("127.0.0.1", 0)
    try:
        yield f"http://127.0.0.1:{port}"
    finally:
        await server.stop()
        kube.close()


async def running(op: OperatorHarness, name: str) -> None:
    await op.create_job(finetunejob(name))
    await op.wait_for_event(NS, name, "RayJobCreated")
    await op.set_rayjob_status(NS, name, jobDeploymentStatus="Running", jobStatus="RUNNING")
    await op.wait_for_phase(NS, name, "Running")


async def report(endpoint: str, name: str, step: int) -> int:
    """One update as the job's trainer sends it."""
    update: dict[str, Any] = {"epoch": 1, "totalEpochs": 2, "step": step, "totalSteps": 20, "percent": step * 5}
    headers = {"Authorization": f"Bearer {POD_TOKEN}", "Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{endpoint}/v1/progress/{NS}/{name}", data=json.dumps(update), headers=headers) as response,
    ):
        return response.status


def reporting(op: OperatorHarness, name: str) -> tuple[str, str] | None:
    found = op.condition(NS, name, "ProgressReporting")
    return (found["status"], found["reason"]) if found else None


async def test_a_trainer_that_never_reports_is_named_in_the_status(op: OperatorHarness, progress_endpoint: str) -> None:
    await running(op, "silent")
    await op.wait_for(
        lambda: reporting(op, "silent") == ("False", "NoProgressReceived"), what="ProgressReporting=False"
    )
    condition = op.condition(NS, "silent", "ProgressReporting")
    assert condition is not None and "status.progress stays empty" in condition["message"]
    event = await op.wait_for_event(NS, "silent", "NoProgressReceived")
    assert event["type"] == "Warning"
    assert op.phase(NS, "silent") == "Running"  # the run goes on; only the condition says it is silent

    # Its trainer gets through after all: the condition says so at once.
    assert await report(progress_endpoint, "silent", step=1) == 200
    await op.wait_for(lambda: reporting(op, "silent") == ("True", "ProgressReceived"), what="ProgressReporting=True")
    await op.wait_for_event(NS, "silent", "ProgressReceived")


@pytest.mark.parametrize("operator_settings", [fast_settings(progress_grace_seconds=CHATTY_GRACE)])
async def test_a_trainer_that_reports_is_true_and_stays_so(op: OperatorHarness, progress_endpoint: str) -> None:
    await running(op, "chatty")
    assert await report(progress_endpoint, "chatty", step=1) == 200
    await op.wait_for(lambda: reporting(op, "chatty") == ("True", "ProgressReceived"), what="ProgressReporting=True")
    job = op.job(NS, "chatty")
    assert job is not None and job["status"]["progress"]["step"] == 1

    await op.settle(CHATTY_GRACE + 0.5)  # past the grace: an update came, so nothing is said against it
    assert reporting(op, "chatty") == ("True", "ProgressReceived")
    assert "NoProgressReceived" not in op.event_reasons(NS, "chatty")
    assert "ProgressReceived" not in op.event_reasons(NS, "chatty")  # no news: it reported from the start
