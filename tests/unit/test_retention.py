"""What stays of a job's Ray cluster when its run ends, and status.logs: what KubeRay is told, and accepts.

Each RayJob is checked twice: against KubeRay v1.7's CRD schema, and against the checks its controller
makes on every reconcile (`kuberay_rules.spec_problem`, written down from KubeRay's validation.go), which a
RayJob failing ends ValidationFailed.
"""

from __future__ import annotations

import copy
from datetime import UTC, datetime
from typing import Any

import pytest

from kubetune_dev.devcluster.kuberay_rules import rules_due, spec_problem
from kubetune_operator import lifecycle
from kubetune_operator.builders import build_rayjob
from kubetune_operator.incoming import receive
from kubetune_operator.retention import suspend_patch
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.spec import FineTuneJob
from tests.support.rayjob_schema import assert_valid_rayjob

SETTINGS = OperatorSettings(trainer_image="registry.example/kubetune-trainer:1.2.3")
END = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)


def body(**run_policy: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "flowers", "namespace": "vision", "uid": "u-1", "generation": 1},
        "spec": {
            "model": {"architecture": "resnet18", "checkpoint": "s3://models/resnet18.safetensors"},
            "data": {"train": "s3://datasets/flowers/train/"},
            "output": {"path": "s3://runs/flowers/"},
            "runPolicy": run_policy,
        },
    }


def rayjob(settings: OperatorSettings = SETTINGS, **run_policy: Any) -> dict[str, Any]:
    built = build_rayjob(FineTuneJob.from_body(body(**run_policy)), settings)
    assert_valid_rayjob(built)
    assert spec_problem(built["spec"]) is None
    return built


def merge(target: dict[str, Any], patch: dict[str, Any]) -> dict[str, Any]:
    """A JSON merge patch (RFC 7386), as the API server applies the operator's."""
    out = copy.deepcopy(target)
    for key, value in patch.items():
        if value is None:
            out.pop(key, None)
        elif isinstance(value, dict) and isinstance(out.get(key), dict):
            out[key] = merge(out[key], value)
        else:
            out[key] = value
    return out


def deleted_at(spec: dict[str, Any], status: dict[str, Any], seconds: float) -> tuple[str, ...]:
    return rules_due(spec, status, end=0.0, now=seconds).policies


def test_a_failed_jobs_head_stays_an_hour_its_workers_go_at_once_and_success_keeps_nothing() -> None:
    spec = rayjob()["spec"]
    assert spec["shutdownAfterJobFinishes"] is False
    failed = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}
    assert deleted_at(spec, failed, 0) == ("DeleteWorkers",)
    assert deleted_at(spec, failed, 3599) == ("DeleteWorkers",)
    assert "DeleteCluster" in deleted_at(spec, failed, 3600)
    # Failed around the Ray job (a deadline, a failed submission): no jobStatus FAILED, the same rules.
    deadline = {"jobDeploymentStatus": "Failed", "reason": "DeadlineExceeded"}
    assert deleted_at(spec, deadline, 0) == ("DeleteWorkers",)
    assert "DeleteCluster" in deleted_at(spec, deadline, 3600)
    succeeded = {"jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"}
    assert deleted_at(spec, succeeded, 0) == ("DeleteCluster",)


def test_an_elastic_jobs_failed_cluster_stays_whole_since_kuberay_refuses_deleting_workers_under_its_autoscaler() -> (
    None
):
    """KubeRay refuses DeleteWorkers where the autoscaler runs (ValidationFailed: the job would never start)."""
    elastic = body()
    elastic["spec"]["resources"] = {"workers": {"min": 1, "max": 2}}
    job = FineTuneJob.from_body(elastic)
    built = build_rayjob(job, SETTINGS)
    assert built["spec"]["rayClusterSpec"]["enableInTreeAutoscaling"] is True
    assert_valid_rayjob(built)
    assert spec_problem(built["spec"]) is None
    failed = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}
    assert deleted_at(built["spec"], failed, 3599) == ()
    assert "DeleteCluster" in deleted_at(built["spec"], failed, 3600)
    # Suspended and resumed, it gets the same rules back, still acceptable to KubeRay.
    policy = job.spec.run_policy
    suspended = merge(built, suspend_patch(policy.model_copy(update={"suspend": True}), SETTINGS, elastic=True))
    resumed = merge(suspended, suspend_patch(policy, SETTINGS, elastic=True))
    assert resumed == {**built, "spec": {**built["spec"], "suspend": False}}
    assert spec_problem(resumed["spec"]) is None


@pytest.mark.parametrize(("keep", "seconds"), [("30m", 1800), ("1h30m", 5400), ("168h", 604800), ("90s", 90)])
def test_keep_failed_for_sets_when_the_head_goes(keep: str, seconds: int) -> None:
    spec = rayjob(keepFailedFor=keep)["spec"]
    failed = {"jobDeploymentStatus": "Failed", "jobStatus": "FAILED"}
    assert "DeleteCluster" not in deleted_at(spec, failed, seconds - 1)
    assert "DeleteCluster" in deleted_at(spec, failed, seconds)


@pytest.mark.parametrize(
    ("run_policy", "settings"),
    [
        ({"keepFailedFor": "0s"}, SETTINGS),
        ({"queueName": "gpu-queue"}, SETTINGS),  # Kueue admits no RayJob without shutdownAfterJobFinishes
        ({"suspend": True}, SETTINGS),  # KubeRay suspends none without it
        ({}, OperatorSettings(trainer_image="registry.example/t:1", keep_failed_heads=False)),
    ],
    ids=["keep-nothing", "queued", "created-suspended", "operator-without-rules"],
)
def test_without_deletion_rules_the_whole_cluster_goes_when_the_job_ends(
    run_policy: dict[str, Any], settings: OperatorSettings
) -> None:
    spec = rayjob(settings, **run_policy)["spec"]
    assert spec["shutdownAfterJobFinishes"] is True
    assert "deletionStrategy" not in spec


def test_suspend_swaps_the_rules_for_shutdown_and_resume_swaps_them_back() -> None:
    launched = rayjob()
    suspended = merge(launched, suspend_patch(FineTuneJob.from_body(body(suspend=True)).spec.run_policy, SETTINGS))
    assert suspended["spec"]["suspend"] is True
    assert suspended["spec"]["shutdownAfterJobFinishes"] is True
    assert "deletionStrategy" not in suspended["spec"]
    assert_valid_rayjob(suspended)
    assert spec_problem(suspended["spec"]) is None
    resumed = merge(suspended, suspend_patch(FineTuneJob.from_body(body()).spec.run_policy, SETTINGS))
    assert resumed == {**launched, "spec": {**launched["spec"], "suspend": False}}
    # What KubeRay would do to a plain `suspend: true` on the launched RayJob: refuse it.
    assert "not allowed to be suspended" in str(spec_problem({**launched["spec"], "suspend": True}))


@pytest.mark.parametrize(
    ("edit", "problem"),
    [
        ({"shutdownAfterJobFinishes": True}, "mutually exclusive"),
        ({"deletionStrategy": {"deletionRules": [], "onSuccess": {"policy": "DeleteCluster"}}}, "requires either"),
    ],
)
def test_kuberays_checks_refuse_rules_beside_shutdown(edit: dict[str, Any], problem: str) -> None:
    """The stand-in's copy of KubeRay's checks can fail: the builder's output passes them for a reason."""
    assert problem in str(spec_problem({**rayjob()["spec"], **edit}))


def test_kuberays_checks_refuse_a_head_that_goes_before_its_workers() -> None:
    spec = rayjob(keepFailedFor="1h")["spec"]
    rules = spec["deletionStrategy"]["deletionRules"]
    for rule in rules:
        if rule["policy"] == "DeleteWorkers":
            rule["condition"]["ttlSeconds"] = 7200
    assert "must be >=" in str(spec_problem(spec))


# -- status.logs -----------------------------------------------------------------------------------------


def owned(built: dict[str, Any], **status: Any) -> dict[str, Any]:
    owner = {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "name": "flowers", "uid": "u-1"}
    meta = {**built["metadata"], "ownerReferences": [{**owner, "controller": True}]}
    return {**built, "metadata": meta, "status": status}


COMMAND = (
    "kubectl -n vision exec svc/flowers-x7k2p-head-svc -c ray-head -- "
    "cat /tmp/ray/session_latest/logs/job-driver-flowers-q9r4t.log"
)
RUNNING = {
    "jobDeploymentStatus": "Running",
    "jobStatus": "RUNNING",
    "rayClusterName": "flowers-x7k2p",
    "jobId": "flowers-q9r4t",
}
FAILED = {**RUNNING, "jobDeploymentStatus": "Failed", "jobStatus": "FAILED", "reason": "AppFailed"}


def follow(built: dict[str, Any], status: dict[str, Any], job_status: dict[str, Any] | None = None) -> dict[str, Any]:
    job = receive({**body(), "status": job_status or {}})
    change = lifecycle.follow_rayjob(job, owned(built, **status), now=END)
    return {**job.status, **change.patch}


def test_status_logs_gives_the_command_that_prints_the_drivers_log_while_the_head_runs() -> None:
    assert "logs" not in follow(rayjob(), {"jobDeploymentStatus": "Initializing"})
    assert follow(rayjob(), RUNNING)["logs"] == COMMAND


def test_a_failed_job_keeps_status_logs_and_says_until_when_its_head_stays() -> None:
    running = follow(rayjob(), RUNNING)
    failed = follow(rayjob(keepFailedFor="2h"), {**FAILED, "endTime": "2026-05-01T12:00:00Z"}, running)
    assert failed["logs"] == COMMAND
    assert failed["phase"] == "Failed"
    assert "stays until 2026-05-01T14:00:00Z (runPolicy.keepFailedFor)" in failed["message"]
    assert failed["message"].endswith(COMMAND)


def test_a_long_kuberay_message_is_cut_before_the_note_not_the_note() -> None:
    status = {**FAILED, "endTime": "2026-05-01T12:00:00Z", "message": "x" * 10000}
    failed = follow(rayjob(), status)
    assert len(failed["message"]) <= lifecycle.MAX_MESSAGE
    assert failed["message"].endswith(COMMAND)


@pytest.mark.parametrize(
    ("run_policy", "status"),
    [({"keepFailedFor": "0s"}, FAILED), ({}, {**RUNNING, "jobDeploymentStatus": "Complete", "jobStatus": "SUCCEEDED"})],
    ids=["failed-keeping-nothing", "succeeded"],
)
def test_once_the_head_goes_with_the_run_status_logs_goes_too(
    run_policy: dict[str, Any], status: dict[str, Any]
) -> None:
    running = follow(rayjob(), RUNNING)
    ended = follow(rayjob(**run_policy), status, running)
    assert ended["logs"] is None  # the merge patch removes it
    assert "stays until" not in ended["message"]
