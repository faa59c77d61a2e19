"""The FineTuneJob API (kubetune.dev/v1alpha1): one pydantic model holds every rule.

The sections the trainer also needs come from kubetune_trainer.config; the operator-only sections
(resources, runPolicy, image), the status and the object envelope are defined here. The CRD's schema is
generated from these classes (see crd.py), and `kubetune validate`, `render` and the operator all parse
through `FineTuneJob`.
"""

from __future__ import annotations

import math
from collections.abc import Collection
from datetime import datetime
from typing import TYPE_CHECKING, Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, WithJsonSchema, create_model, model_validator

from kubetune_operator.pod_template import (
    DNS_LABEL,
    LabelKey,
    LabelValue,
    PodTemplate,
    Toleration,
)
from kubetune_operator.states import Phase
from kubetune_trainer.config import (
    DEFAULT_CACHE_SIZE,
    DEFAULT_PREEMPTION_GRACE_S,
    DISK_SIZE_PATTERN,
    DNS_SUBDOMAIN,
    DURATION,
    MAX_PREEMPTION_GRACE_S,
    MAX_WORKERS,
    MIN_PREEMPTION_GRACE_S,
    TASK_CEL_RULES,
    TASK_DESCRIPTION,
    CamelModel,
    DataSpec,
    ModelSpec,
    OutputSpec,
    SpecSection,
    StorageSpec,
    SweepSpec,
    Task,
    TrainingSpec,
    cel,
    check_sections,
    concurrent_trials,
    disk_bytes,
    duration_seconds,
    prefixes_overlap,
    prefixes_overlap_cel,
)
from kubetune_trainer.progress_model import TRIAL_ENDS, ProgressUpdate, SweepProgress, metrics_model

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]
CATEGORIES = ["kubetune"]

# KubeRay names the RayCluster "<rayjob>-<5 chars>" and its head service "<cluster>-head-svc", both
# DNS-1035 labels of at most 63 characters; the RayJob carries the job's name, so the job's name must
# leave that room. KubeRay itself rejects RayJob names over 47 characters.
MAX_NAME_LENGTH = 47
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"
IMAGE_PATTERN = r"^\S+$"
REASON_PATTERN = r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$"
MAX_GPUS_PER_WORKER = 16
INT32_MAX = 2**31 - 1
# runPolicy.keepFailedFor: how long a failed job's Ray head (and the driver's log on it) stays, at most a
# week: it holds a node's CPU and memory (trainer.head in the chart) while nobody may be looking.
KEEP_FAILED_FOR_PATTERN = rf"^({DURATION})$"
DEFAULT_KEEP_FAILED_FOR = "1h"
MAX_KEEP_FAILED_FOR_S = 7 * 24 * 3600
KEEP_FAILED_FOR_MESSAGE = "keepFailedFor must be a duration from 0s to 168h"
KEEP_FAILED_FOR_RULE = cel(
    f"!has(self.keepFailedFor) || duration(self.keepFailedFor) <= duration('{MAX_KEEP_FAILED_FOR_S}s')",
    KEEP_FAILED_FOR_MESSAGE,
    ".keepFailedFor",
)


MIN_IMAGES_PER_WORKER = 2  # per step, when elastic workers split the global batch
MIN_RESIZE_INTERVAL_S, MAX_RESIZE_INTERVAL_S, DEFAULT_RESIZE_INTERVAL_S = 1, 3600, 60
WORKERS_ALLOWED = (
    f"a number of workers from 1 to {MAX_WORKERS}, or {{min: N, max: M}} with 1 <= N <= M <= {MAX_WORKERS}"
)
# The CRD's schema: a number, or an object with min and max (a structural schema cannot type a union, so
# each alternative is value validations that the other kind of value cannot meet: a number's bounds that
# no object has, an object's required keys beside bounds no number meets). The bounds of min and max,
# and min <= max, are the model's (`Workers`), which the operator applies to every job.
WORKERS_SCHEMA: dict[str, Any] = {
    "x-kubernetes-preserve-unknown-fields": True,
    "anyOf": [
        {"minimum": 1, "maximum": MAX_WORKERS, "minProperties": 1, "maxProperties": 0},
        {"minimum": 1, "maximum": 0, "required": ["min", "max"]},
    ],
}


class Workers(SpecSection):
    """How many Ray Train workers: a number (fixed), or `{min, max}` (elastic: training starts once `min`
    workers are placed, grows to `max` as more can be, and shrinks when one is lost, each time resuming
    from the latest checkpoint). A number N is read as min = max = N."""

    min: int = Field(ge=1, le=MAX_WORKERS, description="Workers training needs to start (and to go on).")
    max: int = Field(ge=1, le=MAX_WORKERS, description="Workers training grows to when they can be placed.")
    resize_interval_seconds: int = Field(
        default=DEFAULT_RESIZE_INTERVAL_S,
        ge=MIN_RESIZE_INTERVAL_S,
        le=MAX_RESIZE_INTERVAL_S,
        description=(
            "Elastic only: seconds between checks for more placeable workers while training runs; a resize "
            "restarts the workers from the latest checkpoint."
        ),
    )

    @model_validator(mode="before")
    @classmethod
    def _a_number_or_a_range(cls, value: Any) -> Any:
        if isinstance(value, dict):
            return value
        if isinstance(value, bool) or not isinstance(value, int) or not 1 <= value <= MAX_WORKERS:
            raise ValueError(f"must be {WORKERS_ALLOWED} (got {value!r})")
        return {"min": value, "max": value}

    @model_validator(mode="after")
    def _min_at_most_max(self) -> Workers:
        if self.min > self.max:
            raise ValueError(f"must be {WORKERS_ALLOWED}: min ({self.min}) is more than max ({self.max})")
        return self

    @property
    def elastic(self) -> bool:
        return self.min < self.max


class ResourcesSpec(SpecSection):
    """The Ray cluster's training workers."""

    workers: Annotated[Workers, WithJsonSchema(WORKERS_SCHEMA)] = Field(
        default_factory=lambda: Workers(min=1, max=1),
        description=(
            f"Ray Train workers (one pod each), 1 when omitted: {WORKERS_ALLOWED}. {{min, max}} trains elastically: "
            "it starts once min workers are placed, grows to max as more can be, shrinks when one is lost, each "
            "time from the latest checkpoint, with the global batch batchSize * min kept (docs/trainer.md); "
            f"resizeIntervalSeconds ({MIN_RESIZE_INTERVAL_S}-{MAX_RESIZE_INTERVAL_S}, default "
            f"{DEFAULT_RESIZE_INTERVAL_S}) is how often a running job looks for more."
        ),
    )
    gpus_per_worker: int = Field(
        default=1,
        ge=0,
        le=MAX_GPUS_PER_WORKER,
        description="nvidia.com/gpu per worker pod; 0 trains on CPU.",
    )
    cpus_per_worker: int = Field(default=4, ge=1, le=256, description="CPU cores per worker pod.")
    memory_per_worker: str = Field(
        default="16Gi",
        pattern=QUANTITY_PATTERN,
        max_length=32,
        description="Memory per worker pod, as a Kubernetes quantity (e.g. 16Gi).",
    )
    node_selector: dict[LabelKey, LabelValue] = Field(
        default_factory=dict,
        max_length=64,
        description="Node labels the worker pods must match, e.g. nvidia.com/gpu.product: NVIDIA-H100-80GB-HBM3.",
    )
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations for the worker pods."
    )
    priority_class_name: str | None = Field(
        default=None, pattern=DNS_SUBDOMAIN, max_length=253, description="PriorityClass of all Ray pods."
    )
    cache_size: str = Field(
        default=DEFAULT_CACHE_SIZE,
        pattern=DISK_SIZE_PATTERN,
        description=(
            "Disk for each worker pod's node cache (the dataset's images and the base weights, downloaded once "
            "per node): the size limit of its emptyDir. Each worker pod requests this much ephemeral storage "
            "and 4Gi more for /tmp and Ray's session dir."
        ),
    )


class RunPolicy(SpecSection):
    """Retries, deadlines, suspension, queueing, and what stays after a failure."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [KEEP_FAILED_FOR_RULE]})

    max_retries: int = Field(
        default=3,
        ge=0,
        le=100,
        description="Worker failures Ray Train recovers from its last checkpoint (preemptions are counted apart).",
    )
    max_preemptions: int | None = Field(
        default=None,
        ge=0,
        le=10000,
        description=(
            "Preemptions (a node drained or reclaimed, a pod deleted) the run recovers from, from the checkpoint "
            "it saves when notified; no limit when omitted. They do not count against maxRetries."
        ),
    )
    preemption_grace_seconds: int = Field(
        default=DEFAULT_PREEMPTION_GRACE_S,
        ge=MIN_PREEMPTION_GRACE_S,
        le=MAX_PREEMPTION_GRACE_S,
        description=(
            "Seconds a preempted Ray pod has to checkpoint the current step before it is killed: its "
            "terminationGracePeriodSeconds. The checkpoint must be written and uploaded within it."
        ),
    )
    backoff_limit: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Whole Ray cluster retries after the job fails (KubeRay backoffLimit).",
    )
    active_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=INT32_MAX,
        description="Seconds the run may take before it is stopped and the job fails; no limit when omitted.",
    )
    start_deadline_seconds: int | None = Field(
        default=None,
        ge=1,
        le=INT32_MAX,
        description=(
            "Seconds the Ray cluster may take to start running the job (every pod scheduled with its GPUs, "
            "images pulled), counted from each launch, resume or retry, after a Kueue admission; past it the job "
            "fails with StartDeadlineExceeded (KubeRay's preRunningDeadlineSeconds). No limit when omitted."
        ),
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None,
        ge=0,
        le=INT32_MAX,
        description="Seconds after success or failure before the FineTuneJob is deleted; kept when omitted.",
    )
    suspend: bool = Field(
        default=False,
        description="true stops the Ray cluster; false (again) resumes from the last checkpoint.",
    )
    queue_name: str | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN,
        max_length=63,
        description="Kueue LocalQueue to admit the job through (sets the kueue.x-k8s.io/queue-name label).",
    )
    keep_failed_for: str = Field(
        default=DEFAULT_KEEP_FAILED_FOR,
        pattern=KEEP_FAILED_FOR_PATTERN,
        max_length=24,
        description=(
            "How long the Ray head of a failed job stays, with the driver's log on it (status.logs says how to "
            "read it), e.g. 30m or 2h (from 0s to 168h); the workers go at once, and the head after this. A job "
            "that succeeds keeps nothing. Through KubeRay's deletionRules: when the operator runs without them "
            "(a queued job, or trainer.keepFailedHeads false) the whole Ray cluster goes when the job ends."
        ),
    )

    @model_validator(mode="after")
    def _keep_failed_for_bounded(self) -> RunPolicy:
        if self.keep_failed_for_s > MAX_KEEP_FAILED_FOR_S:
            raise ValueError(f"keepFailedFor: must be a duration from 0s to 168h (got {self.keep_failed_for})")
        return self

    @property
    def keep_failed_for_s(self) -> int:
        """Seconds a failed job's Ray head stays."""
        return duration_seconds(self.keep_failed_for)


class FineTuneJobSpec(SpecSection):
    """What to fine-tune, on what data, how, with which resources, and where the results go."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [
                cel(
                    f"!({prefixes_overlap_cel('self.output.path', 'self.data.train')})",
                    "output.path must not overlap data.train: checkpoints and results would be read as training images",
                    ".output.path",
                ),
                cel(
                    f"!has(self.data.validation) || !({prefixes_overlap_cel('self.output.path', 'self.data.validation')})",
                    "output.path must not overlap data.validation: checkpoints and results would be read as validation images",
                    ".output.path",
                ),
                cel(
                    f"!has(self.data.test) || !({prefixes_overlap_cel('self.output.path', 'self.data.test')})",
                    "output.path must not overlap data.test: checkpoints and results would be read as test images",
                    ".output.path",
                ),
                *TASK_CEL_RULES,
                cel(
                    "!has(self.resources.priorityClassName) || "
                    + " && ".join(
                        f"!has(self.podTemplate{r}.spec.priorityClassName)" for r in ("", ".head", ".workers")
                    ),
                    "podTemplate.spec.priorityClassName: resources.priorityClassName says it already; set one of them",
                    ".podTemplate.spec.priorityClassName",
                ),
            ]
        }
    )

    task: Task = Field(default="classification", description=TASK_DESCRIPTION)
    model: ModelSpec = Field(description="The model, its base weights and the fine-tuning strategy.")
    data: DataSpec = Field(description="The dataset in S3.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Training hyperparameters.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Workers and their resources.")
    output: OutputSpec = Field(description="Where checkpoints and the exported model go.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3 endpoint and credentials.")
    sweep: SweepSpec | None = Field(
        default=None,
        description="A hyperparameter sweep: trials of this spec with other values of some fields (Ray Tune); the "
        "best trial's model is exported. See docs/sweeps.md.",
    )
    run_policy: RunPolicy = Field(
        default_factory=RunPolicy,
        description="Retries, deadlines, suspension, queueing, and how long a failed job's Ray head stays.",
    )
    image: str | None = Field(
        default=None,
        min_length=1,
        max_length=512,
        pattern=IMAGE_PATTERN,
        description="Trainer image override; the operator's configured trainer image when omitted.",
    )
    pod_template: PodTemplate = Field(
        default_factory=PodTemplate,
        description=(
            "Additions to every Ray pod (labels, scheduling, identity, volumes, env), with head and workers for "
            "what differs; what the operator owns is refused."
        ),
    )

    @model_validator(mode="after")
    def _one_priority_class(self) -> FineTuneJobSpec:
        template = self.pod_template
        said = [template.spec, template.head.spec, template.workers.spec]
        if self.resources.priority_class_name and any(s.priority_class_name for s in said):
            raise ValueError(
                "podTemplate.spec.priorityClassName: resources.priorityClassName says it already; set one of them"
            )
        return self

    @model_validator(mode="after")
    def _output_apart_from_data(self) -> FineTuneJobSpec:
        data = self.data
        for field, prefix in (
            ("data.train", data.train),
            ("data.validation", data.validation),
            ("data.test", data.test),
        ):
            if prefix and prefixes_overlap(self.output.path, prefix):
                raise ValueError(
                    f"output.path: must not overlap {field} ({prefix}): checkpoints and results would be read "
                    f"as images (got {self.output.path})"
                )
        return self

    @model_validator(mode="after")
    def _global_batch_feeds_every_worker(self) -> FineTuneJobSpec:
        workers, batch = self.resources.workers, self.training.batch_size
        if workers.elastic and batch * workers.min < MIN_IMAGES_PER_WORKER * workers.max:
            raise ValueError(
                f"training.batchSize: with elastic workers the global batch, batchSize * workers.min "
                f"({batch} * {workers.min}), is split among up to workers.max ({workers.max}) workers and must "
                f"give each at least {MIN_IMAGES_PER_WORKER} images (BatchNorm): at least "
                f"{math.ceil(MIN_IMAGES_PER_WORKER * workers.max / workers.min)}"
            )
        return self

    @model_validator(mode="after")
    def _image_cache_fits_the_volume(self) -> FineTuneJobSpec:
        limit, volume = self.data.cache.size_limit, self.resources.cache_size
        if limit is not None and disk_bytes(limit) > disk_bytes(volume):
            raise ValueError(
                f"data.cache.sizeLimit: must be at most resources.cacheSize ({volume}), the node cache's volume that "
                f"holds the images (got {limit})"
            )
        return self

    @model_validator(mode="after")
    def _fields_fit_the_task(self) -> FineTuneJobSpec:
        check_sections(self.task, self.model, self.data, self.training, self.sweep)
        return self

    @model_validator(mode="after")
    def _sweep_fits_one_ray_cluster(self) -> FineTuneJobSpec:
        # Python only: the CRD's schema cannot type resources.workers (a number or {min, max}), so no CEL
        # rule can read it (see WORKERS_SCHEMA).
        if self.sweep is None:
            return self
        workers = self.resources.workers
        if workers.elastic:
            raise ValueError(
                f"resources.workers: a sweep (spec.sweep) needs a fixed number of workers per trial, not elastic "
                f"{{min: {workers.min}, max: {workers.max}}}: set resources.workers to one number from 1 to "
                f"{MAX_WORKERS}"
            )
        if workers.min * self.concurrent_trials > MAX_WORKERS:
            raise ValueError(
                f"sweep.maxConcurrentTrials: each trial at once takes resources.workers ({workers.min}) workers, and "
                f"resources.workers * maxConcurrentTrials must be at most {MAX_WORKERS} (the most workers of a Ray "
                f"cluster): at most {MAX_WORKERS // workers.min} with {workers.min} workers per trial "
                f"(got {self.sweep.max_concurrent_trials})"
            )
        return self

    @property
    def concurrent_trials(self) -> int:
        """Runs that train at once: a sweep's maxConcurrentTrials (at most its trials: check_sweep), else 1."""
        return concurrent_trials(self.sweep)

    @property
    def cluster_workers(self) -> Workers:
        """The Ray cluster's worker pods: resources.workers for each run that trains at once (a sweep's
        concurrent trials). The one place the count is derived: the RayJob's worker group, the launch's log
        line and `kubetune render`'s sweep plan read it here."""
        workers, runs = self.resources.workers, self.concurrent_trials
        return workers.model_copy(update={"min": workers.min * runs, "max": workers.max * runs})


class ObjectMeta(BaseModel):
    """The parts of metadata the operator relies on; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(
        min_length=1,
        max_length=MAX_NAME_LENGTH,
        pattern=NAME_PATTERN,
        description=(
            f"The job's name: at most {MAX_NAME_LENGTH} characters, because KubeRay derives the Ray cluster's "
            "and its services' names from it."
        ),
    )
    namespace: str | None = Field(default=None, pattern=DNS_LABEL, max_length=63)
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


# -- status: written by the operator only. ---------------------------------------------------------------


class StatusModel(CamelModel):
    """A part of the status: lenient on read, so fields a newer or older operator wrote never fail a job."""

    model_config = ConfigDict(extra="ignore")


class Condition(StatusModel):
    """A status condition following the Kubernetes API conventions."""

    type: str = Field(max_length=316, description="Condition type in CamelCase, e.g. Ready, Running, Failed.")
    status: Literal["True", "False", "Unknown"] = Field(description="True, False or Unknown.")
    reason: str = Field(
        pattern=REASON_PATTERN,
        max_length=1024,
        description="Why the condition last changed, as a CamelCase word (e.g. CheckpointNotFound, InvalidSpec).",
    )
    message: str = Field(default="", max_length=32768, description="What happened, for people.")
    last_transition_time: datetime = Field(description="When the condition's status last changed.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation the condition was computed from."
    )


def optional_fields(model: type[BaseModel], *, without: Collection[str] = ()) -> dict[str, Any]:
    """`model`'s fields, each optional (default None) with its rules and description: for a model that
    holds what `model` said last, in part (create_model's field definitions)."""
    fields: dict[str, Any] = {}
    for name, info in model.model_fields.items():
        if name in without:
            continue
        kind: Any = Annotated[(info.annotation, *info.metadata)] if info.metadata else info.annotation
        fields[name] = (kind | None, Field(default=None, description=info.description))
    return fields


def status_model(name: str, doc: str, fields: dict[str, Any]) -> type[StatusModel]:
    """A part of the status built from the contract's model (`fields`, as `optional_fields` gives them)."""
    return create_model(name, __base__=StatusModel, __module__=__name__, __doc__=doc, **fields)


# status.progress: what the trainer last reported (the contract's ProgressUpdate, but for the trainer's own
# phase), read leniently as the rest of the status is, and when the operator accepted it.
_STATUS_METRICS = metrics_model("ProgressMetrics", StatusModel, "The latest training metrics the trainer reported.")
_PROGRESS_FIELDS: dict[str, Any] = {
    # A sweep's trials go to status.sweep, beside progress (which follows the sweep's best trial).
    **optional_fields(ProgressUpdate, without=("phase", "sweep")),
    "metrics": (_STATUS_METRICS | None, Field(default=None, description="The latest training metrics.")),
    "updated_at": (datetime | None, Field(default=None, description="When the operator accepted this update.")),
}
# status.sweep: a sweep's trials by state and its best trial, as the trainer last reported them (the
# contract's SweepProgress), and `finished`, which the operator adds for the Trials printer column.
FINISHED_STATES = TRIAL_ENDS  # SweepProgress's counts of ended trials
_FINISHED = "Trials finished (done, stopped early or failed) of all, e.g. 3/8 (the Trials column)."
_SWEEP_FIELDS: dict[str, Any] = {
    **optional_fields(SweepProgress),
    "finished": (str | None, Field(default=None, max_length=16, description=_FINISHED)),
}
if TYPE_CHECKING:  # built from the contract's models; for mypy, StatusModels
    ProgressStatus = StatusModel
    SweepStatus = StatusModel
else:
    ProgressStatus = status_model(
        "ProgressStatus", "How far training is, as the trainer last reported it.", _PROGRESS_FIELDS
    )
    SweepStatus = status_model(
        "SweepStatus", "Where a sweep is: its trials by state and the best so far.", _SWEEP_FIELDS
    )


class ModelStatus(StatusModel):
    """Where a successful job left its model, and which epoch it is."""

    uri: str = Field(description="s3:// URI of the exported weights (model.safetensors).")
    card: str | None = Field(
        default=None, description="s3:// URI of model.json: classes, exact preprocessing, metrics, exports."
    )
    report: str | None = Field(
        default=None,
        description="s3:// URI of report.html: the evaluation of the exported model on the test set (or validation).",
    )
    evaluation: str | None = Field(default=None, description="s3:// URI of evaluation.json: the report's figures.")
    best_epoch: int | None = Field(
        default=None, ge=1, description="The epoch whose checkpoint was exported: the best by selectBy."
    )
    select_by: str | None = Field(
        default=None, description="The validation figure that picked it (spec.training.selectBy or the task's default)."
    )


class FineTuneJobStatus(StatusModel):
    """What the operator observed: the job's phase, history and progress."""

    phase: Phase | None = Field(
        default=None,
        description=(
            "Pending (accepted, not yet launched), Launching (Ray cluster starting), Running (training), "
            "Succeeded, Failed or Suspended."
        ),
    )
    conditions: list[Condition] = Field(
        default_factory=list,
        description="The latest observation of each aspect of the job (Kubernetes API conventions).",
        json_schema_extra={"x-kubernetes-list-type": "map", "x-kubernetes-list-map-keys": ["type"]},
    )
    progress: ProgressStatus | None = Field(default=None, description="Training progress and latest metrics.")
    sweep: SweepStatus | None = Field(
        default=None,
        description="Sweeps only (spec.sweep): the trials by state and the best trial so far, as the trainer last "
        "reported them; kept when the job ends.",
    )
    ray_job_name: str | None = Field(default=None, description="Name of the KubeRay RayJob that runs the training.")
    dashboard_url: str | None = Field(
        default=None, alias="dashboardURL", description="URL of the Ray dashboard of the job's cluster."
    )
    latest_checkpoint: str | None = Field(
        default=None, description="s3:// URI of the newest checkpoint; a resumed run continues from it."
    )
    model: ModelStatus | None = Field(
        default=None, description="The exported model and its report, once the job succeeded."
    )
    logs: str | None = Field(
        default=None,
        max_length=1024,
        description=(
            "The command that prints the training driver's log, while the job's Ray head runs: during the run, "
            "and after a failure for runPolicy.keepFailedFor (the Failed condition says until when)."
        ),
    )
    start_time: datetime | None = Field(default=None, description="When training started.")
    completion_time: datetime | None = Field(default=None, description="When the job succeeded or failed.")
    preflight: str | None = Field(
        default=None,
        max_length=4096,
        description=(
            "Set when the S3 inputs were not checked before launch because storage.credentialsSecret is not "
            "set: the pods' own cloud identity reads S3, which the operator cannot check as."
        ),
    )
    restarts: int | None = Field(
        default=None,
        ge=0,
        description=(
            "Times KubeRay started a new Ray cluster after a failed run (runPolicy.backoffLimit). Training "
            "workers that Ray Train restarts inside a run (runPolicy.maxRetries) are not counted."
        ),
    )
    message: str | None = Field(default=None, max_length=32768, description="The latest event, for people.")
    observed_generation: int | None = Field(
        default=None, ge=0, description="The metadata.generation the operator last acted on."
    )


class FineTuneJob(BaseModel):
    """A whole FineTuneJob object as written in YAML."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["kubetune.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta = Field(description="The object's metadata; its name names the job's Ray cluster too")
    spec: FineTuneJobSpec = Field(description="What to fine-tune, on what data, how, and where the results go")
    status: FineTuneJobStatus | None = Field(default=None, description="What the operator observed; written by it")

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> FineTuneJob:
        """Parse a manifest or a kopf body (which carries status and server-set metadata).

        Only the camelCase names count: the snake_case ones Python code may use are unknown to the CRD, so
        the API server would drop them (a silently ignored `learning_rate`); here they are unknown fields.
        """
        return cls.model_validate(dict(body), by_name=False)
