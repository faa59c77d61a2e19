"""Run identity: which job continues which run's checkpoints (config.run_name, docs/trainer.md)."""

from __future__ import annotations

import copy
from typing import Any

import pytest
from pydantic import ValidationError

from kubetune_operator.spec import FineTuneJob
from kubetune_operator.trainer_config import trainer_config

JOB: dict[str, Any] = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "flowers", "namespace": "vision", "uid": "1111-aaaa"},
    "spec": {
        "model": {"architecture": "resnet50", "checkpoint": "s3://models/base/resnet50.safetensors"},
        "data": {"train": "s3://datasets/flowers/train/"},
        "output": {"path": "s3://runs/flowers/"},
    },
}


def run_of(edit: dict[str, Any] | None = None, **metadata: str) -> str:
    body = copy.deepcopy(JOB)
    body["metadata"].update(metadata)
    for section, fields in (edit or {}).items():
        body["spec"][section] = {**body["spec"].get(section, {}), **fields}
    return trainer_config(FineTuneJob.from_body(body)).run_name


def test_a_job_deleted_and_applied_again_continues_its_run() -> None:
    first = run_of()
    assert first.startswith("vision.flowers.")
    assert run_of(uid="2222-bbbb") == first  # a new uid: the same run
    # What may change when the same job is applied again: it still continues (e.g. to train longer).
    for edit in (
        {"training": {"epochs": 20, "learningRate": 1e-4, "batchSize": 64, "checkpointEvery": "10m"}},
        {"resources": {"workers": 4, "memoryPerWorker": "32Gi"}},
        {"runPolicy": {"maxRetries": 5, "preemptionGraceSeconds": 120}},
        {"output": {"checkpointsToKeep": 5}},
    ):
        assert run_of(edit) == first, edit


@pytest.mark.parametrize(
    "edit",
    [
        {"model": {"checkpoint": "s3://models/base/other.safetensors"}},
        {"model": {"architecture": "resnet18"}},
        {"model": {"strategy": "head"}},
        {"data": {"train": "s3://datasets/flowers-v2/train/"}},
        {"data": {"imageSize": 160}},
        {"training": {"seed": 7}},
        {"training": {"optimizer": "sgd"}},
    ],
)
def test_another_model_data_optimizer_or_seed_is_another_run(edit: dict[str, Any]) -> None:
    assert run_of(edit) != run_of()


def test_the_same_name_in_another_namespace_is_another_run() -> None:
    assert run_of(namespace="other") != run_of()


def test_resume_never_ties_the_run_to_the_job_object() -> None:
    never = {"model": {"resume": "never"}}
    assert run_of(never) == f"{run_of()}.1111-aaaa"
    assert run_of(never, uid="2222-bbbb") != run_of(never)  # applied again: a fresh run


@pytest.mark.parametrize(("every", "seconds"), [("epoch", None), ("90s", 90), ("10m", 600), ("1h30m", 5400)])
def test_checkpoint_every_is_epoch_or_a_duration(every: str, seconds: int | None) -> None:
    job = FineTuneJob.from_body({**JOB, "spec": {**JOB["spec"], "training": {"checkpointEvery": every}}})
    assert job.spec.training.checkpoint_interval_s == seconds


@pytest.mark.parametrize("every", ["0s", "169h", "5d", "10 m", "1m1h", ""])
def test_a_checkpoint_interval_outside_the_range_names_the_field(every: str) -> None:
    with pytest.raises(ValidationError) as caught:
        FineTuneJob.from_body({**JOB, "spec": {**JOB["spec"], "training": {"checkpointEvery": every}}})
    assert "checkpointEvery" in str(caught.value)
