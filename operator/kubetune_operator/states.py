"""The fixed words of a FineTuneJob's status, and the KubeRay states they follow: one definition each.

Each is a `StrEnum`, so it is written to the status, Events and metrics as its plain value, and a value
read back from the API (a str) compares equal to its member. KubeRay may report a state this operator
does not know: such values stay plain strings, compared against these members, never converted.
"""

from __future__ import annotations

from enum import StrEnum


class Phase(StrEnum):
    """`status.phase`: where a job is in its life."""

    PENDING = "Pending"
    LAUNCHING = "Launching"
    RUNNING = "Running"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SUSPENDED = "Suspended"


PHASES: tuple[Phase, ...] = tuple(Phase)
TERMINAL_PHASES = frozenset({Phase.SUCCEEDED, Phase.FAILED})


class ConditionType(StrEnum):
    """`status.conditions[].type`: one condition per aspect of the job."""

    LAUNCHED = "Launched"
    RUNNING = "Running"
    SUSPENDED = "Suspended"
    SUCCEEDED = "Succeeded"
    FAILED = "Failed"
    SPEC_CHANGE_REFUSED = "SpecChangeRefused"
    PROGRESS_REPORTING = "ProgressReporting"
    PREFLIGHT_CHECKED = "PreflightChecked"  # set (False) only when preflight could not run


class Reason(StrEnum):
    """Why a condition (and the phase) is what it is; also the reason of the Event that says so."""

    # Before launch: the spec, KubeRay, and the S3 preflight (kubetune_operator.s3).
    INVALID_SPEC = "InvalidSpec"
    ENDPOINT_NOT_ALLOWED = "EndpointNotAllowed"  # spec.storage.endpoint is not on the operator's allow-list
    IMAGE_NOT_ALLOWED = "ImageNotAllowed"  # spec.image is not from a registry on it
    KUBERAY_NOT_INSTALLED = "KubeRayNotInstalled"
    STORAGE_UNAVAILABLE = "StorageUnavailable"
    SECRET_NOT_FOUND = "SecretNotFound"
    INVALID_SECRET = "InvalidSecret"
    CHECKPOINT_NOT_FOUND = "CheckpointNotFound"
    DATASET_NOT_FOUND = "DatasetNotFound"
    ACCESS_DENIED = "AccessDenied"
    STORAGE_ERROR = "StorageError"
    CA_BUNDLE_NOT_FOUND = "CABundleNotFound"
    # A Secret or NetworkPolicy of the job's name that another owner holds (a deleted namesake's, still going).
    PREVIOUS_CHILD_STILL_EXISTS = "PreviousChildStillExists"
    SECRET_NOT_READABLE = "SecretNotReadable"  # RBAC: preflight skipped, the job launches unchecked
    # A RayJob of the job's name that is not the job's own (an earlier namesake's, or an orphan).
    PREVIOUS_RAYJOB_STILL_EXISTS = "PreviousRayJobStillExists"
    # Following the RayJob (lifecycle.observe_rayjob).
    RAYJOB_CREATED = "RayJobCreated"
    CLUSTER_STARTING = "ClusterStarting"
    WAITING_FOR_SUBMISSION = "WaitingForSubmission"
    DRIVER_STARTING = "DriverStarting"
    TRAINING_RUNNING = "TrainingRunning"
    RETRYING = "Retrying"
    TRAINING_SUCCEEDED = "TrainingSucceeded"
    TRAINING_FAILED = "TrainingFailed"
    JOB_STOPPED = "JobStopped"
    DEADLINE_EXCEEDED = "DeadlineExceeded"
    START_DEADLINE_EXCEEDED = "StartDeadlineExceeded"  # the Ray cluster never ran the job: GPUs, nodes, images
    SUBMISSION_FAILED = "SubmissionFailed"
    RAYJOB_FAILED = "RayJobFailed"
    RAYJOB_VALIDATION_FAILED = "RayJobValidationFailed"
    RAYJOB_DELETED = "RayJobDeleted"
    UNKNOWN_RAYJOB_STATE = "UnknownRayJobState"
    SUSPENDING = "Suspending"
    SUSPENDED = "Suspended"
    QUEUED = "Queued"
    RESUMING = "Resuming"
    RESTARTED = "Restarted"  # an Event only: KubeRay started a new Ray cluster
    # Spec edits after launch.
    SPEC_CHANGE_REFUSED = "SpecChangeRefused"  # the Event of a refusal
    IMMUTABLE_FIELD_CHANGED = "ImmutableFieldChanged"
    JOB_FINISHED = "JobFinished"
    SPEC_MATCHES_RUN = "SpecMatchesRun"
    # Progress from the trainer.
    NO_PROGRESS_RECEIVED = "NoProgressReceived"
    PROGRESS_RECEIVED = "ProgressReceived"
    PREEMPTED = "Preempted"  # an Event only: Ray Train restarted the workers after a preemption


class JobDeploymentStatus(StrEnum):
    """KubeRay's `RayJob.status.jobDeploymentStatus`: where the Ray cluster and the submission are."""

    NONE = ""  # not reported yet
    NEW = "New"
    INITIALIZING = "Initializing"
    WAITING = "Waiting"
    RUNNING = "Running"
    RETRYING = "Retrying"
    COMPLETE = "Complete"
    FAILED = "Failed"
    VALIDATION_FAILED = "ValidationFailed"
    SUSPENDING = "Suspending"
    SUSPENDED = "Suspended"


class JobStatus(StrEnum):
    """KubeRay's `RayJob.status.jobStatus`: the Ray job's own state (the training driver's)."""

    PENDING = "PENDING"
    RUNNING = "RUNNING"
    STOPPED = "STOPPED"
    SUCCEEDED = "SUCCEEDED"
    FAILED = "FAILED"
