"""What a task's evaluation of the exported model gives the report, evaluation.json and model.json."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from kubetune_trainer.evaluation.report import Section

# Which images a report judges: the test split when the job has one, else the validation split.
TEST, VALIDATION = "test", "validation"


@dataclass
class Judged:
    """A task's verdict on one split: `metrics` (evaluation.json), `headline` (a few figures by name, for
    the summary line and MLflow), the report's `sections`, extra `files` to publish under output.path
    (name → bytes), and `card` facts for model.json (e.g. a detector's score threshold)."""

    metrics: dict[str, Any]
    headline: dict[str, float]
    sections: list[Section]
    files: dict[str, bytes] = field(default_factory=dict)
    card: dict[str, Any] = field(default_factory=dict)
