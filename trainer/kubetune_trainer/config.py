"""The contract between the operator and the trainer.

The spec sections that both sides need (model, data, training, output, storage) are defined here once,
with every field rule they carry. The operator's FineTuneJob model composes these very classes, so
`kubetune validate`, the CRD, the operator and the trainer all enforce one copy of the rules.

This module imports pydantic only: the operator image loads it without torch or Ray.
"""

from __future__ import annotations

import hashlib
import json
import math
import os
import re
from dataclasses import dataclass
from typing import Annotated, Any, Literal, get_args

from pydantic import BaseModel, ConfigDict, Field, ValidationError, WithJsonSchema, field_validator, model_validator
from pydantic.alias_generators import to_camel

from kubetune_trainer import architectures

# An s3:// URI of one object, and an s3:// prefix (a "folder"). Bucket names follow S3's rules. Keys have
# no whitespace and no empty segments ("a//b"): with at most one trailing slash, "is one prefix inside
# another" is a plain startsWith after appending "/", which the CRD's CEL rules can express exactly.
# No segment is "." or "..": S3 keeps them as names, but every local path the trainer makes from a key
# refuses them (localpaths.py), so a prefix holding one could only fail the run, and "inside another
# prefix" would stop meaning what it says. Written without look-arounds, which neither the API server's
# regular expressions (RE2) nor pydantic's support: a segment that does not start with ".", or starts
# with "." and a character other than ".", or with ".." and at least one more character.
S3_BUCKET = r"[a-z0-9][a-z0-9.\-]{1,61}[a-z0-9]"
S3_SEGMENT = r"(?:[^\s/.][^\s/]*|\.[^\s/.][^\s/]*|\.\.[^\s/]+)"
S3_OBJECT_PATTERN = rf"^s3://{S3_BUCKET}(/{S3_SEGMENT})+$"
S3_PREFIX_PATTERN = rf"^s3://{S3_BUCKET}(/{S3_SEGMENT})*/?$"
# The Ray pods' preStop hook (kubetune_trainer.preemption): it passes a pod's termination on to its Train
# workers and training driver as SIGTERM; the grace period in seconds follows as its one argument.
PRESTOP_COMMAND = ("python", "-m", "kubetune_trainer.preemption")
# runPolicy.preemptionGraceSeconds: the pods' terminationGracePeriodSeconds, and the trainer's deadline.
MIN_PREEMPTION_GRACE_S, DEFAULT_PREEMPTION_GRACE_S, MAX_PREEMPTION_GRACE_S = 10, 60, 3600
# The environment variable that holds the TrainerConfig JSON for `python -m kubetune_trainer` without
# --config: how the operator's RayJob passes it to the driver on the Ray head.
CONFIG_ENV = "KUBETUNE_TRAINER_CONFIG"
# Ray Train features kubetune does not use, off in every trainer process (the RayJob's containers, `kubetune
# run --local`, the trainer alone): Ray Train's own Prometheus metrics (the operator exports progress),
# structured JSON log files and the state actor's reconciliation. Each runs a polling actor or thread beside
# training; on a 2-core node they took ~5% of the CPU from the training step (bench/findings.md, "Trainer
# overhead"). Ray Train's preemption watcher stays on: a Ray node drain (autoscaler, `ray drain-node`) is
# one of the preemption notices the loop acts on (`preemption.py`).
RAY_TRAIN_ENV = {
    "RAY_TRAIN_METRICS_ENABLED": "0",
    "RAY_TRAIN_ENABLE_CONTROLLER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_WORKER_STRUCTURED_LOGGING": "0",
    "RAY_TRAIN_ENABLE_STATE_ACTOR_RECONCILIATION": "0",
}


def use_ray_train_env() -> None:
    """`RAY_TRAIN_ENV` in this process (and the Ray processes it starts), unless the environment says otherwise."""
    for name, value in RAY_TRAIN_ENV.items():
        os.environ.setdefault(name, value)


# What a successful run leaves under output.path, by role (the operator's status.model names them too).
OUTPUT_FILES = {
    "weights": "model.safetensors",
    "card": "model.json",
    "history": "history.json",
    "curves": "training-curves.png",
    "evaluation": "evaluation.json",
    "report": "report.html",
}

# The most classes a model may have: model.numClasses, class folders, COCO categories.
MAX_CLASSES = 100_000
# The most epochs a run may have (spec.training.epochs, and what a progress update may say).
MAX_EPOCHS = 1000
MAX_WORKERS = 256  # Ray Train workers of a run (spec.resources.workers, and what progress reports)
CHECKPOINT_PATTERN = rf"^s3://{S3_BUCKET}(/{S3_SEGMENT})*/[^\s/]+\.(safetensors|pt|pth|bin)$"
ARCHITECTURE_PATTERN = r"^[a-z0-9][a-z0-9_.\-]*$"
ANNOTATIONS_PATTERN = rf"^s3://{S3_BUCKET}(/{S3_SEGMENT})*/[^\s/]+\.json$"
# No user:password@ in the authority: credentials belong in the Secret, never in a spec anyone may read.
ENDPOINT_PATTERN = r"^https?://[^\s/@]+(/[^\s]*)?$"
REGION_PATTERN = r"^[a-z0-9\-]{2,32}$"
DEFAULT_REGION = "us-east-1"  # S3's own default: what boto3 signs for when no region is given
# A Kubernetes object name (DNS-1123 subdomain), e.g. of a Secret.
DNS_SUBDOMAIN = r"^[a-z0-9]([-a-z0-9]*[a-z0-9])?(\.[a-z0-9]([-a-z0-9]*[a-z0-9])?)*$"


def as_prefix(uri: str) -> str:
    """`uri` ending in exactly one "/", so that startsWith means "inside this prefix"."""
    return uri if uri.endswith("/") else uri + "/"


S3Prefix = Annotated[
    str,
    Field(
        pattern=S3_PREFIX_PATTERN,
        max_length=1024,
    ),
]
CheckpointUri = Annotated[
    str,
    Field(
        pattern=CHECKPOINT_PATTERN,
        max_length=1024,
    ),
]


AnnotationsUri = Annotated[
    str,
    Field(
        pattern=ANNOTATIONS_PATTERN,
        max_length=1024,
    ),
]

Task = Literal["classification", "detection"]
# The validation figures (history.json's keys) a run can pick its best checkpoint by (training.selectBy), per
# task, the default first; LOWER_IS_BETTER are minimised, the others maximised.
SelectBy = Literal["valAccuracy", "valLoss", "valMap", "valMap50"]
SELECT_BY: dict[str, tuple[str, ...]] = {
    "classification": ("valAccuracy", "valLoss"),
    "detection": ("valMap", "valMap50"),
}
LOWER_IS_BETTER = frozenset({"valLoss"})


def selected_metric(task: str, chosen: str | None) -> str:
    """The history key that picks a run's best checkpoint: `training.selectBy`, or the task's default."""
    return chosen or SELECT_BY[task][0]


# torchvision's detection zoo: the models a detection job can fine-tune (built by name, without downloads).
DETECTION_ARCHITECTURES: tuple[str, ...] = (
    "fasterrcnn_resnet50_fpn",
    "fasterrcnn_resnet50_fpn_v2",
    "fasterrcnn_mobilenet_v3_large_fpn",
    "fasterrcnn_mobilenet_v3_large_320_fpn",
    "retinanet_resnet50_fpn",
    "retinanet_resnet50_fpn_v2",
    "fcos_resnet50_fpn",
    "ssdlite320_mobilenet_v3_large",
    "ssd300_vgg16",
)


def cel(rule: str, message: str, field_path: str | None = None) -> dict[str, Any]:
    """A CEL rule for the CRD (x-kubernetes-validations), mirroring a Python check beside it."""
    out: dict[str, Any] = {"rule": rule, "message": message}
    if field_path:
        out["fieldPath"] = field_path
    return out


class CamelModel(BaseModel):
    """camelCase on the wire (YAML, JSON), snake_case in Python; unknown fields are errors."""

    model_config = ConfigDict(
        alias_generator=to_camel,
        populate_by_name=True,
        extra="forbid",
        validate_default=True,
    )

    def wire(self) -> dict[str, Any]:
        """The camelCase dict, without unset optionals."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


class SpecSection(CamelModel):
    """A section of the FineTuneJob spec: typed as strictly as the API server types it.

    Strict mode refuses what pydantic would otherwise coerce ("10" for an integer, 1 for a boolean) but
    the CRD's schema rejects, so `kubetune validate` says no exactly where `kubectl apply` would.
    """

    model_config = ConfigDict(strict=True)


STRATEGY_RULE = cel(
    "self.strategy == 'partial' ? has(self.trainableLayers) : !has(self.trainableLayers)",
    "trainableLayers is required with strategy 'partial' and not allowed otherwise",
    ".trainableLayers",
)


class ModelSpec(SpecSection):
    """What to fine-tune: the architecture, its base weights and which parts train."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [STRATEGY_RULE]})

    architecture: str = Field(
        min_length=1,
        max_length=128,
        pattern=ARCHITECTURE_PATTERN,
        description=(
            "Classification: a timm model name, e.g. resnet50, convnext_tiny. Detection: a torchvision "
            "detection model, one of " + ", ".join(DETECTION_ARCHITECTURES) + "."
        ),
    )
    checkpoint: CheckpointUri = Field(
        description=(
            "s3:// URI of the base weights: a .safetensors file (preferred) or a .pt/.pth/.bin "
            "state dict, loaded without unpickling code."
        )
    )
    num_classes: int | None = Field(
        default=None,
        ge=1,
        le=MAX_CLASSES,
        description=(
            "Number of classes of the new task (at least 2 for classification; detection may find a single "
            "class); inferred from the dataset's class folders or COCO categories when omitted."
        ),
    )
    strategy: Literal["head", "partial", "full"] = Field(
        default="full",
        description=(
            "What trains: full (everything; the backbone's learning rate follows backboneLearningRateScale and "
            "layerDecay), partial (the last trainableLayers stages and the head), head (only the new classifier)."
        ),
    )
    trainable_layers: int | None = Field(
        default=None,
        ge=1,
        le=64,
        description="Number of backbone stages, counted from the top, that train with strategy 'partial'.",
    )
    resume: Literal["auto", "never"] = Field(
        default="auto",
        description=(
            "auto: continue from the last committed checkpoint of the job's run in output.path, also when the job "
            "was deleted and applied again under the same name with the same task, model, data, optimizer, weight "
            "averaging (emaDecay) and seed; never: start over (a run of this job object alone, which its own retries and resumes still "
            "continue)."
        ),
    )

    @model_validator(mode="after")
    def _strategy_needs_layers(self) -> ModelSpec:
        if self.strategy == "partial" and self.trainable_layers is None:
            raise ValueError("trainableLayers: required when strategy is 'partial'")
        if self.strategy != "partial" and self.trainable_layers is not None:
            raise ValueError(f"trainableLayers: only allowed with strategy 'partial' (strategy is '{self.strategy}')")
        return self


def prefixes_overlap_cel(a: str, b: str) -> str:
    """CEL for "prefix a is inside prefix b or b inside a", matching `prefixes_overlap`."""
    pa = f"({a}.endsWith('/') ? {a} : {a} + '/')"
    pb = f"({b}.endsWith('/') ? {b} : {b} + '/')"
    return f"{pa}.startsWith({pb}) || {pb}.startsWith({pa})"


def prefixes_overlap(a: str, b: str) -> bool:
    """Whether one s3:// prefix lies inside the other (or they are the same)."""
    pa, pb = as_prefix(a), as_prefix(b)
    return pa.startswith(pb) or pb.startswith(pa)


VALIDATION_APART_RULE = cel(
    f"!has(self.validation) || !({prefixes_overlap_cel('self.validation', 'self.train')})",
    "validation must not overlap train: validation images would also be trained on",
    ".validation",
)
TEST_APART_RULE = cel(
    f"!has(self.test) || !({prefixes_overlap_cel('self.test', 'self.train')})",
    "test must not overlap train: test images would also be trained on",
    ".test",
)


class AnnotationsSpec(SpecSection):
    """COCO-format annotation files of a detection job; image file names are relative to the image prefixes."""

    train: AnnotationsUri = Field(description="s3:// URI of the training annotations (COCO JSON).")
    validation: AnnotationsUri = Field(description="s3:// URI of the validation annotations (COCO JSON).")
    test: AnnotationsUri | None = Field(
        default=None,
        description=(
            "s3:// URI of the test annotations (COCO JSON), evaluated once with the best checkpoint after "
            "training; the report uses the validation set when omitted."
        ),
    )


# data.format: how the dataset is laid out (docs/trainer.md, "Data"). Omitted: imagefolder for
# classification, coco for detection.
DataFormat = Literal["imagefolder", "coco", "webdataset", "manifest"]
DATA_FORMATS: tuple[str, ...] = get_args(DataFormat)
TASK_FORMATS: dict[str, tuple[str, ...]] = {
    "classification": ("imagefolder", "webdataset", "manifest"),
    "detection": ("coco", "webdataset", "manifest"),
}
MANIFEST_SUFFIXES = (".csv", ".jsonl")
SHARD_SUFFIX = ".tar"
# The most shards a brace pattern may name (s3://b/train-{000000..099999}.tar is the largest).
MAX_SHARDS = 100_000
_BRACES = re.compile(r"\{([^{}]*)\}")
_RANGE = re.compile(r"^([0-9]{1,9})\.\.([0-9]{1,9})$")


def _brace_choices(body: str, pattern: str) -> list[str]:
    """The strings one {...} group stands for: a range {000..127} (zero-padded to the first bound's width)
    or a list {a,b,c}; bounded by MAX_SHARDS before anything is expanded."""
    if span := _RANGE.match(body):
        first, last = int(span.group(1)), int(span.group(2))
        if last < first or last - first + 1 > MAX_SHARDS:
            raise ValueError(f"'{{{body}}}' in {pattern} must count up, naming at most {MAX_SHARDS:,} shards")
        width = len(span.group(1))
        return [str(n).zfill(width) for n in range(first, last + 1)]
    choices = body.split(",")
    if len(choices) < 2 or any(not c for c in choices):
        raise ValueError(f"'{{{body}}}' in {pattern} is neither a range {{000..127}} nor a list {{a,b}}")
    return choices


def expand_braces(pattern: str) -> list[str]:
    """Every string a shard pattern names (`s3://b/train-{000000..000127}.tar`), in order; ValueError
    for a malformed group or more than MAX_SHARDS names in all (counted before they are made)."""
    parts = _BRACES.split(pattern)  # literal, group, literal, group, ..., literal
    literals, groups = parts[0::2], [_brace_choices(body, pattern) for body in parts[1::2]]
    if any(c in literal for literal in literals for c in "{}"):
        raise ValueError(f"{pattern}: braces must pair up and may not nest")
    if math.prod(len(g) for g in groups) > MAX_SHARDS:
        raise ValueError(f"{pattern} names more than {MAX_SHARDS:,} shards")
    names = [literals[0]]
    for group, literal in zip(groups, literals[1:], strict=True):
        names = [name + choice + literal for name in names for choice in group]
    return names


def data_format(task: str, data: DataSpec) -> str:
    """data.format, or the task's own layout when it is omitted (imagefolder, coco)."""
    return data.format or ("coco" if task == "detection" else "imagefolder")


def _check_uri_shape(data_format: str | None, field_name: str, uri: str) -> None:
    """A manifest names one .csv/.jsonl file; a webdataset a .tar shard or a brace pattern of them."""
    if data_format == "manifest" and not uri.endswith(MANIFEST_SUFFIXES):
        raise ValueError(f"{field_name}: with format manifest, the s3:// URI of a .csv or .jsonl file (got {uri})")
    if data_format == "webdataset":
        if not uri.endswith(SHARD_SUFFIX):
            raise ValueError(
                f"{field_name}: with format webdataset, .tar shards like s3://bucket/train-{{000000..000127}}.tar "
                f"(got {uri})"
            )
        expand_braces(uri)
    elif "{" in uri or "}" in uri:
        raise ValueError(f"{field_name}: braces name shards, only with format webdataset (got {uri})")


def _ends_cel(field: str, suffixes: tuple[str, ...]) -> str:
    return "(" + " || ".join(f"{field}.endsWith('{suffix}')" for suffix in suffixes) + ")"


def _braces_cel(field: str) -> str:
    return f"({field}.contains('{{') || {field}.contains('}}'))"


def _parts_end_cel(suffixes: tuple[str, ...]) -> str:
    """CEL: train, and validation and test when given, end with one of `suffixes`."""
    optional = [f"(!has(self.{part}) || {_ends_cel(f'self.{part}', suffixes)})" for part in ("validation", "test")]
    return " && ".join([_ends_cel("self.train", suffixes), *optional])


FORMAT_URI_RULES = [
    cel(
        f"!has(self.format) || (self.format == 'manifest' ? {_parts_end_cel(MANIFEST_SUFFIXES)} : "
        f"(self.format != 'webdataset' || {_parts_end_cel((SHARD_SUFFIX,))}))",
        "with format manifest, train, validation and test name .csv or .jsonl files; with format webdataset, "
        ".tar shards",
        ".format",
    ),
    cel(
        f"(has(self.format) && self.format == 'webdataset') || !({_braces_cel('self.train')} || "
        f"(has(self.validation) && {_braces_cel('self.validation')}) || (has(self.test) && {_braces_cel('self.test')}))",
        "braces name shards, only with format webdataset",
        ".train",
    ),
]


# data.cache (docs/trainer.md, "Data"): how a node holds the images. full: every image cached once per node
# before training (fastest from the second epoch on); stream: shards fetched ahead of use and dropped after
# it, disk bounded by sizeLimit (`stream.py`); auto: stream when the listing says the images do not fit.
CacheMode = Literal["full", "stream", "auto"]
CACHE_MODES: tuple[str, ...] = get_args(CacheMode)
# A size on disk: a whole, non-zero number of Mi, Gi or Ti (resources.cacheSize's shape).
DISK_SIZE_PATTERN = r"^[1-9][0-9]{0,5}(Mi|Gi|Ti)$"
# data.cache.sizeLimit also takes Ki: a small test or benchmark set must be able to exceed it.
CACHE_LIMIT_PATTERN = r"^[1-9][0-9]{0,8}(Ki|Mi|Gi|Ti)$"
DISK_UNITS = {"Ki": 1024, "Mi": 1024**2, "Gi": 1024**3, "Ti": 1024**4}
# The node cache's size when the spec gives none (resources.cacheSize's default, and sizeLimit's for a
# trainer config written by hand).
DEFAULT_CACHE_SIZE = "20Gi"


def disk_bytes(size: str) -> int:
    """A size of DISK_SIZE_PATTERN or CACHE_LIMIT_PATTERN (e.g. 500Mi) in bytes."""
    number, unit = size[:-2], size[-2:]
    if unit not in DISK_UNITS or not number.isdigit():
        raise ValueError(f"not a whole number of Ki, Mi, Gi or Ti: {size!r}")
    return int(number) * DISK_UNITS[unit]


class CacheSpec(SpecSection):
    """How each node holds the dataset's images: all of them before training, or streamed in bounded windows."""

    mode: CacheMode = Field(
        default="auto",
        description=(
            "full: every image is cached on each node before training (later epochs read local disk); stream: "
            "shards (webdataset) or groups of images (other formats) are fetched ahead of use, in parallel, and "
            "dropped after use, so the node's disk stays under sizeLimit whatever the dataset's size; auto "
            "(default): full when the listed images and the base weights fit in sizeLimit, stream otherwise."
        ),
    )
    size_limit: str | None = Field(
        default=None,
        pattern=CACHE_LIMIT_PATTERN,
        description=(
            "Disk for the images on each node (Ki, Mi, Gi or Ti, e.g. 2Gi): what auto compares the dataset with, "
            "and what stream mode never exceeds. At most resources.cacheSize (the node cache's volume), which is "
            "the default."
        ),
    )

    @property
    def limit_bytes(self) -> int:
        return disk_bytes(self.size_limit or DEFAULT_CACHE_SIZE)


class DataSpec(SpecSection):
    """Where the images are: an ImageFolder layout (<prefix>/<class>/<image>) in S3, images and COCO
    annotations for detection, WebDataset tar shards, or a manifest file of image URIs and labels."""

    model_config = ConfigDict(
        json_schema_extra={"x-kubernetes-validations": [VALIDATION_APART_RULE, TEST_APART_RULE, *FORMAT_URI_RULES]}
    )

    format: DataFormat | None = Field(
        default=None,
        description=(
            "How the dataset is laid out: imagefolder (classification's default: <prefix>/<class>/<image>), coco "
            "(detection's default: images and data.annotations), webdataset (tar shards, data.train "
            "s3://bucket/train-{000000..000127}.tar; labels from .cls/.json members, boxes from .json), or "
            "manifest (data.train a .csv of uri,label or a .jsonl of image URIs with a label or boxes)."
        ),
    )
    train: S3Prefix = Field(
        description=(
            "s3:// prefix of the training images: one folder per class, or (detection) the images the annotations "
            "name; webdataset: the shards (a .tar URI, braces allowed); manifest: the .csv or .jsonl file."
        )
    )
    validation: S3Prefix | None = Field(
        default=None,
        description=(
            "s3:// prefix of the validation images (same class folders); a seeded split of train when omitted. "
            "Detection: the prefix of the validation annotations' images; train's when omitted. Webdataset and "
            "manifest: the validation shards or file, in the format of train; a seeded split of train when omitted."
        ),
    )
    test: S3Prefix | None = Field(
        default=None,
        description=(
            "s3:// prefix of the test images (same class folders), evaluated once with the best checkpoint after "
            "training (evaluation.json, report.html); the report uses the validation images when omitted. "
            "Detection: the prefix of the test annotations' images; validation's (or train's) when omitted. "
            "Webdataset and manifest: the test shards or file, in the format of train."
        ),
    )
    annotations: AnnotationsSpec | None = Field(
        default=None,
        description="COCO JSON annotations for train, validation and test; required with task detection, refused otherwise.",
    )
    validation_split: float = Field(
        default=0.2,
        gt=0.0,
        lt=1.0,
        description="Fraction of train held out for validation when no validation prefix is given.",
    )
    image_size: int | None = Field(
        default=None,
        ge=16,
        le=1024,
        description="Square input size in pixels; the model's own default when omitted.",
    )
    cache: CacheSpec = Field(
        default_factory=CacheSpec,
        description="How each node holds the images: cached whole (full), streamed within sizeLimit (stream), or auto.",
    )
    augment: Literal["none", "light", "standard", "strong"] = Field(
        default="light",
        description=(
            "Training augmentation, scaled to the image size: none; light (random shifts of up to 1/8 of the "
            "side); standard (random resized crops and flips); strong (smaller crops, flips and colour "
            "jitter: timm's ImageNet recipe at 224 px). Detection flips with every policy but none."
        ),
    )

    @model_validator(mode="after")
    def _uris_fit_the_format(self) -> DataSpec:
        for part, uri in (("train", self.train), ("validation", self.validation), ("test", self.test)):
            if uri is not None:
                _check_uri_shape(self.format, part, uri)
        return self

    @model_validator(mode="after")
    def _validation_apart_from_train(self) -> DataSpec:
        if self.validation is not None and prefixes_overlap(self.validation, self.train):
            raise ValueError(
                f"validation: must not overlap train ({self.train}): validation images would also be trained on "
                f"(got {self.validation})"
            )
        if self.test is not None and prefixes_overlap(self.test, self.train):
            raise ValueError(
                f"test: must not overlap train ({self.train}): test images would also be trained on (got {self.test})"
            )
        return self


# Defaults measured on the fine-tuning quality benchmark (bench/quality.py; docs/trainer.md, "Defaults").
LAYER_DECAY = 0.8
# The top backbone stage's share of the head's rate when backboneLearningRateScale is omitted. A detector's
# new heads (and FPN) take the range test's rate, its pretrained backbone a tenth of it: at the full rate
# the backbone's features were lost (mAP 0.13 against 0.31; docs/trainer.md).
BACKBONE_SCALE: dict[Task, float] = {"classification": 1.0, "detection": 0.1}
# Without warmupEpochs, the warm-up takes this share of the run's steps.
WARMUP_FRACTION = 0.2

# training.learningRate: a number, or "auto" for the range test. A CRD type is one type, so the schema
# leaves the node untyped (x-kubernetes-preserve-unknown-fields) and says which values pass in anyOf's
# value validations: the string auto, or a number in (0, 10]. minLength 1 with maxLength 0 fails every
# string, so the second branch holds numbers only (the API server still rejects other strings, and the
# model rejects booleans and objects too).
AUTO = "auto"
MAX_LEARNING_RATE = 10.0
LEARNING_RATE_SCHEMA: dict[str, Any] = {
    "x-kubernetes-preserve-unknown-fields": True,
    "anyOf": [
        {"enum": [AUTO]},
        {"exclusiveMinimum": 0.0, "maximum": MAX_LEARNING_RATE, "minLength": 1, "maxLength": 0},
    ],
}

WARMUP_RULE = cel(
    "!has(self.warmupEpochs) || self.warmupEpochs < self.epochs",
    "warmupEpochs must be less than epochs",
    ".warmupEpochs",
)
# A duration in hours, minutes and seconds ("10m", "1h30m", "90s"), as CEL's duration() reads it; each
# field that takes one bounds it with a CEL rule and its Python twin (`duration_seconds`).
DURATION = r"[0-9]{1,6}h([0-9]{1,6}m)?([0-9]{1,6}s)?|[0-9]{1,6}m([0-9]{1,6}s)?|[0-9]{1,6}s"
# training.checkpointEvery: "epoch", or a duration.
EPOCH = "epoch"
CHECKPOINT_EVERY_PATTERN = rf"^(epoch|{DURATION})$"
MIN_CHECKPOINT_INTERVAL_S = 1
MAX_CHECKPOINT_INTERVAL_S = 7 * 24 * 3600
CHECKPOINT_EVERY_RULE = cel(
    f"self.checkpointEvery == '{EPOCH}' || (duration(self.checkpointEvery) >= duration('{MIN_CHECKPOINT_INTERVAL_S}s')"
    f" && duration(self.checkpointEvery) <= duration('{MAX_CHECKPOINT_INTERVAL_S}s'))",
    "checkpointEvery must be 'epoch' or a duration from 1s to 168h",
    ".checkpointEvery",
)
_DURATION_UNITS = {"h": 3600, "m": 60, "s": 1}


def duration_seconds(text: str) -> int:
    """Seconds of a DURATION ("1h30m" -> 5400)."""
    total, digits = 0, ""
    for char in text:
        if char.isdigit():
            digits += char
        else:
            total, digits = total + int(digits) * _DURATION_UNITS[char], ""
    return total


# The options a fine-tune is expected to have (docs/trainer.md, "Training options"); every one is off by
# default. RandAugment is timm's, configured by its own string: "rand", then dash-separated m<magnitude>,
# n<ops per image>, p<probability of each op>, mstd<magnitude noise>, mmax<magnitude cap>, inc<0|1>.
RAND_AUGMENT_PATTERN = r"^rand(-(m|n|p|mstd|mmax|inc)[0-9]{1,3}(\.[0-9]{1,3})?)*$"
MAX_ACCUMULATE_STEPS = 1024
MAX_MIX_ALPHA = 10.0
MAX_CLIP_NORM = 1.0e4
MAX_LABEL_SMOOTHING = 0.5
MIN_EMA_DECAY = 0.5
# Options that only a classifier takes: they act on single labels and on whole-image pixels.
CLASSIFICATION_ONLY = ("labelSmoothing", "mixupAlpha", "cutmixAlpha", "randAugment")
MIX_EVEN_BATCH_RULE = cel(
    "(self.mixupAlpha == 0.0 && self.cutmixAlpha == 0.0) || self.batchSize % 2 == 0",
    "batchSize must be even with mixupAlpha or cutmixAlpha (timm's Mixup pairs each image with another)",
    ".batchSize",
)
PATIENCE_RULE = cel(
    "!has(self.earlyStopping) || self.earlyStopping.patience < self.epochs",
    "earlyStopping.patience must be less than epochs (it could never stop the run early)",
    ".earlyStopping.patience",
)


class EarlyStoppingSpec(SpecSection):
    """Stop training once a validation figure has stopped improving."""

    metric: SelectBy | None = Field(
        default=None,
        description=(
            "The validation figure watched: valAccuracy or valLoss for classification, valMap or valMap50 for "
            "detection; training.selectBy's (or its default) when omitted."
        ),
    )
    patience: int = Field(
        default=3,
        ge=1,
        le=MAX_EPOCHS,
        description="Epochs without an improvement of at least minDelta after which training stops; less than epochs.",
    )
    min_delta: float = Field(
        default=0.0,
        ge=0.0,
        le=1000.0,
        description="The least change of the metric (in its own units, e.g. 0.01 = one point of accuracy) that counts as an improvement.",
    )


class TrainingSpec(SpecSection):
    """How to train: epochs, batch, optimiser and schedule."""

    model_config = ConfigDict(
        json_schema_extra={
            "x-kubernetes-validations": [WARMUP_RULE, CHECKPOINT_EVERY_RULE, MIX_EVEN_BATCH_RULE, PATIENCE_RULE]
        }
    )

    epochs: int = Field(default=10, ge=1, le=MAX_EPOCHS, description="Passes over the training data.")
    batch_size: int = Field(default=32, ge=1, le=4096, description="Images per step on each worker.")
    learning_rate: Annotated[float | None, WithJsonSchema(LEARNING_RATE_SCHEMA)] = Field(
        default=None,
        gt=0.0,
        le=MAX_LEARNING_RATE,
        description=(
            "Peak learning rate of the new head, reached at the end of warm-up (the backbone's follows "
            "backboneLearningRateScale and layerDecay): a number, or auto (the same as leaving it out) to have "
            "a learning-rate range test on the job's data choose it before training (`kubetune tune-lr` runs "
            "the same test alone)."
        ),
    )
    backbone_learning_rate_scale: float | None = Field(
        default=None,
        gt=0.0,
        le=1.0,
        description=(
            "The top backbone stage's learning rate as a fraction of the head's (strategies partial and full); "
            "omitted: 1 for classification, 0.1 for detection."
        ),
    )
    layer_decay: float = Field(
        default=LAYER_DECAY,
        gt=0.0,
        le=1.0,
        description=(
            "Layer-wise learning-rate decay: each backbone stage below the top one learns this much slower "
            "than the stage above it (1: every stage alike)."
        ),
    )
    optimizer: Literal["adamw", "sgd"] = Field(
        default="adamw", description="Optimiser: adamw (AdamW) or sgd (SGD with momentum)."
    )
    weight_decay: float = Field(default=0.05, ge=0.0, le=1.0, description="Weight-decay coefficient.")
    scheduler: Literal["cosine", "constant", "step"] = Field(
        default="cosine", description="Learning-rate schedule after warm-up: cosine decay, constant, or step decay."
    )
    warmup_epochs: int | None = Field(
        default=None,
        ge=0,
        le=100,
        description="Epochs of linear learning-rate warm-up, less than epochs; omitted: the first fifth of the steps.",
    )
    precision: Literal["bf16", "fp16", "fp32"] = Field(
        default="bf16", description="Mixed precision on GPU; CPU runs always use fp32."
    )
    seed: int = Field(default=42, ge=0, le=2**31 - 1, description="Seed for splits, shuffling and initialisation.")
    select_by: SelectBy | None = Field(
        default=None,
        description=(
            "The validation figure that picks the checkpoint to export (the best epoch, not the last): "
            "valAccuracy (highest) or valLoss (lowest) for classification, valMap or valMap50 (highest) for "
            "detection; valAccuracy, or valMap for detection, when omitted."
        ),
    )
    checkpoint_every: str = Field(
        default=EPOCH,
        pattern=CHECKPOINT_EVERY_PATTERN,
        max_length=24,
        description=(
            "When to checkpoint: epoch (after every epoch), or a duration such as 10m or 1h30m (from 1s to 168h): "
            "whenever that long has passed since the last checkpoint, mid-epoch or at an epoch's end, and after "
            "the last epoch. Checkpoints upload in the background; a preemption also checkpoints."
        ),
    )

    accumulate_steps: int = Field(
        default=1,
        ge=1,
        le=MAX_ACCUMULATE_STEPS,
        description=(
            "Gradient accumulation: batches whose gradients are averaged into one optimizer step, so a step sees "
            "batchSize x accumulateSteps images per worker (1: a step per batch)."
        ),
    )
    gradient_clip_norm: float | None = Field(
        default=None,
        gt=0.0,
        le=MAX_CLIP_NORM,
        description="Gradient clipping: the most the gradients' total L2 norm may be at a step; no clipping when omitted.",
    )
    label_smoothing: float = Field(
        default=0.0,
        ge=0.0,
        le=MAX_LABEL_SMOOTHING,
        description=(
            "Classification: label smoothing, the share of each target spread over the other classes (timm's "
            "loss); from 0 (off) to 0.5."
        ),
    )
    mixup_alpha: float = Field(
        default=0.0,
        ge=0.0,
        le=MAX_MIX_ALPHA,
        description=(
            "Classification: mixup, the Beta(alpha, alpha) mixing of image pairs and their labels (timm's Mixup); "
            "0 (off), typically 0.2 to 1. Needs an even batchSize."
        ),
    )
    cutmix_alpha: float = Field(
        default=0.0,
        ge=0.0,
        le=MAX_MIX_ALPHA,
        description=(
            "Classification: CutMix, pasting a Beta(alpha, alpha)-sized patch of another image (timm's Mixup; with "
            "mixupAlpha too, each batch uses one or the other, half and half); 0 (off), typically 1. Needs an "
            "even batchSize."
        ),
    )
    rand_augment: str | None = Field(
        default=None,
        max_length=64,
        pattern=RAND_AUGMENT_PATTERN,
        description=(
            "Classification: RandAugment on the training images after data.augment's crops (timm's "
            "rand_augment_transform), by timm's config string, e.g. rand-m9-mstd0.5 (magnitude 9 of 10, "
            "2 ops per image) or rand-m7-n3; off when omitted."
        ),
    )
    ema_decay: float | None = Field(
        default=None,
        ge=MIN_EMA_DECAY,
        lt=1.0,
        description=(
            "An exponential moving average of the weights (timm's ModelEmaV3, with its warm-up), e.g. 0.999: the "
            "average is validated, picks the best epoch and is exported; off when omitted."
        ),
    )
    early_stopping: EarlyStoppingSpec | None = Field(
        default=None,
        description=(
            "Stop once the metric has not improved by minDelta for patience epochs: the job succeeds with reason "
            "EarlyStopped and exports the best epoch; trains every epoch when omitted."
        ),
    )

    @field_validator("learning_rate", mode="before")
    @classmethod
    def _auto_is_the_range_test(cls, value: Any) -> Any:
        """`auto` and an omitted learningRate mean the same: the range test chooses it (None here)."""
        if isinstance(value, str) and value == AUTO:
            return None
        if isinstance(value, str):
            raise ValueError(f"must be a number or {AUTO} (got {value!r})")
        return value

    def backbone_scale(self, task: Task) -> float:
        """backboneLearningRateScale, or the task's default (BACKBONE_SCALE) when it is omitted."""
        return (
            self.backbone_learning_rate_scale if self.backbone_learning_rate_scale is not None else BACKBONE_SCALE[task]
        )

    @model_validator(mode="after")
    def _warmup_before_end(self) -> TrainingSpec:
        if self.warmup_epochs is not None and self.warmup_epochs >= self.epochs:
            raise ValueError(f"warmupEpochs: must be less than epochs ({self.epochs}) (got {self.warmup_epochs})")
        return self

    @model_validator(mode="after")
    def _mix_pairs_images(self) -> TrainingSpec:
        if (self.mixup_alpha > 0 or self.cutmix_alpha > 0) and self.batch_size % 2:
            raise ValueError(
                "batchSize: must be even with mixupAlpha or cutmixAlpha (timm's Mixup pairs each image with "
                f"another) (got {self.batch_size})"
            )
        return self

    @model_validator(mode="after")
    def _patience_within_epochs(self) -> TrainingSpec:
        if self.early_stopping is not None and self.early_stopping.patience >= self.epochs:
            raise ValueError(
                f"earlyStopping.patience: must be less than epochs ({self.epochs}), or it could never stop the run "
                f"early (got {self.early_stopping.patience})"
            )
        return self

    @property
    def mixes(self) -> bool:
        """Whether batches are mixed (mixup or CutMix): the loss then takes soft targets."""
        return self.mixup_alpha > 0 or self.cutmix_alpha > 0

    def classification_only(self) -> list[str]:
        """The classification-only options this spec turns on (CLASSIFICATION_ONLY), by their field names."""
        on = {
            "labelSmoothing": self.label_smoothing > 0,
            "mixupAlpha": self.mixup_alpha > 0,
            "cutmixAlpha": self.cutmix_alpha > 0,
            "randAugment": self.rand_augment is not None,
        }
        return [name for name in CLASSIFICATION_ONLY if on[name]]

    @model_validator(mode="after")
    def _checkpoint_interval_bounded(self) -> TrainingSpec:
        seconds = self.checkpoint_interval_s
        if seconds is not None and not MIN_CHECKPOINT_INTERVAL_S <= seconds <= MAX_CHECKPOINT_INTERVAL_S:
            raise ValueError(
                f"checkpointEvery: must be '{EPOCH}' or a duration from 1s to 168h (got {self.checkpoint_every})"
            )
        return self

    @property
    def checkpoint_interval_s(self) -> int | None:
        """Seconds between time-based checkpoints; None for one per epoch."""
        return None if self.checkpoint_every == EPOCH else duration_seconds(self.checkpoint_every)


# -- sweeps (spec.sweep): Ray Tune over the spec's own fields ------------------------------------------

MAX_SWEEP_TRIALS = 1000
MAX_SWEEP_PARAMETERS = 16
MAX_SWEEP_VALUES = 64


@dataclass(frozen=True)
class Sweepable:
    """A spec field a sweep may vary, and the distributions it accepts.

    `kind` says which of a parameter's keys it takes: "number" (values, uniform, loguniform), "integer"
    (values only: batch sizes and stage counts are grids, not ranges) or "choice" (choices only).
    """

    field: str  # the spec path, camelCase, as users write it in sweep.parameters[].field
    kind: Literal["number", "integer", "choice"]


# The one table of sweepable fields. Each trial's spec is the job's spec with the trial's values set, and is
# validated like any spec (model.trainableLayers applies to the trials whose strategy is partial).
SWEEPABLE: tuple[Sweepable, ...] = (
    Sweepable("training.learningRate", "number"),
    Sweepable("training.weightDecay", "number"),
    Sweepable("training.batchSize", "integer"),
    Sweepable("training.labelSmoothing", "number"),
    Sweepable("training.mixupAlpha", "number"),
    Sweepable("model.strategy", "choice"),
    Sweepable("model.trainableLayers", "integer"),
    Sweepable("data.augment", "choice"),
)
SweepField = Literal[
    "training.learningRate",
    "training.weightDecay",
    "training.batchSize",
    "training.labelSmoothing",
    "training.mixupAlpha",
    "model.strategy",
    "model.trainableLayers",
    "data.augment",
]
SWEEPABLE_BY_FIELD = {item.field: item for item in SWEEPABLE}


class SweepRange(SpecSection):
    """A continuous range of a number, both ends included."""

    min: float = Field(ge=0.0, description="Lowest value (above 0 for loguniform).")
    max: float = Field(ge=0.0, description="Highest value, above min.")

    @model_validator(mode="after")
    def _ordered(self) -> SweepRange:
        if not self.max > self.min:
            raise ValueError(f"max: must be above min ({self.min}) (got {self.max})")
        return self


class SweepParameter(SpecSection):
    """One field a sweep varies: exactly one of values, choices, uniform or loguniform."""

    field: SweepField = Field(description="The spec field: " + ", ".join(item.field for item in SWEEPABLE) + ".")
    values: list[float] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_SWEEP_VALUES,
        description="Numbers to choose from (number and integer fields).",
    )
    choices: list[str] | None = Field(
        default=None,
        min_length=1,
        max_length=MAX_SWEEP_VALUES,
        description="Names to choose from (model.strategy, data.augment).",
    )
    uniform: SweepRange | None = Field(default=None, description="Sampled uniformly between min and max.")
    loguniform: SweepRange | None = Field(
        default=None, description="Sampled uniformly in log space between min and max (min above 0)."
    )

    @model_validator(mode="after")
    def _one_distribution_of_the_field_s_kind(self) -> SweepParameter:
        given = [key for key in ("values", "choices", "uniform", "loguniform") if getattr(self, key) is not None]
        kind = SWEEPABLE_BY_FIELD[self.field].kind
        allowed = {"number": ("values", "uniform", "loguniform"), "integer": ("values",), "choice": ("choices",)}[kind]
        if len(given) != 1 or given[0] not in allowed:
            raise ValueError(
                f"{self.field}: set exactly one of {', '.join(allowed)} (got {', '.join(given) or 'none'})"
            )
        if kind == "integer" and self.values and any(v != int(v) for v in self.values):
            raise ValueError(f"{self.field}: values must be whole numbers (got {self.values})")
        if self.loguniform is not None and self.loguniform.min <= 0:
            raise ValueError(f"{self.field}: loguniform.min must be above 0 (got {self.loguniform.min})")
        return self


class SweepScheduler(SpecSection):
    """How trials are stopped early: asha (Ray Tune's ASHA) or fifo (every trial runs all its epochs)."""

    type: Literal["asha", "fifo"] = Field(default="asha", description="asha or fifo.")
    grace_period: int = Field(
        default=1, ge=1, le=MAX_EPOCHS, description="ASHA: epochs every trial trains before it may be stopped."
    )
    reduction_factor: int = Field(
        default=3, ge=2, le=8, description="ASHA: each rung keeps about 1/reductionFactor of the trials."
    )


class SweepSpec(SpecSection):
    """A hyperparameter sweep inside the job: trials of the same training, each with other values of
    `parameters`; the best trial by `metric` is exported as the job's model."""

    parameters: list[SweepParameter] = Field(
        min_length=1, max_length=MAX_SWEEP_PARAMETERS, description="The fields to vary, each once."
    )
    trials: int = Field(default=8, ge=1, le=MAX_SWEEP_TRIALS, description="Trials to run in all.")
    max_concurrent_trials: int = Field(
        default=1,
        ge=1,
        le=MAX_WORKERS,
        description="Trials at once; each takes resources.workers workers, so the Ray cluster has this many times "
        "as many.",
    )
    metric: SelectBy | None = Field(
        default=None,
        description="The validation figure that ranks trials; omitted: training.selectBy or the task's default.",
    )
    mode: Literal["max", "min"] | None = Field(
        default=None, description="max or min; omitted: min for valLoss, max otherwise."
    )
    scheduler: SweepScheduler = Field(default_factory=SweepScheduler, description="Early stopping of poor trials.")
    seed: int | None = Field(
        default=None, ge=0, le=2**31 - 1, description="Seed of the trials' sampling; omitted: training.seed."
    )


def concurrent_trials(sweep: SweepSpec | None) -> int:
    """How many runs train at once: a sweep's maxConcurrentTrials, else the one run."""
    return sweep.max_concurrent_trials if sweep is not None else 1


ExportFormat = Literal["safetensors", "onnx", "torchscript"]
FORMATS_RULE = cel(
    "!has(self.formats) || 'safetensors' in self.formats",
    "formats must include safetensors (the model's weights are always exported); add onnx and/or torchscript",
    ".formats",
)
MLFLOW_URI_PATTERN = r"^https?://[^\s/@]+(/[^\s@]*)?$"


class MlflowSpec(SpecSection):
    """An MLflow tracking server to hand the trained model to."""

    tracking_uri: str = Field(
        pattern=MLFLOW_URI_PATTERN,
        max_length=512,
        description=(
            "http(s):// URL of the MLflow tracking server (no credentials in it: the trainer's environment "
            "gives MLflow's own MLFLOW_TRACKING_TOKEN or MLFLOW_TRACKING_USERNAME/PASSWORD)."
        ),
    )
    experiment: str = Field(
        default="kubetune", min_length=1, max_length=256, description="MLflow experiment the run is logged in."
    )
    registered_model: str | None = Field(
        default=None,
        min_length=1,
        max_length=256,
        description="Registered model to add the exported model to as a new version; only logged when omitted.",
    )


class OutputSpec(SpecSection):
    """Where checkpoints and the exported model go."""

    model_config = ConfigDict(json_schema_extra={"x-kubernetes-validations": [FORMATS_RULE]})

    path: S3Prefix = Field(
        description=(
            "s3:// prefix for checkpoints/, model.safetensors, model.json, history.json, training-curves.png, "
            "evaluation.json and report.html."
        )
    )
    checkpoints_to_keep: int = Field(
        default=2,
        ge=1,
        le=100,
        description="Checkpoints kept: the best ones by training.selectBy, and always the latest (to resume from).",
    )
    formats: list[ExportFormat] = Field(
        default_factory=lambda: list[ExportFormat](["safetensors"]),
        min_length=1,
        max_length=3,
        description=(
            "Model formats to export: safetensors (always), onnx (checked against the model with onnxruntime "
            "at export), torchscript."
        ),
        json_schema_extra={"x-kubernetes-list-type": "set"},
    )
    mlflow: MlflowSpec | None = Field(
        default=None,
        description="Log the run (parameters, metrics per epoch, the report, the model) to MLflow and register it.",
    )

    @model_validator(mode="after")
    def _weights_always(self) -> OutputSpec:
        if "safetensors" not in self.formats:
            raise ValueError(
                "formats: must include safetensors (the model's weights are always exported); add onnx and/or "
                f"torchscript (got {self.formats})"
            )
        if len(set(self.formats)) != len(self.formats):
            raise ValueError(f"formats: each format at most once (got {self.formats})")
        return self


CONFIG_MAP_KEY = r"^[-._a-zA-Z0-9]+$"
# Where the trainer finds a private CA's bundle (boto3 reads it itself; pyarrow is told): the operator
# mounts storage.caBundle's key and points this at it.
CA_BUNDLE_ENV = "AWS_CA_BUNDLE"
AddressingStyle = Literal["auto", "path", "virtual"]


class CaBundle(SpecSection):
    """A ConfigMap key holding the PEM certificates of a private CA."""

    config_map: str = Field(pattern=DNS_SUBDOMAIN, max_length=253, description="The ConfigMap's name.")
    key: str = Field(
        default="ca.crt", pattern=CONFIG_MAP_KEY, max_length=253, description="The key holding the PEM bundle."
    )


class StorageSpec(SpecSection):
    """The S3-compatible object store and how to authenticate to it."""

    endpoint: str | None = Field(
        default=None,
        pattern=ENDPOINT_PATTERN,
        max_length=512,
        description="S3-compatible endpoint URL (http:// or https://); AWS S3 when omitted.",
    )
    region: str = Field(
        default=DEFAULT_REGION,
        pattern=REGION_PATTERN,
        description="S3 region (S3-compatible stores mostly accept any).",
    )
    credentials_secret: str | None = Field(
        default=None,
        pattern=DNS_SUBDOMAIN,
        max_length=253,
        description=(
            "Name of a Secret in the job's namespace with AWS_ACCESS_KEY_ID and AWS_SECRET_ACCESS_KEY; "
            "the pods' own identity (IRSA, workload identity) when omitted."
        ),
    )
    ca_bundle: CaBundle | None = Field(
        default=None,
        description=(
            "A ConfigMap key with the CA certificates (PEM) of an S3 endpoint with a private CA; used by the "
            "operator's preflight and by the trainer (AWS_CA_BUNDLE). The system's CAs when omitted."
        ),
    )
    addressing_style: Literal["path", "virtual"] | None = Field(
        default=None,
        description=(
            "path (https://endpoint/bucket/key, MinIO and Ceph) or virtual (https://bucket.endpoint/key); "
            "path with an endpoint, AWS's choice without, when omitted."
        ),
    )

    def boto_addressing_style(self) -> AddressingStyle:
        """What botocore's `s3.addressing_style` gets: S3-compatible stores default to path addressing."""
        return self.addressing_style or ("path" if self.endpoint else "auto")


def _unknown_architecture(name: str, known: frozenset[str], what: str) -> ValueError:
    close = architectures.close_matches(name, known)
    hint = f"; close matches: {', '.join(close)}" if close else ""
    return ValueError(f"model.architecture: '{name}' is not a {what}{hint}")


def check_sections(
    task: str, model: ModelSpec, data: DataSpec, training: TrainingSpec, sweep: SweepSpec | None
) -> None:
    """The cross-section rules of the sections the job's spec and the trainer's config both hold: the
    task's (`check_task`), and a sweep's (`check_sweep`)."""
    check_task(task, model, data, training)
    if sweep is not None:
        check_sweep(task, model, data, training, sweep)


def check_task(task: str, model: ModelSpec, data: DataSpec, training: TrainingSpec) -> None:
    """The fields each task accepts; raises ValueError("<field.path>: ...") like the other cross-field rules."""
    if training.select_by is not None and training.select_by not in SELECT_BY[task]:
        raise ValueError(
            f"training.selectBy: with task '{task}' one of {', '.join(SELECT_BY[task])} (got {training.select_by})"
        )
    stopping = training.early_stopping
    if stopping is not None and stopping.metric is not None and stopping.metric not in SELECT_BY[task]:
        raise ValueError(
            f"training.earlyStopping.metric: with task '{task}' one of {', '.join(SELECT_BY[task])} "
            f"(got {stopping.metric})"
        )
    if task == "detection" and training.classification_only():
        raise ValueError(
            f"training.{training.classification_only()[0]}: only with task 'classification' (label smoothing, mixup, "
            "CutMix and RandAugment act on single labels and whole images, not on boxes); remove it"
        )
    check_test_split(task, data)
    detector = model.architecture in DETECTION_ARCHITECTURES
    if not detector and model.architecture not in architectures.timm_models():
        if task == "detection":
            raise _unknown_architecture(model.architecture, frozenset(DETECTION_ARCHITECTURES), "detection model")
        raise _unknown_architecture(model.architecture, architectures.timm_models(), "timm model")
    if task == "classification" and model.num_classes == 1:
        raise ValueError("model.numClasses: must be >= 2 with task classification (1 is allowed for detection)")
    if task == "detection":
        if not detector:
            raise ValueError(
                f"model.architecture: '{model.architecture}' is a classification architecture; detection accepts: "
                + ", ".join(DETECTION_ARCHITECTURES)
            )
    else:
        if detector:
            raise ValueError(
                f"model.architecture: '{model.architecture}' is a detection architecture; set task: detection, "
                "or name a timm classification model (e.g. resnet50)"
            )
    check_format(task, data)


def check_format(task: str, data: DataSpec) -> None:
    """The formats each task reads, and data.annotations exactly with coco."""
    if data.format is not None and data.format not in TASK_FORMATS[task]:
        raise ValueError(
            f"data.format: '{data.format}' is not a format of task {task}; it accepts: {', '.join(TASK_FORMATS[task])}"
        )
    layout = data_format(task, data)
    if layout == "coco" and data.annotations is None:
        raise ValueError("data.annotations: required with task 'detection' (COCO JSON for train and validation)")
    if layout != "coco" and data.annotations is not None:
        why = f"task is '{task}'" if task != "detection" else f"format is '{layout}': its files hold the boxes"
        raise ValueError(f"data.annotations: only allowed with task 'detection' and format coco ({why})")


# -- sweeps: each trial is the job's spec with the trial's values set, validated like any spec -----------

SweepValue = float | int | str


def sweep_value(field: str, value: float | str) -> SweepValue:
    """A parameter's value as its field takes it: integer fields' whole numbers as int."""
    if SWEEPABLE_BY_FIELD[field].kind == "integer" and isinstance(value, float):
        return int(value)
    return value


def trial_sections(
    model: ModelSpec, data: DataSpec, training: TrainingSpec, values: dict[str, SweepValue]
) -> tuple[ModelSpec, DataSpec, TrainingSpec]:
    """The spec's sections with a trial's `values` (spec path to value) set, validated like any spec's.

    model.trainableLayers applies to the trials whose strategy is partial: a trial of another strategy
    leaves it out. Raises pydantic's ValidationError or ValueError for values the fields do not accept.
    """
    wires: dict[str, dict[str, Any]] = {"model": model.wire(), "data": data.wire(), "training": training.wire()}
    for path, value in values.items():
        section, key = path.split(".", 1)
        wires[section][key] = value
    if wires["model"].get("strategy") != "partial":
        wires["model"].pop("trainableLayers", None)
    return (
        ModelSpec.model_validate(wires["model"]),
        DataSpec.model_validate(wires["data"]),
        TrainingSpec.model_validate(wires["training"]),
    )


def _points(parameter: SweepParameter) -> list[SweepValue]:
    """The values of a parameter that bound what its trials may get: every listed one, a range's two ends."""
    if parameter.values is not None:
        return [sweep_value(parameter.field, v) for v in parameter.values]
    if parameter.choices is not None:
        return list(parameter.choices)
    spread = parameter.uniform or parameter.loguniform
    assert spread is not None  # SweepParameter holds exactly one distribution
    return [spread.min, spread.max]


def _first_message(error: Exception) -> str:
    """A ValidationError's first problem (or a ValueError's text), without pydantic's decoration."""
    if isinstance(error, ValidationError):
        item = error.errors()[0]
        return str(item["msg"]).removeprefix("Value error, ")
    return str(error)


def _partners(sweep: SweepSpec, field: str, value: SweepValue) -> dict[str, SweepValue]:
    """What a trial with `field` at `value` also sets: trainableLayers needs strategy partial, and strategy
    partial takes the swept trainableLayers' first value."""
    if field == "model.trainableLayers":
        return {"model.strategy": "partial"}
    layers = [p for p in sweep.parameters if p.field == "model.trainableLayers"]
    if field == "model.strategy" and value == "partial" and layers:
        return {"model.trainableLayers": _points(layers[0])[0]}
    return {}


def check_sweep(task: str, model: ModelSpec, data: DataSpec, training: TrainingSpec, sweep: SweepSpec) -> None:
    """spec.sweep against the rest of the spec; raises ValueError("sweep.<field>: ...") like check_task."""
    fields = [p.field for p in sweep.parameters]
    repeated = sorted({f for f in fields if fields.count(f) > 1})
    if repeated:
        raise ValueError(f"sweep.parameters: each field at most once ({', '.join(repeated)} repeated)")
    if sweep.max_concurrent_trials > sweep.trials:
        raise ValueError(
            f"sweep.maxConcurrentTrials: at most sweep.trials ({sweep.trials}) (got {sweep.max_concurrent_trials})"
        )
    metric = sweep_metric(task, training, sweep)
    if metric not in SELECT_BY[task]:
        raise ValueError(f"sweep.metric: with task '{task}' one of {', '.join(SELECT_BY[task])} (got {metric})")
    if sweep.mode is not None and sweep.mode != metric_mode(metric):
        raise ValueError(
            f"sweep.mode: {metric} is best when {'lowest' if metric in LOWER_IS_BETTER else 'highest'}: "
            f"{metric_mode(metric)} or leave it out (got {sweep.mode})"
        )
    if sweep.scheduler.type == "asha" and sweep.scheduler.grace_period > training.epochs:
        raise ValueError(
            f"sweep.scheduler.gracePeriod: at most training.epochs ({training.epochs}) "
            f"(got {sweep.scheduler.grace_period})"
        )
    strategies = next((p.choices or [] for p in sweep.parameters if p.field == "model.strategy"), [model.strategy])
    if "model.trainableLayers" in fields and "partial" not in strategies:
        raise ValueError(
            "sweep.parameters: model.trainableLayers only with model.strategy partial (or partial among the "
            f"swept strategies; strategies: {', '.join(strategies)})"
        )
    for index, parameter in enumerate(sweep.parameters):
        for value in _points(parameter):
            try:
                sections = trial_sections(
                    model, data, training, {parameter.field: value, **_partners(sweep, parameter.field, value)}
                )
                check_task(task, *sections)
            except (ValidationError, ValueError) as error:
                raise ValueError(
                    f"sweep.parameters[{index}]: {parameter.field} {value!r} is not a value the field accepts: "
                    f"{_first_message(error)}"
                ) from None


def sweep_metric(task: str, training: TrainingSpec, sweep: SweepSpec) -> str:
    """The history key that ranks a sweep's trials: sweep.metric, else training.selectBy or the task's default."""
    return sweep.metric or selected_metric(task, training.select_by)


def metric_mode(metric: str) -> Literal["min", "max"]:
    """min for a loss, max for the other figures."""
    return "min" if metric in LOWER_IS_BETTER else "max"


def check_test_split(task: str, data: DataSpec) -> None:
    """Classification's test images apart from validation's; detection's test prefix (coco) only with test
    annotations."""
    if task == "detection":
        coco = data_format(task, data) == "coco"
        if coco and data.test is not None and (data.annotations is None or data.annotations.test is None):
            raise ValueError("data.test: with task 'detection' only together with data.annotations.test")
    elif data.test is not None and data.validation is not None and prefixes_overlap(data.test, data.validation):
        raise ValueError(
            f"data.test: must not overlap data.validation ({data.validation}): the test images would pick the "
            f"model they judge (got {data.test})"
        )


def cel_list(items: tuple[str, ...]) -> str:
    """`items` as a CEL list literal of strings."""
    return "[" + ", ".join(f"'{item}'" for item in items) + "]"


TASK_CEL_RULES = [
    cel(
        "!has(self.training.earlyStopping) || !has(self.training.earlyStopping.metric) || (self.task == 'detection' ? "
        f"self.training.earlyStopping.metric in {cel_list(SELECT_BY['detection'])} : "
        f"self.training.earlyStopping.metric in {cel_list(SELECT_BY['classification'])})",
        "training.earlyStopping.metric must be valAccuracy or valLoss with task classification, valMap or valMap50 "
        "with detection",
        ".training.earlyStopping.metric",
    ),
    cel(
        "self.task != 'detection' || (self.training.labelSmoothing == 0.0 && self.training.mixupAlpha == 0.0 && "
        "self.training.cutmixAlpha == 0.0 && !has(self.training.randAugment))",
        "training.labelSmoothing, mixupAlpha, cutmixAlpha and randAugment are only allowed with task classification",
        ".training",
    ),
    cel(
        "!has(self.training.selectBy) || (self.task == 'detection' ? "
        f"self.training.selectBy in {cel_list(SELECT_BY['detection'])} : "
        f"self.training.selectBy in {cel_list(SELECT_BY['classification'])})",
        "training.selectBy must be valAccuracy or valLoss with task classification, valMap or valMap50 with detection",
        ".training.selectBy",
    ),
    cel(
        "self.task != 'detection' || !has(self.data.test) || "
        "(has(self.data.annotations) && has(self.data.annotations.test))",
        "data.test is allowed with task detection only together with data.annotations.test",
        ".data.test",
    ),
    cel(
        "self.task == 'detection' || !has(self.data.test) || !has(self.data.validation) || "
        f"!({prefixes_overlap_cel('self.data.test', 'self.data.validation')})",
        "data.test must not overlap data.validation: the test images would pick the model they judge",
        ".data.test",
    ),
    cel(
        "self.task == 'detection' || !has(self.model.numClasses) || self.model.numClasses >= 2",
        "model.numClasses must be >= 2 with task classification (1 is allowed for detection)",
        ".model.numClasses",
    ),
    cel(
        "(self.task == 'detection' && (!has(self.data.format) || self.data.format == 'coco')) "
        "== has(self.data.annotations)",
        "data.annotations is required with task detection (format coco) and not allowed otherwise",
        ".data.annotations",
    ),
    cel(
        "!has(self.data.format) || self.data.format in "
        "(self.task == 'detection' ? "
        f"{cel_list(TASK_FORMATS['detection'])} : {cel_list(TASK_FORMATS['classification'])})",
        "data.format must be a format of the task: classification reads "
        + ", ".join(TASK_FORMATS["classification"])
        + "; detection reads "
        + ", ".join(TASK_FORMATS["detection"]),
        ".data.format",
    ),
    cel(
        f"(self.model.architecture in {cel_list(DETECTION_ARCHITECTURES)}) == (self.task == 'detection')",
        "model.architecture must be a torchvision detection model with task detection, and a classification "
        "model otherwise; detection accepts: " + ", ".join(DETECTION_ARCHITECTURES),
        ".model.architecture",
    ),
]
TASK_DESCRIPTION = (
    "What the model learns: classification (one label per image, timm models) or detection (boxes and "
    "labels, torchvision detection models, COCO annotations)."
)


# What identifies a run's checkpoints, beyond the job's namespace and name (`run_digest`): what makes them
# unloadable into, or meaningless for, another spec. The task, the model (base weights, architecture,
# classes, strategy; not `resume`), the data (images, annotations, split, size, augmentation), and of the
# training the optimizer (its state must load), the weights' average (emaDecay: on or off, its state is in the
# checkpoints, and it is what they rank and export) and the seed (it splits train from validation). The other
# training fields (epochs, learning rate and schedule, batch size, precision, checkpointEvery, the other
# training options) may change
# between a job and the same job applied again: it continues its run, e.g. to train longer.
RUN_SHAPING = {"model": None, "data": None, "training": ("optimizer", "seed", "emaDecay")}
NOT_RUN_SHAPING = {"model": ("resume",)}
RUN_DIGEST_LENGTH = 12


def run_digest(task: str, model: ModelSpec, data: DataSpec, training: TrainingSpec) -> str:
    """A digest of what a run's checkpoints belong to (RUN_SHAPING): another digest is another run.

    Resources, the run policy, storage access, the image, the output's retention and the training fields
    left out are not in it: a re-created job with more memory, another worker count, a fixed image or a
    lower learning rate still continues its run.
    """
    sections: dict[str, Any] = {"task": task}
    for name, section in (("model", model), ("data", data), ("training", training)):
        fields = section.model_dump(by_alias=True, mode="json")
        kept = RUN_SHAPING[name]
        sections[name] = {
            key: value
            for key, value in fields.items()
            if (kept is None or key in kept) and key not in NOT_RUN_SHAPING.get(name, ())
        }
    canonical = json.dumps(sections, sort_keys=True, separators=(",", ":"))
    return hashlib.sha256(canonical.encode()).hexdigest()[:RUN_DIGEST_LENGTH]


def run_name(namespace: str, name: str, digest: str, uid: str | None = None) -> str:
    """`<namespace>.<name>.<digest>`, and `.<uid>` for a job that never resumes another job's run.

    Neither a namespace (a DNS label) nor a job name holds a ".", so the parts never run together. The
    same job applied again under the same name, with the same run-shaping spec, gets the same name and
    continues from the run's last committed checkpoint; another spec gets another name (and a fresh run).
    """
    return ".".join(part for part in (namespace, name, digest, uid) if part)


class ProgressTarget(CamelModel):
    """Where the trainer pushes progress updates (the operator's endpoint), if anywhere."""

    url: str = Field(description="Progress endpoint URL for this job.")
    token_path: str = Field(description="File holding the projected ServiceAccount token.")


class ScalingSpec(CamelModel):
    """The Ray Train workers, as the trainer sees them: `workers` (the minimum, and the reference count of
    the global batch), and for elastic training `maxWorkers` above it."""

    workers: int = Field(default=1, ge=1)
    max_workers: int | None = Field(default=None, ge=1, description="Elastic: the most workers; fixed when omitted.")
    resize_interval_s: float = Field(default=60.0, gt=0, description="Elastic: seconds between checks for more.")
    gpus_per_worker: int = Field(default=0, ge=0)
    cpus_per_worker: float = Field(default=1.0, gt=0)

    @property
    def elastic(self) -> bool:
        return self.max_workers is not None and self.max_workers > self.workers

    def num_workers(self) -> int | tuple[int, int]:
        """Ray Train's ScalingConfig(num_workers): a number, or (min, max) for elastic training."""
        return (self.workers, self.max_workers) if self.max_workers is not None and self.elastic else self.workers


class TrainerConfig(CamelModel):
    """Everything `python -m kubetune_trainer --config FILE` needs; made from a FineTuneJob by the operator."""

    job_name: str = Field(description="The FineTuneJob's name (for logs and reports).")
    namespace: str | None = Field(default=None, description="The FineTuneJob's namespace.")
    task: Task = Field(default="classification", description=TASK_DESCRIPTION)
    run_name: str = Field(
        min_length=1,
        max_length=200,
        pattern=r"^[a-z0-9][a-z0-9.\-]*$",
        description=(
            "Ray Train run name, the folder of the run's checkpoints under <output.path>/checkpoints/: "
            "<namespace>.<name>.<digest of the run-shaping spec> (`run_name`), so a restarted driver, or the "
            "same job applied again, resumes from the run's last checkpoint."
        ),
    )
    model: ModelSpec
    data: DataSpec
    training: TrainingSpec = Field(default_factory=TrainingSpec)
    output: OutputSpec
    storage: StorageSpec = Field(default_factory=StorageSpec)
    scaling: ScalingSpec = Field(default_factory=ScalingSpec)
    max_failures: int = Field(default=3, ge=0, description="Worker-failure restarts from the last checkpoint.")
    max_preemptions: int | None = Field(
        default=None, ge=0, description="Preemptions the run recovers from (apart from max_failures); None: no limit."
    )
    preemption_grace_seconds: int = Field(
        default=DEFAULT_PREEMPTION_GRACE_S,
        ge=MIN_PREEMPTION_GRACE_S,
        le=MAX_PREEMPTION_GRACE_S,
        description="Seconds from a preemption notice (SIGTERM, a Ray node drain) until the node goes.",
    )
    progress: ProgressTarget | None = None
    sweep: SweepSpec | None = Field(default=None, description="A hyperparameter sweep (spec.sweep); None: one run.")

    @model_validator(mode="after")
    def _fields_fit_the_task(self) -> TrainerConfig:
        check_sections(self.task, self.model, self.data, self.training, self.sweep)
        return self

    @property
    def selected_metric(self) -> str:
        """The history key that picks the checkpoint to export (`training.selectBy` or the task's default)."""
        return selected_metric(self.task, self.training.select_by)
