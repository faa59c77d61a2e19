"""Detection results: COCO mAP@[.5:.95] and mAP@.5, box matching, and the operating score threshold.

mAP comes from torchmetrics' MeanAveragePrecision on the pycocotools backend, i.e. COCO's own
evaluation; predictions are made with the model's own transforms (it resizes and normalises inside).
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Iterable, Sequence
from typing import Any

import torch
from torch import nn

# Boxes drawn in detections.png are those the model is at least this sure of: by default this, and after
# training the validation set's best operating point (`best_score_threshold`).
SCORE_THRESHOLD = 0.5
# Below this score a box is never worth drawing (and not worth matching when choosing the threshold).
MIN_SCORE_THRESHOLD = 0.05


def _finite(value: torch.Tensor) -> float:
    number = float(value)
    # torchmetrics answers -1 when a class never occurs; no occurrence means nothing was measured.
    return number if math.isfinite(number) and number >= 0 else 0.0


@torch.no_grad()
def predict(
    model: nn.Module,
    batches: Iterable[tuple[Sequence[torch.Tensor], Sequence[dict[str, torch.Tensor]]]],
    device: torch.device,
    autocast: Callable[[], contextlib.AbstractContextManager[Any]] = contextlib.nullcontext,
) -> tuple[list[dict[str, torch.Tensor]], list[dict[str, torch.Tensor]]]:
    """(predictions, targets) on the CPU for every image of `batches`; the model is put in eval mode."""
    model.eval()
    predictions: list[dict[str, torch.Tensor]] = []
    targets: list[dict[str, torch.Tensor]] = []
    for images, batch_targets in batches:
        with autocast():
            outputs = model([image.to(device) for image in images])
        predictions += [
            {k: v.detach().float().cpu() if k != "labels" else v.cpu() for k, v in o.items()} for o in outputs
        ]
        targets += [{k: v.cpu() for k, v in t.items()} for t in batch_targets]
    return predictions, targets


def mean_average_precision(
    predictions: Sequence[dict[str, torch.Tensor]], targets: Sequence[dict[str, torch.Tensor]]
) -> dict[str, float]:
    """{"valMap": mAP@[.5:.95], "valMap50": mAP@.5} over all images, as fractions (0-1)."""
    from torchmetrics.detection import MeanAveragePrecision

    metric = MeanAveragePrecision(box_format="xyxy", iou_type="bbox", backend="pycocotools")
    # COCO's evaluation counts each image's best 100 boxes; detectors that return more (SSD: 300) are
    # scored as COCO scores them, without a warning per image.
    metric.warn_on_many_detections = False
    metric.update(list(predictions), list(targets))
    result = metric.compute()
    return {"valMap": _finite(result["map"]), "valMap50": _finite(result["map_50"])}


def match_boxes(
    prediction: dict[str, torch.Tensor], target: dict[str, torch.Tensor], min_score: float, iou: float = 0.5
) -> list[tuple[int, int | None]]:
    """The predictions scored at least `min_score`, most confident first, each with the true box it
    matches (or None): each true box is matched once, by the most confident prediction of its class that
    overlaps it by `iou` or more, as COCO matches."""
    from torchvision.ops import box_iou

    keep = torch.nonzero(prediction["scores"] >= min_score).flatten()
    keep = keep[prediction["scores"][keep].argsort(descending=True)]
    overlaps = box_iou(prediction["boxes"][keep], target["boxes"]) if len(keep) and len(target["boxes"]) else None
    matched: set[int] = set()
    out: list[tuple[int, int | None]] = []
    for row, index in enumerate(keep.tolist()):
        hit = None
        if overlaps is not None:
            same_class = (target["labels"] == prediction["labels"][index]) & (overlaps[row] >= iou)
            for j in overlaps[row].argsort(descending=True).tolist():
                if bool(same_class[j]) and j not in matched:
                    hit = j
                    break
        if hit is not None:
            matched.add(hit)
        out.append((index, hit))
    return out


def best_score_threshold(
    predictions: Sequence[dict[str, torch.Tensor]],
    targets: Sequence[dict[str, torch.Tensor]],
    iou: float = 0.5,
) -> float:
    """The score threshold at which the kept boxes match the true ones best (highest F1 at IoU `iou`,
    `match_boxes`), at least MIN_SCORE_THRESHOLD; SCORE_THRESHOLD when nothing matches at all.

    A short fine-tuning often leaves every score below a fixed 0.5 although the boxes are right: this
    is the threshold a user would deploy with, and the one detections.png draws."""
    outcomes: list[tuple[float, bool]] = []
    true_boxes = 0
    for prediction, target in zip(predictions, targets, strict=True):
        true_boxes += len(target["labels"])
        for index, hit in match_boxes(prediction, target, MIN_SCORE_THRESHOLD, iou):
            outcomes.append((float(prediction["scores"][index]), hit is not None))
    outcomes.sort(key=lambda o: -o[0])
    best_f1, best = 0.0, SCORE_THRESHOLD
    hits = 0
    for kept, (score, hit) in enumerate(outcomes, start=1):
        hits += hit
        f1 = 2 * hits / (kept + true_boxes)
        if f1 > best_f1:
            best_f1, best = f1, score
    return round(max(best, MIN_SCORE_THRESHOLD), 4)
