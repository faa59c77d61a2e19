"""What stays of a job's Ray cluster once its run ends, and where the driver's log is (pure).

On success nothing stays. On failure the workers go at once and the head, with the driver's log on it,
stays for `runPolicy.keepFailedFor`, through KubeRay's RayJob `deletionStrategy.deletionRules` (KubeRay
>= 1.6 with its RayJobDeletionPolicy feature gate, on by default there). KubeRay refuses those rules
beside `shutdownAfterJobFinishes` (its older switch, which deletes the whole cluster when the job ends),
and refuses `suspend` without `shutdownAfterJobFinishes`; Kueue refuses a queued RayJob without it. So a
queued job, a suspended one, a `keepFailedFor` of 0s, or an operator with `keep_failed_heads` off get
`shutdownAfterJobFinishes` instead, and the operator swaps the two when it suspends or resumes a job
(`suspend_patch`), and when a run ends in a state no rule matches (`left_by_the_rules`).

The driver runs in the head pod as a Ray job that KubeRay submitted over HTTP (HTTPMode), so its output
is Ray's log file there, not the container's: `driver_log_command` is the `kubectl exec` that prints it.
"""

from __future__ import annotations

from collections.abc import Mapping
from datetime import UTC, datetime, timedelta
from typing import Any

from kubetune_operator.pod_names import HEAD
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.spec import RunPolicy
from kubetune_operator.states import JobDeploymentStatus, JobStatus

# KubeRay's deletion rule policies, gentlest first, and the end states a rule may match (its CRD's enums).
DELETE_WORKERS, DELETE_CLUSTER = "DeleteWorkers", "DeleteCluster"
SUCCEEDED_JOB = {"jobStatus": JobStatus.SUCCEEDED.value}
# A failed Ray job (jobStatus FAILED), and a RayJob that failed around it (jobDeploymentStatus Failed: the
# deadline passed, submission failed, the retries ran out); both match a failed run, so each gets a rule.
FAILED_RUN = ({"jobStatus": JobStatus.FAILED.value}, {"jobDeploymentStatus": JobDeploymentStatus.FAILED.value})
# Where Ray writes a submitted job's driver output on the head: its session dir, /tmp/ray (an emptyDir).
DRIVER_LOG_PATH = "/tmp/ray/session_latest/logs/job-driver-{job_id}.log"


def keeps_failed_head(policy: RunPolicy, settings: OperatorSettings, *, suspended: bool) -> bool:
    """Whether the job's RayJob carries deletion rules (else shutdownAfterJobFinishes), see the module doc."""
    return settings.keep_failed_heads and not policy.queue_name and not suspended and policy.keep_failed_for_s > 0


def _rule(condition: Mapping[str, str], ttl_seconds: int, policy: str) -> dict[str, Any]:
    return {"condition": {**condition, "ttlSeconds": ttl_seconds}, "policy": policy}


def deletion_rules(keep_seconds: int, *, elastic: bool = False) -> list[dict[str, Any]]:
    """Success: the cluster goes at once. Failure: the workers at once, the head after `keep_seconds`.

    KubeRay refuses DeleteWorkers where the autoscaler runs (elastic workers): there the whole cluster
    stays for `keep_seconds`, and the autoscaler removes the idle workers down to `workers.min` meanwhile."""
    rules = [_rule(SUCCEEDED_JOB, 0, DELETE_CLUSTER)]
    for failed in FAILED_RUN:
        if not elastic:
            rules.append(_rule(failed, 0, DELETE_WORKERS))
        rules.append(_rule(failed, keep_seconds, DELETE_CLUSTER))
    return rules


def end_of_run(
    policy: RunPolicy, settings: OperatorSettings, *, suspended: bool, elastic: bool = False
) -> dict[str, Any]:
    """The RayJob spec fields that say what KubeRay deletes when the run ends; `deletionStrategy` None
    (in a merge patch: remove it) where shutdownAfterJobFinishes does the work."""
    if not keeps_failed_head(policy, settings, suspended=suspended):
        return {"shutdownAfterJobFinishes": True, "deletionStrategy": None}
    rules = deletion_rules(policy.keep_failed_for_s, elastic=elastic)
    return {"shutdownAfterJobFinishes": False, "deletionStrategy": {"deletionRules": rules}}


def suspend_patch(policy: RunPolicy, settings: OperatorSettings, *, elastic: bool = False) -> dict[str, Any]:
    """The merge patch that suspends or resumes (`policy.suspend`) a job's RayJob, valid for KubeRay in one
    write: with the deletion rules swapped for shutdownAfterJobFinishes, or back."""
    end = end_of_run(policy, settings, suspended=policy.suspend, elastic=elastic)
    return {"spec": {"suspend": policy.suspend, **end}}


def left_by_the_rules(rayjob: Mapping[str, Any]) -> bool:
    """Whether the run ended in a state no deletion rule matches, so KubeRay would keep its whole cluster:
    a Ray job stopped by hand (jobStatus STOPPED; the rules' conditions know only SUCCEEDED and FAILED).
    The operator then swaps the rules for shutdownAfterJobFinishes (`SHUTDOWN_PATCH`), which KubeRay acts on."""
    spec, status = rayjob.get("spec") or {}, rayjob.get("status") or {}
    has_rules = bool((spec.get("deletionStrategy") or {}).get("deletionRules"))
    return has_rules and (
        status.get("jobDeploymentStatus") == JobDeploymentStatus.COMPLETE
        and status.get("jobStatus") == JobStatus.STOPPED
    )


SHUTDOWN_PATCH: dict[str, Any] = {"spec": {"shutdownAfterJobFinishes": True, "deletionStrategy": None}}


def head_kept_for(rayjob: Mapping[str, Any]) -> int | None:
    """Seconds KubeRay keeps the head of this RayJob after a failed run, as its deletion rules say; None
    when it keeps none (shutdownAfterJobFinishes, or no rule that deletes the head later)."""
    rules = ((rayjob.get("spec") or {}).get("deletionStrategy") or {}).get("deletionRules") or []
    kept = [
        int((rule.get("condition") or {}).get("ttlSeconds") or 0)
        for rule in rules
        if rule.get("policy") == DELETE_CLUSTER and (rule.get("condition") or {}).get("jobStatus") == JobStatus.FAILED
    ]
    return max(kept) if kept and max(kept) > 0 else None


def driver_log_command(namespace: str, rayjob_status: Mapping[str, Any]) -> str | None:
    """The command that prints the driver's log while the head runs; None before KubeRay names the cluster
    and the Ray job. Through the head's Service, which selects the head pod (`kubectl exec svc/...`)."""
    cluster, job_id = rayjob_status.get("rayClusterName"), rayjob_status.get("jobId")
    if not isinstance(cluster, str) or not cluster or not isinstance(job_id, str) or not job_id:
        return None
    log = DRIVER_LOG_PATH.format(job_id=job_id)
    return f"kubectl -n {namespace} exec svc/{cluster}-head-svc -c {HEAD} -- cat {log}"


def kept_head_note(rayjob: Mapping[str, Any], end: datetime, command: str | None) -> str | None:
    """What a failed job's message adds: until when its head and the driver's log stay, and how to read it."""
    seconds = head_kept_for(rayjob)
    if seconds is None or command is None:
        return None
    until = (end + timedelta(seconds=seconds)).astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
    return f"The Ray head, with the driver's log, stays until {until} (runPolicy.keepFailedFor): {command}"
