"""Detection end to end, as a user runs it: COCO files and images in a real S3 server (moto), a detector
pretrained on other shapes, `kubetune run FILE --local` and `python -m kubetune_trainer --config FILE`
on a real local Ray.

Two runs, at once, share the work of every test here (module fixtures): fine-tuning from the pretrained
detector through `kubetune run --local`, interrupted once by a test fault (trainer_faults.py) and resumed;
and the same budget from random weights through `python -m kubetune_trainer`. Budget (2 shared CPU cores):
SSDlite at 64 px, 96 training and 24 validation images, 6 epochs of batch 8, head strategy, two DDP
workers of one CPU each (so the validation predictions are gathered across workers). The pretraining is
cached under `.cache/kubetune-tests/` (shapes_world.pretrained_detector).
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from tests.support.digits_world import DATA_BUCKET, MODEL_BUCKET, DigitsWorld
from tests.support.shapes_world import (
    DETECTOR,
    DETECTOR_SIZE,
    FINETUNE_CLASSES,
    ShapesSet,
    as_tensors,
    make_shapes,
    pretrained_detector,
    random_detector,
)
from tests.support.trainer_faults import FAIL_ONCE_AFTER_FIRST_EPOCH

SHAPES = f"s3://{DATA_BUCKET}/shapes-new"
PRETRAINED_DETECTOR = f"s3://{MODEL_BUCKET}/shapes-rgb/{DETECTOR}.safetensors"
RANDOM_DETECTOR = f"s3://{MODEL_BUCKET}/shapes-random/{DETECTOR}.safetensors"
EPOCHS = 6
TRAIN_IMAGES, VAL_IMAGES, TEST_IMAGES = 96, 24, 24
FINETUNED_OUTPUT = "s3://results/detection/shapes-finetune"
HISTORY_KEYS = ["epoch", "trainLoss", "valMap", "valMap50", "imagesPerSecond", "learningRate", "seconds"]

pytestmark = pytest.mark.slow


class Shapes:
    """The fine-tuning data set in S3 (new classes), and the base weights."""

    def __init__(self, world: DigitsWorld) -> None:
        self.world = world
        self.train = make_shapes(FINETUNE_CLASSES, TRAIN_IMAGES, seed=20, size=DETECTOR_SIZE)
        self.validation = make_shapes(FINETUNE_CLASSES, VAL_IMAGES, seed=21, size=DETECTOR_SIZE)
        self.test = make_shapes(FINETUNE_CLASSES, TEST_IMAGES, seed=22, size=DETECTOR_SIZE)
        # File names in the COCO files are relative to data.train and data.validation.
        objects = {f"{SHAPES}/images/train/{k}": v for k, v in self.train.pngs().items()}
        objects |= {f"{SHAPES}/images/val/{k}": v for k, v in self.validation.pngs().items()}
        objects |= {f"{SHAPES}/images/test/{k}": v for k, v in self.test.pngs().items()}
        objects[f"{SHAPES}/annotations/test.json"] = json.dumps(self.test.coco()).encode()
        train_coco = self.train.coco()
        # What real annotation files hold: an unreadable image, boxes of no size or outside their image.
        objects[f"{SHAPES}/images/train/broken.png"] = b"not a png at all"
        train_coco["images"].append({"id": 9999, "file_name": "broken.png", "width": 64, "height": 64})
        bad_boxes = ([5, 5, 0, 10], [5, 5, 10, -3], [80, 80, 10, 10])
        for n, bbox in enumerate(bad_boxes):
            train_coco["annotations"].append({"id": 90000 + n, "image_id": 1, "category_id": 1, "bbox": bbox})
        objects[f"{SHAPES}/annotations/train.json"] = json.dumps(train_coco).encode()
        objects[f"{SHAPES}/annotations/val.json"] = json.dumps(self.validation.coco()).encode()
        objects[RANDOM_DETECTOR] = random_detector(world.workdir / "random-detector.safetensors").read_bytes()
        world.put_many(objects)

    def manifest(self, name: str, checkpoint: str, *, judged: bool = False) -> dict[str, Any]:
        """The job; `judged`: with a test split and an ONNX copy too."""
        job = {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": {
                "task": "detection",
                "model": {"architecture": DETECTOR, "checkpoint": checkpoint, "strategy": "head"},
                "data": {
                    "train": f"{SHAPES}/images/train/",
                    "validation": f"{SHAPES}/images/val/",
                    "annotations": {
                        "train": f"{SHAPES}/annotations/train.json",
                        "validation": f"{SHAPES}/annotations/val.json",
                    },
                    "imageSize": DETECTOR_SIZE,
                    "augment": "light",
                },
                "training": {
                    "epochs": EPOCHS,
                    "batchSize": 8,
                    "learningRate": 0.01,
                    "weightDecay": 1e-4,
                    "warmupEpochs": 1,
                    "seed": 42,
                },
                "output": {"path": f"s3://results/detection/{name}", "checkpointsToKeep": 2},
                "resources": {"workers": 2, "gpusPerWorker": 0, "cpusPerWorker": 1},
                "runPolicy": {"maxRetries": 1},
            },
        }
        if judged:
            spec: dict[str, Any] = job["spec"]
            spec["data"]["test"] = f"{SHAPES}/images/test/"
            spec["data"]["annotations"]["test"] = f"{SHAPES}/annotations/test.json"
            spec["output"]["formats"] = ["safetensors", "onnx"]
        return job


@pytest.fixture(scope="module")
def shapes(world: DigitsWorld) -> Shapes:
    return Shapes(world)


def run_finetuned(shapes: Shapes) -> subprocess.CompletedProcess[str]:
    """Fine-tuned from the pretrained detector with `kubetune run --local`; the worker fails once after
    epoch 1 and Ray Train restarts it from that checkpoint. The pretraining (a cold cache's) comes first."""
    shapes.world.put(PRETRAINED_DETECTOR, pretrained_detector().read_bytes())
    path = shapes.world.workdir / "shapes-finetune.yaml"
    path.write_text(yaml.safe_dump(shapes.manifest("shapes-finetune", PRETRAINED_DETECTOR, judged=True)))
    return shapes.world.kubetune_run(path, timeout=500, **FAIL_ONCE_AFTER_FIRST_EPOCH)


def run_from_random(shapes: Shapes) -> subprocess.CompletedProcess[str]:
    """The same job from random weights, through the RayJob's entrypoint `python -m kubetune_trainer`."""
    config = shapes.world.workdir / "shapes-random.json"
    manifest = shapes.manifest("shapes-random", RANDOM_DETECTOR)
    config.write_text(trainer_config_json(manifest))
    return subprocess.run(
        [sys.executable, "-m", "kubetune_trainer", "--config", str(config), "--s3-endpoint", shapes.world.endpoint],
        env=shapes.world.env(),
        capture_output=True,
        text=True,
        timeout=500,
    )


@pytest.fixture(scope="module")
def runs(shapes: Shapes) -> dict[str, subprocess.CompletedProcess[str]]:
    """Both at once: the random one's run beside the pretraining and the fine-tuning run (each run with
    its own local Ray), which overlap on two cores better than one after the other."""
    with ThreadPoolExecutor(2) as pool:
        started = {"finetuned": pool.submit(run_finetuned, shapes), "random": pool.submit(run_from_random, shapes)}
        return {name: future.result() for name, future in started.items()}


@pytest.fixture(scope="module")
def finetuned(runs: dict[str, subprocess.CompletedProcess[str]]) -> subprocess.CompletedProcess[str]:
    return runs["finetuned"]


@pytest.fixture(scope="module")
def from_random(runs: dict[str, subprocess.CompletedProcess[str]]) -> subprocess.CompletedProcess[str]:
    return runs["random"]


def trainer_config_json(manifest: dict[str, Any]) -> str:
    from kubetune_operator.spec import FineTuneJob
    from kubetune_operator.trainer_config import trainer_config

    return trainer_config(FineTuneJob.model_validate(manifest)).model_dump_json(by_alias=True, exclude_none=True)


def card_of(world: DigitsWorld, name: str) -> dict[str, Any]:
    card: dict[str, Any] = json.loads(world.get(f"s3://results/detection/{name}/model.json"))
    return card


def test_a_pretrained_detector_fine_tunes_to_new_classes_far_better_than_random_weights(
    shapes: Shapes, finetuned: subprocess.CompletedProcess[str], from_random: subprocess.CompletedProcess[str]
) -> None:
    assert finetuned.returncode == 0, finetuned.stderr
    assert from_random.returncode == 0, from_random.stderr
    pretrained = card_of(shapes.world, "shapes-finetune")["metrics"]
    random_init = card_of(shapes.world, "shapes-random")["metrics"]
    print(
        f"mAP@.5 after {EPOCHS} epochs: pretrained {pretrained['valMap50']:.3f}, random {random_init['valMap50']:.3f}"
    )
    assert pretrained["valMap50"] >= 0.15
    assert pretrained["valMap50"] >= random_init["valMap50"] + 0.1
    assert pretrained["valMap"] > random_init["valMap"]
    # What the user sees: mAP on the progress lines and in the summary.
    assert re.search(rf"epoch {EPOCHS}/{EPOCHS} \[#+\] 100% loss \d+\.\d+ mAP 0\.\d+ mAP@\.5 0\.\d+", finetuned.stderr)
    assert re.search(r"validation mAP@\[\.5:\.95\] 0\.\d+, mAP@\.5 0\.\d+", finetuned.stdout)
    assert "detections.png" in from_random.stdout


def test_an_interrupted_run_resumes_and_records_every_epoch_once(
    shapes: Shapes, finetuned: subprocess.CompletedProcess[str]
) -> None:
    assert finetuned.returncode == 0, finetuned.stderr
    output = "s3://results/detection/shapes-finetune"
    # The run's folder: default.shapes-finetune.<digest> (config.run_name).
    assert re.search(
        rf"resumed from {output}/checkpoints/default\.shapes-finetune\.[0-9a-f]+/epoch-0001 after epoch 1",
        finetuned.stderr,
    )
    history = json.loads(shapes.world.get(f"{output}/history.json"))
    assert [e["epoch"] for e in history] == list(range(1, EPOCHS + 1))
    assert all(list(e) == HISTORY_KEYS for e in history)
    card = card_of(shapes.world, "shapes-finetune")
    # The exported epoch is the best by valMap (training.selectBy's default for detection).
    best = max(range(EPOCHS), key=lambda i: (history[i]["valMap"], i))
    assert card["epochs"] == EPOCHS and card["epoch"] == best + 1 and card["selectBy"] == "valMap"
    assert card["metrics"]["valMap50"] == history[best]["valMap50"]


def test_the_exported_detector_reloads_outside_the_trainer_and_scores_what_it_reported(
    shapes: Shapes, finetuned: subprocess.CompletedProcess[str], tmp_path: Path
) -> None:
    assert finetuned.returncode == 0, finetuned.stderr
    output = "s3://results/detection/shapes-finetune"
    card = card_of(shapes.world, "shapes-finetune")
    assert card["task"] == "detection" and card["architecture"] == DETECTOR
    assert card["classNames"] == FINETUNE_CLASSES and card["imageSize"] == DETECTOR_SIZE
    assert 0.05 <= card["scoreThreshold"] < 1  # where the boxes match best, drawn in detections.png
    data = card["data"]
    assert (data["trainImages"], data["validationImages"]) == (TRAIN_IMAGES, VAL_IMAGES)
    train_counts = data["counts"]["train"]
    assert train_counts["imagesCorrupt"] == 1
    assert (train_counts["boxesDroppedEmpty"], train_counts["boxesDroppedOutside"]) == (2, 1)
    assert train_counts["imagesWithoutBoxes"] == TRAIN_IMAGES // 8 + 1  # the unreadable one had none either
    assert data["trainBoxes"] == sum(len(b) for b in shapes.train.boxes)
    assert data["validationBoxes"] == sum(len(b) for b in shapes.validation.boxes)
    for picture in ("detections.png", "training-curves.png"):
        with Image.open(io.BytesIO(shapes.world.get(f"{output}/{picture}"))) as image:
            assert image.format == "PNG" and image.width > 300

    weights = tmp_path / "model.safetensors"
    weights.write_bytes(shapes.world.get(f"{output}/model.safetensors"))
    scores = reloaded_map(card, weights, shapes.validation)
    assert scores["map_50"] == pytest.approx(card["metrics"]["valMap50"], abs=1e-3)
    assert scores["map"] == pytest.approx(card["metrics"]["valMap"], abs=1e-3)


def reloaded_model(card: dict[str, Any], weights: Path) -> Any:
    """The exported detector rebuilt with torchvision and safetensors only (no kubetune code)."""
    import torchvision.models.detection as zoo
    from safetensors.torch import load_model

    model = getattr(zoo, card["architecture"])(weights=None, weights_backbone=None, num_classes=card["numClasses"] + 1)
    transform = card["transform"]
    model.transform.min_size, model.transform.max_size = (transform["minSize"],), transform["maxSize"]
    model.transform.fixed_size = tuple(transform["fixedSize"]) if transform["fixedSize"] else None
    load_model(model, str(weights))
    return model.eval()


def predicted(model: Any, images: list[Any]) -> list[dict[str, Any]]:
    import torch

    with torch.no_grad():
        return [out for start in range(0, len(images), 8) for out in model(images[start : start + 8])]


def reloaded_map(card: dict[str, Any], weights: Path, validation: ShapesSet) -> dict[str, float]:
    """mAP of the exported model with torchvision, safetensors and torchmetrics only (no kubetune code)."""
    from torchmetrics.detection import MeanAveragePrecision

    images, targets = as_tensors(validation)
    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    metric.warn_on_many_detections = False  # COCO's evaluation counts a model's best 100 boxes per image
    metric.update(predicted(reloaded_model(card, weights), images), targets)
    result = metric.compute()
    return {"map": max(0.0, float(result["map"])), "map_50": max(0.0, float(result["map_50"]))}


def pycocotools_figures(card: dict[str, Any], weights: Path, judged: ShapesSet) -> dict[str, Any]:
    """COCO's own evaluation (pycocotools' COCOeval, no torchmetrics) of the exported model on `judged`:
    mAP, mAP@.5 and AP per category id."""
    import contextlib
    import os

    from pycocotools.coco import COCO
    from pycocotools.cocoeval import COCOeval

    images, _ = as_tensors(judged)
    detections = [
        {"image_id": i + 1, "category_id": int(label), "bbox": [x1, y1, x2 - x1, y2 - y1], "score": float(score)}
        for i, out in enumerate(predicted(reloaded_model(card, weights), images))
        for (x1, y1, x2, y2), label, score in zip(
            out["boxes"].tolist(), out["labels"].tolist(), out["scores"].tolist(), strict=True
        )
    ]
    with open(os.devnull, "w") as quiet, contextlib.redirect_stdout(quiet):
        truth = COCO()
        truth.dataset = judged.coco()
        truth.createIndex()

        def evaluate(categories: list[int]) -> list[float]:
            run = COCOeval(truth, truth.loadRes(detections), "bbox")
            run.params.catIds = categories
            run.evaluate()
            run.accumulate()
            run.summarize()
            return [float(v) for v in run.stats]

        everything = evaluate(sorted(truth.getCatIds()))
        per_class = {c: evaluate([c])[0] for c in sorted(truth.getCatIds())}
    return {"map": everything[0], "map50": everything[1], "perClass": per_class}


def test_the_test_set_report_agrees_with_pycocotools_and_opens_in_a_browser(
    shapes: Shapes, finetuned: subprocess.CompletedProcess[str], tmp_path: Path
) -> None:
    from tests.support.browser import keep_screenshot, open_page

    assert finetuned.returncode == 0, finetuned.stderr
    output, card = FINETUNED_OUTPUT, card_of(shapes.world, "shapes-finetune")
    evaluation = json.loads(shapes.world.get(f"{output}/evaluation.json"))
    assert evaluation["split"] == "test" and evaluation["epoch"] == card["epoch"]
    metrics = evaluation["metrics"]
    assert metrics["images"] == TEST_IMAGES and metrics["scoreThreshold"] == card["scoreThreshold"]
    weights = tmp_path / "model.safetensors"
    weights.write_bytes(shapes.world.get(f"{output}/model.safetensors"))
    coco = pycocotools_figures(card, weights, shapes.test)
    assert metrics["map"] == pytest.approx(max(coco["map"], 0), abs=2e-3)
    assert metrics["map50"] == pytest.approx(max(coco["map50"], 0), abs=2e-3)
    for row in metrics["perClass"]:
        assert (row["ap"] or 0.0) == pytest.approx(max(coco["perClass"][row["label"]], 0), abs=2e-3), row["class"]
    assert card["evaluation"]["split"] == "test" and f"report at {output}/report.html" in finetuned.stdout
    # The ONNX copy (SSD's outputs in its own order) finds the same boxes on every validation image.
    onnx = card["exports"]["onnx"]
    assert onnx["outputs"] == ["boxes", "scores", "labels"]
    assert onnx["check"]["sameDetections"] == onnx["check"]["images"] == VAL_IMAGES

    page_file = tmp_path / "report.html"
    page_file.write_bytes(shapes.world.get(f"{output}/report.html"))
    page = open_page(page_file)
    keep_screenshot(page, "report-detection.png", tmp_path)
    assert [i["alt"] for i in page.images] == [
        "training curves",
        "precision-recall curves",
        "misses and false positives",
    ]
    assert all(i["complete"] and i["naturalWidth"] > 0 for i in page.images), page.images
    assert page.console == [] and page.errors == [] and page.requests == [] and not page.overflow
    for text in ("Results on the test set", "Per class", "mAP by object size", "Misses and false positives"):
        assert text in page.text
