"""End-to-end fault tests: the real operator, KubeRay stand-in, Ray Train and S3 (busy_world.py), in trouble.

All the jobs run at once on one cluster (about four minutes on two cores together, where one alone
takes about one and a half): each test waits for its own job's scenario (scenarios.py) and asserts on
what it saw. The operator crash of `steady` hits every job running at that moment.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from typing import Any

import pytest
import torch

from tests.support.busy_world import BUCKET, DENIED_CHECKPOINT, NS, RESUMED, World, condition, progress_of, status_of
from tests.support.scenarios import (
    FAULTS,
    access_denied,
    deleted_while_running,
    elastic,
    kills,
    missing_checkpoint,
    preempted,
    s3_trouble,
    steady,
    suspend,
    uninterrupted,
)

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def world(busy_world: World) -> Iterator[World]:
    busy_world.start(*FAULTS)  # all at once; each test then waits for its own
    yield busy_world


def succeeded(facts: dict[str, Any]) -> dict[str, Any]:
    status = status_of(facts["final"])
    assert status.get("phase") == "Succeeded", status
    return status


def assert_every_epoch_once(facts: dict[str, Any]) -> None:
    """history.json has one entry per epoch, in order: none lost, none doubled by a resumed run."""
    assert [entry["epoch"] for entry in facts["history"]] == list(range(1, facts["epochs"] + 1))


def assert_failed_beside_steady(world: World, facts: dict[str, Any]) -> None:
    """The steady job was running when this one was submitted, was still running when it failed, and completed."""
    assert facts["steady_when_submitted"] == "Running"
    healthy = succeeded(world.outcome(steady))
    assert status_of(facts["final"])["completionTime"] <= healthy["completionTime"]  # RFC 3339, UTC: sortable


def resumes(log: str) -> list[tuple[str, int]]:
    """(checkpoint, epoch) of each resume the trainer reported ("resumed from … after epoch N")."""
    return sorted({(uri, int(epoch)) for uri, epoch in RESUMED.findall(log)})


def test_an_operator_crash_mid_job_makes_no_second_rayjob_and_status_goes_on(world: World) -> None:
    facts = world.outcome(steady)
    status = succeeded(facts)
    assert status["progress"]["epoch"] == facts["epochs"]

    # The restarted operator adopted the RayJob: created once, the same object all along, run once.
    versions = facts["rayjob_versions"]
    assert [kind for kind, _ in versions].count("ADDED") == 1
    assert {obj["metadata"]["uid"] for _, obj in versions} == {facts["rayjob_uid"]}
    assert len(facts["driver_logs"]) == 1

    # Progress kept coming after the restart, further than before the crash.
    before = facts["progress_before_crash"]
    after = [s.progress for s in facts["samples"] if s.at > facts["restarted_at"] and s.progress]
    assert after and after[-1]["updatedAt"] != before["updatedAt"]
    assert any(p["epoch"] > before["epoch"] and p["step"] > before["step"] for p in after), (before, after)


def test_a_killed_training_worker_resumes_from_the_last_checkpoint_in_the_same_run(world: World) -> None:
    facts = world.outcome(kills)
    succeeded(facts)
    assert_every_epoch_once(facts)

    # Ray Train started a new worker group inside the first run (the first driver log says so), from
    # at least the checkpoint committed before the kill; KubeRay saw nothing, so no restart counted.
    first = facts["driver_logs"][0]
    [(checkpoint, epoch)] = resumes(first)
    assert checkpoint.endswith(f"/epoch-{epoch:04d}"), checkpoint
    assert epoch >= facts["committed_before_worker_kill"] >= 1
    assert facts["restarts_after_worker_kill"] == 0
    # The driver told the operator: status.progress counted the worker failure of this attempt.
    assert any((s.progress or {}).get("workerFailures") == 1 for s in facts["samples"]), "no workerFailures: 1 seen"


def test_a_killed_driver_restarts_the_run_from_the_last_checkpoint_and_counts_a_restart(world: World) -> None:
    facts = world.outcome(kills)
    status = succeeded(facts)
    assert_every_epoch_once(facts)

    # KubeRay retried on a new Ray cluster (a second driver), which resumed from the run's checkpoints;
    # that is what status.restarts counts (docs/operator.md), and the job went back to Launching meanwhile.
    assert len(facts["driver_logs"]) == 2
    [(checkpoint, epoch)] = resumes(facts["driver_logs"][1])
    assert checkpoint.endswith(f"/epoch-{epoch:04d}"), checkpoint
    assert epoch >= facts["committed_before_driver_kill"] > facts["committed_before_worker_kill"]
    assert status["restarts"] == 1
    phases = [s.phase for s in facts["samples"] if s.phase]
    assert "Launching" in phases[phases.index("Running") :], phases


def test_a_preempted_worker_checkpoints_its_step_and_the_run_resumes_from_it_as_if_uninterrupted(
    world: World,
) -> None:
    facts = world.outcome(preempted)
    status = succeeded(facts)
    assert_every_epoch_once(facts)

    # Ray Train restarted the workers inside the one run (no KubeRay retry), from the step they saved on the
    # notice: a preemption, not a worker failure, and no step lost.
    [log] = facts["driver_logs"]
    restart = re.search(
        r"preemption 1: Ray Train restarts the workers from (s3://\S+) \(step (\d+)\); 0 step\(s\) lost", log
    )
    assert restart, log[-3000:]
    assert re.search(r"/epoch-\d{4}-step-\d{8}$", restart[1]), restart[1]
    # The step the notice came in, or the next: the workers' votes on it are read one step later (cadence.py).
    assert int(restart[2]) - facts["step_at_notice"] in (0, 1), (restart[2], facts["step_at_notice"])
    assert f"resumed from {restart[1]} after epoch" in log
    assert "worker failure" not in log
    assert status.get("restarts", 0) == 0

    # The status and an Event say so.
    assert (status["progress"]["preemptions"], status["progress"]["preemptionStepsLost"]) == (1, 0), status
    [event] = [e for e in facts["events"] if e["reason"] == "Preempted"]
    assert event["type"] == "Warning" and "0 step(s) lost" in event["message"], event

    # The same weights as the same job left alone (same seed, CPU).
    reference = world.outcome(uninterrupted)
    succeeded(reference)
    got, want = world.weights("preempted"), world.weights("uninterrupted")
    assert set(got) == set(want)
    for name, tensor in want.items():
        torch.testing.assert_close(got[name], tensor, rtol=1e-5, atol=1e-6, msg=name)


def test_s3_errors_and_an_outage_while_checkpointing_are_ridden_out(world: World) -> None:
    facts = world.outcome(s3_trouble)
    assert facts["error_hits"] > 0, "no checkpoint write met the 503 window"
    assert facts["outage_hits"] > 0, "no request met the outage"
    succeeded(facts)
    assert_every_epoch_once(facts)


def test_a_missing_checkpoint_fails_the_job_with_the_reason_while_another_completes(world: World) -> None:
    facts = world.outcome(missing_checkpoint)
    status = status_of(facts["final"])
    assert status["phase"] == "Failed", status
    failed = condition(facts["final"], "Failed")
    assert failed["reason"] == "TrainingFailed"
    assert f"no such object: s3://{BUCKET}/base/missing.safetensors" in failed["message"], failed
    assert_failed_beside_steady(world, facts)


def test_a_failed_jobs_head_and_driver_log_stay_for_keep_failed_for_then_go(world: World) -> None:
    facts = world.outcome(missing_checkpoint)
    status, cluster = status_of(facts["final"]), facts["cluster"]
    # status.logs names the kept head (through its Service) and the Ray job whose driver log it prints.
    head = f"kubectl -n {NS} exec svc/{cluster}-head-svc -c ray-head -- cat "
    assert re.fullmatch(re.escape(head) + r"/tmp/ray/session_latest/logs/job-driver-missing-\w+\.log", status["logs"])
    assert "stays until" in status["message"] and status["message"].endswith(status["logs"]), status["message"]
    assert facts["kept_cluster"] is not None, "the workers were not deleted, or the head not kept, after the failure"
    assert "no such object" in facts["kept_driver_log"], "the driver's log was not kept with the head"
    assert facts["head_gone"], f"RayCluster {cluster} outlived keepFailedFor"
    assert facts["driver_log_after"] == "", "the driver's log outlived its head"


def test_access_denied_fails_the_job_with_the_reason_while_another_completes(world: World) -> None:
    facts = world.outcome(access_denied)
    status = status_of(facts["final"])
    assert status["phase"] == "Failed", status
    failed = condition(facts["final"], "Failed")
    assert failed["reason"] == "AccessDenied"
    assert DENIED_CHECKPOINT in failed["message"], failed
    assert facts["rayjob"] is None  # refused before anything was launched
    assert_failed_beside_steady(world, facts)


def test_suspend_stops_the_ray_cluster_and_resume_continues_from_the_last_checkpoint(world: World) -> None:
    facts = world.outcome(suspend)
    assert status_of(facts["suspended"])["phase"] == "Suspended"
    assert facts["ray_processes_before"], "the job had no Ray cluster to stop"
    assert facts["ray_processes_while_suspended"] == []
    assert facts["rayclusters_while_suspended"] == []
    succeeded(facts)
    assert_every_epoch_once(facts)

    # Two runs: the first never resumed, the second resumed from the first one's last checkpoint.
    first, second = facts["driver_logs"]
    assert resumes(first) == []
    [(checkpoint, epoch)] = resumes(second)
    # Stopping the cluster sends its processes SIGTERM: a preemption notice, so the workers may have saved
    # the current step (epoch-NNNN-step-SSSSSSSS) before the stand-in's grace period ran out.
    assert re.search(rf"/epoch-{epoch:04d}(-step-\d{{8}})?$", checkpoint), checkpoint
    assert epoch == facts["committed_when_suspended"] >= 1


def test_deleting_a_running_job_leaves_nothing_behind(world: World) -> None:
    facts = world.outcome(deleted_while_running)
    assert facts["phase_when_deleted"] == "Running"
    assert facts["ray_processes_before"], "the job had no Ray cluster to stop"
    assert facts["leftovers"] == []
    # No ServiceAccount of its own: its pods ran as the namespace's shared one, which stays for the others.
    assert "deleted-trainer" not in facts["service_accounts"]
    assert "kubetune-trainer" in facts["service_accounts"]


def test_status_progress_never_goes_back_across_a_crash_a_worker_restart_or_a_resume(world: World) -> None:
    """A restarted run reports from its checkpoint again; the status keeps showing the furthest point."""
    for run in (steady, kills, suspend):
        facts = world.outcome(run)
        positions = [(p["epoch"], p["step"]) for p in (s.progress for s in facts["samples"]) if p]
        assert positions == sorted(positions), run.__name__
        assert progress_of(facts["final"])["epoch"] == facts["epochs"], run.__name__


def test_an_elastic_job_grows_to_two_workers_shrinks_to_one_and_completes_every_epoch_once(world: World) -> None:
    facts = world.outcome(elastic)
    status = succeeded(facts)
    assert_every_epoch_once(facts)
    assert status["progress"]["epoch"] == facts["epochs"]
    # status.progress.workers went 1 -> 2 -> 1 as the node joined and went, in one Ray cluster (one attempt).
    counts = [s.progress["workers"] for s in facts["samples"] if s.progress.get("workers")]
    changes = [n for i, n in enumerate(counts) if i == 0 or n != counts[i - 1]]
    assert changes[:3] == [1, 2, 1], counts
    assert len(facts["driver_logs"]) == 1
    # Each resize resumed from a checkpoint, not from scratch: the run continued after epoch 1.
    log = facts["driver_logs"][0]
    assert len([epoch for _, epoch in resumes(log)]) >= 1 and all(epoch >= 1 for _, epoch in resumes(log)), log[-3000:]
