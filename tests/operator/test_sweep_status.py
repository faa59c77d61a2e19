"""A sweep job, operator side, against kmock: the RayJob holds the workers of each trial at once, the trainer's
updates fill status.sweep (never status.progress.sweep) and the sweep's bounded gauges, the printer columns
read them, status.sweep stays when the job succeeds, and deleting the job removes the sweep's series.

The real operator (kopf, as main.py builds it) with its metrics and progress ports; the trainer's side is
OperatorReporter, as the driver sends updates.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from pathlib import Path
from typing import Any

import pytest
import pytest_asyncio

from kubetune_operator.crd import SWEEP_COLUMNS
from kubetune_trainer.operator_reporter import OperatorReporter
from kubetune_trainer.progress_model import TRIAL_STATES, ProgressUpdate
from tests.support.live_operator import Ports, ReviewingApiServer, live_operator
from tests.support.operator_harness import OperatorHarness, finetunejob

pytestmark = pytest.mark.asyncio

NS = "sweeps"  # a namespace of its own: the operator's metrics registry is process-wide
SWEEP = {
    "trials": 4,
    "maxConcurrentTrials": 3,
    "parameters": [{"field": "training.learningRate", "values": [0.001, 0.003, 0.01, 0.3]}],
}


@pytest_asyncio.fixture
async def operator() -> AsyncIterator[tuple[OperatorHarness, ReviewingApiServer, Ports]]:
    async with live_operator(NS) as running:
        yield running


def update(epoch: int, best: str, value: float, learning_rate: str, **counts: int) -> ProgressUpdate:
    """What the sweep's driver sends: the best trial's progress, and the trials by state."""
    sweep = {"trials": 4, "metric": "valAccuracy", "bestTrial": best, "bestValue": value, **counts}
    sweep["bestParameters"] = {"training.learningRate": learning_rate}
    position = {"epoch": epoch, "totalEpochs": 3, "step": epoch * 10, "totalSteps": 30, "percent": epoch * 100 / 3}
    return ProgressUpdate.model_validate({**position, "metrics": {"valAccuracy": value}, "sweep": sweep})


async def send(token: Path, ports: Ports, sent: ProgressUpdate) -> None:
    reporter = OperatorReporter(ports.progress_url("tune"), token)
    reporter.report(sent)
    await asyncio.to_thread(reporter.close)  # delivers it (waiting out the one-a-second limit)
    assert reporter.sent == 1


def column(job: dict[str, Any], path: str) -> Any:
    """What a printer column's simple JSONPath (.a.b.c) reads from the job, as kubectl would."""
    value: Any = job
    for key in path.lstrip(".").split("."):
        value = value.get(key) if isinstance(value, dict) else None
    return value


def trials(ports: Ports) -> dict[str, float]:
    samples = ports.scrape()
    return {
        dict(labels)["state"]: value
        for (metric, labels), value in samples.items()
        if metric == "kubetune_job_sweep_trials" and dict(labels)["name"] == "tune"
    }


async def test_a_sweep_s_trials_fill_status_sweep_and_its_metrics(
    operator: tuple[OperatorHarness, ReviewingApiServer, Ports], tmp_path: Path
) -> None:
    op, api, ports = operator
    await op.create_job(finetunejob("tune", sweep=SWEEP), namespace=NS)
    rayjob = await op.wait_for(lambda: op.rayjob(NS, "tune"), what="the sweep's RayJob")
    # 2 workers a trial (the harness' job), 3 trials at once.
    (group,) = rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (6, 6, 6)
    await op.set_rayjob_status(NS, "tune", jobDeploymentStatus="Running", jobStatus="RUNNING")
    await op.wait_for_phase(NS, "tune", "Running")
    token = tmp_path / "token"
    token.write_text(api.issue_token(NS, "tune"))

    # Three trials run, one waits; trial-001 leads.
    await send(token, ports, update(2, "trial-001", 0.7, "0.003", pending=1, running=3))
    job = await op.wait_for(lambda: (j := op.job(NS, "tune")) and "sweep" in j.get("status", {}) and j)
    assert job["status"]["sweep"] == {
        **{"trials": 4, "pending": 1, "running": 3, "done": 0, "stopped": 0, "failed": 0},
        **{"metric": "valAccuracy", "bestTrial": "trial-001", "bestValue": 0.7, "finished": "0/4"},
        "bestParameters": {"training.learningRate": "0.003"},
    }
    assert "sweep" not in job["status"]["progress"]
    assert job["status"]["progress"]["epoch"] == 2
    assert job["status"]["phase"] == "Running"
    assert trials(ports) == {"pending": 1, "running": 3, "done": 0, "stopped": 0, "failed": 0}
    assert list(trials(ports)) == list(TRIAL_STATES)  # one series a state, whatever the trials
    assert ports.scrape()[("kubetune_job_sweep_best_value", (("name", "tune"), ("namespace", NS)))] == 0.7

    # ASHA stops two poor trials; trial-003, at an earlier epoch than trial-001 was, is the new best.
    await send(token, ports, update(1, "trial-003", 0.8, "0.01", running=1, done=1, stopped=2))
    job = await op.wait_for(
        lambda: (j := op.job(NS, "tune")) and j["status"]["sweep"]["bestTrial"] == "trial-003" and j, what="trial-003"
    )
    sweep = job["status"]["sweep"]
    assert (sweep["finished"], sweep["bestParameters"]) == ("3/4", {"training.learningRate": "0.01"})
    assert (job["status"]["progress"]["epoch"], job["status"]["progress"]["metrics"]["valAccuracy"]) == (1, 0.8)
    # The Trials and Best columns of `kubectl get ftj`.
    assert [column(job, c["jsonPath"]) for c in SWEEP_COLUMNS] == ["3/4", 0.8]
    assert trials(ports)["stopped"] == 2

    # The last trial ends and the run succeeds: status.sweep stays, the record of the sweep.
    await send(token, ports, update(3, "trial-003", 0.85, "0.01", done=2, stopped=2))
    await op.wait_for(lambda: (op.job(NS, "tune") or {})["status"]["sweep"]["finished"] == "4/4", what="4/4")
    await op.set_rayjob_status(NS, "tune", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    job = await op.wait_for_phase(NS, "tune", "Succeeded")
    assert job["status"]["sweep"]["bestValue"] == 0.85 and job["status"]["sweep"]["running"] == 0
    assert trials(ports) == {"pending": 0, "running": 0, "done": 2, "stopped": 2, "failed": 0}

    # Deleting the job removes every series of it, the sweep's too.
    await op.delete("kubetune.dev/v1alpha1/finetunejobs", NS, "tune")
    await op.wait_for(lambda: not trials(ports), what="the sweep's series to go")
    assert not any(dict(labels).get("name") == "tune" for _, labels in ports.scrape())


async def test_a_job_that_sweeps_nothing_has_no_sweep_status_or_series(
    operator: tuple[OperatorHarness, ReviewingApiServer, Ports], tmp_path: Path
) -> None:
    op, api, ports = operator
    await op.create_job(finetunejob("single"), namespace=NS)
    rayjob = await op.wait_for(lambda: op.rayjob(NS, "single"), what="the RayJob")
    assert rayjob["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["replicas"] == 2
    await op.set_rayjob_status(NS, "single", jobDeploymentStatus="Running", jobStatus="RUNNING")
    await op.wait_for_phase(NS, "single", "Running")
    token = tmp_path / "token"
    token.write_text(api.issue_token(NS, "single"))
    reporter = OperatorReporter(ports.progress_url("single"), token)
    reporter.report(
        ProgressUpdate.model_validate({"epoch": 1, "totalEpochs": 3, "step": 5, "totalSteps": 30, "percent": 16.7})
    )
    await asyncio.to_thread(reporter.close)

    job = await op.wait_for(lambda: (j := op.job(NS, "single")) and "progress" in j.get("status", {}) and j)
    assert "sweep" not in job["status"] and "sweep" not in job["status"]["progress"]
    assert [column(job, c["jsonPath"]) for c in SWEEP_COLUMNS] == [None, None]  # empty columns
    assert not [metric for metric, _ in ports.scrape() if metric.startswith("kubetune_job_sweep")]
