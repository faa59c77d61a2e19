"""KubeRay moves the RayJob through its states; the FineTuneJob's status and Events follow."""

from __future__ import annotations

from typing import Any

import pytest

from kubetune_dev.devcluster.kuberay_rules import spec_problem
from tests.support.operator_harness import RAYJOBS, OperatorHarness, finetunejob

pytestmark = pytest.mark.asyncio

NS, NAME = "default", "flowers"


async def launched(op: OperatorHarness, **sections: dict[str, Any]) -> None:
    await op.create_job(finetunejob(NAME, **sections))
    await op.wait_for(lambda: op.rayjob(NS, NAME), what="the RayJob")
    # kopf hands a handler the latest state of an object: let it see the new RayJob before KubeRay moves it.
    await op.wait_for_event(NS, NAME, "RayJobCreated")


async def step(op: OperatorHarness, phase: str, reason: str, /, **rayjob_status: Any) -> dict[str, Any]:
    """Play one KubeRay status; the job once it shows `phase` and the Event `reason` was posted."""
    await op.set_rayjob_status(NS, NAME, **rayjob_status)
    await op.wait_for(
        lambda: (
            (op.job(NS, NAME) or {}).get("status", {}).get("phase") == phase and reason in op.event_reasons(NS, NAME)
        ),
        what=lambda: (
            f"phase {phase} with Event {reason} (phase {op.phase(NS, NAME)}, events {op.event_reasons(NS, NAME)})"
        ),
    )
    job = op.job(NS, NAME)
    assert job is not None
    return job


def conditions(job: dict[str, Any]) -> dict[str, tuple[str, str]]:
    return {c["type"]: (c["status"], c["reason"]) for c in job["status"]["conditions"]}


async def test_a_run_from_creation_to_success(op: OperatorHarness) -> None:
    await launched(op)
    job = await step(op, "Launching", "ClusterStarting", jobDeploymentStatus="Initializing")
    assert conditions(job)["Launched"] == ("True", "RayJobCreated")
    assert conditions(job)["Running"] == ("False", "ClusterStarting")

    await step(op, "Launching", "DriverStarting", jobDeploymentStatus="Running", jobStatus="PENDING")
    job = await step(
        op,
        "Running",
        "TrainingRunning",
        jobStatus="RUNNING",
        dashboardURL="flowers-raycluster-abcde-head-svc.default.svc.cluster.local:8265",
        startTime="2026-05-01T12:00:00Z",
    )
    assert conditions(job)["Running"] == ("True", "TrainingRunning")
    assert job["status"]["dashboardURL"] == "http://flowers-raycluster-abcde-head-svc.default.svc.cluster.local:8265"
    assert job["status"]["startTime"]
    assert "completionTime" not in job["status"]

    job = await step(
        op,
        "Succeeded",
        "TrainingSucceeded",
        jobDeploymentStatus="Complete",
        jobStatus="SUCCEEDED",
        endTime="2026-05-01T13:00:00Z",
    )
    status = job["status"]
    assert conditions(job)["Succeeded"] == ("True", "TrainingSucceeded")
    assert conditions(job)["Running"][0] == "False"
    assert status["completionTime"] == "2026-05-01T13:00:00Z"
    assert status["model"]["uri"] == "s3://runs/flowers/model.safetensors"
    assert status["model"]["report"] == "s3://runs/flowers/report.html"
    assert status["observedGeneration"] == 1
    assert op.event_reasons(NS, NAME) == [
        "RayJobCreated",
        "ClusterStarting",
        "DriverStarting",
        "TrainingRunning",
        "TrainingSucceeded",
    ]
    assert all(e["type"] == "Normal" for e in op.events(NS, NAME))


async def test_a_deadline_ends_the_job_failed_with_kuberays_message(op: OperatorHarness) -> None:
    await launched(op, runPolicy={"activeDeadlineSeconds": 3600})
    await step(op, "Running", "TrainingRunning", jobDeploymentStatus="Running", jobStatus="RUNNING")
    job = await step(
        op,
        "Failed",
        "DeadlineExceeded",
        jobDeploymentStatus="Failed",
        jobStatus="STOPPED",
        reason="DeadlineExceeded",
        message="The RayJob has passed the activeDeadlineSeconds.",
    )
    assert conditions(job)["Failed"] == ("True", "DeadlineExceeded")
    assert job["status"]["message"] == "The RayJob has passed the activeDeadlineSeconds."
    assert job["status"]["completionTime"]
    (event,) = [e for e in op.events(NS, NAME) if e["reason"] == "DeadlineExceeded"]
    assert event["type"] == "Warning"


async def test_a_failed_job_says_how_to_read_the_drivers_log_and_until_when(op: OperatorHarness) -> None:
    await launched(op, runPolicy={"keepFailedFor": "45m"})
    names = {"rayClusterName": "flowers-x7k2p", "jobId": "flowers-q9r4t"}
    job = await step(op, "Running", "TrainingRunning", jobDeploymentStatus="Running", jobStatus="RUNNING", **names)
    command = (
        "kubectl -n default exec svc/flowers-x7k2p-head-svc -c ray-head -- "
        "cat /tmp/ray/session_latest/logs/job-driver-flowers-q9r4t.log"
    )
    assert job["status"]["logs"] == command
    end = {"endTime": "2026-05-01T12:00:00Z", "reason": "AppFailed", "message": "Job entrypoint command failed"}
    job = await step(op, "Failed", "TrainingFailed", jobDeploymentStatus="Failed", jobStatus="FAILED", **names, **end)
    assert job["status"]["logs"] == command
    (event,) = [e for e in op.events(NS, NAME) if e["reason"] == "TrainingFailed"]
    assert "stays until 2026-05-01T12:45:00Z (runPolicy.keepFailedFor): " + command in event["message"]


async def test_a_ray_job_stopped_by_hand_still_gets_its_cluster_shut_down(op: OperatorHarness) -> None:
    """KubeRay's deletion rules match no STOPPED Ray job: the operator hands the RayJob back to
    shutdownAfterJobFinishes, which KubeRay acts on at once."""
    await launched(op)
    assert (op.rayjob(NS, NAME) or {})["spec"]["deletionStrategy"]["deletionRules"]
    await step(op, "Running", "TrainingRunning", jobDeploymentStatus="Running", jobStatus="RUNNING")
    await step(op, "Failed", "JobStopped", jobDeploymentStatus="Complete", jobStatus="STOPPED")
    spec = await op.wait_for(
        lambda: (s := (op.rayjob(NS, NAME) or {}).get("spec", {})).get("shutdownAfterJobFinishes") and s,
        what="the RayJob handed to shutdownAfterJobFinishes",
    )
    assert "deletionStrategy" not in spec and spec_problem(spec) is None


async def test_retries_count_restarts_and_the_last_failure_is_final(op: OperatorHarness) -> None:
    await launched(op, runPolicy={"backoffLimit": 2})
    await step(op, "Running", "TrainingRunning", jobDeploymentStatus="Running", jobStatus="RUNNING")
    job = await step(op, "Launching", "Retrying", jobDeploymentStatus="Retrying", jobStatus="FAILED", failed=1)
    assert job["status"]["restarts"] == 1
    await op.wait_for_event(NS, NAME, "Restarted")
    await step(op, "Running", "TrainingRunning", jobDeploymentStatus="Running", jobStatus="RUNNING")
    job = await step(
        op, "Failed", "TrainingFailed", jobDeploymentStatus="Failed", jobStatus="FAILED", reason="AppFailed", failed=3
    )
    assert job["status"]["restarts"] == 2
    # KubeRay may still touch the RayJob after the end; the outcome stays.
    await op.set_rayjob_status(NS, NAME, jobDeploymentStatus="Running", jobStatus="RUNNING")
    await op.settle()
    assert op.phase(NS, NAME) == "Failed"


async def test_kuberay_rejecting_the_rayjob_fails_the_job(op: OperatorHarness) -> None:
    await launched(op)
    job = await step(
        op, "Failed", "RayJobValidationFailed", jobDeploymentStatus="ValidationFailed", message="invalid rayStartParams"
    )
    assert "invalid rayStartParams" in job["status"]["message"]


async def test_an_unknown_kuberay_state_keeps_the_job_going(op: OperatorHarness) -> None:
    await launched(op)
    await step(op, "Running", "TrainingRunning", jobDeploymentStatus="Running", jobStatus="RUNNING")
    job = await step(op, "Running", "UnknownRayJobState", jobDeploymentStatus="Rebalancing")
    assert "Rebalancing" in job["status"]["message"]
    await step(op, "Succeeded", "TrainingSucceeded", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")


async def test_deleting_the_rayjob_of_a_running_job_fails_it(op: OperatorHarness) -> None:
    await launched(op)
    await step(op, "Running", "TrainingRunning", jobDeploymentStatus="Running", jobStatus="RUNNING")
    await op.delete(RAYJOBS, NS, NAME)
    job = await op.wait_for_phase(NS, NAME, "Failed")
    assert conditions(job)["Failed"] == ("True", "RayJobDeleted")
    assert "re-create" in job["status"]["message"]


async def test_a_job_waiting_in_a_kueue_queue_is_pending(op: OperatorHarness) -> None:
    await launched(op, runPolicy={"queueName": "gpu-queue"})
    rayjob = op.rayjob(NS, NAME)
    assert rayjob is not None
    assert rayjob["metadata"]["labels"]["kueue.x-k8s.io/queue-name"] == "gpu-queue"
    # Kueue suspends the RayJob until it admits the workload.
    await op.patch(RAYJOBS, NS, NAME, {"spec": {"suspend": True}})
    job = await step(op, "Pending", "Queued", jobDeploymentStatus="Suspended")
    assert "gpu-queue" in job["status"]["message"]
    await op.patch(RAYJOBS, NS, NAME, {"spec": {"suspend": False}})
    await step(op, "Running", "TrainingRunning", jobDeploymentStatus="Running", jobStatus="RUNNING")
