"""The progress message from the trainer to the operator, and the one table of the metrics it carries.

Part of the contract between the two (beside config.py): pydantic and the standard library only, so the
operator imports it without torch or Ray.

`METRICS` is the one definition of each metric a run reports. Every place that lists metrics reads it:

- `ProgressMetrics` (the message's `metrics`), and so the operator's `status.progress.metrics` and the
  CRD's schema for it (`kubetune_operator.spec`, `crd.py`), with the row's description and bounds;
- history.json (`history_entry`, in the table's order), a task's validation figures (`validation_keys`:
  `Task.metric_keys`) and model.json's final `metrics` (`card_metrics`);
- the console's progress line (`console`) and `kubetune run --local`'s last line (`summary`);
- the operator's Prometheus gauges (`gauge`, `kubetune_operator.metrics`) and `kubectl get ftj`'s printer
  columns (`column`, `kubetune_operator.crd`).

A new metric is one row here, plus the code that measures it (a task's `evaluate`, or the loop).

`ProgressUpdate` is the message itself (camelCase on the wire). Everything in it is bounded: the
operator's progress endpoint takes it from the network, and writes it into the job's status.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass
from typing import TYPE_CHECKING, Annotated, Any, Literal, get_args

from pydantic import Field, create_model, model_validator
from pydantic.alias_generators import to_camel

from kubetune_trainer.config import (
    MAX_EPOCHS,
    MAX_SWEEP_PARAMETERS,
    MAX_SWEEP_TRIALS,
    MAX_WORKERS,
    S3_PREFIX_PATTERN,
    CamelModel,
    SelectBy,
    SweepField,
    Task,
)

# Steps stay integers that JSON and the status (int64) hold exactly; a checkpoint URI is an S3 key (at
# most 1,024 bytes) in a bucket (at most 63 characters).
MAX_STEPS = 2**53
MAX_WORKER_FAILURES = 1_000_000
MAX_CHECKPOINT_URI = len("s3://") + 63 + 1 + 1024
MAX_PREEMPTIONS = 1_000_000
# The most backbone stages a progress update lists (timm groups a ViT-H's 32 blocks into 32 stages).
MAX_STAGES = 256
MAX_AUGMENT_TEXT = 256
TrainerPhase = Literal["Resumed", "Training", "Checkpointing", "Evaluated", "Preempted"]

BOTH: tuple[Task, ...] = ("classification", "detection")


@dataclass(frozen=True)
class Gauge:
    """A Prometheus gauge of the operator's, per job (labels namespace and name)."""

    name: str
    help: str


@dataclass(frozen=True)
class Metric:
    """One metric: how it is named, bounded and described, who reports it, and where it is shown."""

    field: str  # the Python name; the wire, status, history and model.json key is its camelCase (`key`)
    description: str
    tasks: tuple[Task, ...] = BOTH
    # Measured by the task's evaluation after each epoch (else by the training loop itself).
    validation: bool = False
    ge: float | None = None
    le: float | None = None
    console: str | None = None  # its part of the progress line, a format string for the value
    summary: str | None = None  # its part of `kubetune run --local`'s "validation …" line
    in_card: bool = True  # in model.json's final `metrics`
    gauge: Gauge | None = None
    column: str | None = None  # the header of its printer column in `kubectl get ftj`

    @property
    def key(self) -> str:
        return to_camel(self.field)

    def field_info(self) -> Any:
        """Its pydantic field: an optional number with its bounds and description."""
        return Field(default=None, ge=self.ge, le=self.le, description=self.description)


METRICS: tuple[Metric, ...] = (
    Metric(
        "train_loss",
        "Mean training loss of the epoch in progress (after an epoch: over the whole epoch).",
        console="loss {:.4f}",
        gauge=Gauge("kubetune_job_train_loss", "Latest training loss reported by the run."),
    ),
    Metric(
        "val_loss",
        "Classification: validation loss after the latest epoch.",
        tasks=("classification",),
        validation=True,
        summary="loss {:.4f}",
        gauge=Gauge("kubetune_job_validation_loss", "Latest validation loss reported by the run."),
    ),
    Metric(
        "val_accuracy",
        "Classification: top-1 validation accuracy after the latest epoch, as a fraction (0-1).",
        tasks=("classification",),
        validation=True,
        ge=0,
        le=1,
        console="acc {:.1%}",
        summary="accuracy {:.2%}",
        gauge=Gauge(
            "kubetune_job_validation_accuracy_ratio", "Latest validation accuracy (0 to 1) reported by the run."
        ),
        column="Val-Acc",
    ),
    Metric(
        "val_map",
        "Detection: COCO mAP@[.5:.95] after the latest epoch, as a fraction (0-1).",
        tasks=("detection",),
        validation=True,
        ge=0,
        le=1,
        console="mAP {:.3f}",
        summary="mAP@[.5:.95] {:.3f}",
        gauge=Gauge(
            "kubetune_job_validation_map_ratio", "Latest COCO mAP@[.5:.95] (0 to 1) reported by a detection run."
        ),
        column="Val-mAP",
    ),
    Metric(
        "val_map50",
        "Detection: COCO mAP@.5 after the latest epoch, as a fraction (0-1).",
        tasks=("detection",),
        validation=True,
        ge=0,
        le=1,
        console="mAP@.5 {:.3f}",
        summary="mAP@.5 {:.3f}",
        gauge=Gauge("kubetune_job_validation_map50_ratio", "Latest COCO mAP@.5 (0 to 1) reported by a detection run."),
    ),
    Metric(
        "images_per_second",
        "Training throughput over all workers, in images per second.",
        ge=0,
        console="{:.0f} img/s",
        gauge=Gauge("kubetune_job_images_per_second", "Training throughput of the whole run."),
    ),
    Metric("learning_rate", "Current peak learning rate.", ge=0, in_card=False),
)
METRIC_KEYS = frozenset(metric.key for metric in METRICS)


def metrics_model(name: str, base: type[CamelModel], doc: str) -> type[CamelModel]:
    """A model with one optional number per row of METRICS, on `base` (which says how strict it reads)."""
    fields: dict[str, Any] = {metric.field: (float | None, metric.field_info()) for metric in METRICS}
    return create_model(name, __base__=base, __module__=__name__, __doc__=doc, **fields)


# Built from the table; for mypy, a CamelModel (nothing outside this table names a metric's attribute).
if TYPE_CHECKING:
    ProgressMetrics = CamelModel
else:
    ProgressMetrics = metrics_model(
        "ProgressMetrics", CamelModel, "The latest figures; validation ones come from the last finished epoch."
    )


class TrainingSettings(CamelModel):
    """What the run trains with, once decided: the learning rates it uses and the augmentation (model.json's
    effectiveTraining says the same, in more detail)."""

    learning_rate: float = Field(ge=0.0, description="Peak learning rate of the head, reached after the warm-up.")
    learning_rate_source: Literal["spec", "rangeTest"] = Field(
        description="spec (training.learningRate) or rangeTest (chosen by the learning-rate range test)."
    )
    backbone_learning_rates: list[float] = Field(
        default_factory=list,
        max_length=MAX_STAGES,
        description="Peak learning rate of each trained backbone stage, input side first.",
    )
    warmup_steps: int = Field(ge=0, le=MAX_STEPS, description="Steps of linear warm-up before the peak.")
    augment: str = Field(
        max_length=MAX_AUGMENT_TEXT, description="The training augmentation (data.augment) at this image size."
    )

    @classmethod
    def from_effective(cls, effective: Mapping[str, Any]) -> TrainingSettings | None:
        """From the loop's `effective_training` block; None before it exists."""
        if not effective:
            return None
        return cls(
            learning_rate=effective["learningRate"],
            learning_rate_source=effective["learningRateSource"],
            backbone_learning_rates=list(effective["backboneLearningRates"])[:MAX_STAGES],
            warmup_steps=effective["warmupSteps"],
            augment=str(effective["augment"].get("description", ""))[:MAX_AUGMENT_TEXT],
        )


MAX_TRIAL_ID = 64
MAX_PARAMETER_TEXT = 64
# How a sweep's trial ends (sweep.json's `state`), and every state a trial is in: SweepProgress's counts.
TrialEnd = Literal["done", "stopped", "failed"]
TRIAL_ENDS: tuple[TrialEnd, ...] = get_args(TrialEnd)
TRIAL_STATES: tuple[str, ...] = ("pending", "running", *TRIAL_ENDS)
# A trial's id as the trainer names it (`sweep_plan.Trial.id`): trial-000 to trial-999.
TRIAL_ID_PATTERN = r"^trial-[0-9]{3,}$"
PRINTABLE_PATTERN = r"^[ -~]+$"  # printable ASCII: what a number or a choice (a strategy, an augment) is
ParameterText = Annotated[str, Field(min_length=1, max_length=MAX_PARAMETER_TEXT, pattern=PRINTABLE_PATTERN)]


class SweepProgress(CamelModel):
    """Where a sweep (spec.sweep) is: its trials by state and the best so far. The operator writes it as
    status.sweep; its counts are bounded by its trials (at most spec.sweep.trials' bound), its strings by
    what the trainer writes (a trial id, a metric name, a swept field and its value as printable text), so
    whoever holds a job's progress token puts no more than that into the status and the metrics."""

    trials: int = Field(ge=1, le=MAX_SWEEP_TRIALS, description="Trials the sweep runs in all (spec.sweep.trials).")
    pending: int = Field(default=0, ge=0, le=MAX_SWEEP_TRIALS, description="Trials not started yet.")
    running: int = Field(default=0, ge=0, le=MAX_SWEEP_TRIALS, description="Trials training now.")
    done: int = Field(default=0, ge=0, le=MAX_SWEEP_TRIALS, description="Trials that trained all their epochs.")
    stopped: int = Field(
        default=0, ge=0, le=MAX_SWEEP_TRIALS, description="Trials the scheduler (ASHA) stopped early as poor."
    )
    failed: int = Field(default=0, ge=0, le=MAX_SWEEP_TRIALS, description="Trials that failed past their retries.")
    metric: SelectBy = Field(description="The validation figure that ranks trials (spec.sweep.metric).")
    best_trial: str | None = Field(
        default=None, max_length=MAX_TRIAL_ID, pattern=TRIAL_ID_PATTERN, description="The best trial's id."
    )
    best_value: float | None = Field(
        default=None, allow_inf_nan=False, description="The best trial's best value of the metric."
    )
    best_parameters: dict[SweepField, ParameterText] = Field(
        default_factory=dict,
        max_length=MAX_SWEEP_PARAMETERS,
        description="The best trial's values of the swept fields (spec path to the value as text).",
    )

    @model_validator(mode="after")
    def _counts_within_trials(self) -> SweepProgress:
        for state in TRIAL_STATES:
            if getattr(self, state) > self.trials:
                raise ValueError(f"{state}: at most trials ({self.trials}) (got {getattr(self, state)})")
        return self


class ProgressUpdate(CamelModel):
    """Where a run is: the message from the trainer to the operator (and the console)."""

    epoch: int = Field(ge=0, le=MAX_EPOCHS, description="The epoch in progress, counting from 1 (0 before the first).")
    total_epochs: int = Field(ge=1, le=MAX_EPOCHS, description="Epochs the run will train (spec.training.epochs).")
    step: int = Field(ge=0, le=MAX_STEPS, description="Optimiser steps done in the whole run.")
    total_steps: int = Field(ge=0, le=MAX_STEPS, description="Optimiser steps the whole run will take.")
    percent: float = Field(ge=0, le=100, description="Share of all steps done, 0-100.")
    eta_seconds: float | None = Field(default=None, ge=0, description="Estimated seconds until training ends.")
    metrics: ProgressMetrics = Field(default_factory=ProgressMetrics, description="The latest training metrics.")
    latest_checkpoint: str | None = Field(
        default=None,
        pattern=S3_PREFIX_PATTERN,
        max_length=MAX_CHECKPOINT_URI,
        description="s3:// URI of the newest checkpoint Ray Train committed: a restart resumes from it.",
    )
    worker_failures: int | None = Field(
        default=None,
        ge=0,
        le=MAX_WORKER_FAILURES,
        description="Worker failures in the current attempt; Ray Train restarts the workers from the latest "
        "checkpoint after each, up to spec.runPolicy.maxRetries (status.restarts counts whole-cluster retries).",
    )
    preemptions: int | None = Field(
        default=None,
        ge=0,
        le=MAX_PREEMPTIONS,
        description="Preemptions in the current attempt; Ray Train restarts the workers from the checkpoint saved "
        "on each notice, up to spec.runPolicy.maxPreemptions (not counted against maxRetries).",
    )
    preemption_steps_lost: int | None = Field(
        default=None,
        ge=0,
        le=MAX_STEPS,
        description="Optimiser steps the latest preemption lost: done since the checkpoint the workers resumed from.",
    )
    workers: int | None = Field(
        default=None,
        ge=1,
        le=MAX_WORKERS,
        description="Ray Train workers the run trains on now: spec.resources.workers, or with elastic workers "
        "between its min and max as workers are placed and lost.",
    )
    phase: TrainerPhase | None = Field(
        default=None,
        description="Resumed, Training, Checkpointing or Evaluated (after each epoch, with or without its "
        "checkpoint), or Preempted (the checkpoint of a preemption notice is saved).",
    )
    training: TrainingSettings | None = Field(
        default=None, description="The effective learning rates and augmentation of the run."
    )
    best_epoch: int | None = Field(
        default=None,
        ge=1,
        le=MAX_EPOCHS,
        description="The epoch whose checkpoint is the best so far by spec.training.selectBy: the one exported.",
    )
    early_stopped: bool | None = Field(
        default=None,
        description="True once spec.training.earlyStopping has ended training before its last epoch (the best "
        "epoch is exported all the same).",
    )
    sweep: SweepProgress | None = Field(
        default=None,
        description="Sweeps only: the trials by state and the best so far. The other fields are the best trial's "
        "own (before any trial has finished an epoch, the latest trial's): epoch, step, percent and eta count that "
        "trial's epochs, not the sweep's; done + stopped + failed of trials says how far the sweep is.",
    )


# -- what the table lists, for each place that shows metrics -------------------------------------------


def validation_keys(task: Task) -> tuple[str, ...]:
    """The figures `task`'s evaluation reports after each epoch, keyed as in history.json."""
    return tuple(m.key for m in METRICS if m.validation and task in m.tasks)


def history_entry(epoch: int, figures: Mapping[str, float], seconds: float) -> dict[str, Any]:
    """history.json's entry of one epoch: its figures in the table's order, between `epoch` and `seconds`."""
    unknown = set(figures) - METRIC_KEYS
    if unknown:
        raise ValueError(f"metrics {sorted(unknown)} are not in progress_model.METRICS")
    return {"epoch": epoch, **{m.key: figures[m.key] for m in METRICS if m.key in figures}, "seconds": seconds}


def card_metrics(final: Mapping[str, Any]) -> dict[str, Any]:
    """model.json's `metrics`: the figures the card keeps of the exported epoch (the best by selectBy)."""
    return {m.key: final[m.key] for m in METRICS if m.in_card and m.key in final}


def console_parts(metrics: CamelModel) -> list[str]:
    """The metrics' parts of the progress line, in the table's order (`loss 0.4123`, `acc 93.1%`, …)."""
    values = ((m, getattr(metrics, m.field)) for m in METRICS if m.console)
    return [m.console.format(value) for m, value in values if m.console and value is not None]


def summary_parts(figures: Mapping[str, float]) -> list[str]:
    """The exported epoch's validation figures as `kubetune run --local` ends with them (`accuracy 93.10%`)."""
    return [m.summary.format(figures[m.key]) for m in METRICS if m.summary and m.key in figures]
