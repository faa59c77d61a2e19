"""The detection task's parts, without Ray: COCO files as users have them, detectors by name with base
weights, the strategies, mAP and the picture of the results, and the driver's preparation of a run.
The end-to-end runs are in test_detection_e2e.py."""

from __future__ import annotations

import io
import json
from pathlib import Path

import pytest
import torch
from PIL import Image
from safetensors.torch import save_file

from kubetune_trainer.config import AnnotationsSpec, DataSpec, TrainerConfig
from kubetune_trainer.data import prepare_images
from kubetune_trainer.detection_data import (
    DetectionFiles,
    DetectionIndex,
    build_detection_index,
    collate,
    index_from_wire,
    index_wire,
    parse_coco,
)
from kubetune_trainer.detection_eval import (
    SCORE_THRESHOLD,
    best_score_threshold,
    mean_average_precision,
)
from kubetune_trainer.detection_model import apply_detection_strategy, build_detector, create_detector
from kubetune_trainer.errors import CheckpointError, ConfigError, DataError
from kubetune_trainer.evaluation.detector_report import DETECTIONS_FILE, detections_png
from kubetune_trainer.export import PUBLISHED_FILES
from kubetune_trainer.local import summary
from kubetune_trainer.progress_model import ProgressMetrics, ProgressUpdate
from kubetune_trainer.reporting import progress_line
from kubetune_trainer.run import Outcome, check_inputs, prepare
from kubetune_trainer.storage import S3Store, S3Uri
from kubetune_trainer.tasks import DetectionTask
from tests.support.digits_world import DATA_BUCKET, DigitsWorld
from tests.support.shapes_world import make_shapes

SMALL = "ssdlite320_mobilenet_v3_large"


def coco_file(annotations: list[dict[str, object]], images: int = 2) -> str:
    return json.dumps(
        {
            "images": [{"id": i, "file_name": f"a/{i}.png", "width": 100, "height": 80} for i in range(1, images + 1)],
            "annotations": annotations,
            "categories": [{"id": 7, "name": "bolt"}, {"id": 3, "name": "nut"}],
        }
    )


def test_coco_quirks_are_counted_not_crashed_on() -> None:
    annotations: list[dict[str, object]] = [
        {"image_id": 1, "category_id": 3, "bbox": [10, 10, 20, 30]},  # fine
        {"image_id": 1, "category_id": 7, "bbox": [90, 70, 20, 20]},  # sticks out: clipped
        {"image_id": 1, "category_id": 7, "bbox": [10, 10, 0, 5]},  # zero width
        {"image_id": 1, "category_id": 7, "bbox": [10, 10, -4, 5]},  # negative height
        {"image_id": 1, "category_id": 7, "bbox": [150, 10, 20, 20]},  # wholly outside
        {"image_id": 1, "category_id": 99, "bbox": [1, 1, 5, 5]},  # unknown category
        {"image_id": 42, "category_id": 7, "bbox": [1, 1, 5, 5]},  # unknown image
        {"image_id": 1, "category_id": 7, "bbox": [1, 1, "x", 5]},  # not numbers
        {"image_id": 1, "category_id": 7, "bbox": [1, 1, float("nan"), 5]},  # NaN (Python's json reads it)
        {"image_id": 1, "category_id": 7, "bbox": [float("-inf"), 1, 5, 5]},  # infinite
        {"image_id": 1, "category_id": 7, "bbox": [1e300, 1, 1e300, 5]},  # beyond any image
        {"image_id": 1, "category_id": 7, "bbox": [1, 1, 5, 5, 5]},  # five numbers
        {"image_id": [1], "category_id": 7, "bbox": [1, 1, 5, 5]},  # an id that cannot name an image
        {"image_id": 1, "category_id": {"id": 7}, "bbox": [1, 1, 5, 5]},  # nor a category
    ]
    samples, names, ids, counts = parse_coco(coco_file(annotations), "s3://bkt/train.json")
    # Categories sorted by id: nut (3) is label 1, bolt (7) label 2.
    assert (names, ids) == (["nut", "bolt"], [3, 7])
    first, second = samples
    assert first.boxes == [[10.0, 10.0, 30.0, 40.0], [90.0, 70.0, 100.0, 80.0]]
    assert first.labels == [1, 2]
    assert second.boxes == []  # an image without boxes stays, as a negative
    assert counts.wire() == {
        "images": 2,
        "imagesWithoutBoxes": 1,
        "boxes": 2,
        "boxesClipped": 1,
        "boxesDroppedEmpty": 7,
        "boxesDroppedOutside": 1,
        "boxesDroppedUnknownCategory": 2,
        "boxesDroppedUnknownImage": 2,
        "boxesDroppedOverLimit": 0,
    }
    # The validation file takes the training file's label order, whatever its own order.
    _, val_names, _, _ = parse_coco(coco_file([]), "s3://bkt/val.json", class_ids=ids)
    assert val_names == ["nut", "bolt"]
    assert index_from_wire(index_wire(samples)) == samples


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        ("{not json", "is not valid JSON"),
        ('{"annotations": []}', "no 'images' list"),
        ('{"images": [], "categories": []}', "has no categories"),
        ('{"images": [{"id": 1, "file_name": "a.png", "width": 0, "height": 5}], "categories": [{"id": 1}]}', "width"),
    ],
)
def test_unusable_annotation_files_say_why(raw: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_coco(raw, "s3://bkt/train.json")


def test_images_and_variable_size_targets_batch_together(tmp_path: Path) -> None:
    world = make_shapes(["red", "green"], count=8, seed=1, size=64)
    for key, data in world.pngs().items():
        (tmp_path / key).write_bytes(data)
    samples, _, _, counts = parse_coco(json.dumps(world.coco()), "s3://bkt/train.json")
    assert counts.images_without_boxes == 1 and counts.boxes == sum(len(b) for b in world.boxes)
    dataset = DetectionFiles(tmp_path, samples, flip=True)
    torch.manual_seed(0)
    images, targets = collate([dataset[i] for i in range(len(dataset))])
    assert len(images) == 8 and all(tuple(i.shape) == (3, 64, 64) for i in images)
    assert [len(t["boxes"]) for t in targets] == [len(b) for b in world.boxes]
    # Flipped or not, each box still frames its own colour.
    for image, target in zip(images, targets, strict=True):
        for (x1, y1, x2, y2), label in zip(target["boxes"].tolist(), target["labels"].tolist(), strict=True):
            patch = image[:, int(y1) : int(y2), int(x1) : int(x2)]
            channel = 0 if label == 1 else 1
            assert patch[channel].mean() > 0.7


def test_detectors_are_built_by_name_and_keep_the_backbone_of_the_base_weights(tmp_path: Path) -> None:
    base = create_detector(SMALL, num_classes=5)
    weights = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in base.state_dict().items()}, str(weights))

    model, report = build_detector(SMALL, num_classes=2, weights=weights, source="s3://bkt/base.safetensors")
    own = model.state_dict()
    backbone_key = next(k for k in own if k.startswith("backbone."))
    assert torch.equal(own[backbone_key], base.state_dict()[backbone_key])
    # The box classifier is new (3 = 2 classes + background) and none of the base's was loaded.
    assert all(k.startswith("head.classification_head") for k in report.dropped_keys) and report.dropped_keys
    assert own["head.classification_head.module_list.0.1.weight"].shape[0] == 6 * 3
    assert report.missing_keys == []

    with pytest.raises(CheckpointError, match="does not fit"):
        other = tmp_path / "other.safetensors"
        save_file({"fc.weight": torch.zeros(2, 2)}, str(other))
        build_detector(SMALL, num_classes=2, weights=other, source="s3://bkt/other.safetensors")


def test_strategies_choose_which_backbone_stages_train() -> None:
    model = create_detector("fasterrcnn_mobilenet_v3_large_320_fpn", num_classes=2)
    trains = {
        strategy: apply_detection_strategy(model, strategy, layers)
        for strategy, layers in (("head", None), ("partial", 2), ("full", None))
    }
    head, partial, full = trains["head"], trains["partial"], trains["full"]
    assert head.backbone == [] and any(n.startswith("roi_heads.box_predictor") for n in head.head)
    assert any(n.startswith("backbone.fpn") for n in head.head)
    assert partial.stages_trained == 2 and partial.backbone
    assert 0 < len(partial.backbone) < len(full.backbone)
    assert full.stages_trained == full.stages_total
    # The last call (full) left every parameter trainable; a head-only plan freezes the whole body.
    apply_detection_strategy(model, "head")
    frozen = [n for n, p in model.named_parameters() if not p.requires_grad]
    assert frozen and all(n.startswith("backbone.body.") for n in frozen)


def test_map_is_one_for_exact_boxes_and_drops_for_wrong_ones() -> None:
    targets = [{"boxes": torch.tensor([[10.0, 10, 40, 40], [50, 50, 70, 80]]), "labels": torch.tensor([1, 2])}]
    exact = [{**targets[0], "scores": torch.tensor([0.9, 0.8])}]
    assert mean_average_precision(exact, targets) == {"valMap": 1.0, "valMap50": 1.0}
    shifted = [
        {
            "boxes": torch.tensor([[14.0, 14, 44, 44], [50, 50, 70, 80]]),
            "labels": torch.tensor([1, 1]),
            "scores": torch.tensor([0.9, 0.8]),
        }
    ]
    scores = mean_average_precision(shifted, targets)
    assert 0 < scores["valMap"] < scores["valMap50"] < 1.0
    nothing = [{"boxes": torch.zeros(0, 4), "labels": torch.zeros(0, dtype=torch.int64), "scores": torch.zeros(0)}]
    assert mean_average_precision(nothing, targets) == {"valMap": 0.0, "valMap50": 0.0}


def test_the_picture_shows_images_with_boxes(tmp_path: Path) -> None:
    world = make_shapes(["red"], count=3, seed=2, size=64, empty_every=0)
    images = [torch.from_numpy(p).permute(2, 0, 1).float() / 255 for p in world.images]
    targets = [
        {
            "boxes": torch.tensor([[x, y, x + w, y + h] for x, y, w, h, _ in b], dtype=torch.float32),
            "labels": torch.ones(len(b), dtype=torch.int64),
        }
        for b in world.boxes
    ]
    predictions = [
        {
            "boxes": t["boxes"],
            "labels": torch.ones(len(t["boxes"]), dtype=torch.int64),
            "scores": torch.ones(len(t["boxes"])),
        }
        for t in targets
    ]
    dataset = [(image, target) for image, target in zip(images, targets, strict=True)]
    with Image.open(io.BytesIO(detections_png(dataset, predictions, ["red"], 0.5))) as picture:
        assert picture.width > 400 and picture.height > 100


def test_trainer_config_carries_the_task() -> None:
    config = TrainerConfig.model_validate(
        {
            "jobName": "parts",
            "runName": "parts",
            "task": "detection",
            "model": {"architecture": SMALL, "checkpoint": "s3://bkt/base.safetensors"},
            "data": {
                "train": "s3://bkt/images/",
                "annotations": {"train": "s3://bkt/ann/train.json", "validation": "s3://bkt/ann/val.json"},
            },
            "output": {"path": "s3://bkt/runs/parts/"},
        }
    )
    assert TrainerConfig.model_validate_json(config.model_dump_json(by_alias=True)).task == "detection"
    with pytest.raises(ValueError, match="detection architecture"):
        TrainerConfig.model_validate({**config.wire(), "task": "classification"})


def test_the_driver_prepares_a_detection_run_from_s3(world: DigitsWorld, tmp_path: Path) -> None:
    train_set = make_shapes(["red", "green"], count=6, seed=5, size=64)
    val_set = make_shapes(["red", "green"], count=3, seed=6, size=64)
    base = f"s3://{DATA_BUCKET}/shapes-driver"
    world.put_many({f"{base}/images/{k}": v for k, v in {**train_set.pngs("t/"), **val_set.pngs("v/")}.items()})
    world.put(f"{base}/train.json", json.dumps(train_set.coco("t/")).encode())
    world.put(f"{base}/val.json", json.dumps(val_set.coco("v/")).encode())
    weights = tmp_path / "base.safetensors"
    save_file({k: v.contiguous() for k, v in create_detector(SMALL, num_classes=4).state_dict().items()}, str(weights))
    world.put("s3://models/shapes-driver/base.safetensors", weights.read_bytes())
    config = TrainerConfig.model_validate(
        {
            "jobName": "driver",
            "runName": "driver",
            "task": "detection",
            # strategy head: the backbone stays frozen (the default, full, trains everything).
            "model": {
                "architecture": SMALL,
                "checkpoint": "s3://models/shapes-driver/base.safetensors",
                "strategy": "head",
            },
            "data": {
                "train": f"{base}/images/",
                "annotations": {"train": f"{base}/train.json", "validation": f"{base}/val.json"},
                "imageSize": 64,
            },
            "output": {"path": "s3://results/shapes-driver/"},
            "storage": {"endpoint": world.endpoint},
        }
    )
    store = S3Store(world.endpoint, "us-east-1")

    prepared = prepare(config, check_inputs(config, store), here=True)

    assert isinstance(prepared.task, DetectionTask)
    assert prepared.task.boxes.class_names == ["red", "green"]
    assert (len(prepared.task.boxes.train), len(prepared.task.boxes.validation)) == (6, 3)
    assert prepared.task.boxes.counts["train"]["imagesCorrupt"] == 0
    # The model's own transform at data.imageSize, and the base's box classifier (4 classes) replaced.
    assert prepared.data_config["fixedSize"] == [64, 64] and prepared.data_config["minSize"] == 64
    assert prepared.weights_report.dropped_keys and not prepared.weights_report.missing_keys
    assert 0 < prepared.trainable_parameters < prepared.total_parameters

    with pytest.raises(ConfigError, match=r"model\.architecture: 'resnet50' is not a detection architecture"):
        check_inputs(
            config.model_copy(update={"model": config.model.model_copy(update={"architecture": "resnet50"})}), store
        )


def test_unreadable_images_leave_the_detection_index_and_are_counted() -> None:
    samples, names, _, counts = parse_coco(coco_file([{"image_id": 1, "category_id": 3, "bbox": [1, 1, 9, 9]}]), "t")
    index = DetectionIndex(names, samples, samples[:1], {"train": counts.wire(), "validation": counts.wire()})
    kept = DetectionIndex.from_wire(index.wire()).without_corrupt({"a/1.png": "OSError: truncated"})
    assert [s.key for s in kept.train] == ["a/2.png"] and kept.validation == []
    assert (kept.counts["train"]["imagesCorrupt"], kept.counts["validation"]["imagesCorrupt"]) == (1, 1)
    assert kept.counts["train"]["boxes"] == 1  # what the file held; the card also counts the boxes kept


def test_coco_files_in_s3_become_cached_images_with_their_boxes(world: DigitsWorld, tmp_path: Path) -> None:
    train_set = make_shapes(["red", "green"], count=6, seed=3, size=64)
    val_set = make_shapes(["red", "green"], count=3, seed=4, size=64)
    base = f"s3://{DATA_BUCKET}/shapes"
    world.put_many({f"{base}/images/{k}": v for k, v in train_set.pngs("train/").items()})
    world.put_many({f"{base}/images/{k}": v for k, v in val_set.pngs("val/").items()})
    train_coco = train_set.coco("train/")
    train_coco["images"].append({"id": 999, "file_name": "train/gone.png", "width": 64, "height": 64})
    world.put(f"{base}/annotations/train.json", json.dumps(train_coco).encode())
    world.put(f"{base}/annotations/val.json", json.dumps(val_set.coco("val/")).encode())
    data = DataSpec(
        train=f"{base}/images/",
        annotations=AnnotationsSpec(train=f"{base}/annotations/train.json", validation=f"{base}/annotations/val.json"),
    )
    store = S3Store(world.endpoint, "us-east-1")

    index, images = build_detection_index(store, data, num_classes=None)

    assert index.class_names == ["red", "green"]
    assert (len(index.train), len(index.validation)) == (6, 3)
    assert index.counts["train"]["imagesMissing"] == 1 and index.counts["validation"]["imagesMissing"] == 0
    folder, corrupt = prepare_images(store, images, root=tmp_path)
    assert corrupt == {}
    image, target = DetectionFiles(folder, index.validation)[0]
    x, y, w, h, c = val_set.boxes[0][0]
    assert target["boxes"][0].tolist() == [x, y, x + w, y + h] and target["labels"][0] == c + 1
    assert tuple(image.shape) == (3, 64, 64)

    with pytest.raises(ConfigError, match=r"model\.numClasses: 5 does not match the 2 categories"):
        build_detection_index(store, data, num_classes=5)
    elsewhere = data.model_copy(update={"train": f"{base}/nothing-here/"})
    with pytest.raises(DataError, match="none of the images"):
        build_detection_index(store, elsewhere, num_classes=None)


def test_progress_lines_and_the_summary_show_map_for_detection(capsys: pytest.CaptureFixture[str]) -> None:
    update = ProgressUpdate(
        epoch=3,
        total_epochs=6,
        step=36,
        total_steps=72,
        percent=50.0,
        metrics=ProgressMetrics(train_loss=2.5, val_map=0.1234, val_map50=0.4567, images_per_second=20.0),
    )
    line = progress_line(update)
    assert "mAP 0.123 mAP@.5 0.457" in line and "acc" not in line
    files = (*PUBLISHED_FILES, DETECTIONS_FILE)
    model = S3Uri.parse("s3://results/det/model.safetensors")
    summary(0.0, Outcome(model, {"trainLoss": 2.5, "valMap": 0.1234, "valMap50": 0.4567}, 6, files))
    out = capsys.readouterr().out
    assert "validation mAP@[.5:.95] 0.123, mAP@.5 0.457" in out and "detections.png" in out


def test_the_picture_threshold_is_where_the_boxes_match_best() -> None:
    targets = [{"boxes": torch.tensor([[10.0, 10, 40, 40], [50, 50, 70, 80]]), "labels": torch.tensor([1, 2])}]
    # Right boxes with low scores (a short fine-tuning), then a wrong class and a stray box below them.
    predictions = [
        {
            "boxes": torch.tensor([[11.0, 10, 40, 41], [50, 51, 70, 80], [50, 50, 70, 80], [0, 0, 5, 5]]),
            "labels": torch.tensor([1, 2, 1, 1]),
            "scores": torch.tensor([0.31, 0.22, 0.2, 0.1]),
        }
    ]
    assert best_score_threshold(predictions, targets) == 0.22
    stray = [{**predictions[0], "labels": torch.tensor([3, 3, 3, 3])}]
    assert best_score_threshold(stray, targets) == SCORE_THRESHOLD
