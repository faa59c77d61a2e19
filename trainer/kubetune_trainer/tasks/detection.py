"""Object detection: torchvision detectors, COCO boxes, the sum of the model's losses; COCO mAP@[.5:.95]
and mAP@.5, and a picture of the final model's detections."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kubetune_trainer.augment import detection_augment, detection_flips
from kubetune_trainer.checkpoint import unwrap
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import DatasetIndex
from kubetune_trainer.detection_data import DetectionFiles, DetectionIndex, collate
from kubetune_trainer.detection_decode import on_device_detection
from kubetune_trainer.detection_eval import (
    SCORE_THRESHOLD,
    mean_average_precision,
    predict,
)
from kubetune_trainer.detection_model import (
    apply_detection_strategy,
    build_detector,
    check_detection_architecture,
    transform_config,
)
from kubetune_trainer.evaluation.detector_report import judge_detector
from kubetune_trainer.evaluation.judged import TEST, VALIDATION, Judged
from kubetune_trainer.export import DETECTION_PANELS, Panel, detection_card
from kubetune_trainer.formats import detection_index
from kubetune_trainer.model import TrainablePlan, WeightsReport
from kubetune_trainer.model_formats import export_detector
from kubetune_trainer.progress_model import validation_keys
from kubetune_trainer.steps import Autocast, DetectionStepper
from kubetune_trainer.storage import S3Store
from kubetune_trainer.tasks.base import Trained


def gather(items: list[Any]) -> list[Any]:
    """Every worker's items, in rank order, on every worker (each worker holds a disjoint shard)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


def annotation_summary(boxes: DetectionIndex) -> str:
    """`train 48 images (6 without boxes), 96 boxes (2 clipped, 1 dropped); validation …` for the log."""
    parts = []
    for part, counts in boxes.counts.items():
        dropped = sum(v for k, v in counts.items() if k.startswith("boxesDropped"))
        parts.append(
            f"{part} {counts.get('images', 0)} images ({counts.get('imagesWithoutBoxes', 0)} without boxes, "
            f"{counts.get('imagesMissing', 0)} missing, {counts.get('imagesCorrupt', 0)} unreadable), "
            f"{counts.get('boxes', 0)} boxes ({counts.get('boxesClipped', 0)} clipped, {dropped} malformed dropped)"
        )
    return "; ".join(parts)


class DetectionTask:
    """A detection run: the boxes of each image (`boxes`) and the same images listed for the node cache
    (`images`, a `DatasetIndex` with the same keys)."""

    metric_keys: tuple[str, ...] = validation_keys("detection")
    panels: tuple[Panel, ...] = DETECTION_PANELS
    model_modules: tuple[str, ...] = ("torchvision.models.detection",)
    collate: Callable[[Any], Any] | None = staticmethod(collate)

    def __init__(self, config: TrainerConfig, boxes: DetectionIndex, images: DatasetIndex) -> None:
        self.config = config
        self.boxes = boxes
        self.images = images

    # -- the driver ---------------------------------------------------------------------------------

    @staticmethod
    def check_architecture(name: str) -> None:
        check_detection_architecture(name)

    @classmethod
    def find(cls, config: TrainerConfig, store: S3Store) -> DetectionTask:
        """Read and sanitise the boxes (COCO files, shards or a manifest) and match them to the listed
        images (`formats.detection_index`)."""
        boxes, images = detection_index(store, config)
        return cls(config, boxes, images)

    @classmethod
    def from_wire(cls, config: TrainerConfig, data: Mapping[str, Any]) -> DetectionTask:
        return cls(config, DetectionIndex.from_wire(data["boxes"]), DatasetIndex.from_wire(data["images"]))

    def wire(self) -> dict[str, Any]:
        return {"boxes": self.boxes.wire(), "images": self.images.wire()}

    def without_corrupt(self, corrupt: Mapping[str, str]) -> DetectionTask:
        """Unreadable images dropped from both indexes (their boxes with them, counted per part)."""
        return DetectionTask(self.config, self.boxes.without_corrupt(corrupt), self.images.without_corrupt(corrupt))

    def summary(self) -> list[str]:
        return [f"annotations: {annotation_summary(self.boxes)}"]

    def card(self, trained: Trained) -> dict[str, Any]:
        """`scoreThreshold`: the exported model's best F1 on the validation set (`judge`), which
        detections.png and the report draw at."""
        threshold = float(trained.judged.get("scoreThreshold", SCORE_THRESHOLD))
        return detection_card(
            self.config,
            self.boxes,
            trained.preprocessing,
            trained.weights,
            trained.history,
            trained.finished_at,
            trained.best_epoch,
            score_threshold=threshold,
        )

    # -- the model ----------------------------------------------------------------------------------

    def build_model(self, weights: Path, device: torch.device) -> tuple[nn.Module, WeightsReport, TrainablePlan]:
        spec = self.config.model
        model, report = build_detector(
            spec.architecture, len(self.boxes.class_names), weights, spec.checkpoint, self.config.data.image_size
        )
        return model, report, apply_detection_strategy(model, spec.strategy, spec.trainable_layers)

    def preprocessing(self, model: nn.Module) -> dict[str, Any]:
        """The detector's own resize and normalisation (`detection_model.transform_config`)."""
        return transform_config(model)

    # -- the workers --------------------------------------------------------------------------------

    def train_keys(self) -> list[str]:
        return [sample.key for sample in self.boxes.train]

    def datasets(
        self, folder: Path, preprocessing: Mapping[str, Any], device: torch.device | None = None
    ) -> tuple[DetectionFiles, DetectionFiles]:
        """Training and validation images; on CUDA their JPEGs decoded there (`detection_decode`)."""
        train = DetectionFiles(folder, self.boxes.train, flip=detection_flips(self.config.data.augment))
        validation = DetectionFiles(folder, self.boxes.validation)
        return on_device_detection(train, device), on_device_detection(validation, device)

    def augmentation(self, preprocessing: Mapping[str, Any]) -> dict[str, Any]:
        return detection_augment(self.config.data.augment)

    def stepper(
        self, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, autocast: Autocast, device: torch.device
    ) -> DetectionStepper:
        clip_norm = self.config.training.gradient_clip_norm
        return DetectionStepper(model, optimizer, scheduler, scaler, autocast, device, clip_norm=clip_norm)

    def evaluate(self, stepper: DetectionStepper, loader: Any, device: torch.device) -> dict[str, float]:
        """mAP over the whole validation set: each worker predicts its shard (every image once), the
        predictions are gathered, and every worker computes the same figures from all of them.

        Every worker predicts with rank 0's buffers (BatchNorm statistics drift apart per worker in
        training), i.e. with the model that is exported, and outside the DDP wrapper, whose forward
        may hold a collective that a worker with an empty shard would never join."""
        model = unwrap(stepper.model)
        if dist.is_available() and dist.is_initialized() and dist.get_world_size() > 1:
            for buffer in model.buffers():
                dist.broadcast(buffer, src=0)
        predictions, targets = predict(model, loader, device, stepper.autocast)
        return mean_average_precision(gather(predictions), gather(targets))

    # -- after training: the exported model judged, and its other formats ------------------------------

    def judged_sets(self, folder: Path, preprocessing: Mapping[str, Any]) -> tuple[Any, Any, str]:
        validation = DetectionFiles(folder, self.boxes.validation)
        if not self.boxes.test:
            return validation, validation, VALIDATION
        return validation, DetectionFiles(folder, self.boxes.test), TEST

    def judge(self, model: nn.Module, validation: Any, judged: Any, split: str, device: torch.device) -> Judged:
        return judge_detector(model, validation, judged, self.boxes.class_names, device, split)

    def export_formats(
        self, model: nn.Module, validation: Any, folder: Path, judged: Judged, preprocessing: Mapping[str, Any]
    ) -> dict[str, dict[str, Any]]:
        threshold = float(judged.card.get("scoreThreshold", SCORE_THRESHOLD))
        return export_detector(model, self.config.output.formats, validation, folder, threshold)
