"""The `Task` protocol: everything that differs between what a run can learn, for every step of a run.

A task is what the run learns *on which data*: `tasks.find_task` builds one on the driver (architecture
checked, dataset listed, annotations read), and it travels to the node preparation and the workers as
plain data (`wire`, `tasks.task_from_wire`). The driver and the loop never ask which task they run.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from pathlib import Path
from typing import Any, Protocol

import torch
from torch import nn

from kubetune_trainer.data import DatasetIndex
from kubetune_trainer.evaluation.judged import Judged
from kubetune_trainer.export import Panel
from kubetune_trainer.model import TrainablePlan, WeightsReport
from kubetune_trainer.steps import Autocast


@dataclass(frozen=True)
class Trained:
    """What a model card says beyond the task's own data: how the model sees images (`Task.preprocessing`),
    how the base weights fitted, the history, the epoch exported (the best by selectBy), what the
    evaluation after training found (`Task.judge`'s card facts: a detector's score threshold), when the
    run finished."""

    preprocessing: Mapping[str, Any]
    weights: WeightsReport
    history: Sequence[Mapping[str, Any]]
    best_epoch: int
    judged: Mapping[str, Any]
    finished_at: datetime


class Stepping(Protocol):
    """A task's training step (`steps.Stepper`, `steps.DetectionStepper`) around its model."""

    model: nn.Module

    def train_step(self, inputs: Any, targets: Any, weight: float = 1.0) -> torch.Tensor: ...

    def train_steps(
        self, batches: Sequence[tuple[Any, Any]], weights: Sequence[float] | None = None
    ) -> torch.Tensor: ...


class Task(Protocol):
    """One task's steps. The driver: `images`, `without_corrupt`, `summary`, `build_model`,
    `preprocessing`, `card`, `panels`. The workers: `build_model`, `datasets`, `collate`, `stepper`,
    `evaluate` (figures keyed as in history.json: `metric_keys`). After training, with the exported
    model: `judged_sets`, `judge` and `export_formats`."""

    metric_keys: tuple[str, ...]
    # The panels of training-curves.png.
    panels: tuple[Panel, ...]
    # What `build_model` imports (seconds of a cold start): each worker imports them beside Ray Train's
    # own set-up (`startup.ModelImports`).
    model_modules: tuple[str, ...]

    @property
    def collate(self) -> Callable[[Any], Any] | None: ...

    @property
    def images(self) -> DatasetIndex:
        """Every image of the run, with the class names: what each node caches and decode-checks."""
        ...

    def wire(self) -> dict[str, Any]:
        """The task's data as plain JSON-ready data (it crosses Ray); `tasks.task_from_wire` reads it."""
        ...

    def without_corrupt(self, corrupt: Mapping[str, str]) -> Task:
        """The same task without the images that did not decode (key -> reason)."""
        ...

    def summary(self) -> list[str]:
        """Lines for the driver's log about the task's own data (beyond the image counts)."""
        ...

    def build_model(self, weights: Path, device: torch.device) -> tuple[nn.Module, WeightsReport, TrainablePlan]:
        """The architecture with the base weights from the local file `weights`, the strategy applied."""
        ...

    def preprocessing(self, model: nn.Module) -> dict[str, Any]:
        """How the model sees images, JSON-ready: the workers' transforms and the model card take it."""
        ...

    def datasets(
        self, folder: Path, preprocessing: Mapping[str, Any], device: torch.device | None = None
    ) -> tuple[Any, Any]:
        """Training and validation datasets over the node's cached images in `folder`; with `device`, ones
        whose batches `device_decode.device_batches` finishes there (CUDA: JPEGs decoded on the GPU; both tasks)."""
        ...

    def train_keys(self) -> list[str]:
        """The key of each item of the training dataset, by index (the loop's sample accounting)."""
        ...

    def augmentation(self, preprocessing: Mapping[str, Any]) -> dict[str, Any]:
        """What `data.augment` does to the training images of this task (`augment.AugmentPlan.wire`)."""
        ...

    def stepper(
        self, model: nn.Module, optimizer: Any, scheduler: Any, scaler: Any, autocast: Autocast, device: torch.device
    ) -> Stepping: ...

    def evaluate(self, stepper: Any, loader: Any, device: torch.device) -> dict[str, float]:
        """The validation figures of an epoch, exact over all workers (every worker gets the same)."""
        ...

    def judged_sets(self, folder: Path, preprocessing: Mapping[str, Any]) -> tuple[Any, Any, str]:
        """(validation set, the set the report judges, its name): the test set, or the validation set again
        (the very object) when the job has none."""
        ...

    def judge(self, model: nn.Module, validation: Any, judged: Any, split: str, device: torch.device) -> Judged:
        """The exported model's figures, pictures and report sections on `judged`."""
        ...

    def export_formats(
        self, model: nn.Module, validation: Any, folder: Path, judged: Judged, preprocessing: Mapping[str, Any]
    ) -> dict[str, dict[str, Any]]:
        """The formats of output.formats beyond safetensors written into `folder`, checked on `validation`."""
        ...

    def card(self, trained: Trained) -> dict[str, Any]:
        """model.json: the task's data and model, and `trained`."""
        ...
