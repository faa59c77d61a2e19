"""Best, not last: which epoch's checkpoint a run exports (`training.selectBy`).

One rule, used by the workers (the best epoch so far, in progress updates), by Ray Train's checkpoint
retention (`checkpoint_config`: the best `checkpointsToKeep` by the same figure, plus the latest to resume
from) and by the export. It is Ray Train's own ordering, so the epoch named here is always one Ray kept:
a figure that is missing or NaN ranks below every number, and of equal figures the later epoch wins.
"""

from __future__ import annotations

import math
import sys
from collections.abc import Mapping, Sequence
from typing import Any

from kubetune_trainer.config import LOWER_IS_BETTER, metric_mode


def _score(entry: Mapping[str, Any], metric: str) -> tuple[bool, float]:
    value = entry.get(metric)
    if not isinstance(value, int | float) or isinstance(value, bool) or math.isnan(value):
        return (False, 0.0)
    return (True, -float(value) if metric in LOWER_IS_BETTER else float(value))


def best_entry(history: Sequence[Mapping[str, Any]], metric: str) -> Mapping[str, Any] | None:
    """The history entry with the best `metric` (the later one of equals); None for an empty history."""
    best: Mapping[str, Any] | None = None
    for entry in history:
        if best is None or _score(entry, metric) >= _score(best, metric):
            best = entry
    return best


def best_epoch(history: Sequence[Mapping[str, Any]], metric: str) -> int | None:
    """The 1-based epoch whose checkpoint is the best by `metric`, or None before the first epoch ends."""
    entry = best_entry(history, metric)
    return int(entry["epoch"]) if entry is not None else None


def checkpoint_config(num_to_keep: int, metric: str) -> dict[str, Any]:
    """Ray Train's CheckpointConfig arguments: keep the best `num_to_keep` by `metric` (and the latest)."""
    return {
        "num_to_keep": num_to_keep,
        "checkpoint_score_attribute": metric,
        "checkpoint_score_order": metric_mode(metric),
    }


def unranked(metric_keys: Sequence[str]) -> dict[str, float]:
    """Figures for a checkpoint without validation of its own (mid-epoch): the worst finite number each
    metric can have, so Ray Train ranks it below every epoch end. Not NaN: Ray's snapshot of its
    checkpoints (checkpoint_manager_snapshot.json) turns NaN into null, which a resumed driver cannot rank."""
    return {key: sys.float_info.max if key in LOWER_IS_BETTER else -sys.float_info.max for key in metric_keys}
