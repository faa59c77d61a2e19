"""Image classification: timm models, an ImageFolder layout in S3, cross-entropy; validation loss and top-1
accuracy."""

from __future__ import annotations

from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from kubetune_trainer.augment import augment_plan, build_transforms
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import DatasetIndex, datasets, image_files
from kubetune_trainer.device_decode import on_device_files
from kubetune_trainer.evaluation.classifier_report import judge_classifier
from kubetune_trainer.evaluation.judged import TEST, VALIDATION, Judged
from kubetune_trainer.export import CLASSIFICATION_PANELS, Panel, classification_card
from kubetune_trainer.formats import classification_index
from kubetune_trainer.model import (
    TrainablePlan,
    WeightsReport,
    apply_strategy,
    build_model,
    check_architecture,
    data_config,
)
from kubetune_trainer.model_formats import classifier_preprocessing, export_classifier
from kubetune_trainer.options import batch_mixer, classification_loss
from kubetune_trainer.progress_model import validation_keys
from kubetune_trainer.steps import Autocast, Stepper
from kubetune_trainer.storage import S3Store
from kubetune_trainer.tasks.base import Trained


class ClassificationTask:
    """A classification run on the images of `index` (class folders, split into train and validation)."""

    metric_keys: tuple[str, ...] = validation_keys("classification")
    panels: tuple[Panel, ...] = CLASSIFICATION_PANELS
    model_modules: tuple[str, ...] = ("timm",)
    collate: Callable[[Any], Any] | None = None

    def __init__(self, config: TrainerConfig, index: DatasetIndex) -> None:
        self.config = config
        self.index = index

    # -- the driver ---------------------------------------------------------------------------------

    @staticmethod
    def check_architecture(name: str) -> None:
        check_architecture(name)

    @classmethod
    def find(cls, config: TrainerConfig, store: S3Store) -> ClassificationTask:
        """List the class folders (or read the shards or manifest) and split them (`formats.classification_index`)."""
        return cls(config, classification_index(store, config))

    @classmethod
    def from_wire(cls, config: TrainerConfig, data: Mapping[str, Any]) -> ClassificationTask:
        return cls(config, DatasetIndex.from_wire(data["index"]))

    def wire(self) -> dict[str, Any]:
        return {"index": self.index.wire()}

    @property
    def images(self) -> DatasetIndex:
        return self.index

    def without_corrupt(self, corrupt: Mapping[str, str]) -> ClassificationTask:
        return ClassificationTask(self.config, self.index.without_corrupt(corrupt))

    def summary(self) -> list[str]:
        return []

    def card(self, trained: Trained) -> dict[str, Any]:
        card = classification_card(
            self.config,
            self.index,
            trained.preprocessing,
            trained.weights,
            trained.history,
            trained.finished_at,
            trained.best_epoch,
        )
        _, eval_transform = build_transforms(trained.preprocessing, "none")
        return card | {"preprocessing": classifier_preprocessing(eval_transform)}

    # -- the model ----------------------------------------------------------------------------------

    def build_model(self, weights: Path, device: torch.device) -> tuple[nn.Module, WeightsReport, TrainablePlan]:
        spec = self.config.model
        model, report = build_model(spec.architecture, len(self.index.class_names), weights, spec.checkpoint)
        plan = apply_strategy(model, spec.strategy, spec.trainable_layers)
        if device.type == "cuda":
            model = model.to(memory_format=torch.channels_last)
        return model, report, plan

    def preprocessing(self, model: nn.Module) -> dict[str, Any]:
        """timm's data config for the model, at `data.imageSize` when set."""
        return data_config(model, self.config.data.image_size)

    # -- the workers --------------------------------------------------------------------------------

    def train_keys(self) -> list[str]:
        return [sample.key for sample in self.index.train]

    def datasets(
        self, folder: Path, preprocessing: Mapping[str, Any], device: torch.device | None = None
    ) -> tuple[Any, Any]:
        """Training and validation images; on CUDA their JPEGs decoded there (`device_decode`)."""
        train, validation = datasets(
            folder, self.index, preprocessing, self.config.data.augment, self.config.training.rand_augment
        )
        return on_device_files(train, device), on_device_files(validation, device)

    def augmentation(self, preprocessing: Mapping[str, Any]) -> dict[str, Any]:
        size, extra = int(preprocessing["input_size"][-1]), self.config.training.rand_augment
        return augment_plan(self.config.data.augment, size, extra).wire()

    def stepper(
        self, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, autocast: Autocast, device: torch.device
    ) -> Stepper:
        """The step with the training options that shape it: clipping, the loss, mixup and CutMix."""
        training = self.config.training
        return Stepper(
            model,
            optimizer,
            scheduler,
            scaler,
            autocast,
            channels_last=device.type == "cuda",
            clip_norm=training.gradient_clip_norm,
            loss=classification_loss(training),
            mix=batch_mixer(training, len(self.index.class_names)),
        )

    def evaluate(self, stepper: Stepper, loader: Any, device: torch.device) -> dict[str, float]:
        """Mean loss and top-1 accuracy over the whole validation set, summed across all workers."""
        sums = stepper.eval_sums(loader, device)
        if dist.is_available() and dist.is_initialized():
            dist.all_reduce(sums)
        loss, correct, count = sums.tolist()
        return {"valLoss": loss / max(count, 1.0), "valAccuracy": correct / max(count, 1.0)}

    # -- after training: the exported model judged, and its other formats ------------------------------

    def judged_sets(self, folder: Path, preprocessing: Mapping[str, Any]) -> tuple[Any, Any, str]:
        _, eval_transform = build_transforms(preprocessing, "none")
        validation = image_files(folder, self.index, self.index.validation, eval_transform)
        if not self.index.test:
            return validation, validation, VALIDATION
        return validation, image_files(folder, self.index, self.index.test, eval_transform), TEST

    def judge(self, model: nn.Module, validation: Any, judged: Any, split: str, device: torch.device) -> Judged:
        return judge_classifier(model, judged, self.index.class_names, device, split)

    def export_formats(
        self, model: nn.Module, validation: Any, folder: Path, judged: Judged, preprocessing: Mapping[str, Any]
    ) -> dict[str, dict[str, Any]]:
        size = int(preprocessing["input_size"][-1])
        return export_classifier(model, self.config.output.formats, validation, folder, size)
