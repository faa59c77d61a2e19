"""The running operator (kopf, as main.py builds it) serves metrics and the progress endpoint: a trainer's
updates reach the job's status, status changes reach the metrics, and deleting a job removes its series.

Uses the operator tests' harness (tests/support/operator_harness.py) over an API server that also
answers TokenReviews.
"""

from __future__ import annotations

import asyncio
import json
import urllib.error
import urllib.request
from collections.abc import AsyncIterator
from pathlib import Path

import pytest
import pytest_asyncio

from kubetune_trainer.operator_reporter import OperatorReporter
from kubetune_trainer.progress_model import ProgressUpdate
from tests.support.live_operator import Ports, ReviewingApiServer, live_operator
from tests.support.operator_harness import OperatorHarness, finetunejob

pytestmark = pytest.mark.asyncio

NS = "watchtower"  # a namespace of their own: the operator's metrics registry is process-wide


@pytest_asyncio.fixture
async def operator() -> AsyncIterator[tuple[OperatorHarness, ReviewingApiServer, Ports]]:
    async with live_operator(NS) as running:
        yield running


def sample(
    samples: dict[tuple[str, tuple[tuple[str, str], ...]], float], metric: str, /, **labels: str
) -> float | None:
    return samples.get((metric, tuple(sorted(labels.items()))))


async def test_progress_and_phases_flow_into_status_and_metrics_until_the_job_is_deleted(
    operator: tuple[OperatorHarness, ReviewingApiServer, Ports], tmp_path: Path
) -> None:
    op, api, ports = operator
    for name in ("cats", "dogs"):
        await op.create_job(finetunejob(name), namespace=NS)
        await op.wait_for(lambda name=name: op.rayjob(NS, name), what=f"RayJob {name}")  # type: ignore[misc]
    await op.set_rayjob_status(NS, "cats", jobDeploymentStatus="Running", jobStatus="RUNNING")
    await op.wait_for_phase(NS, "cats", "Running")

    # The phase change reached the metrics through the handlers' hooks.
    samples = await op.wait_for(
        lambda: (
            (s := ports.scrape()) and sample(s, "kubetune_job_phase", namespace=NS, name="cats", phase="Running") and s
        ),
        what="cats Running in the metrics",
    )
    assert sample(samples, "kubetune_jobs", namespace=NS, phase="Running") == 1
    assert sample(samples, "kubetune_job_queue_duration_seconds_count") is None  # no namespace label: filtered

    # The trainer of cats pushes progress with its projected token: it lands in the status and the gauges.
    token = tmp_path / "token"
    token.write_text(api.issue_token(NS, "cats"))
    reporter = OperatorReporter(ports.progress_url("cats"), token)
    reporter.report(
        ProgressUpdate.model_validate(
            {
                "epoch": 2,
                "totalEpochs": 4,
                "step": 50,
                "totalSteps": 100,
                "percent": 50.0,
                "etaSeconds": 120.0,
                "metrics": {"trainLoss": 0.6, "valAccuracy": 0.82, "imagesPerSecond": 410.0},
                "latestCheckpoint": f"s3://runs/{NS}/cats/checkpoints/checkpoint_000002",
            }
        )
    )
    await asyncio.to_thread(reporter.close)
    assert reporter.sent == 1
    job = await op.wait_for(lambda: (op.job(NS, "cats") or {}).get("status", {}).get("progress") and op.job(NS, "cats"))
    progress = job["status"]["progress"]
    assert (progress["epoch"], progress["percent"], progress["metrics"]["valAccuracy"]) == (2, 50.0, 0.82)
    assert job["status"]["phase"] == "Running"  # the operator's own status survives the progress patch
    samples = ports.scrape()
    assert sample(samples, "kubetune_job_progress_ratio", namespace=NS, name="cats") == 0.5
    assert sample(samples, "kubetune_job_validation_accuracy_ratio", namespace=NS, name="cats") == 0.82

    # dogs' token cannot report for cats: it is not for cats' audience.
    request = urllib.request.Request(
        ports.progress_url("cats"),
        data=json.dumps({"epoch": 4, "totalEpochs": 4, "step": 100, "totalSteps": 100, "percent": 100}).encode(),
        headers={"Authorization": f"Bearer {api.issue_token(NS, 'dogs')}", "Content-Type": "application/json"},
        method="POST",
    )
    with pytest.raises(urllib.error.HTTPError) as refused:
        await asyncio.to_thread(urllib.request.urlopen, request, None, 10)
    assert refused.value.code == 401
    assert (sample(ports.scrape(), "kubetune_progress_updates_total", result="rejected", code="401") or 0) >= 1

    # Deleting cats removes every series of it; dogs keeps its own.
    await op.delete("kubetune.dev/v1alpha1/finetunejobs", NS, "cats")
    await op.wait_for(
        lambda: not any(dict(labels).get("name") == "cats" for _, labels in ports.scrape()),
        what="cats' series to disappear",
    )
    samples = ports.scrape()
    assert any(dict(labels).get("name") == "dogs" for _, labels in samples)
    assert sample(samples, "kubetune_jobs", namespace=NS, phase="Running") == 0
