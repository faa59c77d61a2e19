"""A Running job whose trainer never reports says so in its status (ProgressReporting), instead of a silent 0%."""

from __future__ import annotations

import base64
import json
from collections.abc import AsyncIterator
from typing import Any

import aiohttp
import pytest
import pytest_asyncio

from kubetune_operator.auth import Identity, service_account_username
from kubetune_operator.builders import token_audience
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
SIGNATURE = "signed-by-the-api-server"


def pod_token(audience: str) -> str:
    """A projected token as the kubelet writes it into the job's pods: a JWT for the job's audience."""
    claims = base64.urlsafe_b64encode(json.dumps({"aud": [audience]}).encode()).decode().rstrip("=")
    return f"e30.{claims}.{SIGNATURE}"


@pytest.fixture
def operator_settings() -> OperatorSettings:
    return fast_settings(progress_grace_seconds=GRACE)


class PodTokens:
    """TokenReview as the API server answers it for the jobs' pods (kmock's API server has no TokenReview)."""

    async def authenticate(self, token: str, audience: str) -> Identity | None:
        authentic = token == pod_token(audience)
        return Identity(service_account_username(NS, "kubetune-trainer")) if authentic else None


@pytest.fixture
def endpoint_metrics() -> OperatorMetrics:
    return OperatorMetrics(process_collectors=False)


@pytest_asyncio.fixture
async def progress_endpoint(op: OperatorHarness, endpoint_metrics: OperatorMetrics) -> AsyncIterator[str]:
    """The real progress endpoint, writing to the same API server the operator watches and reading the jobs
    from the operator's watch cache, as the operator's own endpoint does."""
    kube = Kube.for_server(str(op.api.url))
    view = op.runtime.status.jobs if op.runtime is not None else None
    server = ProgressServer(PodTokens(), kube, endpoint_metrics, view=view)  # type: ignore[arg-type]
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


async def report(op: OperatorHarness, endpoint: str, name: str, step: int, **counts: int) -> int:
    """One update as the job's trainer sends it (`counts`: e.g. preemptions, preemptionStepsLost)."""
    update: dict[str, Any] = {"epoch": 1, "totalEpochs": 2, "step": step, "totalSteps": 20, "percent": step * 5}
    update.update(counts)
    token = pod_token(token_audience(NS, name, (op.job(NS, name) or {})["metadata"]["uid"]))
    headers = {"Authorization": f"Bearer {token}", "Content-Type": "application/json"}
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
    assert await report(op, progress_endpoint, "silent", step=1) == 200
    await op.wait_for(lambda: reporting(op, "silent") == ("True", "ProgressReceived"), what="ProgressReporting=True")
    await op.wait_for_event(NS, "silent", "ProgressReceived")


@pytest.mark.parametrize("operator_settings", [fast_settings(progress_grace_seconds=CHATTY_GRACE)])
async def test_a_trainer_that_reports_is_true_and_stays_so(op: OperatorHarness, progress_endpoint: str) -> None:
    await running(op, "chatty")
    assert await report(op, progress_endpoint, "chatty", step=1) == 200
    await op.wait_for(lambda: reporting(op, "chatty") == ("True", "ProgressReceived"), what="ProgressReporting=True")
    job = op.job(NS, "chatty")
    assert job is not None and job["status"]["progress"]["step"] == 1

    await op.settle(CHATTY_GRACE + 0.5)  # past the grace: an update came, so nothing is said against it
    assert reporting(op, "chatty") == ("True", "ProgressReceived")
    assert "NoProgressReceived" not in op.event_reasons(NS, "chatty")
    assert "ProgressReceived" not in op.event_reasons(NS, "chatty")  # no news: it reported from the start


async def test_a_preemption_the_trainer_counts_shows_in_status_an_event_and_the_counter(
    op: OperatorHarness, progress_endpoint: str, endpoint_metrics: OperatorMetrics
) -> None:
    await running(op, "spot")
    assert await report(op, progress_endpoint, "spot", step=6) == 200

    # The workers restarted from the step saved on the notice (step 6): the update comes from no further on.
    await op.settle(1.1)  # one update per second and job
    assert await report(op, progress_endpoint, "spot", step=6, preemptions=1, preemptionStepsLost=0) == 200

    event = await op.wait_for_event(NS, "spot", "Preempted")
    assert event["type"] == "Warning"
    assert "Preemption 1 of this run" in event["message"] and "0 step(s) lost" in event["message"], event
    progress = (op.job(NS, "spot") or {})["status"]["progress"]
    assert (progress["preemptions"], progress["preemptionStepsLost"]) == (1, 0)
    assert endpoint_metrics.registry.get_sample_value("kubetune_job_preemptions_total", {"namespace": NS}) == 1

    # A second preemption that lost steps: its workers report from behind the furthest point; it still counts.
    await op.settle(1.1)
    assert await report(op, progress_endpoint, "spot", step=4, preemptions=2, preemptionStepsLost=2) == 200
    await op.wait_for(lambda: len([e for e in op.events(NS, "spot") if e["reason"] == "Preempted"]) == 2)
    progress = (op.job(NS, "spot") or {})["status"]["progress"]
    assert (progress["step"], progress["preemptions"], progress["preemptionStepsLost"]) == (6, 2, 2)
    assert endpoint_metrics.registry.get_sample_value("kubetune_job_preemptions_total", {"namespace": NS}) == 2
