"""What a FineTuneJob's status should say, given what happened (pure).

The one table from KubeRay's RayJob status to the job's phase is `observe_rayjob`; every way the status
changes (launching, waiting, failing before launch, following the RayJob, refusing a spec edit) is a
function here that takes the job as it is and returns a `StatusChange`: the merge patch for `.status`
and the Kubernetes Events that tell the story. Conditions follow the Kubernetes API conventions: one per
type, `lastTransitionTime` moves only when `status` flips, and each carries the generation it saw.
"""

from __future__ import annotations

from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from typing import Any

from kubetune_operator.builders import JOB_LABEL, MANAGED_BY, MANAGED_BY_LABEL, MUTABLE_SPEC_FIELDS
from kubetune_operator.spec import API_VERSION, KIND, TERMINAL_PHASES

LAUNCHED = "Launched"
RUNNING = "Running"
SUSPENDED = "Suspended"
SUCCEEDED = "Succeeded"
FAILED = "Failed"
SPEC_CHANGE_REFUSED = "SpecChangeRefused"

# KubeRay's reasons for a failed RayJob, as this operator's condition reasons.
FAILURE_REASONS = {
    "DeadlineExceeded": "DeadlineExceeded",
    "PreRunningDeadlineExceeded": "DeadlineExceeded",
    "AppFailed": "TrainingFailed",
    "SubmissionFailed": "SubmissionFailed",
}
# Condition and status messages stay readable in `kubectl describe` and far below the API's limits.
MAX_MESSAGE = 4000


@dataclass(frozen=True)
class Observation:
    """The phase a job is in, with the condition reason and message that explain it."""

    phase: str
    reason: str
    message: str
    # Something needs attention although the job has not failed (its Event is a Warning).
    warning: bool = False


@dataclass(frozen=True)
class Event:
    """A Kubernetes Event to post on the job."""

    type: str  # Normal or Warning
    reason: str
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


def _mapping(value: Any) -> Mapping[str, Any]:
    """`value` if it is a mapping, else empty: bodies of malformed jobs may hold anything anywhere."""
    return value if isinstance(value, Mapping) else {}


def _status(job: Mapping[str, Any]) -> Mapping[str, Any]:
    return _mapping(job.get("status"))


def _spec(job: Mapping[str, Any]) -> Mapping[str, Any]:
    return _mapping(job.get("spec"))


def run_policy(job: Mapping[str, Any]) -> Mapping[str, Any]:
    return _mapping(_spec(job).get("runPolicy"))


def _generation(job: Mapping[str, Any]) -> int | None:
    generation = _mapping(job.get("metadata")).get("generation")
    return generation if isinstance(generation, int) else None


def phase_of(job: Mapping[str, Any]) -> str | None:
    phase = _status(job).get("phase")
    return phase if isinstance(phase, str) else None


def is_finished(job: Mapping[str, Any]) -> bool:
    return phase_of(job) in TERMINAL_PHASES


def is_launched(job: Mapping[str, Any]) -> bool:
    """Whether the operator has created the job's RayJob (it records the name when it sees it)."""
    return bool(_status(job).get("rayJobName"))


def condition(job: Mapping[str, Any], type_: str) -> Mapping[str, Any] | None:
    for item in _status(job).get("conditions") or []:
        if isinstance(item, Mapping) and item.get("type") == type_:
            return item
    return None


def owner_job_name(rayjob: Mapping[str, Any]) -> str | None:
    """The FineTuneJob that controls `rayjob`: its controller ownerReference, else the job label."""
    meta = rayjob.get("metadata") or {}
    for ref in meta.get("ownerReferences") or []:
        if ref.get("controller") and ref.get("kind") == KIND and ref.get("apiVersion") == API_VERSION:
            name = ref.get("name")
            return name if isinstance(name, str) else None
    labels = meta.get("labels") or {}
    if labels.get(MANAGED_BY_LABEL) == MANAGED_BY and isinstance(labels.get(JOB_LABEL), str):
        return str(labels[JOB_LABEL])
    return None


def dashboard_url(rayjob_status: Mapping[str, Any]) -> str | None:
    """KubeRay reports host:port of the head service; people click URLs."""
    url = rayjob_status.get("dashboardURL")
    if not isinstance(url, str) or not url:
        return None
    return url if "://" in url else f"http://{url}"


def model_uri(job: Mapping[str, Any]) -> str | None:
    path = _mapping(_spec(job).get("output")).get("path")
    if not isinstance(path, str) or not path:
        return None
    return f"{path.rstrip('/')}/model.safetensors"


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
    name = (rayjob.get("metadata") or {}).get("name", "")
    status = rayjob.get("status") or {}
    deployment = str(status.get("jobDeploymentStatus") or "")
    job_status = str(status.get("jobStatus") or "")
    kuberay_message = str(status.get("message") or "")
    rayjob_suspended = bool((rayjob.get("spec") or {}).get("suspend"))

    if deployment == "Complete":
        if job_status in ("FAILED", "STOPPED"):
            reason = "TrainingFailed" if job_status == "FAILED" else "JobStopped"
            return Observation("Failed", reason, kuberay_message or f"The Ray job ended {job_status}")
        where = f"; the model is at {model}" if model else ""
        return Observation("Succeeded", "TrainingSucceeded", f"Training finished{where}")
    if deployment == "Failed":
        reason = FAILURE_REASONS.get(str(status.get("reason") or ""), "RayJobFailed")
        return Observation("Failed", reason, kuberay_message or f"RayJob {name} failed")
    if deployment == "ValidationFailed":
        message = kuberay_message or "KubeRay rejected the RayJob"
        return Observation("Failed", "RayJobValidationFailed", message)

    if suspend_requested:
        if deployment == "Suspended":
            return Observation(
                "Suspended",
                "Suspended",
                "Suspended: the Ray cluster is gone; set spec.runPolicy.suspend to false to resume from the "
                "last checkpoint",
            )
        return Observation("Suspended", "Suspending", "Suspending: KubeRay is stopping the Ray cluster")
    if deployment in ("Suspending", "Suspended"):
        if rayjob_suspended and queue_name:
            return Observation("Pending", "Queued", f"Waiting for Kueue to admit the job (LocalQueue {queue_name})")
        if rayjob_suspended:
            return Observation("Suspended", "Suspended", f"RayJob {name} was suspended outside kubetune")
        return Observation(
            "Launching",
            "Resuming",
            "Resuming: the Ray cluster is starting again; training continues from the last checkpoint",
        )

    if deployment in ("", "New"):
        return Observation("Launching", "RayJobCreated", f"RayJob {name} created; waiting for KubeRay to start it")
    if deployment == "Initializing":
        return Observation("Launching", "ClusterStarting", "The Ray cluster is starting")
    if deployment == "Waiting":
        return Observation("Launching", "WaitingForSubmission", "The Ray cluster is up; waiting to submit the Ray job")
    if deployment == "Retrying":
        failed = status.get("failed") or 0
        return Observation(
            "Launching", "Retrying", f"The Ray job failed ({failed} time(s)); KubeRay is starting a new Ray cluster"
        )
    if deployment == "Running":
        if job_status == "RUNNING" or job_status in ("SUCCEEDED", "FAILED", "STOPPED"):
            url = dashboard_url(status)
            return Observation(
                "Running", "TrainingRunning", "Training is running" + (f"; Ray dashboard: {url}" if url else "")
            )
        return Observation("Launching", "DriverStarting", "The Ray job is submitted; the training driver is starting")

    phase = previous_phase if previous_phase and previous_phase not in TERMINAL_PHASES else "Launching"
    return Observation(
        phase,
        "UnknownRayJobState",
        f"RayJob {name} reports jobDeploymentStatus {deployment!r}, jobStatus {job_status!r}, which this "
        "operator does not know; waiting for a known state",
        warning=True,
    )


def restarts_of(rayjob: Mapping[str, Any]) -> int:
    """Times KubeRay started a new Ray cluster: each failed attempt but a final one."""
    status = rayjob.get("status") or {}
    failed = status.get("failed")
    failed = failed if isinstance(failed, int) and failed > 0 else 0
    if status.get("jobDeploymentStatus") == "Failed":
        return max(failed - 1, 0)
    return failed


# -- composing a status ----------------------------------------------------------------------------------


def set_condition(
    conditions: Iterable[Mapping[str, Any]],
    type_: str,
    status: bool,
    reason: str,
    message: str,
    *,
    generation: int | None,
    now: datetime,
) -> list[dict[str, Any]]:
    """`conditions` with `type_` set; its lastTransitionTime changes only when its status flips."""
    value = "True" if status else "False"
    result: list[dict[str, Any]] = []
    found = False
    for item in conditions:
        current = dict(item)
        if current.get("type") == type_:
            found = True
            moved = current.get("status") != value or not current.get("lastTransitionTime")
            current = {
                "type": type_,
                "status": value,
                "reason": reason,
                "message": clip(message),
                "lastTransitionTime": timestamp(now) if moved else current["lastTransitionTime"],
            }
            if generation is not None:
                current["observedGeneration"] = generation
        result.append(current)
    if not found:
        new: dict[str, Any] = {
            "type": type_,
            "status": value,
            "reason": reason,
            "message": clip(message),
            "lastTransitionTime": timestamp(now),
        }
        if generation is not None:
            new["observedGeneration"] = generation
        result.append(new)
    return result


def _headline(job: Mapping[str, Any]) -> tuple[str | None, str | None]:
    """The phase and the reason that explains it, as last written."""
    phase = phase_of(job)
    holder = {
        "Failed": FAILED,
        "Succeeded": SUCCEEDED,
        "Suspended": SUSPENDED,
        "Pending": LAUNCHED,
    }.get(phase or "", RUNNING)
    found = condition(job, holder) or condition(job, LAUNCHED)
    return phase, (str(found.get("reason")) if found else None)


def _transition(
    job: Mapping[str, Any],
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
    status = _status(job)
    generation = _generation(job)
    phase = observation.phase
    conditions: list[dict[str, Any]] = [dict(c) for c in status.get("conditions") or []]
    present = {c.get("type") for c in conditions}

    def put(type_: str, value: bool, reason: str = observation.reason, message: str = observation.message) -> None:
        nonlocal conditions
        conditions = set_condition(conditions, type_, value, reason, message, generation=generation, now=now)

    if launched is True:
        put(LAUNCHED, True, "RayJobCreated", launched_message)
    elif launched is False:
        put(LAUNCHED, False)
    if launched or RUNNING in present:
        put(RUNNING, phase == "Running")
    if phase == "Suspended" or SUSPENDED in present:
        put(SUSPENDED, phase == "Suspended")
    if phase == "Succeeded":
        put(SUCCEEDED, True)
    if phase == "Failed":
        put(FAILED, True)

    target: dict[str, Any] = {
        "phase": phase,
        "message": clip(observation.message),
        "conditions": conditions,
    }
    if generation is not None:
        target["observedGeneration"] = generation
    if phase == "Running" and not status.get("startTime"):
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
        kind = "Warning" if phase == "Failed" or observation.warning else "Normal"
        all_events.insert(0, Event(kind, observation.reason, clip(observation.message)))
    return StatusChange(patch, tuple(all_events), phase_of(job), phase)


# -- the ways a status changes ---------------------------------------------------------------------------


def waiting(job: Mapping[str, Any], reason: str, message: str, *, now: datetime) -> StatusChange:
    """The job cannot launch yet but may later (KubeRay missing, S3 unreachable): Pending, retried."""
    return _transition(job, Observation("Pending", reason, message, warning=True), now=now, launched=False)


def failed_before_launch(job: Mapping[str, Any], reason: str, message: str, *, now: datetime) -> StatusChange:
    """The job can never launch as written (invalid spec, missing data): Failed, not retried."""
    return _transition(job, Observation("Failed", reason, message), now=now, launched=False)


def follow_rayjob(job: Mapping[str, Any], rayjob: Mapping[str, Any], *, now: datetime) -> StatusChange:
    """The job's status after its RayJob changed; a finished job keeps its outcome."""
    if is_finished(job):
        return NO_CHANGE
    policy = run_policy(job)
    observation = observe_rayjob(
        rayjob,
        previous_phase=phase_of(job),
        suspend_requested=bool(policy.get("suspend")),
        queue_name=policy.get("queueName") or None,
        model=model_uri(job),
    )
    rayjob_status = rayjob.get("status") or {}
    name = str((rayjob.get("metadata") or {}).get("name", ""))
    extra: dict[str, Any] = {"rayJobName": name}
    url = dashboard_url(rayjob_status)
    if url:
        extra["dashboardURL"] = url
    old_restarts = _status(job).get("restarts") or 0
    restarts = max(old_restarts, restarts_of(rayjob))
    extra["restarts"] = restarts
    if observation.phase in TERMINAL_PHASES:
        end = parse_timestamp(rayjob_status.get("endTime"))
        extra["completionTime"] = timestamp(end or now)
    if observation.phase == "Succeeded":
        model = model_uri(job)
        if model:
            extra["model"] = model
    events: list[Event] = []
    if restarts > old_restarts:
        limit = (rayjob.get("spec") or {}).get("backoffLimit", 0)
        events.append(
            Event(
                "Warning",
                "Restarted",
                f"The Ray cluster failed and was started again ({restarts} of {limit} retries used)",
            )
        )
    return _transition(
        job,
        observation,
        now=now,
        launched=True,
        launched_message=f"RayJob {name} runs the job",
        extra=extra,
        events=events,
    )


def rayjob_deleted(job: Mapping[str, Any], rayjob_name: str, *, now: datetime) -> StatusChange:
    """Someone deleted the RayJob of a job that had not finished: the run is gone."""
    if is_finished(job):
        return NO_CHANGE
    message = (
        f"RayJob {rayjob_name} was deleted while the job was {phase_of(job) or 'starting'}; "
        "delete and re-create the FineTuneJob to run it again"
    )
    return _transition(job, Observation("Failed", "RayJobDeleted", message), now=now, launched=None)


def refuse_spec_change(job: Mapping[str, Any], fields: list[str], *, now: datetime) -> StatusChange:
    """A spec edit that cannot apply to a launched or finished job: say so, change nothing else."""
    if is_finished(job):
        message = (
            f"{', '.join(fields)} changed after the job finished ({phase_of(job)}); the change has no effect. "
            "Create a new FineTuneJob to train again."
        )
        reason = "JobFinished"
    else:
        message = (
            f"{', '.join(fields)} changed while the job is {phase_of(job) or 'launching'}; the change is not applied "
            "and the run keeps the spec it was launched with. Revert the change, or delete and re-create the job. "
            "Only spec.runPolicy.suspend and spec.runPolicy.ttlSecondsAfterFinished may change after launch."
        )
        reason = "ImmutableFieldChanged"
    conditions = set_condition(
        _status(job).get("conditions") or [],
        SPEC_CHANGE_REFUSED,
        True,
        reason,
        message,
        generation=_generation(job),
        now=now,
    )
    patch = {"conditions": conditions, **_generation_patch(job)}
    return StatusChange(patch, (Event("Warning", "SpecChangeRefused", clip(message)),))


def _generation_patch(job: Mapping[str, Any]) -> dict[str, Any]:
    generation = _generation(job)
    if generation is None or _status(job).get("observedGeneration") == generation:
        return {}
    return {"observedGeneration": generation}


def observe_generation(job: Mapping[str, Any]) -> StatusChange:
    """A spec edit that needed no other status change (a new TTL) was still seen: say which generation."""
    return StatusChange(_generation_patch(job))


def accept_spec(job: Mapping[str, Any], *, now: datetime) -> StatusChange:
    """The spec matches the run again (a refused edit was reverted): clear the refusal."""
    refused = condition(job, SPEC_CHANGE_REFUSED)
    if not refused or refused.get("status") != "True":
        return observe_generation(job)
    message = "The spec matches the running job again"
    conditions = set_condition(
        _status(job).get("conditions") or [],
        SPEC_CHANGE_REFUSED,
        False,
        "SpecMatchesRun",
        message,
        generation=_generation(job),
        now=now,
    )
    patch = {"conditions": conditions, **_generation_patch(job)}
    return StatusChange(patch, (Event("Normal", "SpecMatchesRun", message),))


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


def expiry_delay(job: Mapping[str, Any], *, now: datetime) -> float | None:
    """Seconds until a finished job's ttlSecondsAfterFinished runs out (0 when due); None if it never expires."""
    ttl = run_policy(job).get("ttlSecondsAfterFinished")
    if not isinstance(ttl, int) or isinstance(ttl, bool) or not is_finished(job):
        return None
    finished = parse_timestamp(_status(job).get("completionTime"))
    if finished is None:
        return None
    return max((finished + timedelta(seconds=ttl) - now).total_seconds(), 0.0)
