"""Model names are checked at apply time, not on a GPU: the shipped list equals the installed timm and
torchvision, a misspelt name is refused naming close matches, and detection may have a single class."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune_operator.messages import format_validation_error
from kubetune_operator.spec import FineTuneJob
from kubetune_trainer import architectures
from kubetune_trainer.config import DETECTION_ARCHITECTURES
from tests.support.paths import REPO

JOB: dict[str, Any] = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "names"},
    "spec": {
        "model": {"architecture": "convnext_tiny", "checkpoint": "s3://models/base/convnext_tiny.safetensors"},
        "data": {"train": "s3://datasets/flowers/train/"},
        "output": {"path": "s3://runs/names/"},
    },
}
DETECTION = {
    "task": "detection",
    "model": {
        "architecture": "fasterrcnn_mobilenet_v3_large_320_fpn",
        "checkpoint": "s3://models/base/det.safetensors",
    },
    "data": {
        "train": "s3://datasets/boxes/images/",
        "annotations": {"train": "s3://datasets/boxes/train.json", "validation": "s3://datasets/boxes/val.json"},
    },
}


def job(**spec: Any) -> dict[str, Any]:
    doc = copy.deepcopy(JOB)
    doc["spec"].update(copy.deepcopy(spec))
    return doc


def errors(doc: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        FineTuneJob.from_body(doc)
    return format_validation_error(caught.value, "job.yaml")


def test_the_shipped_names_are_the_installed_timm_and_torchvision() -> None:
    import timm
    import torchvision

    assert architectures.timm_models() == set(timm.list_models()), "run: python -m kubetune_trainer.write_architectures"
    detection = set(torchvision.models.list_models(module=torchvision.models.detection))
    assert architectures.detection_models() == detection, "run: python -m kubetune_trainer.write_architectures"
    assert set(DETECTION_ARCHITECTURES) <= detection


def test_a_misspelt_timm_name_is_refused_naming_close_matches() -> None:
    (line,) = errors(job(model={**JOB["spec"]["model"], "architecture": "convnext_tinyy"}))
    assert line.startswith("job.yaml: spec.model.architecture: 'convnext_tinyy' is not a timm model; close matches: ")
    assert "convnext_tiny" in line.split("close matches: ")[1].split(", ")


def test_a_misspelt_detection_name_is_refused_naming_detection_models() -> None:
    (line,) = errors(job(**{**DETECTION, "model": {**DETECTION["model"], "architecture": "fasterrcnn_resnet50_fnp"}}))
    assert "spec.model.architecture: 'fasterrcnn_resnet50_fnp' is not a detection model" in line
    assert "fasterrcnn_resnet50_fpn" in line


def test_detection_may_have_one_class_and_classification_may_not() -> None:
    single = FineTuneJob.from_body(job(**{**DETECTION, "model": {**DETECTION["model"], "numClasses": 1}}))
    assert single.spec.model.num_classes == 1
    (line,) = errors(job(model={**JOB["spec"]["model"], "numClasses": 1}))
    assert line.startswith("job.yaml: spec.model.numClasses: must be >= 2 with task classification")


def test_the_console_script_refuses_a_misspelt_name_from_the_repo_root() -> None:
    kubetune = Path(sys.executable).with_name("kubetune")
    path = "tests/fixtures/invalid/architecture-misspelt.yaml"
    done = subprocess.run([str(kubetune), "validate", path], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    assert f"{path}:9: spec.model.architecture: 'convnext_tinyy' is not a timm model; close matches: convnext_tiny" in (
        done.stdout
    )
