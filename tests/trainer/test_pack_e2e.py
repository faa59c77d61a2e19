"""`kubetune data pack` then `kubetune run --local`, as a user moves a dataset to shards and trains from them.

A local ImageFolder of digits and a COCO detection set in the session's moto S3 are packed by the
console script into shards in S3; a classification and a detection job train from the values it
printed, both runs at once, and each run's model.json counts exactly the images of the source.

Budget: 12 digits of each class 5-9 at 32 px (test_resnet, head only), 12 + 6 shapes at 64 px
(SSDlite from random weights, head only), one epoch each, one worker of one CPU per run.
"""

from __future__ import annotations

import json
import subprocess
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.digits_world import DATA_BUCKET, KUBETUNE, MODEL_BUCKET, OUT_BUCKET, DigitsWorld, digit_png
from tests.support.shapes_world import DETECTOR, DETECTOR_SIZE, FINETUNE_CLASSES, make_shapes, random_detector

pytestmark = pytest.mark.slow

PER_CLASS = 12
SHAPES = f"s3://{DATA_BUCKET}/pack-e2e/coco"
DETECTOR_WEIGHTS = f"s3://{MODEL_BUCKET}/pack-e2e/{DETECTOR}.safetensors"


def data_pack(world: DigitsWorld, *args: str) -> dict[str, Any]:
    """The console script's `data pack`; the data: values it printed."""
    done = subprocess.run(
        [str(KUBETUNE), "data", "pack", *args, "--s3-endpoint", world.endpoint],
        env=world.env(),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    values: dict[str, Any] = yaml.safe_load(done.stdout)["data"]
    return values


def digits_folder(world: DigitsWorld, root: Path) -> Path:
    counts: Counter[int] = Counter()
    for n, (pixels, label) in enumerate(world.digits(range(5, 10))):
        if counts[label] < PER_CLASS:
            counts[label] += 1
            (root / str(label)).mkdir(parents=True, exist_ok=True)
            (root / str(label) / f"{n:04d}.png").write_bytes(digit_png(pixels))
    return root


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
            "training": {"epochs": 1, "batchSize": 6, "learningRate": 0.01, "seed": 42},
            "output": {"path": f"s3://{OUT_BUCKET}/pack-e2e/packed-shapes"},
            "resources": {"workers": 1, "gpusPerWorker": 0, "cpusPerWorker": 1},
        },
    }
    path = world.workdir / "packed-shapes.yaml"
    path.write_text(yaml.safe_dump(job))
    return path


def test_packed_shards_train_on_every_image_of_the_source(pretrained: DigitsWorld, tmp_path: Path) -> None:
    world = pretrained
    digits = data_pack(
        world,
        str(digits_folder(world, tmp_path / "digits")),
        f"s3://{DATA_BUCKET}/pack-e2e/digits",
        "--shard-size",
        "16",
    )
    assert digits == {
        "format": "webdataset",
        "train": f"s3://{DATA_BUCKET}/pack-e2e/digits/train-{{000000..000003}}.tar",
    }
    boxes = coco_in_s3(world, tmp_path)
    shapes = data_pack(
        world,
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

    classification = world.job(
        "packed-digits",
        output=f"s3://{OUT_BUCKET}/pack-e2e/packed-digits",
        train=digits["train"],
        validation=None,
        data_format="webdataset",
        epochs=1,
        strategy="head",
        trainable_layers=None,
        cpus_per_worker=1,
    )
    runs = {
        "classification": world.kubetune_popen(classification),
        "detection": world.kubetune_popen(detection_job(world, shapes)),
    }
    outputs = {name: run.communicate(timeout=400)[0] for name, run in runs.items()}
    for name, run in runs.items():
        assert run.returncode == 0, f"{name} run failed:\n{outputs[name]}"

    card = json.loads(world.get(f"s3://{OUT_BUCKET}/pack-e2e/packed-digits/model.json"))
    assert card["classNames"] == ["5", "6", "7", "8", "9"] and card["data"]["format"] == "webdataset"
    assert card["data"]["trainImages"] + card["data"]["validationImages"] == 5 * PER_CLASS
    assert card["data"]["corruptImages"] == 0

    card = json.loads(world.get(f"s3://{OUT_BUCKET}/pack-e2e/packed-shapes/model.json"))
    assert card["classNames"] == sorted(FINETUNE_CLASSES)
    data = card["data"]
    assert (data["trainImages"], data["validationImages"]) == (12, 6)
    assert (data["trainBoxes"], data["validationBoxes"]) == (boxes["trainBoxes"], boxes["valBoxes"])
