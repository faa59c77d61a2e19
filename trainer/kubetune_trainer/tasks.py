"""What differs between tasks inside the one training loop (`loop.train_loop`).

The loop owns everything a run has whatever it learns: DDP, the sampler and its seeded order, the
optimizer over `param_groups`, the schedule, checkpoints and resume, progress, the fault hook and
`history.json`. A task supplies only the rest:

- `build_model`: the architecture with the base weights and its `TrainablePlan` (what trains);
- `datasets` and `collate`: the local images as the model takes them;
- `stepper`: one optimizer step (`steps.Stepper` for classification, `steps.DetectionStepper`);
- `evaluate`: the validation figures of an epoch, exact over all workers, keyed as in `history.json`
  (`metric_keys`: classification valLoss/valAccuracy, detection valMap/valMap50);
- `final_files`: extra files for the last checkpoint, which the export publishes (detections.png), and
  facts about them that travel in its progress.json (`final`) to the model card (the score threshold).
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any, Protocol

import torch
import torch.distributed as dist
from torch import nn

from kubetune_trainer.checkpoint import unwrap
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import DatasetIndex, datasets
from kubetune_trainer.detection_data import DetectionFiles, DetectionIndex, collate
from kubetune_trainer.detection_eval import (
    SCORE_THRESHOLD,
    best_score_threshold,
    mean_average_precision,
    plot_detections,
    predict,
)
from kubetune_trainer.detection_model import apply_detection_strategy, build_detector
from kubetune_trainer.export import DETECTIONS_FILE
from kubetune_trainer.model import TrainablePlan, apply_strategy, build_model
from kubetune_trainer.steps import Autocast, DetectionStepper, Stepper

# Validation images drawn in detections.png.
PICTURE_IMAGES = 8


class Stepping(Protocol):
    def train_step(self, inputs: Any, targets: Any) -> torch.Tensor: ...


class Task(Protocol):
    @property
    def metric_keys(self) -> tuple[str, ...]: ...

    @property
    def collate(self) -> Callable[[Any], Any] | None: ...

    def build_model(self, weights: Path, device: torch.device) -> tuple[nn.Module, TrainablePlan]: ...

    def datasets(self, folder: Path) -> tuple[Any, Any]: ...

    def stepper(
        self, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, autocast: Autocast, device: torch.device
    ) -> Stepping: ...

    def evaluate(self, stepper: Any, loader: Any, device: torch.device) -> dict[str, float]: ...

    def final_files(self, model: nn.Module, validation: Any, device: torch.device, folder: Path) -> dict[str, Any]:
        """Write extra files of the last checkpoint into `folder` (rank 0); facts about them for the card."""
        ...


class ClassificationTask:
    """timm models, ImageFolder data, cross-entropy; validation loss and top-1 accuracy."""

    metric_keys: tuple[str, ...] = ("valLoss", "valAccuracy")
    collate: Callable[[Any], Any] | None = None

    def __init__(self, config: TrainerConfig, index: DatasetIndex, data_config: Mapping[str, Any]) -> None:
        self.config = config
        self.index = index
        self.data_config = dict(data_config)

    def build_model(self, weights: Path, device: torch.device) -> tuple[nn.Module, TrainablePlan]:
        spec = self.config.model
        model, _ = build_model(spec.architecture, len(self.index.class_names), weights, spec.checkpoint)
        plan = apply_strategy(model, spec.strategy, spec.trainable_layers)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model, plan

    def datasets(self, folder: Path) -> tuple[Any, Any]:
        return datasets(folder, self.index, self.data_config, self.config.data.augment)

    def stepper(
        self, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, autocast: Autocast, device: torch.device
    ) -> Stepper:
        return Stepper(model, optimizer, scheduler, scaler, autocast, channels_last=device.type == "cuda")

    def evaluate(self, stepper: Stepper, loader: Any, device: torch.device) -> dict[str, float]:
        """Mean loss and top-1 accuracy over the whole validation set, summed across all workers."""
        sums = stepper.eval_sums(loader, device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        loss, correct, count = sums.tolist()
        return {"valLoss": loss / max(count, 1.0), "valAccuracy": correct / max(count, 1.0)}

    def final_files(self, model: nn.Module, validation: Any, device: torch.device, folder: Path) -> dict[str, Any]:
        return {}


def gather(items: list[Any]) -> list[Any]:
    """Every worker's items, in rank order, on every worker (each worker holds a disjoint shard)."""
    if not (dist.is_available() and dist.is_initialized()) or dist.get_world_size() == 1:
        return items
    parts: list[Any] = [None] * dist.get_world_size()
    dist.all_gather_object(parts, items)
    return [item for part in parts for item in part]


class DetectionTask:
    """torchvision detectors, COCO boxes, the sum of the model's losses; COCO mAP@[.5:.95] and mAP@.5."""

    metric_keys: tuple[str, ...] = ("valMap", "valMap50")
    collate: Callable[[Any], Any] | None = staticmethod(collate)

    def __init__(self, config: TrainerConfig, detection: DetectionIndex) -> None:
        self.config = config
        self.detection = detection
        # The last evaluation's (predictions, targets) over the whole validation set.
        self.last_predictions: tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]] | None = None

    def build_model(self, weights: Path, device: torch.device) -> tuple[nn.Module, TrainablePlan]:
        spec = self.config.model
        model, _ = build_detector(
            spec.architecture,
            len(self.detection.class_names),
            weights,
            spec.checkpoint,
            self.config.data.image_size,
        )
        return model, apply_detection_strategy(model, spec.strategy, spec.trainable_layers)

    def datasets(self, folder: Path) -> tuple[DetectionFiles, DetectionFiles]:
        train = DetectionFiles(folder, self.detection.train, flip=self.config.data.augment)
        return train, DetectionFiles(folder, self.detection.validation)

    def stepper(
        self, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, autocast: Autocast, device: torch.device
    ) -> DetectionStepper:
        return DetectionStepper(model, optimizer, scheduler, scaler, autocast, device)

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
        self.last_predictions = (gather(predictions), gather(targets))
        return mean_average_precision(*self.last_predictions)

    def final_files(self, model: nn.Module, validation: Any, device: torch.device, folder: Path) -> dict[str, Any]:
        """detections.png: the first validation images with true boxes and the boxes predicted above the
        validation set's best score threshold (rank 0 only, after the last evaluation)."""
        threshold = best_score_threshold(*self.last_predictions) if self.last_predictions else SCORE_THRESHOLD
        count = min(PICTURE_IMAGES, len(validation))
        if count:
            images, targets = collate([validation[i] for i in range(count)])
            predictions, _ = predict(model, [(images, targets)], device)
            plot_detections(
                images, predictions, targets, self.detection.class_names, folder / DETECTIONS_FILE, threshold
            )
        return {"scoreThreshold": threshold, "pictureImages": count}


def task_for(
    config: TrainerConfig,
    index: DatasetIndex,
    data_config: Mapping[str, Any],
    detection: Mapping[str, Any] | None,
) -> Task:
    if config.task == "detection":
        if detection is None:
            raise ValueError("a detection run needs its detection index")
        return DetectionTask(config, DetectionIndex.from_wire(detection))
    return ClassificationTask(config, index, data_config)
