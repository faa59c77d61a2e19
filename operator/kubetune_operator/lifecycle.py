"""What a FineTuneJob's status should say, given what happened (pure).

The one table from KubeRay's RayJob status to the job's phase is `observe_rayjob`; every way the status
changes (launching, waiting, failing before launch, following the RayJob, refusing a spec edit, progress
arriving or not) is a function here that takes the job as it is (an `incoming.JobRecord`: typed spec,
status as written) and returns a `StatusChange`: the merge patch for `.status` and the Kubernetes Events
that tell the story. Conditions follow the Kubernetes API conventions: one per type, `lastTransitionTime`
moves only when `status` flips, and each carries the generation it saw.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubetune_operator.builders import (
    JOB_LABEL,
    MANAGED_BY,
    MANAGED_BY_LABEL,
    MUTABLE_SPEC_FIELDS,
    PROGRESS_URL_ENV,
    TOKEN_PATH,
)
from kubetune_operator.incoming import JobRecord
from kubetune_operator.retention import driver_log_command, kept_head_note
from kubetune_operator.spec import API_VERSION, KIND
from kubetune_operator.states import (
    PHASES,
    TERMINAL_PHASES,
    ConditionType,
    JobDeploymentStatus,
    JobStatus,
    Phase,
    Reason,
)

# KubeRay's reasons for a failed RayJob, as this operator's condition reasons.
FAILURE_REASONS = {
    "DeadlineExceeded": Reason.DEADLINE_EXCEEDED,
    "PreRunningDeadlineExceeded": Reason.START_DEADLINE_EXCEEDED,
    "AppFailed": Reason.TRAINING_FAILED,
    "SubmissionFailed": Reason.SUBMISSION_FAILED,
}
# Condition and status messages stay readable in `kubectl describe` and far below the API's limits.
MAX_MESSAGE = 4000


@dataclass(frozen=True)
class Observation:
    """The phase a job is in, with the condition reason and message that explain it."""

    phase: Phase
    reason: Reason
    message: str
    # Something needs attention although the job has not failed (its Event is a Warning).
    warning: bool = False


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the job."""

    type: str  # Normal or Warning
    reason: Reason
    message: str


@dataclass(frozen=True)
class StatusChange:
    """A merge patch for the job's `.status`, and the Events that go with it."""

    patch: dict[str, Any] = field(default_factory=dict)
    events: tuple[Event, ...] = ()
    old_phase: str | None = None
    new_phase: str | None = None

    @property
    def phase_changed(self) -> bool:
        return self.new_phase is not None and self.new_phase != self.old_phase

    def __bool__(self) -> bool:
        return bool(self.patch or self.events)


NO_CHANGE = StatusChange()


def timestamp(moment: datetime) -> str:
    """RFC 3339 in UTC with second precision, as Kubernetes writes times."""
    return moment.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_timestamp(value: Any) -> datetime | None:
    """A Kubernetes timestamp (RFC 3339) as an aware datetime, or None when absent or unreadable."""
    if not isinstance(value, str) or not value:
        return None
    try:
        parsed = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=UTC)


def clip(message: str) -> str:
    return message if len(message) <= MAX_MESSAGE else message[: MAX_MESSAGE - 1] + "…"


# -- reading the job and its RayJob ---------------------------------------------------------------------


def phase_of(job: JobRecord) -> str | None:
    phase = job.status.get("phase")
    return phase if isinstance(phase, str) else None


def is_finished(job: JobRecord) -> bool:
    return phase_of(job) in TERMINAL_PHASES


def is_launched(job: JobRecord) -> bool:
    """Whether the operator has created the job's RayJob (it records the name when it sees it)."""
    return bool(job.status.get("rayJobName"))


def condition(job: JobRecord, type_: ConditionType) -> Mapping[str, Any] | None:
    for item in job.status.get("conditions") or []:
        if isinstance(item, Mapping) and item.get("type") == type_:
            return item
    return None


def _controller(rayjob: Mapping[str, Any]) -> Mapping[str, Any] | None:
    for ref in (rayjob.get("metadata") or {}).get("ownerReferences") or []:
        if ref.get("controller"):
            return ref
    return None


def owner_job_name(rayjob: Mapping[str, Any]) -> str | None:
    """The FineTuneJob that controls `rayjob`: its controller ownerReference, else the job label."""
    ref = _controller(rayjob)
    if ref is not None and ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION:
        name = ref.get("name")
        return name if isinstance(name, str) else None
    labels = (rayjob.get("metadata") or {}).get("labels") or {}
    if labels.get(MANAGED_BY_LABEL) == MANAGED_BY and isinstance(labels.get(JOB_LABEL), str):
        return str(labels[JOB_LABEL])
    return None


def owner_uid(rayjob: Mapping[str, Any]) -> str | None:
    """The uid of the object that controls `rayjob` (a job of the same name may have been created since)."""
    ref = _controller(rayjob)
    uid = ref.get("uid") if ref is not None else None
    return str(uid) if uid else None


def belongs_to(rayjob: Mapping[str, Any], job_uid: str | None) -> bool:
    """Whether `rayjob` is the job's own: its controller is the job with `job_uid`. A RayJob of the same
    name left by an earlier job (deleted, its RayJob not yet collected) or orphaned (no owner) is not."""
    return job_uid is None or owner_uid(rayjob) == job_uid


def dashboard_url(rayjob_status: Mapping[str, Any]) -> str | None:
    """KubeRay reports host:port of the head service; people click URLs."""
    url = rayjob_status.get("dashboardURL")
    if not isinstance(url, str) or not url:
        return None
    return url if "://" in url else f"http://{url}"


# -- RayJob status → phase (the one table) ---------------------------------------------------------------


def observe_rayjob(
    rayjob: Mapping[str, Any],
    *,
    previous_phase: str | None,
    suspend_requested: bool,
    queue_name: str | None,
    model: str | None,
) -> Observation:
    """The job's phase as the RayJob shows it; states this table does not know stay non-terminal."""
    name = str((rayjob.get("metadata") or {}).get("name", ""))
    status = rayjob.get("status") or {}
    deployment = str(status.get("jobDeploymentStatus") or "")
    job_status = str(status.get("jobStatus") or "")
    found = (
        _ended(rayjob, deployment, job_status, model)
        or _suspension(name, deployment, suspend_requested, bool((rayjob.get("spec") or {}).get("suspend")), queue_name)
        or _starting_or_running(name, status, deployment, job_status)
    )
    if found is not None:
        return found
    known = previous_phase is not None and previous_phase in PHASES and previous_phase not in TERMINAL_PHASES
    return Observation(
        Phase(previous_phase) if known and previous_phase is not None else Phase.LAUNCHING,
        Reason.UNKNOWN_RAYJOB_STATE,
        f"RayJob {name} reports jobDeploymentStatus {deployment!r}, jobStatus {job_status!r}, which this "
        "operator does not know; waiting for a known state",
        warning=True,
    )


def _ended(rayjob: Mapping[str, Any], deployment: str, job_status: str, model: str | None) -> Observation | None:
    meta, status = rayjob.get("metadata") or {}, rayjob.get("status") or {}
    name = str(meta.get("name", ""))
    kuberay_message = str(status.get("message") or "")
    if deployment == JobDeploymentStatus.COMPLETE:
        if job_status in (JobStatus.FAILED, JobStatus.STOPPED):
            reason = Reason.TRAINING_FAILED if job_status == JobStatus.FAILED else Reason.JOB_STOPPED
            return Observation(Phase.FAILED, reason, kuberay_message or f"The Ray job ended {job_status}")
        where = f"; the model is at {model}" if model else ""
        return Observation(Phase.SUCCEEDED, Reason.TRAINING_SUCCEEDED, f"Training finished{where}")
    if deployment == JobDeploymentStatus.FAILED:
        reason = FAILURE_REASONS.get(str(status.get("reason") or ""), Reason.RAYJOB_FAILED)
        if reason == Reason.START_DEADLINE_EXCEEDED:
            return Observation(Phase.FAILED, reason, _never_started(meta, status, kuberay_message))
        return Observation(Phase.FAILED, reason, kuberay_message or f"RayJob {name} failed")
    if deployment == JobDeploymentStatus.VALIDATION_FAILED:
        message = kuberay_message or "KubeRay rejected the RayJob"
        return Observation(Phase.FAILED, Reason.RAYJOB_VALIDATION_FAILED, message)
    return None


def _never_started(meta: Mapping[str, Any], status: Mapping[str, Any], kuberay_message: str) -> str:
    """Why a job whose Ray cluster never ran it failed, and where to look (the pods' Events)."""
    cluster, namespace = status.get("rayClusterName") or "<cluster>", meta.get("namespace") or "default"
    return (
        "The Ray cluster did not start running the job within runPolicy.startDeadlineSeconds: some of its pods "
        "could not be scheduled or started (not enough free GPUs, no node matching the nodeSelector, "
        f"tolerations or affinity, an image that does not pull); their Events say which: kubectl -n {namespace} "
        f"describe pods -l ray.io/cluster={cluster}. KubeRay: {kuberay_message}"
    )


def _suspension(
    name: str, deployment: str, suspend_requested: bool, rayjob_suspended: bool, queue_name: str | None
) -> Observation | None:
    suspended = deployment == JobDeploymentStatus.SUSPENDED
    if suspend_requested:
        if suspended:
            return Observation(
                Phase.SUSPENDED,
                Reason.SUSPENDED,
                "Suspended: the Ray cluster is gone; set spec.runPolicy.suspend to false to resume from the "
                "last checkpoint",
            )
        return Observation(Phase.SUSPENDED, Reason.SUSPENDING, "Suspending: KubeRay is stopping the Ray cluster")
    if not suspended and deployment != JobDeploymentStatus.SUSPENDING:
        return None
    if rayjob_suspended and queue_name:
        return Observation(
            Phase.PENDING, Reason.QUEUED, f"Waiting for Kueue to admit the job (LocalQueue {queue_name})"
        )
    if rayjob_suspended:
        return Observation(Phase.SUSPENDED, Reason.SUSPENDED, f"RayJob {name} was suspended outside kubetune")
    return Observation(
        Phase.LAUNCHING,
        Reason.RESUMING,
        "Resuming: the Ray cluster is starting again; training continues from the last checkpoint",
    )


def _starting_or_running(name: str, status: Mapping[str, Any], deployment: str, job_status: str) -> Observation | None:
    if deployment in (JobDeploymentStatus.NONE, JobDeploymentStatus.NEW):
        message = f"RayJob {name} created; waiting for KubeRay to start it"
        return Observation(Phase.LAUNCHING, Reason.RAYJOB_CREATED, message)
    if deployment == JobDeploymentStatus.INITIALIZING:
        return Observation(Phase.LAUNCHING, Reason.CLUSTER_STARTING, "The Ray cluster is starting")
    if deployment == JobDeploymentStatus.WAITING:
        message = "The Ray cluster is up; waiting to submit the Ray job"
        return Observation(Phase.LAUNCHING, Reason.WAITING_FOR_SUBMISSION, message)
    if deployment == JobDeploymentStatus.RETRYING:
        failed = status.get("failed") or 0
        message = f"The Ray job failed ({failed} time(s)); KubeRay is starting a new Ray cluster"
        return Observation(Phase.LAUNCHING, Reason.RETRYING, message)
    if deployment != JobDeploymentStatus.RUNNING:
        return None
    # A Ray job that has ended is still running as far as the cluster goes, until KubeRay says Complete.
    if job_status in (JobStatus.RUNNING, JobStatus.SUCCEEDED, JobStatus.FAILED, JobStatus.STOPPED):
        url = dashboard_url(status)
        message = "Training is running" + (f"; Ray dashboard: {url}" if url else "")
        return Observation(Phase.RUNNING, Reason.TRAINING_RUNNING, message)
    message = "The Ray job is submitted; the training driver is starting"
    return Observation(Phase.LAUNCHING, Reason.DRIVER_STARTING, message)


def restarts_of(rayjob: Mapping[str, Any]) -> int:
    """Times KubeRay started a new Ray cluster: each failed attempt but a final one."""
    status = rayjob.get("status") or {}
    failed = status.get("failed")
    failed = failed if isinstance(failed, int) and failed > 0 else 0
    if status.get("jobDeploymentStatus") == JobDeploymentStatus.FAILED:
        return max(failed - 1, 0)
    return failed


# -- composing a status ----------------------------------------------------------------------------------


def set_condition(
    conditions: Iterable[Mapping[str, Any]],
    type_: ConditionType,
    status: bool,
    reason: Reason,
    message: str,
    *,
    generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """`conditions` with `type_` set (in its place, else last); its lastTransitionTime changes only when
    its status flips."""
    value = "True" if status else "False"
    new: dict[str, Any] = {
        "type": type_,
        "status": value,
        "reason": reason,
        "message": clip(message),
        "lastTransitionTime": timestamp(now),
    }
    if generation is not None:
        new["observedGeneration"] = generation
    result: list[dict[str, Any]] = []
    found = False
    for item in conditions:
        if item.get("type") != type_:
            result.append(dict(item))
            continue
        found = True
        if item.get("status") == value and item.get("lastTransitionTime"):
            new["lastTransitionTime"] = item["lastTransitionTime"]
        result.append(new)
    return result if found else [*result, new]


def _headline(job: JobRecord) -> tuple[str | None, str | None]:
    """The phase and the reason that explains it, as last written."""
    phase = phase_of(job)
    holder = {
        Phase.FAILED: ConditionType.FAILED,
        Phase.SUCCEEDED: ConditionType.SUCCEEDED,
        Phase.SUSPENDED: ConditionType.SUSPENDED,
        Phase.PENDING: ConditionType.LAUNCHED,
    }.get(phase or "", ConditionType.RUNNING)  # type: ignore[call-overload]
    found = condition(job, holder) or condition(job, ConditionType.LAUNCHED)
    return phase, (str(found.get("reason")) if found else None)


def _phase_conditions(
    job: JobRecord, observation: Observation, *, now: datetime, launched: bool | None, launched_message: str
) -> list[dict[str, Any]]:
    """The job's conditions once it is in `observation`'s phase (see `_transition` for `launched`)."""
    generation = job.meta.generation
    phase = observation.phase
    conditions: list[dict[str, Any]] = [dict(c) for c in job.status.get("conditions") or []]
    present = {c.get("type") for c in conditions}

    def put(type_: ConditionType, value: bool, reason: Reason = observation.reason, message: str = "") -> None:
        nonlocal conditions
        text = message or observation.message
        conditions = set_condition(conditions, type_, value, reason, text, generation=generation, now=now)

    if launched is True:
        put(ConditionType.LAUNCHED, True, Reason.RAYJOB_CREATED, launched_message)
    elif launched is False:
        put(ConditionType.LAUNCHED, False)
    if launched or ConditionType.RUNNING in present:
        put(ConditionType.RUNNING, phase == Phase.RUNNING)
    if phase == Phase.SUSPENDED or ConditionType.SUSPENDED in present:
        put(ConditionType.SUSPENDED, phase == Phase.SUSPENDED)
    if phase == Phase.SUCCEEDED:
        put(ConditionType.SUCCEEDED, True)
    if phase == Phase.FAILED:
        put(ConditionType.FAILED, True)
    return conditions


def _transition(
    job: JobRecord,
    observation: Observation,
    *,
    now: datetime,
    launched: bool | None,
    launched_message: str = "",
    extra: Mapping[str, Any] | None = None,
    events: Iterable[Event] = (),
) -> StatusChange:
    """The status for `observation`, as a patch against what `job` says now.

    `launched`: True once the RayJob exists, False while the job cannot launch (the condition then
    carries why), None to leave the Launched condition as it is.
    """
    status = job.status
    phase = observation.phase
    target: dict[str, Any] = {
        "phase": phase,
        "message": clip(observation.message),
        "conditions": _phase_conditions(
            job, observation, now=now, launched=launched, launched_message=launched_message
        ),
    }
    if job.meta.generation is not None:
        target["observedGeneration"] = job.meta.generation
    if phase == Phase.RUNNING and not status.get("startTime"):
        target["startTime"] = timestamp(now)
    if phase in TERMINAL_PHASES and not status.get("completionTime"):
        target["completionTime"] = timestamp(now)
    for key, value in (extra or {}).items():
        if key == "completionTime" and status.get("completionTime"):
            continue
        target[key] = value

    patch = {key: value for key, value in target.items() if status.get(key) != value}
    all_events = list(events)
    if _headline(job) != (phase, observation.reason):
        kind = "Warning" if phase == Phase.FAILED or observation.warning else "Normal"
        all_events.insert(0, Event(kind, observation.reason, clip(observation.message)))
    return StatusChange(patch, tuple(all_events), phase_of(job), phase)


# -- the ways a status changes ---------------------------------------------------------------------------


def waiting(job: JobRecord, reason: Reason, message: str, *, now: datetime) -> StatusChange:
    """The job cannot launch yet but may later (KubeRay missing, S3 unreachable): Pending, retried."""
    return _transition(job, Observation(Phase.PENDING, reason, message, warning=True), now=now, launched=False)


def previous_owner_message(namespace: str, child: Mapping[str, Any]) -> str:
    """Why a job waits when one of its children's names (its RayJob, Secret or NetworkPolicy) is held by
    an object that is not its own (see `belongs_to`)."""
    kind, name, previous = (
        child.get("kind") or "RayJob",
        (child.get("metadata") or {}).get("name", ""),
        owner_uid(child),
    )
    if previous:
        return (
            f"{kind} {name} still belongs to an earlier FineTuneJob of this name (uid {previous}); this job "
            "launches once Kubernetes' garbage collector has deleted it"
        )
    return (
        f"{kind} {name} exists but no FineTuneJob owns it (orphaned, or made by hand); this job launches once "
        f"it is gone: kubectl -n {namespace} delete {kind.lower()} {name}"
    )


def failed_before_launch(job: JobRecord, reason: Reason, message: str, *, now: datetime) -> StatusChange:
    """The job can never launch as written (invalid spec, missing data): Failed, not retried."""
    return _transition(job, Observation(Phase.FAILED, reason, message), now=now, launched=False)


def follow_rayjob(job: JobRecord, rayjob: Mapping[str, Any], *, now: datetime) -> StatusChange:
    """The job's status after its RayJob changed; a finished job keeps its outcome."""
    if is_finished(job):
        return NO_CHANGE
    policy = job.run_policy
    observation = observe_rayjob(
        rayjob,
        previous_phase=phase_of(job),
        suspend_requested=policy.suspend,
        queue_name=policy.queue_name or None,
        model=job.model_uri,
    )
    rayjob_status = rayjob.get("status") or {}
    name = str((rayjob.get("metadata") or {}).get("name", ""))
    extra: dict[str, Any] = {"rayJobName": name}
    url = dashboard_url(rayjob_status)
    if url:
        extra["dashboardURL"] = url
    old_restarts = job.status.get("restarts") or 0
    restarts = max(old_restarts, restarts_of(rayjob))
    extra["restarts"] = restarts
    if observation.phase in TERMINAL_PHASES:
        end = parse_timestamp(rayjob_status.get("endTime"))
        extra["completionTime"] = timestamp(end or now)
    observation, extra["logs"] = _driver_log(job, rayjob, observation, now=now)
    model = job.model_status()
    if observation.phase == Phase.SUCCEEDED and model:
        extra["model"] = model
    events: list[Event] = []
    if restarts > old_restarts:
        limit = (rayjob.get("spec") or {}).get("backoffLimit", 0)
        message = f"The Ray cluster failed and was started again ({restarts} of {limit} retries used)"
        events.append(Event("Warning", Reason.RESTARTED, message))
    return _transition(
        job,
        observation,
        now=now,
        launched=True,
        launched_message=f"RayJob {name} runs the job",
        extra=extra,
        events=events,
    )


def _driver_log(
    job: JobRecord, rayjob: Mapping[str, Any], observation: Observation, *, now: datetime
) -> tuple[Observation, str | None]:
    """The command that prints the driver's log while the head runs (status.logs; None, which the patch
    removes, once the head is gone), and a failure's message saying until when its head stays."""
    rayjob_status = rayjob.get("status") or {}
    command = driver_log_command(job.meta.namespace, rayjob_status)
    if observation.phase == Phase.SUCCEEDED:
        return observation, None
    if observation.phase != Phase.FAILED:
        return observation, command
    end = parse_timestamp(rayjob_status.get("endTime")) or now
    note = kept_head_note(rayjob, end, command)
    if note is None:
        return observation, None
    # The note last, whole: a long message from KubeRay (the driver's last lines) is cut before it.
    room = MAX_MESSAGE - len(note) - 2
    cause = observation.message if len(observation.message) <= room else observation.message[: room - 1] + "…"
    return dataclasses.replace(observation, message=f"{cause}. {note}"), command


def rayjob_deleted(job: JobRecord, rayjob_name: str, *, now: datetime) -> StatusChange:
    """Someone deleted the RayJob of a job that had not finished: the run is gone."""
    if is_finished(job):
        return NO_CHANGE
    message = (
        f"RayJob {rayjob_name} was deleted while the job was {phase_of(job) or 'starting'}; "
        "delete and re-create the FineTuneJob to run it again (it resumes from the run's last checkpoint)"
    )
    return _transition(job, Observation(Phase.FAILED, Reason.RAYJOB_DELETED, message), now=now, launched=None)


def _set_one(
    job: JobRecord,
    type_: ConditionType,
    value: bool,
    reason: Reason,
    message: str,
    event: Event | None,
    *,
    now: datetime,
) -> StatusChange:
    """Set one condition that says nothing about the phase (and record the generation seen)."""
    conditions = set_condition(
        job.status.get("conditions") or [], type_, value, reason, message, generation=job.meta.generation, now=now
    )
    patch = {"conditions": conditions, **_generation_patch(job)}
    return StatusChange(patch, (event,) if event else ())


def preflight_skipped(job: JobRecord, secret: str, *, now: datetime) -> StatusChange:
    """RBAC does not let the operator read the job's credentials Secret: it launches without preflight."""
    message = (
        f"Preflight skipped: the operator may not read Secret {secret!r} in namespace {job.meta.namespace!r} "
        "(RBAC), so S3 access was not checked before the Ray cluster starts; the pods still get the keys. "
        "To have it checked, let the operator read Secrets in this namespace: the chart's "
        "rbac.preflightSecrets.namespaces (docs/install.md, Permissions)"
    )
    event = Event("Warning", Reason.SECRET_NOT_READABLE, message)
    return _set_one(job, ConditionType.PREFLIGHT_CHECKED, False, Reason.SECRET_NOT_READABLE, message, event, now=now)


def refuse_spec_change(job: JobRecord, fields: list[str], *, now: datetime) -> StatusChange:
    """A spec edit that cannot apply to a launched or finished job: say so, change nothing else."""
    if is_finished(job):
        message = (
            f"{', '.join(fields)} changed after the job finished ({phase_of(job)}); the change has no effect. "
            "Create a new FineTuneJob to train again."
        )
        reason = Reason.JOB_FINISHED
    else:
        message = (
            f"{', '.join(fields)} changed while the job is {phase_of(job) or 'launching'}; the change is not applied "
            "and the run keeps the spec it was launched with. Revert the change, or delete and re-create the job. "
            "Only spec.runPolicy.suspend and spec.runPolicy.ttlSecondsAfterFinished may change after launch."
        )
        reason = Reason.IMMUTABLE_FIELD_CHANGED
    event = Event("Warning", Reason.SPEC_CHANGE_REFUSED, clip(message))
    return _set_one(job, ConditionType.SPEC_CHANGE_REFUSED, True, reason, message, event, now=now)


def _generation_patch(job: JobRecord) -> dict[str, Any]:
    generation = job.meta.generation
    if generation is None or job.status.get("observedGeneration") == generation:
        return {}
    return {"observedGeneration": generation}


def observe_generation(job: JobRecord) -> StatusChange:
    """A spec edit that needed no other status change (a new TTL) was still seen: say which generation."""
    return StatusChange(_generation_patch(job))


def accept_spec(job: JobRecord, *, now: datetime) -> StatusChange:
    """The spec matches the run again (a refused edit was reverted): clear the refusal."""
    refused = condition(job, ConditionType.SPEC_CHANGE_REFUSED)
    if not refused or refused.get("status") != "True":
        return observe_generation(job)
    message = "The spec matches the running job again"
    event = Event("Normal", Reason.SPEC_MATCHES_RUN, message)
    return _set_one(job, ConditionType.SPEC_CHANGE_REFUSED, False, Reason.SPEC_MATCHES_RUN, message, event, now=now)


# -- progress from the trainer ---------------------------------------------------------------------------


def _running_since(job: JobRecord) -> datetime | None:
    """When the job last turned Running (its Running condition's transition), if it is Running now."""
    running = condition(job, ConditionType.RUNNING)
    if phase_of(job) != Phase.RUNNING or not running or running.get("status") != "True":
        return None
    return parse_timestamp(running.get("lastTransitionTime")) or parse_timestamp(job.status.get("startTime"))


def _progress_received(job: JobRecord) -> bool:
    """Whether the operator has accepted a progress update from the job's trainer (it stamps updatedAt)."""
    progress = job.status.get("progress")
    return isinstance(progress, Mapping) and bool(progress.get("updatedAt"))


def progress_deadline(job: JobRecord, *, grace: float) -> datetime | None:
    """When a Running job without progress is to be called silent; None when there is nothing to wait for
    (not Running, an update already accepted, or the status says it is silent already)."""
    since = _running_since(job)
    if since is None or _progress_received(job):
        return None
    current = condition(job, ConditionType.PROGRESS_REPORTING)
    if current and current.get("status") == "False":
        return None
    return since + timedelta(seconds=grace)


def progress_reporting(job: JobRecord, *, now: datetime, grace: float) -> StatusChange:
    """The ProgressReporting condition of a Running job: True once a progress update was accepted; False
    (NoProgressReceived, a Warning Event) when it has run `grace` seconds without one, so that status.progress
    staying empty says why instead of showing 0%. Other phases keep the condition as it is."""
    current = condition(job, ConditionType.PROGRESS_REPORTING)
    if _running_since(job) is None:
        return NO_CHANGE
    if _progress_received(job):
        if current and current.get("status") == "True":
            return NO_CHANGE
        message = "The trainer's progress updates arrive (status.progress)"
        event = Event("Normal", Reason.PROGRESS_RECEIVED, message) if current else None
        return _set_one(job, ConditionType.PROGRESS_REPORTING, True, Reason.PROGRESS_RECEIVED, message, event, now=now)
    due = progress_deadline(job, grace=grace)
    if due is None or now < due:
        return NO_CHANGE
    message = (
        f"No progress update from the trainer in {grace:g}s of training, so status.progress stays empty. Check "
        f"the training driver's log on the Ray head pod for 'kubetune: progress' lines (they say what is "
        f"missing: its token at {TOKEN_PATH}, or the operator at ${PROGRESS_URL_ENV}), that the operator's "
        "progress endpoint is reachable from the job's namespace, and the operator's log for refused updates"
    )
    event = Event("Warning", Reason.NO_PROGRESS_RECEIVED, clip(message))
    return _set_one(job, ConditionType.PROGRESS_REPORTING, False, Reason.NO_PROGRESS_RECEIVED, message, event, now=now)


def preemptions_added(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> int:
    """Preemptions counted in `status.progress` between `before` and `after`.

    `preemptions` counts those of the current attempt of the driver: a fall (a new attempt) adds none,
    a rise by n adds n.
    """
    old, new = (before or {}).get("preemptions"), after.get("preemptions")
    old = old if isinstance(old, int) else 0
    return new - old if isinstance(new, int) and new > old else 0


def preemption_event(before: Mapping[str, Any] | None, after: Mapping[str, Any]) -> Event | None:
    """The Event of the preemption(s) the trainer counted in `status.progress` (`before` -> `after`), if any."""
    if not preemptions_added(before, after):
        return None
    new = after["preemptions"]
    lost = after.get("preemptionStepsLost")
    lost_text = f"{lost} step(s) lost" if isinstance(lost, int) else "the steps lost are not known"
    message = (
        f"Preemption {new} of this run (a node drained or reclaimed, or a pod deleted): Ray Train restarted the "
        f"workers from the checkpoint they saved on the notice ({after.get('latestCheckpoint') or 'none yet'}); "
        f"{lost_text}, at most the steps since the last checkpoint. spec.runPolicy.maxPreemptions bounds "
        "preemptions, apart from maxRetries"
    )
    return Event("Warning", Reason.PREEMPTED, clip(message))


# -- spec edits and expiry -------------------------------------------------------------------------------


def _leaf_paths(old: Any, new: Any, path: tuple[str, ...]) -> list[tuple[str, ...]]:
    if isinstance(old, Mapping) and isinstance(new, Mapping):
        out: list[tuple[str, ...]] = []
        for key in sorted(set(old) | set(new), key=str):
            if old.get(key) != new.get(key):
                out += _leaf_paths(old.get(key), new.get(key), (*path, str(key)))
        return out
    if isinstance(old, Mapping) and new is None:
        return _leaf_paths(old, {}, path)
    if isinstance(new, Mapping) and old is None:
        return _leaf_paths({}, new, path)
    return [path] if old != new else []


def changed_spec_fields(diff: Iterable[tuple[Any, ...]]) -> list[str]:
    """Dotted paths of the spec fields a kopf diff changes, e.g. `spec.model.checkpoint`."""
    paths: list[tuple[str, ...]] = []
    for item in diff:
        _op, field_path, old, new = item[0], tuple(str(p) for p in item[1]), item[2], item[3]
        if field_path[:1] == ("spec",):
            paths += _leaf_paths(old, new, field_path)
        elif not field_path:
            old_spec = old.get("spec") if isinstance(old, Mapping) else None
            new_spec = new.get("spec") if isinstance(new, Mapping) else None
            paths += _leaf_paths(old_spec, new_spec, ("spec",))
    return sorted({".".join(p) for p in paths})


def is_mutable(field_path: str) -> bool:
    return any(field_path == ".".join(("spec", *names)) for names in MUTABLE_SPEC_FIELDS)


def expiry_delay(job: JobRecord, *, now: datetime) -> float | None:
    """Seconds until a finished job's ttlSecondsAfterFinished runs out (0 when due); None if it never expires."""
    ttl = job.run_policy.ttl_seconds_after_finished
    if ttl is None or not is_finished(job):
        return None
    finished = parse_timestamp(job.status.get("completionTime"))
    if finished is None:
        return None
    return max((finished + timedelta(seconds=ttl) - now).total_seconds(), 0.0)
