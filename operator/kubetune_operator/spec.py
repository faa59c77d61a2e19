"""The FineTuneJob API (kubetune.dev/v1alpha1): one pydantic model holds every rule.

The sections the trainer also needs come from kubetune_trainer.config; the operator-only sections
(resources, runPolicy, image) and the object envelope are defined here. The CRD's schema is generated
from these classes (see crd.py), and `kubetune validate`, `render` and the operator all parse through
`FineTuneJob`.
"""

from __future__ import annotations

from datetime import datetime
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, model_validator

from kubetune_trainer.config import (
    CamelModel,
    DataSpec,
    ModelSpec,
    OutputSpec,
    StorageSpec,
    TrainingSpec,
)

GROUP = "kubetune.dev"
VERSION = "v1alpha1"
API_VERSION = f"{GROUP}/{VERSION}"
KIND = "FineTuneJob"
PLURAL = "finetunejobs"
SINGULAR = "finetunejob"
SHORT_NAMES = ["ftj"]

# KubeRay names the RayCluster "<rayjob>-<5 chars>" and its head service "<cluster>-head-svc", both
# DNS-1035 labels of at most 63 characters; the RayJob carries the job's name, so the job's name must
# leave that room. KubeRay itself rejects RayJob names over 47 characters.
MAX_NAME_LENGTH = 47
NAME_PATTERN = r"^[a-z]([-a-z0-9]*[a-z0-9])?$"
DNS_LABEL = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?$"
QUANTITY_PATTERN = r"^[0-9]+(\.[0-9]+)?(Ki|Mi|Gi|Ti|Pi|k|M|G|T|P)?$"
MAX_GPUS_PER_WORKER = 16
MAX_WORKERS = 256


class Toleration(CamelModel):
    """A Kubernetes toleration, passed through to the worker pods."""

    key: str | None = Field(default=None, max_length=316, description="Taint key to tolerate.")
    operator: Literal["Exists", "Equal"] | None = Field(default=None, description="Exists or Equal.")
    value: str | None = Field(default=None, max_length=63, description="Taint value for Equal.")
    effect: Literal["NoSchedule", "PreferNoSchedule", "NoExecute"] | None = Field(
        default=None, description="Taint effect to tolerate; all effects when omitted."
    )
    toleration_seconds: int | None = Field(default=None, ge=0, description="How long a NoExecute taint is tolerated.")


class ResourcesSpec(CamelModel):
    """The Ray cluster's training workers."""

    workers: int = Field(default=1, ge=1, le=MAX_WORKERS, description="Ray Train workers (one pod each).")
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
    node_selector: dict[str, str] = Field(default_factory=dict, description="Node labels the worker pods must match.")
    tolerations: list[Toleration] = Field(
        default_factory=list, max_length=32, description="Tolerations for the worker pods."
    )
    priority_class_name: str | None = Field(
        default=None, pattern=DNS_LABEL, max_length=253, description="PriorityClass of all Ray pods."
    )


class RunPolicy(CamelModel):
    """Retries, deadlines, suspension and queueing."""

    max_retries: int = Field(
        default=3, ge=0, le=100, description="Worker failures Ray Train recovers from its last checkpoint."
    )
    backoff_limit: int = Field(
        default=0,
        ge=0,
        le=100,
        description="Whole Ray cluster retries after the job fails (KubeRay backoffLimit).",
    )
    active_deadline_seconds: int | None = Field(
        default=None, ge=1, description="Seconds the run may take before it is stopped and the job fails."
    )
    ttl_seconds_after_finished: int | None = Field(
        default=None, ge=0, description="Seconds after success or failure before the FineTuneJob is deleted."
    )
    suspend: bool = Field(
        default=False,
        description="true stops the Ray cluster; false (again) resumes from the last checkpoint.",
    )
    queue_name: str | None = Field(
        default=None,
        pattern=DNS_LABEL,
        max_length=63,
        description="Kueue LocalQueue to admit the job through.",
    )


class FineTuneJobSpec(CamelModel):
    """What to fine-tune, on what data, how, with which resources, and where the results go."""

    model: ModelSpec = Field(description="The model, its base weights and the fine-tuning strategy.")
    data: DataSpec = Field(description="The dataset in S3.")
    training: TrainingSpec = Field(default_factory=TrainingSpec, description="Training hyperparameters.")
    resources: ResourcesSpec = Field(default_factory=ResourcesSpec, description="Workers and their resources.")
    output: OutputSpec = Field(description="Where checkpoints and the exported model go.")
    storage: StorageSpec = Field(default_factory=StorageSpec, description="S3 endpoint and credentials.")
    run_policy: RunPolicy = Field(default_factory=RunPolicy, description="Retries, deadlines, suspension, queueing.")
    image: str | None = Field(
        default=None, min_length=1, max_length=512, pattern=r"^\S+$", description="Trainer image override."
    )

    @model_validator(mode="after")
    def _output_apart_from_data(self) -> FineTuneJobSpec:
        out = self.output.path.rstrip("/") + "/"
        for field, prefix in (("data.train", self.data.train), ("data.validation", self.data.validation)):
            if prefix and (out.startswith(prefix.rstrip("/") + "/") or (prefix.rstrip("/") + "/").startswith(out)):
                raise ValueError(f"output.path: must not overlap {field} ({prefix}) (got {self.output.path})")
        return self


class ObjectMeta(BaseModel):
    """The parts of metadata the operator relies on; the rest passes through untouched."""

    model_config = ConfigDict(extra="allow", populate_by_name=True)

    name: str = Field(min_length=1, max_length=MAX_NAME_LENGTH, pattern=NAME_PATTERN)
    namespace: str | None = Field(default=None, pattern=DNS_LABEL, max_length=63)
    uid: str | None = None
    generation: int | None = None
    labels: dict[str, str] = Field(default_factory=dict)
    annotations: dict[str, str] = Field(default_factory=dict)


class FineTuneJob(BaseModel):
    """A whole FineTuneJob object as written in YAML."""

    model_config = ConfigDict(extra="forbid", populate_by_name=True)

    api_version: Literal["kubetune.dev/v1alpha1"] = Field(alias="apiVersion")
    kind: Literal["FineTuneJob"]
    metadata: ObjectMeta
    spec: FineTuneJobSpec
    status: dict[str, Any] | None = None

    @classmethod
    def from_body(cls, body: dict[str, Any]) -> FineTuneJob:
        """Parse a manifest or a kopf body (which carries status and server-set metadata)."""
        return cls.model_validate(dict(body))


Phase = Literal["Pending", "Launching", "Running", "Succeeded", "Failed", "Suspended"]
PHASES: tuple[str, ...] = ("Pending", "Launching", "Running", "Succeeded", "Failed", "Suspended")
TERMINAL_PHASES = frozenset({"Succeeded", "Failed"})


class Condition(CamelModel):
    """A status condition following the Kubernetes API conventions."""

    model_config = ConfigDict(extra="forbid")

    type: str
    status: Literal["True", "False", "Unknown"]
    reason: str = Field(pattern=r"^[A-Za-z]([A-Za-z0-9_,:]*[A-Za-z0-9_])?$", max_length=1024)
    message: str = Field(default="", max_length=32768)
    last_transition_time: datetime
    observed_generation: int | None = None
