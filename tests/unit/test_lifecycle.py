"""RayJob status → the FineTuneJob's phase, conditions, times and events, as `kubectl` users see them."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta
from typing import Any

import jsonschema
import pytest
import yaml

from kubetune_operator import lifecycle
from kubetune_operator.incoming import InvalidJob, JobRecord, receive
from kubetune_operator.lifecycle import StatusChange
from kubetune_operator.states import Reason
from tests.support.paths import REPO

T0 = datetime(2026, 5, 1, 12, 0, 0, tzinfo=UTC)
OWNER = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "name": "flowers",
    "uid": "u-1",
    "controller": True,
}


def ftj(status: dict[str, Any] | None = None, generation: int = 1, **run_policy: Any) -> JobRecord:
    record = receive(
        {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": "flowers", "namespace": "vision", "uid": "u-1", "generation": generation},
            "spec": {
                "model": {"architecture": "resnet18", "checkpoint": "s3://models/resnet18.safetensors"},
                "data": {"train": "s3://datasets/flowers/train/"},
                "output": {"path": "s3://runs/flowers/"},
                "runPolicy": run_policy,
            },
            "status": status or {},
        }
    )
    assert not isinstance(record.job, InvalidJob), record.job.message
    return record


def rayjob(deployment: str = "", job_status: str = "", suspend: bool = False, **status: Any) -> dict[str, Any]:
    st: dict[str, Any] = {"jobDeploymentStatus": deployment, "jobStatus": job_status, **status}
    return {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": "flowers", "namespace": "vision", "ownerReferences": [OWNER]},
        "spec": {"suspend": suspend, "backoffLimit": 2},
        "status": {k: v for k, v in st.items() if v != ""},
    }


def apply(job: JobRecord, change: StatusChange) -> JobRecord:
    """The job as the API server holds it after the merge patch."""
    return job.with_status({**job.status, **change.patch})


def conditions(job: JobRecord) -> dict[str, dict[str, Any]]:
    return {c["type"]: c for c in job.status.get("conditions", [])}


def observe(rj: dict[str, Any], **kw: Any) -> tuple[str, str]:
    args: dict[str, Any] = {
        "previous_phase": "Launching",
        "suspend_requested": False,
        "queue_name": None,
        "model": None,
    }
    args.update(kw)
    obs = lifecycle.observe_rayjob(rj, **args)
    return obs.phase, obs.reason


# -- the table -------------------------------------------------------------------------------------------

TABLE = [
    # (jobDeploymentStatus, jobStatus, phase, reason)
    ("", "", "Launching", "RayJobCreated"),
    ("New", "", "Launching", "RayJobCreated"),
    ("Initializing", "", "Launching", "ClusterStarting"),
    ("Waiting", "", "Launching", "WaitingForSubmission"),
    ("Running", "PENDING", "Launching", "DriverStarting"),
    ("Running", "", "Launching", "DriverStarting"),
    ("Running", "RUNNING", "Running", "TrainingRunning"),
    ("Running", "SUCCEEDED", "Running", "TrainingRunning"),
    ("Retrying", "FAILED", "Launching", "Retrying"),
    ("Complete", "SUCCEEDED", "Succeeded", "TrainingSucceeded"),
    ("Complete", "FAILED", "Failed", "TrainingFailed"),
    ("Complete", "STOPPED", "Failed", "JobStopped"),
    ("Failed", "FAILED", "Failed", "RayJobFailed"),
    ("ValidationFailed", "", "Failed", "RayJobValidationFailed"),
    ("Suspending", "", "Launching", "Resuming"),
    ("Suspended", "", "Launching", "Resuming"),
]


@pytest.mark.parametrize(("deployment", "job_status", "phase", "reason"), TABLE)
def test_rayjob_states_map_to_phases(deployment: str, job_status: str, phase: str, reason: str) -> None:
    assert observe(rayjob(deployment, job_status)) == (phase, reason)


@pytest.mark.parametrize(
    ("kuberay_reason", "reason"),
    [
        ("DeadlineExceeded", "DeadlineExceeded"),
        ("AppFailed", "TrainingFailed"),
        ("SubmissionFailed", "SubmissionFailed"),
        ("SomethingNew", "RayJobFailed"),
    ],
)
def test_failure_reasons_say_why(kuberay_reason: str, reason: str) -> None:
    rj = rayjob("Failed", "FAILED", reason=kuberay_reason, message="the job ran out of time")
    obs = lifecycle.observe_rayjob(rj, previous_phase="Running", suspend_requested=False, queue_name=None, model=None)
    assert (obs.phase, obs.reason, obs.message) == ("Failed", reason, "the job ran out of time")


def test_a_cluster_that_never_started_says_why_and_where_to_look() -> None:
    rj = rayjob(
        "Failed",
        reason="PreRunningDeadlineExceeded",
        message="The RayJob has passed the preRunningDeadlineSeconds.",
        rayClusterName="flowers-x7k2p",
    )
    obs = lifecycle.observe_rayjob(rj, previous_phase="Launching", suspend_requested=False, queue_name=None, model=None)
    assert (obs.phase, obs.reason) == ("Failed", "StartDeadlineExceeded")
    assert "runPolicy.startDeadlineSeconds" in obs.message and "not enough free GPUs" in obs.message
    assert "kubectl -n vision describe pods -l ray.io/cluster=flowers-x7k2p" in obs.message
    assert obs.message.endswith("KubeRay: The RayJob has passed the preRunningDeadlineSeconds.")


@pytest.mark.parametrize("previous", ["Running", "Suspended", None, "Succeeded"])
def test_unknown_states_never_end_the_job(previous: str | None) -> None:
    phase, reason = observe(rayjob("Exploding", "WEIRD"), previous_phase=previous)
    assert reason == "UnknownRayJobState"
    assert phase == (previous if previous in ("Running", "Suspended") else "Launching")


def test_suspension_requested_shows_suspending_then_suspended() -> None:
    assert observe(rayjob("Running", "RUNNING", suspend=True), suspend_requested=True) == ("Suspended", "Suspending")
    assert observe(rayjob("Suspending", suspend=True), suspend_requested=True) == ("Suspended", "Suspending")
    assert observe(rayjob("Suspended", suspend=True), suspend_requested=True) == ("Suspended", "Suspended")
    # A run that finished while being suspended keeps its outcome.
    assert observe(rayjob("Complete", "SUCCEEDED"), suspend_requested=True) == ("Succeeded", "TrainingSucceeded")


def test_a_job_waiting_for_kueue_is_pending_queued() -> None:
    assert observe(rayjob("Suspended", suspend=True), queue_name="gpu") == ("Pending", "Queued")
    assert observe(rayjob("Suspended", suspend=True)) == ("Suspended", "Suspended")


# -- following a RayJob ----------------------------------------------------------------------------------


def run_through(states: list[tuple[str, str]], job: JobRecord | None = None, **extra: Any) -> list[Any]:
    """Feed RayJob states one by one; the (phase, events) after each."""
    job = job or ftj({"phase": "Launching"})
    seen = []
    for i, (deployment, job_status) in enumerate(states):
        change = lifecycle.follow_rayjob(job, rayjob(deployment, job_status, **extra), now=T0 + timedelta(minutes=i))
        job = apply(job, change)
        seen.append((job.status["phase"], [(e.type, e.reason) for e in change.events]))
    return [job, seen]


def test_a_succeeded_job_names_the_best_epoch_the_trainer_exported() -> None:
    """status.model says which epoch was exported (the best by selectBy, from the last progress update)."""
    progress = {"epoch": 3, "step": 9, "bestEpoch": 2, "updatedAt": "2026-05-01T12:02:00Z"}
    job, _ = run_through([("Complete", "SUCCEEDED")], ftj({"phase": "Running", "progress": progress}))
    assert job.status["model"]["bestEpoch"] == 2 and job.status["model"]["selectBy"] == "valAccuracy"
    assert job.status["model"]["report"] == "s3://runs/flowers/report.html"


def test_a_successful_run_tells_its_story_in_events() -> None:
    job, seen = run_through(
        [
            ("New", ""),
            ("Initializing", ""),
            ("Running", "PENDING"),
            ("Running", "RUNNING"),
            ("Running", "RUNNING"),
            ("Complete", "SUCCEEDED"),
        ],
        dashboardURL="flowers-head-svc.vision.svc.cluster.local:8265",
    )
    assert seen == [
        ("Launching", [("Normal", "RayJobCreated")]),
        ("Launching", [("Normal", "ClusterStarting")]),
        ("Launching", [("Normal", "DriverStarting")]),
        ("Running", [("Normal", "TrainingRunning")]),
        ("Running", []),
        ("Succeeded", [("Normal", "TrainingSucceeded")]),
    ]
    status = job.status
    assert status["startTime"] == "2026-05-01T12:03:00Z"
    assert status["completionTime"] == "2026-05-01T12:05:00Z"
    assert status["dashboardURL"] == "http://flowers-head-svc.vision.svc.cluster.local:8265"
    assert status["rayJobName"] == "flowers"
    assert status["model"] == {
        "uri": "s3://runs/flowers/model.safetensors",
        "card": "s3://runs/flowers/model.json",
        "report": "s3://runs/flowers/report.html",
        "evaluation": "s3://runs/flowers/evaluation.json",
        "selectBy": "valAccuracy",
    }
    assert status["restarts"] == 0
    assert status["observedGeneration"] == 1
    conds = conditions(job)
    assert {t: c["status"] for t, c in conds.items()} == {"Launched": "True", "Running": "False", "Succeeded": "True"}
    assert conds["Launched"]["reason"] == "RayJobCreated"
    assert "Failed" not in conds


def test_last_transition_time_moves_only_when_a_condition_flips() -> None:
    job, _ = run_through([("New", ""), ("Initializing", ""), ("Running", "PENDING")])
    conds = conditions(job)
    # Running stayed False through three states; it flipped at none of them after the first.
    assert conds["Running"]["lastTransitionTime"] == "2026-05-01T12:00:00Z"
    assert conds["Running"]["reason"] == "DriverStarting"
    job = apply(job, lifecycle.follow_rayjob(job, rayjob("Running", "RUNNING"), now=T0 + timedelta(hours=1)))
    assert conditions(job)["Running"]["lastTransitionTime"] == "2026-05-01T13:00:00Z"
    assert conditions(job)["Launched"]["lastTransitionTime"] == "2026-05-01T12:00:00Z"


def test_conditions_carry_the_generation_they_saw() -> None:
    job = ftj({"phase": "Launching"}, generation=7)
    job = apply(job, lifecycle.follow_rayjob(job, rayjob("Running", "RUNNING"), now=T0))
    assert {c["observedGeneration"] for c in job.status["conditions"]} == {7}
    assert job.status["observedGeneration"] == 7


def test_an_unchanged_rayjob_writes_nothing() -> None:
    job, _ = run_through([("Running", "RUNNING")])
    again = lifecycle.follow_rayjob(job, rayjob("Running", "RUNNING"), now=T0 + timedelta(hours=2))
    assert not again


def test_a_failed_run_is_a_warning_and_final() -> None:
    job, seen = run_through([("Running", "RUNNING"), ("Failed", "FAILED")])
    assert seen[-1] == ("Failed", [("Warning", "RayJobFailed")])
    assert conditions(job)["Failed"]["status"] == "True"
    assert job.status["completionTime"]
    # Whatever KubeRay says afterwards, the outcome stays.
    assert not lifecycle.follow_rayjob(job, rayjob("Running", "RUNNING"), now=T0 + timedelta(hours=1))


def test_completion_time_is_kuberays_end_time_when_it_has_one() -> None:
    job = ftj({"phase": "Running"})
    change = lifecycle.follow_rayjob(job, rayjob("Complete", "SUCCEEDED", endTime="2026-05-01T11:59:00Z"), now=T0)
    assert change.patch["completionTime"] == "2026-05-01T11:59:00Z"


def test_restarts_count_each_new_ray_cluster_with_an_event() -> None:
    job = ftj({"phase": "Running"})
    job = apply(job, change := lifecycle.follow_rayjob(job, rayjob("Retrying", "FAILED", failed=1), now=T0))
    assert job.status["restarts"] == 1
    assert ("Warning", "Restarted") in [(e.type, e.reason) for e in change.events]
    job = apply(job, lifecycle.follow_rayjob(job, rayjob("Running", "RUNNING", failed=1), now=T0))
    job = apply(job, change := lifecycle.follow_rayjob(job, rayjob("Failed", "FAILED", failed=3), now=T0))
    # Three failed attempts: two restarts, then the final failure.
    assert job.status["restarts"] == 2
    assert job.status["phase"] == "Failed"


def test_suspend_and_resume() -> None:
    job = ftj({"phase": "Running"}, suspend=True)
    job = apply(job, change := lifecycle.follow_rayjob(job, rayjob("Running", "RUNNING", suspend=True), now=T0))
    assert (job.status["phase"], [e.reason for e in change.events]) == ("Suspended", ["Suspending"])
    job = apply(job, change := lifecycle.follow_rayjob(job, rayjob("Suspended", suspend=True), now=T0))
    assert [e.reason for e in change.events] == ["Suspended"]
    assert conditions(job)["Suspended"]["status"] == "True"
    job = ftj(dict(job.status), suspend=False)  # resumed: spec.runPolicy.suspend edited back to false
    job = apply(job, lifecycle.follow_rayjob(job, rayjob("Suspended", suspend=False), now=T0))
    assert (job.status["phase"], conditions(job)["Suspended"]["status"]) == ("Launching", "False")
    job = apply(job, lifecycle.follow_rayjob(job, rayjob("Running", "RUNNING"), now=T0))
    assert job.status["phase"] == "Running"


def test_a_deleted_rayjob_fails_an_unfinished_job_only() -> None:
    job = ftj({"phase": "Running"})
    change = lifecycle.rayjob_deleted(job, "flowers", now=T0)
    assert (change.new_phase, change.events[0].reason) == ("Failed", "RayJobDeleted")
    assert not lifecycle.rayjob_deleted(ftj({"phase": "Succeeded"}), "flowers", now=T0)


# -- before launch ---------------------------------------------------------------------------------------


def test_invalid_spec_fails_with_the_message_and_completion_time() -> None:
    change = lifecycle.failed_before_launch(ftj(), Reason.INVALID_SPEC, "spec.training.epochs: must be >= 1", now=T0)
    job = apply(ftj(), change)
    assert job.status["phase"] == "Failed"
    assert job.status["completionTime"] == "2026-05-01T12:00:00Z"
    conds = conditions(job)
    assert conds["Failed"]["reason"] == conds["Launched"]["reason"] == "InvalidSpec"
    assert conds["Launched"]["status"] == "False"
    assert "spec.training.epochs" in conds["Failed"]["message"]
    assert [(e.type, e.reason) for e in change.events] == [("Warning", "InvalidSpec")]


def test_waiting_is_pending_with_an_event_only_when_the_reason_changes() -> None:
    job = ftj()
    job = apply(job, first := lifecycle.waiting(job, Reason.KUBERAY_NOT_INSTALLED, "install KubeRay", now=T0))
    again = lifecycle.waiting(job, Reason.KUBERAY_NOT_INSTALLED, "install KubeRay", now=T0 + timedelta(minutes=1))
    assert job.status["phase"] == "Pending"
    assert [(e.type, e.reason) for e in first.events] == [("Warning", "KubeRayNotInstalled")]
    assert not again
    # Once KubeRay is there, the launch creates the RayJob and the status follows it.
    job = apply(job, launched := lifecycle.follow_rayjob(job, rayjob(), now=T0))
    assert (job.status["phase"], conditions(job)["Launched"]["status"]) == ("Launching", "True")
    assert [(e.type, e.reason) for e in launched.events] == [("Normal", "RayJobCreated")]


def test_messages_are_clipped() -> None:
    change = lifecycle.failed_before_launch(ftj(), Reason.INVALID_SPEC, "x" * 100_000, now=T0)
    assert len(change.patch["message"]) <= lifecycle.MAX_MESSAGE
    assert len(change.events[0].message) <= lifecycle.MAX_MESSAGE


# -- spec edits ------------------------------------------------------------------------------------------


def test_changed_spec_fields_from_a_kopf_diff() -> None:
    diff = [
        ("change", ("spec", "model", "checkpoint"), "s3://a/x.pt", "s3://a/y.pt"),
        ("add", ("spec", "runPolicy"), None, {"suspend": True, "ttlSecondsAfterFinished": 60}),
        ("change", ("metadata", "labels", "team"), "a", "b"),
    ]
    fields = lifecycle.changed_spec_fields(diff)
    assert fields == ["spec.model.checkpoint", "spec.runPolicy.suspend", "spec.runPolicy.ttlSecondsAfterFinished"]
    assert [f for f in fields if not lifecycle.is_mutable(f)] == ["spec.model.checkpoint"]


def test_refusing_and_accepting_a_spec_change() -> None:
    job = ftj({"phase": "Running"})
    refused = lifecycle.refuse_spec_change(job, ["spec.data.train"], now=T0)
    job = apply(job, refused)
    cond = conditions(job)["SpecChangeRefused"]
    assert (cond["status"], cond["reason"]) == ("True", "ImmutableFieldChanged")
    assert "spec.data.train" in cond["message"]
    assert [(e.type, e.reason) for e in refused.events] == [("Warning", "SpecChangeRefused")]
    assert "phase" not in refused.patch
    accepted = lifecycle.accept_spec(job, now=T0 + timedelta(minutes=5))
    job = apply(job, accepted)
    assert conditions(job)["SpecChangeRefused"]["status"] == "False"
    assert not lifecycle.accept_spec(job, now=T0)


def test_a_finished_job_refuses_changes_as_finished() -> None:
    change = lifecycle.refuse_spec_change(ftj({"phase": "Succeeded"}), ["spec.training.epochs"], now=T0)
    assert change.patch["conditions"][0]["reason"] == "JobFinished"


# -- expiry and ownership --------------------------------------------------------------------------------


def test_expiry_counts_from_completion() -> None:
    done = {"phase": "Succeeded", "completionTime": "2026-05-01T12:00:00Z"}
    assert lifecycle.expiry_delay(ftj(done, ttlSecondsAfterFinished=60), now=T0 + timedelta(seconds=15)) == 45
    assert lifecycle.expiry_delay(ftj(done, ttlSecondsAfterFinished=60), now=T0 + timedelta(hours=1)) == 0
    assert lifecycle.expiry_delay(ftj(done), now=T0) is None
    assert lifecycle.expiry_delay(ftj({"phase": "Running"}, ttlSecondsAfterFinished=0), now=T0) is None


def test_owner_of_a_rayjob() -> None:
    assert lifecycle.owner_job_name(rayjob()) == "flowers"
    labelled = {"metadata": {"labels": {"app.kubernetes.io/managed-by": "kubetune", "kubetune.dev/job": "other"}}}
    assert lifecycle.owner_job_name(labelled) == "other"
    assert lifecycle.owner_job_name({"metadata": {"labels": {"kubetune.dev/job": "x"}}}) is None


def test_an_accepted_edit_records_the_generation_it_saw() -> None:
    job = ftj({"phase": "Running", "observedGeneration": 1}, generation=2)
    assert lifecycle.accept_spec(job, now=T0).patch == {"observedGeneration": 2}
    assert not lifecycle.accept_spec(ftj({"phase": "Running", "observedGeneration": 2}, generation=2), now=T0)
    refused = lifecycle.refuse_spec_change(job, ["spec.model.architecture"], now=T0)
    assert refused.patch["observedGeneration"] == 2


# -- progress from the trainer ---------------------------------------------------------------------------

GRACE = 90.0


def running_since_t0() -> JobRecord:
    job, _ = run_through([("Running", "RUNNING")])  # turned Running at T0
    return job


def with_progress(job: JobRecord) -> JobRecord:
    return job.with_status({**job.status, "progress": {"epoch": 1, "step": 3, "updatedAt": "2026-05-01T12:02:00Z"}})


def reporting(job: JobRecord) -> tuple[str, str] | None:
    found = conditions(job).get("ProgressReporting")
    return (found["status"], found["reason"]) if found else None


def test_a_running_job_that_never_reports_says_so_once_the_grace_is_over() -> None:
    job = running_since_t0()
    assert lifecycle.progress_deadline(job, grace=GRACE) == T0 + timedelta(seconds=GRACE)
    assert not lifecycle.progress_reporting(job, now=T0 + timedelta(seconds=60), grace=GRACE)

    silent = lifecycle.progress_reporting(job, now=T0 + timedelta(seconds=91), grace=GRACE)
    job = apply(job, silent)
    assert reporting(job) == ("False", "NoProgressReceived")
    message = conditions(job)["ProgressReporting"]["message"]
    assert "status.progress stays empty" in message and "/var/run/secrets/kubetune.dev/token" in message
    assert [(e.type, e.reason) for e in silent.events] == [("Warning", "NoProgressReceived")]
    assert "phase" not in silent.patch  # the job keeps running: only the condition says it is silent
    # Said once: no second write or Event, and nothing left to wait for.
    assert not lifecycle.progress_reporting(job, now=T0 + timedelta(hours=1), grace=GRACE)
    assert lifecycle.progress_deadline(job, grace=GRACE) is None

    # Then an update arrives after all: the condition flips, with an Event saying so.
    job = with_progress(job)
    heard = lifecycle.progress_reporting(job, now=T0 + timedelta(hours=1), grace=GRACE)
    job = apply(job, heard)
    assert reporting(job) == ("True", "ProgressReceived")
    assert [(e.type, e.reason) for e in heard.events] == [("Normal", "ProgressReceived")]
    assert not lifecycle.progress_reporting(job, now=T0 + timedelta(hours=2), grace=GRACE)


def test_a_job_that_reports_in_time_is_true_without_an_event() -> None:
    job = with_progress(running_since_t0())
    assert lifecycle.progress_deadline(job, grace=GRACE) is None
    change = lifecycle.progress_reporting(job, now=T0 + timedelta(seconds=5), grace=GRACE)
    assert reporting(apply(job, change)) == ("True", "ProgressReceived")
    assert not change.events


def test_progress_is_only_judged_while_running() -> None:
    for status in ({"phase": "Launching"}, {"phase": "Suspended"}, {"phase": "Succeeded"}):
        job = ftj(status)
        assert lifecycle.progress_deadline(job, grace=GRACE) is None
        assert not lifecycle.progress_reporting(job, now=T0 + timedelta(days=1), grace=GRACE)


# -- what the API server will accept ---------------------------------------------------------------------

CRD = REPO / "crds" / "finetunejobs.kubetune.dev.yaml"


def status_schema() -> dict[str, Any]:
    crd = yaml.safe_load(CRD.read_text())
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1alpha1"]
    schema: dict[str, Any] = version["schema"]["openAPIV3Schema"]["properties"]["status"]
    return schema


def test_every_status_written_is_valid_for_the_crd() -> None:
    validator = jsonschema.Draft7Validator(status_schema(), format_checker=jsonschema.FormatChecker())
    statuses = []
    job, _ = run_through([("Running", "RUNNING"), ("Retrying", "FAILED"), ("Complete", "SUCCEEDED")], failed=1)
    statuses.append(job.status)
    job = apply(ftj(), lifecycle.failed_before_launch(ftj(), Reason.INVALID_SPEC, "spec.x: bad", now=T0))
    job = apply(job, lifecycle.refuse_spec_change(job, ["spec.model"], now=T0))
    statuses.append(job.status)
    job = running_since_t0()
    job = apply(job, lifecycle.progress_reporting(job, now=T0 + timedelta(hours=1), grace=GRACE))
    statuses.append(job.status)
    job = running_since_t0()
    job = apply(job, lifecycle.progress_reporting(job, now=T0 + timedelta(hours=1), grace=GRACE))
    statuses.append(job.status)
    job = ftj({"phase": "Running"}, suspend=True)
    job = apply(job, lifecycle.follow_rayjob(job, rayjob("Suspended", suspend=True), now=T0))
    statuses.append(job.status)
    for status in statuses:
        errors = [f"{list(e.absolute_path)}: {e.message}" for e in validator.iter_errors(status)]
        assert not errors, errors
