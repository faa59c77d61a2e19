"""Edits to a launched job: suspend/resume and the TTL apply, anything that would change the run is refused."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from typing import Any

import pytest

from kubetune_dev.devcluster.kuberay_rules import spec_problem
from tests.support.operator_harness import OperatorHarness, finetunejob

pytestmark = pytest.mark.asyncio

NS, NAME = "default", "flowers"


async def running_job(op: OperatorHarness, **sections: dict[str, Any]) -> None:
    await op.create_job(finetunejob(NAME, **sections))
    await op.wait_for(lambda: op.rayjob(NS, NAME), what="the RayJob")
    await op.set_rayjob_status(NS, NAME, jobDeploymentStatus="Running", jobStatus="RUNNING")
    await op.wait_for_phase(NS, NAME, "Running")


async def finished_job(op: OperatorHarness, **sections: dict[str, Any]) -> None:
    await running_job(op, **sections)
    await op.set_rayjob_status(NS, NAME, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    await op.wait_for_phase(NS, NAME, "Succeeded")


def rayjob_suspend(op: OperatorHarness) -> bool | None:
    rayjob = op.rayjob(NS, NAME) or {}
    suspend: bool | None = rayjob.get("spec", {}).get("suspend")
    return suspend


def kuberay_problem(op: OperatorHarness) -> str | None:
    """What KubeRay's validation says of the RayJob as it is now (ValidationFailed when not None)."""
    return spec_problem((op.rayjob(NS, NAME) or {}).get("spec") or {})


async def test_suspend_stops_the_rayjob_and_resume_starts_it_again(op: OperatorHarness) -> None:
    await running_job(op)
    launched = (op.rayjob(NS, NAME) or {})["spec"]
    assert launched["deletionStrategy"]["deletionRules"] and launched["shutdownAfterJobFinishes"] is False
    await op.patch_job_spec(NS, NAME, {"runPolicy": {"suspend": True}})
    await op.wait_for(lambda: rayjob_suspend(op) is True, what="the RayJob to be suspended")
    # KubeRay suspends no RayJob with deletion rules: the same write swaps them for shutdownAfterJobFinishes.
    assert kuberay_problem(op) is None
    assert "deletionStrategy" not in (op.rayjob(NS, NAME) or {})["spec"]
    job = await op.wait_for_phase(NS, NAME, "Suspended")
    suspended = next(c for c in job["status"]["conditions"] if c["type"] == "Suspended")
    assert (suspended["status"], suspended["reason"]) == ("True", "Suspending")
    assert job["status"]["observedGeneration"] == 2

    await op.set_rayjob_status(NS, NAME, jobDeploymentStatus="Suspended", jobStatus="STOPPED")
    await op.wait_for_event(NS, NAME, "Suspended")

    await op.patch_job_spec(NS, NAME, {"runPolicy": {"suspend": False}})
    await op.wait_for(lambda: rayjob_suspend(op) is False, what="the RayJob to be resumed")
    assert (op.rayjob(NS, NAME) or {})["spec"]["deletionStrategy"] == launched["deletionStrategy"]
    assert kuberay_problem(op) is None
    job = await op.wait_for_phase(NS, NAME, "Launching")
    assert (op.condition(NS, NAME, "Suspended") or {}).get("status") == "False"
    await op.wait_for_event(NS, NAME, "Resuming")
    await op.set_rayjob_status(NS, NAME, jobDeploymentStatus="Running", jobStatus="RUNNING")
    await op.wait_for_phase(NS, NAME, "Running")


async def test_a_job_created_suspended_gets_a_suspended_rayjob(op: OperatorHarness) -> None:
    await op.create_job(finetunejob(NAME, runPolicy={"suspend": True}))
    await op.wait_for(lambda: rayjob_suspend(op) is True, what="a suspended RayJob")
    assert kuberay_problem(op) is None
    await op.wait_for_phase(NS, NAME, "Suspended")


async def test_changes_that_would_alter_the_run_are_refused_and_the_rayjob_kept(op: OperatorHarness) -> None:
    await running_job(op)
    before = op.rayjob(NS, NAME)
    await op.patch_job_spec(NS, NAME, {"model": {"checkpoint": "s3://models/base/other.safetensors"}})
    refused = await op.wait_for(lambda: op.condition(NS, NAME, "SpecChangeRefused"), what="the refusal")
    assert (refused["status"], refused["reason"]) == ("True", "ImmutableFieldChanged")
    assert "spec.model.checkpoint" in refused["message"]
    event = await op.wait_for_event(NS, NAME, "SpecChangeRefused")
    assert event["type"] == "Warning"
    assert "spec.model.checkpoint" in event["message"]
    assert op.rayjob(NS, NAME) == before
    assert op.phase(NS, NAME) == "Running"

    # Reverting the edit clears the refusal.
    await op.patch_job_spec(NS, NAME, {"model": {"checkpoint": "s3://models/base/resnet18.safetensors"}})
    await op.wait_for(
        lambda: (op.condition(NS, NAME, "SpecChangeRefused") or {}).get("status") == "False", what="the refusal cleared"
    )


async def test_a_mixed_edit_applies_suspend_and_refuses_the_data_change(op: OperatorHarness) -> None:
    await running_job(op)
    await op.patch_job_spec(NS, NAME, {"data": {"train": "s3://datasets/other/"}, "runPolicy": {"suspend": True}})
    await op.wait_for(lambda: rayjob_suspend(op) is True, what="the RayJob to be suspended")
    refused = await op.wait_for(lambda: op.condition(NS, NAME, "SpecChangeRefused"), what="the refusal")
    assert "spec.data.train" in refused["message"]
    assert "spec.runPolicy.suspend" not in refused["message"].split(" changed")[0]
    rayjob = op.rayjob(NS, NAME)
    assert rayjob is not None
    # The run itself is untouched: the trainer config in the head's env still names the old data.
    (head,) = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    config = next(e["value"] for e in head["env"] if e["name"] == "KUBETUNE_TRAINER_CONFIG")
    assert json.loads(config)["data"]["train"] != "s3://datasets/other/"


async def test_a_finished_job_says_edits_have_no_effect(op: OperatorHarness) -> None:
    await finished_job(op)
    await op.patch_job_spec(NS, NAME, {"training": {"epochs": 50}})
    refused = await op.wait_for(lambda: op.condition(NS, NAME, "SpecChangeRefused"), what="the refusal")
    assert refused["reason"] == "JobFinished"
    assert op.phase(NS, NAME) == "Succeeded"


def last_millisecond_of_the_second() -> datetime:
    """Now, as the last millisecond of its second: the whole-second completionTime a job then gets makes a
    TTL of 1 s run out a millisecond after the job finished, every time (what a busy run does now and then)."""
    return datetime.now(UTC).replace(microsecond=999_000)


async def test_ttl_deletes_a_finished_job(op: OperatorHarness) -> None:
    assert op.runtime is not None
    op.runtime.clock = last_millisecond_of_the_second
    await running_job(op, runPolicy={"ttlSecondsAfterFinished": 1})
    await op.set_rayjob_status(NS, NAME, jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    # Not a wait for phase Succeeded first: the job may be gone before a poll sees it (so it was in 2 of
    # 4 busy runs of tests/operator, which read as the job stuck Running).
    await op.wait_for(lambda: op.job(NS, NAME) is None, timeout=5, what="the job to be deleted after its TTL")
    assert op.phases(NS, NAME)[-1] == "Succeeded"  # deleted once finished, not before


async def test_ttl_set_after_the_job_finished_applies(op: OperatorHarness) -> None:
    await finished_job(op)
    await op.settle()
    assert op.job(NS, NAME) is not None  # no TTL: kept
    await op.patch_job_spec(NS, NAME, {"runPolicy": {"ttlSecondsAfterFinished": 0}})
    await op.wait_for(lambda: op.job(NS, NAME) is None, timeout=5, what="the job to be deleted")


async def test_ttl_counts_only_once_the_job_has_finished(op: OperatorHarness) -> None:
    await running_job(op, runPolicy={"ttlSecondsAfterFinished": 0})
    await op.settle()
    assert op.job(NS, NAME) is not None
    await op.set_rayjob_status(NS, NAME, jobDeploymentStatus="Failed", jobStatus="FAILED")
    await op.wait_for(lambda: op.job(NS, NAME) is None, timeout=5, what="the failed job to be deleted")
