"""A FineTuneJob as the operator receives it, parsed once at the door: the typed job, or the refusal of one.

The kopf handlers turn each body into a `JobRecord` before anything else happens (`receive`), and
every step below them takes that record: where the job is (`JobMeta`), its spec as the `FineTuneJob`
model or an `InvalidJob` that says why the model refuses it, and its status as last written, a dict
that the pure `lifecycle` functions read and patch (the operator writes the status as merge patches).
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

from pydantic import ValidationError

from kubetune_operator.messages import format_validation_error
from kubetune_operator.shared_defaults import share_defaults
from kubetune_operator.spec import API_VERSION, KIND, FineTuneJob, RunPolicy
from kubetune_trainer.config import OUTPUT_FILES, selected_metric


def _mapping(value: Any) -> Mapping[str, Any]:
    """`value` if it is a mapping, else empty: a malformed body may hold anything anywhere."""
    return value if isinstance(value, Mapping) else {}


@dataclass(frozen=True)
class JobMeta:
    """What the operator reads of a job's metadata, whatever its spec holds."""

    namespace: str
    name: str
    uid: str | None = None
    generation: int | None = None
    created: str | None = None  # creationTimestamp, as the API server wrote it
    deleting: bool = False  # deletionTimestamp is set
    resource_version: str | None = None  # which version of the job this is (a body's own, not its spec's)

    @classmethod
    def of(cls, body: Mapping[str, Any]) -> JobMeta:
        meta = _mapping(body.get("metadata"))
        generation = meta.get("generation")
        created = meta.get("creationTimestamp")
        return cls(
            namespace=str(meta.get("namespace") or ""),
            name=str(meta.get("name") or ""),
            uid=str(meta["uid"]) if meta.get("uid") else None,
            generation=generation if isinstance(generation, int) and not isinstance(generation, bool) else None,
            created=created if isinstance(created, str) else None,
            deleting=bool(meta.get("deletionTimestamp")),
            resource_version=str(meta["resourceVersion"]) if meta.get("resourceVersion") else None,
        )

    @property
    def source(self) -> str:
        return f"{self.namespace}/{self.name}"

    def reference(self) -> dict[str, Any]:
        """The job as an Event's involvedObject names it."""
        meta = {"name": self.name, "namespace": self.namespace, "uid": self.uid}
        return {"apiVersion": API_VERSION, "kind": KIND, "metadata": {k: v for k, v in meta.items() if v}}

    def metadata(self) -> dict[str, Any]:
        """The metadata fields the hooks read (the metrics: namespace, name, creationTimestamp)."""
        return {"namespace": self.namespace, "name": self.name, "creationTimestamp": self.created}


@dataclass(frozen=True)
class InvalidJob:
    """A job whose spec the model refuses: why (every bad field, formatted for people), and the run
    policy that still steers it (suspend, TTL), parsed on its own; the defaults when it too is invalid."""

    message: str
    run_policy: RunPolicy


@dataclass(frozen=True)
class JobRecord:
    """A job as received: its metadata, its spec parsed (or refused), and its status as written."""

    meta: JobMeta
    job: FineTuneJob | InvalidJob
    status: Mapping[str, Any]

    @property
    def run_policy(self) -> RunPolicy:
        return self.job.run_policy if isinstance(self.job, InvalidJob) else self.job.spec.run_policy

    @property
    def elastic(self) -> bool:
        """Whether the job's workers are elastic (an invalid spec launched nothing: False)."""
        return False if isinstance(self.job, InvalidJob) else self.job.spec.resources.workers.elastic

    @property
    def model_uri(self) -> str | None:
        """Where a successful run leaves the model (None when the spec is invalid)."""
        status = self.model_status()
        return str(status["uri"]) if status else None

    def model_status(self) -> dict[str, Any] | None:
        """`status.model` of a successful run: where its files are, and the epoch it exported (the best by
        selectBy, as the trainer's last progress update named it); None when the spec is invalid."""
        if isinstance(self.job, InvalidJob):
            return None
        out = self.job.spec.output.path.rstrip("/")
        progress = _mapping(self.status.get("progress"))
        best = progress.get("bestEpoch")
        status = {
            "uri": f"{out}/{OUTPUT_FILES['weights']}",
            "card": f"{out}/{OUTPUT_FILES['card']}",
            "report": f"{out}/{OUTPUT_FILES['report']}",
            "evaluation": f"{out}/{OUTPUT_FILES['evaluation']}",
            "bestEpoch": best if isinstance(best, int) and not isinstance(best, bool) and best >= 1 else None,
            "selectBy": selected_metric(self.job.spec.task, self.job.spec.training.select_by),
        }
        return {key: value for key, value in status.items() if value is not None}

    @property
    def stopped_early(self) -> bool:
        """Whether the trainer's last progress update said spec.training.earlyStopping ended training."""
        return _mapping(self.status.get("progress")).get("earlyStopped") is True

    def with_status(self, status: Mapping[str, Any]) -> JobRecord:
        return dataclasses.replace(self, status=status)


def invalid_spec_message(exc: ValidationError, source: str) -> str:
    """`Invalid spec: field: what is allowed (got what was given); ...`, as the status and Events say it."""
    lines = format_validation_error(exc, source, model=FineTuneJob)
    return "Invalid spec: " + "; ".join(line.removeprefix(f"{source}: ") for line in lines)


def _run_policy_alone(body: Mapping[str, Any]) -> RunPolicy:
    try:
        return RunPolicy.model_validate(_mapping(_mapping(body.get("spec")).get("runPolicy")), by_name=False)
    except ValidationError:
        return RunPolicy()


def receive(body: Mapping[str, Any], *, parsed: JobRecord | None = None) -> JobRecord:
    """The record of a FineTuneJob body (a watch event's, or one read from the API server).

    `parsed`: a record already made of a body; when it is of this very version of the job, its parsed
    spec is taken rather than parsed again (a job's launch and its watch event share one).
    """
    meta = JobMeta.of(body)
    if parsed is not None and meta.resource_version and parsed.meta == meta:
        return JobRecord(meta, parsed.job, _mapping(body.get("status")))
    job: FineTuneJob | InvalidJob
    try:
        # The spec and metadata only: the status is the operator's own, read as the dict it wrote.
        # Its sections left at their defaults shared with every other job's (the cache keeps one per job).
        job = share_defaults(FineTuneJob.from_body({key: value for key, value in body.items() if key != "status"}))
    except ValidationError as exc:
        job = InvalidJob(invalid_spec_message(exc, meta.source), _run_policy_alone(body))
    return JobRecord(meta, job, _mapping(body.get("status")))
