"""The FineTuneJob model: defaults, typing as strict as the API server's, cross-field rules, status."""

from __future__ import annotations

import copy
import json
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubetune_operator.spec import (
    Condition,
    FineTuneJob,
    FineTuneJobStatus,
    ProgressStatus,
)
from kubetune_operator.trainer_config import trainer_config
from kubetune_trainer.config import TrainerConfig, prefixes_overlap
from tests.support.paths import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))

MINIMAL: dict[str, Any] = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "flowers"},
    "spec": {
        "model": {"architecture": "resnet50", "checkpoint": "s3://models/base/resnet50.safetensors"},
        "data": {"train": "s3://datasets/flowers/train/"},
        "output": {"path": "s3://runs/flowers/"},
    },
}


def job_with(**spec_edits: Any) -> dict[str, Any]:
    body = copy.deepcopy(MINIMAL)
    for section, value in spec_edits.items():
        body["spec"][section] = {**body["spec"].get(section, {}), **value}
    return body


def test_every_example_parses() -> None:
    names = [FineTuneJob.from_body(yaml.safe_load(p.read_text())).metadata.name for p in EXAMPLES]
    assert len(names) == len(set(names)) >= 4


def test_minimal_job_gets_the_documented_defaults() -> None:
    spec = FineTuneJob.from_body(MINIMAL).spec
    assert (spec.model.strategy, spec.model.num_classes, spec.model.trainable_layers) == ("full", None, None)
    assert (spec.training.epochs, spec.training.batch_size, spec.training.optimizer) == (10, 32, "adamw")
    # The fine-tuning defaults the quality benchmark chose (docs/trainer.md, "Defaults").
    training = spec.training
    assert (training.learning_rate, training.warmup_epochs, spec.data.augment) == (None, None, "light")
    assert (training.backbone_learning_rate_scale, training.layer_decay) == (None, 0.8)
    # The top backbone stage learns at the head's rate in classification, a tenth of it in detection.
    assert (training.backbone_scale("classification"), training.backbone_scale("detection")) == (1.0, 0.1)
    assert (spec.resources.workers.max, spec.resources.gpus_per_worker, spec.resources.memory_per_worker) == (
        1,
        1,
        "16Gi",
    )
    assert (spec.storage.region, spec.storage.endpoint, spec.run_policy.suspend) == ("us-east-1", None, False)
    assert spec.data.validation_split == 0.2


@pytest.mark.parametrize(
    ("section", "edit"),
    [
        ("training", {"epochs": "10"}),
        ("training", {"epochs": 10.0}),
        ("data", {"augment": "true"}),
        ("data", {"augment": 1}),
        ("training", {"learningRate": "0.001"}),
        ("runPolicy", {"suspend": "false"}),
    ],
)
def test_values_the_api_server_would_not_coerce_are_refused(section: str, edit: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        FineTuneJob.from_body(job_with(**{section: edit}))


def test_an_integer_is_a_valid_number() -> None:
    spec = FineTuneJob.from_body(job_with(training={"learningRate": 1, "weightDecay": 0})).spec
    assert spec.training.learning_rate == 1.0


@pytest.mark.parametrize(
    ("a", "b", "overlap"),
    [
        ("s3://b/data/train", "s3://b/data/train/", True),
        ("s3://b/data/train/", "s3://b/data/train/x/", True),
        ("s3://b", "s3://b/anything/", True),
        ("s3://b/data/train", "s3://b/data/train-2", False),
        ("s3://b/data/train/", "s3://c/data/train/", False),
        ("s3://b/runs/", "s3://b/data/", False),
    ],
)
def test_prefixes_overlap_by_whole_segments(a: str, b: str, overlap: bool) -> None:
    assert prefixes_overlap(a, b) is overlap
    assert prefixes_overlap(b, a) is overlap


@pytest.mark.parametrize(
    ("section", "field", "uri"),
    [
        ("data", "train", "s3://datasets/flowers/../birds/train/"),
        ("data", "train", "s3://datasets/flowers/train/.."),
        ("data", "validation", "s3://datasets/./flowers/val/"),
        ("output", "path", "s3://runs/flowers/./"),
        ("model", "checkpoint", "s3://models/../base/resnet50.safetensors"),
    ],
)
def test_s3_uris_with_dot_segments_are_refused_naming_the_field(section: str, field: str, uri: str) -> None:
    # Every local path the trainer makes from a key refuses '.' and '..' segments, and "inside another
    # prefix" is a plain prefix test: a spec must not hold them at all.
    with pytest.raises(ValidationError) as caught:
        FineTuneJob.from_body(job_with(**{section: {field: uri}}))
    assert [error["loc"] for error in caught.value.errors()] == [("spec", section, field)]


def test_dots_inside_a_segment_name_are_plain_names() -> None:
    uri = "s3://datasets/.hidden/...three/v1..2/flowers./"
    assert FineTuneJob.from_body(job_with(data={"train": uri})).spec.data.train == uri


def test_output_may_sit_beside_the_data() -> None:
    body = job_with(data={"validation": "s3://datasets/flowers/val/"}, output={"path": "s3://datasets/flowers-runs/"})
    assert FineTuneJob.from_body(body).spec.output.path == "s3://datasets/flowers-runs/"


@pytest.mark.parametrize(
    "edit",
    [
        {"model": {"strategy": "partial"}},
        {"model": {"strategy": "full", "trainableLayers": 1}},
        {"training": {"epochs": 2, "warmupEpochs": 2}},
        {"output": {"path": "s3://datasets/flowers/train/out/"}},
        {"data": {"validation": "s3://datasets/flowers/train/val/"}},
    ],
)
def test_cross_field_rules_name_the_field_first(edit: dict[str, Any]) -> None:
    with pytest.raises(ValidationError) as caught:
        FineTuneJob.from_body(job_with(**edit))
    message = str(caught.value.errors()[0]["ctx"]["error"])
    field = message.split(": ", 1)[0]
    assert field in ("trainableLayers", "warmupEpochs", "output.path", "validation"), message


def test_trainer_config_survives_the_json_the_trainer_reads() -> None:
    job = FineTuneJob.from_body(yaml.safe_load((REPO / "examples" / "multi-gpu-full.yaml").read_text()))
    config = trainer_config(job)
    text = config.model_dump_json(by_alias=True)
    assert TrainerConfig.model_validate_json(text) == config
    assert TrainerConfig.model_validate(json.loads(text)) == config
    assert json.loads(text)["scaling"] == {
        "workers": 4,
        "maxWorkers": None,  # a fixed count
        "resizeIntervalS": 60.0,
        "gpusPerWorker": 2,
        "cpusPerWorker": 16.0,
    }


# -- status ---------------------------------------------------------------------------------------------

KOPF_BODY_STATUS = {
    "phase": "Running",
    "conditions": [
        {
            "type": "Running",
            "status": "True",
            "reason": "RayJobRunning",
            "message": "training",
            "lastTransitionTime": "2025-03-01T10:00:00Z",
            "observedGeneration": 1,
        }
    ],
    "progress": {
        "epoch": 3,
        "totalEpochs": 10,
        "step": 300,
        "totalSteps": 1000,
        "percent": 30.0,
        "etaSeconds": 420,
        "metrics": {"trainLoss": 0.41, "valLoss": 0.52, "valAccuracy": 0.87, "imagesPerSecond": 812.5},
        "latestCheckpoint": "s3://runs/flowers/checkpoints/epoch-3/",
        "updatedAt": "2025-03-01T10:07:00Z",
    },
    "rayJobName": "flowers",
    "dashboardURL": "http://flowers-head-svc.default.svc:8265",
    "startTime": "2025-03-01T10:00:00Z",
    "restarts": 0,
    "observedGeneration": 1,
    # What kopf keeps for itself, or an older operator wrote: ignored, never an error.
    "kopf": {"progress": {}},
    "retired": "field",
}


def test_a_body_with_status_and_server_metadata_parses() -> None:
    body = copy.deepcopy(MINIMAL)
    body["metadata"].update(
        uid="5f0c", generation=1, creationTimestamp="2025-03-01T09:59:00Z", managedFields=[{"manager": "kubectl"}]
    )
    body["status"] = KOPF_BODY_STATUS
    job = FineTuneJob.from_body(body)
    assert job.status is not None and job.status.progress is not None and job.status.progress.metrics is not None
    assert job.status.phase == "Running"
    assert job.status.progress.metrics.val_accuracy == 0.87
    assert job.status.conditions[0].last_transition_time.year == 2025
    assert job.status.dashboard_url == "http://flowers-head-svc.default.svc:8265"


def test_status_writes_the_crd_field_names() -> None:
    wire = FineTuneJobStatus.model_validate(KOPF_BODY_STATUS).wire()
    assert "dashboardURL" in wire and "rayJobName" in wire and "kopf" not in wire
    assert wire["conditions"][0]["lastTransitionTime"] == "2025-03-01T10:00:00Z"
    assert wire["progress"]["metrics"]["imagesPerSecond"] == 812.5


def test_progress_percent_is_bounded() -> None:
    with pytest.raises(ValidationError):
        ProgressStatus(percent=100.5)


def test_condition_reason_is_camel_case() -> None:
    Condition(type="Failed", status="True", reason="CheckpointNotFound", last_transition_time="2025-03-01T10:00:00Z")
    with pytest.raises(ValidationError):
        Condition(type="Failed", status="True", reason="checkpoint not found", last_transition_time="2025-03-01")


def test_data_format_names_the_allowed_values() -> None:
    from kubetune_operator.messages import format_validation_error

    with pytest.raises(ValidationError) as caught:
        FineTuneJob.from_body(job_with(data={"format": "tfrecord"}))
    (message,) = format_validation_error(caught.value, "job.yaml")
    assert "spec.data.format" in message
    assert all(name in message for name in ("imagefolder", "coco", "webdataset", "manifest")), message


@pytest.mark.parametrize(
    ("data", "expected"),
    [
        ({"format": "coco"}, "data.format: 'coco' is not a format of task classification"),
        ({"format": "manifest", "train": "s3://datasets/m/train.txt"}, "train: with format manifest"),
        ({"format": "webdataset", "train": "s3://datasets/s/train-{0..9}"}, "train: with format webdataset"),
        ({"format": "webdataset", "train": "s3://datasets/s/train-{0..999999}.tar"}, "at most 100,000 shards"),
        ({"format": "webdataset", "train": "s3://datasets/s/{a}.tar"}, "neither a range"),
        ({"train": "s3://datasets/s/train-{0..3}.tar"}, "braces name shards, only with format webdataset"),
        (
            {"format": "webdataset", "train": "s3://datasets/s/train-{0..3}.tar", "test": "s3://datasets/s/test/"},
            "test: with format webdataset, .tar shards",
        ),
        (
            {"format": "manifest", "train": "s3://datasets/m/train.csv", "test": "s3://datasets/m/test-{0..3}.tar"},
            "test: with format manifest, the s3:// URI of a .csv or .jsonl file",
        ),
    ],
)
def test_data_uris_must_fit_their_format(data: dict[str, Any], expected: str) -> None:
    with pytest.raises(ValidationError) as caught:
        FineTuneJob.from_body(job_with(data=data))
    assert expected in str(caught.value)


def test_detection_from_shards_or_a_manifest_needs_no_annotations_even_for_a_test_split() -> None:
    detection = {"task": "detection", "model": {"architecture": "fasterrcnn_mobilenet_v3_large_320_fpn"}}
    for data in (
        {"format": "webdataset", "train": "s3://datasets/s/train-{000000..000127}.tar"},
        {"format": "manifest", "train": "s3://datasets/m/boxes.jsonl"},
        {
            "format": "webdataset",
            "train": "s3://datasets/s/train-{0..9}.tar",
            "test": "s3://datasets/s/test-{0..1}.tar",
        },
        {"format": "manifest", "train": "s3://datasets/m/boxes.jsonl", "test": "s3://datasets/m/test.jsonl"},
    ):
        body = job_with(data=data, model=detection["model"])
        body["spec"]["task"] = "detection"
        assert FineTuneJob.from_body(body).spec.data.format == data["format"]
        body["spec"]["data"]["annotations"] = {
            "train": "s3://datasets/a/t.json",
            "validation": "s3://datasets/a/v.json",
        }
        with pytest.raises(
            ValidationError, match=r"data\.annotations: only allowed with task .detection. and format coco"
        ):
            FineTuneJob.from_body(body)
