"""What differs between tasks, for the driver's steps and the one training loop (`loop.train_loop`).

The driver (`run`) and the loop own everything a run has whatever it learns: inputs checked before any
worker starts, the node cache, DDP, the sampler and its seeded order, the optimizer over
`param_groups`, the schedule, checkpoints and resume, progress, `history.json` and the export. A
`Task` (`base.Task`) supplies only the rest:

- the driver: the architecture check (`check_architecture`) and the data (`find_task`: the class
  folders, or the COCO files matched to the listing), the images every node caches, a log summary;
- the model (node preparation and workers): the architecture with the base weights and its
  `TrainablePlan`, and how it sees images (`preprocessing`: timm's data config, a detector's transform);
- the workers: datasets and collate, one optimizer step (`steps.Stepper`, `steps.DetectionStepper`),
  the validation figures of an epoch keyed as in `history.json` (classification valLoss/valAccuracy,
  detection valMap/valMap50), extra files of the last checkpoint (detections.png);
- the export: the model card, the curves' panels and the files it publishes.

`ClassificationTask` (`classification.py`) and `DetectionTask` (`detection.py`); `config.task` picks one,
here and nowhere else.
"""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.storage import S3Store
from kubetune_trainer.tasks.base import Stepping, Task, Trained
from kubetune_trainer.tasks.classification import ClassificationTask
from kubetune_trainer.tasks.detection import DetectionTask

__all__ = [
    "ClassificationTask",
    "DetectionTask",
    "Stepping",
    "Task",
    "Trained",
    "check_architecture",
    "find_task",
    "task_from_wire",
]

TASKS: dict[str, type[ClassificationTask] | type[DetectionTask]] = {
    "classification": ClassificationTask,
    "detection": DetectionTask,
}


def check_architecture(config: TrainerConfig) -> None:
    """Refuse an architecture the task cannot build (ConfigError naming model.architecture)."""
    TASKS[config.task].check_architecture(config.model.architecture)


def find_task(config: TrainerConfig, store: S3Store) -> Task:
    """The run's task with its data, as the driver finds it in S3 (the dataset listed and split, or the
    annotations read, sanitised and matched to the listing)."""
    return TASKS[config.task].find(config, store)


def task_from_wire(config: TrainerConfig, data: Mapping[str, Any]) -> Task:
    """The task a `Task.wire()` describes, in another process (a node's preparation, a worker)."""
    return TASKS[config.task].from_wire(config, data)
