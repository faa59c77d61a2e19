"""`kubetune data pack` of a COCO set, then `kubetune run --local` from the shards, as a user moves a
detection dataset to WebDataset and trains from it.

A COCO detection set in the session's moto S3 is packed S3 → S3 by the console script; a detection job
trains from the values it printed, and its model.json counts exactly the images and boxes of the
source. (Classification from packed shards is trained in test_formats_e2e.py, in the run that was
there already.) Budget: 12 + 6 shapes at 64 px, SSDlite from random weights, head only, one epoch of
one batch, one worker of one CPU.
"""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.digits_world import DATA_BUCKET, MODEL_BUCKET, OUT_BUCKET, DigitsWorld
from tests.support.shapes_world import DETECTOR, DETECTOR_SIZE, FINETUNE_CLASSES, make_shapes, random_detector

pytestmark = pytest.mark.slow

SHAPES = f"s3://{DATA_BUCKET}/pack-e2e/coco"
DETECTOR_WEIGHTS = f"s3://{MODEL_BUCKET}/pack-e2e/{DETECTOR}.safetensors"


def coco_in_s3(world: DigitsWorld, tmp_path: Path) -> dict[str, int]:
    """12 training and 6 validation images with COCO files; their image and box counts."""
    parts = {
        "train": make_shapes(FINETUNE_CLASSES, 12, 40, DETECTOR_SIZE),
        "val": make_shapes(FINETUNE_CLASSES, 6, 41, DETECTOR_SIZE),
    }
    objects = {DETECTOR_WEIGHTS: random_detector(tmp_path / "detector.safetensors").read_bytes()}
    for part, shapes in parts.items():
        objects |= {f"{SHAPES}/images/{part}/{k}": v for k, v in shapes.pngs().items()}
        objects[f"{SHAPES}/{part}.json"] = json.dumps(shapes.coco()).encode()
    world.put_many(objects)
    return {f"{part}Boxes": sum(len(b) for b in shapes.boxes) for part, shapes in parts.items()}


def detection_job(world: DigitsWorld, data: dict[str, Any]) -> Path:
    job = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "packed-shapes"},
        "spec": {
            "task": "detection",
            "model": {"architecture": DETECTOR, "checkpoint": DETECTOR_WEIGHTS, "strategy": "head"},
            "data": {**data, "imageSize": DETECTOR_SIZE, "augment": "none"},
            "training": {"epochs": 1, "batchSize": 12, "learningRate": 0.01, "seed": 42},
            "output": {"path": f"s3://{OUT_BUCKET}/pack-e2e/packed-shapes"},
            "resources": {"workers": 1, "gpusPerWorker": 0, "cpusPerWorker": 1},
        },
    }
    path = world.workdir / "packed-shapes.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_a_packed_coco_set_trains_on_every_image_and_box_of_the_source(world: DigitsWorld, tmp_path: Path) -> None:
    boxes = coco_in_s3(world, tmp_path)
    shapes = world.data_pack(
        f"{SHAPES}/images/train",
        f"s3://{DATA_BUCKET}/pack-e2e/shapes",
        "--annotations",
        f"{SHAPES}/train.json",
        "--validation",
        f"{SHAPES}/images/val",
        "--validation-annotations",
        f"{SHAPES}/val.json",
        "--shard-size",
        "8",
    )
    assert shapes["train"].endswith("/train-{000000..000001}.tar") and shapes["validation"].endswith(
        "/validation-000000.tar"
    )

    run = world.kubetune_run(detection_job(world, shapes), timeout=400)
    assert run.returncode == 0, run.stdout + run.stderr

    card = json.loads(world.get(f"s3://{OUT_BUCKET}/pack-e2e/packed-shapes/model.json"))
    assert card["classNames"] == sorted(FINETUNE_CLASSES) and card["data"]["format"] == "webdataset"
    data = card["data"]
    assert (data["trainImages"], data["validationImages"]) == (12, 6)
    assert (data["trainBoxes"], data["validationBoxes"]) == (boxes["trainBoxes"], boxes["valBoxes"])
