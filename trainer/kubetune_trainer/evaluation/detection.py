"""A detector's figures on a held-out split: COCO's own evaluation (pycocotools through torchmetrics).

Per class AP@[.5:.95] and AP@.5, mAP by object size (COCO's small < 32², medium < 96², large; the area
is the box's), precision-recall curves at IoU .5 (COCO's 101 recall points, interpolated precision), and
the images to look at: each true box that no prediction above the operating threshold found (a miss) and
each such prediction that matched no true box (a false positive), at IoU .5 and the same class.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from typing import Any

import torch

from kubetune_trainer.detection_eval import match_boxes

PR_POINTS = 101  # COCO's recall thresholds 0, .01, ..., 1
MATCH_IOU = 0.5


def _number(value: Any) -> float | None:
    """A figure as a float; None where COCO answers -1 (nothing of that kind was there to measure)."""
    number = float(value)
    return number if math.isfinite(number) and number >= 0 else None


def _curve(precision: torch.Tensor) -> list[float] | None:
    """Interpolated precision at COCO's recall points; None when the class had no true box."""
    values = precision.tolist()
    return None if all(v < 0 for v in values) else [max(v, 0.0) for v in values]


def coco_figures(
    predictions: Sequence[dict[str, torch.Tensor]],
    targets: Sequence[dict[str, torch.Tensor]],
    class_names: Sequence[str],
) -> dict[str, Any]:
    """mAP, mAP@.5, mAP@.75, mAP by size, and per class AP, AP@.5, true boxes and the PR curve at IoU .5."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(
        box_format="xyxy", iou_type="bbox", backend="pycocotools", class_metrics=True, extended_summary=True
    )
    metric.warn_on_many_detections = False
    metric.update(list(predictions), list(targets))
    result = metric.compute()
    present = [int(c) for c in torch.atleast_1d(result["classes"]).tolist()]
    # precision: IoU thresholds (.5:.05:.95) x recall points x classes present x areas (all, S, M, L) x max dets (1, 10, 100)
    precision = result["precision"]
    per_class_map = torch.atleast_1d(result["map_per_class"])
    boxes = torch.zeros(len(class_names) + 1, dtype=torch.int64)
    for target in targets:
        boxes += torch.bincount(target["labels"].long(), minlength=len(class_names) + 1)[: len(class_names) + 1]
    classes = []
    for label, name in enumerate(class_names, start=1):
        k = present.index(label) if label in present else None
        curve = _curve(precision[0, :, k, 0, -1]) if k is not None else None
        classes.append(
            {
                "class": name,
                "label": label,
                "boxes": int(boxes[label]),
                "ap": _number(per_class_map[k]) if k is not None else None,
                "ap50": float(sum(curve) / len(curve)) if curve is not None else None,
                "precisionAt50": curve,
            }
        )
    return {
        "images": len(targets),
        "map": _number(result["map"]) or 0.0,
        "map50": _number(result["map_50"]) or 0.0,
        "map75": _number(result["map_75"]) or 0.0,
        "bySize": {size: _number(result[f"map_{size}"]) for size in ("small", "medium", "large")},
        "perClass": classes,
        "recallPoints": [round(i / (PR_POINTS - 1), 2) for i in range(PR_POINTS)],
    }


def errors(
    prediction: dict[str, torch.Tensor], target: dict[str, torch.Tensor], threshold: float
) -> tuple[list[int], list[int]]:
    """(true boxes missed, predictions that are false positives) of one image at `threshold`, at IoU .5."""
    matches = match_boxes(prediction, target, threshold, MATCH_IOU)
    matched = {hit for _, hit in matches if hit is not None}
    false_positives = [index for index, hit in matches if hit is None]
    return [j for j in range(len(target["boxes"])) if j not in matched], false_positives


def worst_images(
    predictions: Sequence[dict[str, torch.Tensor]],
    targets: Sequence[dict[str, torch.Tensor]],
    threshold: float,
    count: int,
) -> list[dict[str, Any]]:
    """The images with the most misses and false positives at `threshold`, worst first (index, misses,
    false positives: indices into the image's true boxes and predictions)."""
    found: list[dict[str, Any]] = []
    for i, (prediction, target) in enumerate(zip(predictions, targets, strict=True)):
        misses, false_positives = errors(prediction, target, threshold)
        if misses or false_positives:
            found.append({"index": i, "misses": misses, "falsePositives": false_positives})
    found.sort(key=lambda f: -(len(f["misses"]) + len(f["falsePositives"])))
    return found[:count]


def error_counts(
    predictions: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]], threshold: float
) -> dict[str, int]:
    """True boxes found and missed, and false positives, over the split at `threshold`."""
    found = missed = false_positives = 0
    for prediction, target in zip(predictions, targets, strict=True):
        misses, wrong = errors(prediction, target, threshold)
        missed += len(misses)
        found += len(target["boxes"]) - len(misses)
        false_positives += len(wrong)
    return {"truePositives": found, "misses": missed, "falsePositives": false_positives}
