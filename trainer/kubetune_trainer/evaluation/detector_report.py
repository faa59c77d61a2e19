"""A detector judged on one split: COCO figures, precision-recall curves, its misses and false positives.

The operating threshold (`scoreThreshold` in model.json) is chosen on the validation set (the best F1,
`detection_eval.best_score_threshold`), never on the test set it is then judged on; detections.png
draws the first images of the judged split at that threshold.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
from torch import nn

from kubetune_trainer.detection_data import collate
from kubetune_trainer.detection_eval import best_score_threshold, predict
from kubetune_trainer.evaluation.detection import coco_figures, error_counts, worst_images
from kubetune_trainer.evaluation.figures import Box, Tile, grid_png, pr_curves_png
from kubetune_trainer.evaluation.judged import Judged
from kubetune_trainer.evaluation.report import Section, cards, figure, number, paragraph, table

BATCH = 8
PICTURE_IMAGES = 8  # detections.png
ERROR_IMAGES = 12  # the grid of misses and false positives
DETECTIONS_FILE = "detections.png"
TRUE, PREDICTED, MISSED, WRONG = "limegreen", "orange", "#d1242f", "#8250df"

Predictions = list[dict[str, torch.Tensor]]


def predictions_of(model: nn.Module, dataset: Any, device: torch.device) -> tuple[Predictions, Predictions]:
    """(predictions, targets) of every image of `dataset` (a `DetectionFiles`), in order."""
    loader = torch.utils.data.DataLoader(dataset, batch_size=BATCH, shuffle=False, collate_fn=collate)
    return predict(model, loader, device)


def _name(class_names: Sequence[str], label: int) -> str:
    return class_names[label - 1] if 0 < label <= len(class_names) else str(label)


def detections_png(
    dataset: Any, predictions: Predictions, class_names: Sequence[str], threshold: float, count: int = PICTURE_IMAGES
) -> bytes:
    """The first images: true boxes green dashed, predictions at `threshold` orange with class and score."""
    tiles = []
    for i in range(min(count, len(dataset))):
        image, target = dataset[i]
        boxes = [Box(b, TRUE, "--") for b in target["boxes"].tolist()]
        p = predictions[i]
        for box, label, score in zip(p["boxes"].tolist(), p["labels"].tolist(), p["scores"].tolist(), strict=True):
            if score >= threshold:
                boxes.append(Box(box, PREDICTED, "-", f"{_name(class_names, label)} {score:.2f}"))
        tiles.append(Tile(image.permute(1, 2, 0).clamp(0, 1).numpy(), f"image {i + 1}", boxes))
    return grid_png(tiles, f"true boxes: green dashed; predicted (score >= {threshold}): orange")


def errors_png(
    dataset: Any, predictions: Predictions, targets: Predictions, class_names: Sequence[str], threshold: float
) -> bytes:
    """The images with the most errors: missed true boxes red dashed, false positives purple."""
    worst = worst_images(predictions, targets, threshold, ERROR_IMAGES)
    # Read in the set's order: a set paged within sizeLimit (`evaluation.paged`) then fetches a page once.
    images = {i: dataset[i][0] for i in sorted(found["index"] for found in worst)}
    tiles = []
    for found in worst:
        i, p, t = found["index"], predictions[found["index"]], targets[found["index"]]
        boxes = [
            Box(t["boxes"][j].tolist(), MISSED, "--", f"missed {_name(class_names, int(t['labels'][j]))}")
            for j in found["misses"]
        ]
        boxes += [
            Box(
                p["boxes"][j].tolist(),
                WRONG,
                "-",
                f"{_name(class_names, int(p['labels'][j]))} {float(p['scores'][j]):.2f}",
            )
            for j in found["falsePositives"]
        ]
        caption = f"{len(found['misses'])} missed, {len(found['falsePositives'])} false"
        tiles.append(Tile(images[i].permute(1, 2, 0).clamp(0, 1).numpy(), caption, boxes))
    return grid_png(tiles, f"misses (red dashed) and false positives (purple) at score >= {threshold}")


def judge_detector(
    model: nn.Module,
    validation: Any,
    evaluated: Any,
    class_names: Sequence[str],
    device: torch.device,
    split: str,
) -> Judged:
    """The COCO figures of `evaluated` at the threshold chosen on `validation` (the same set without a test split)."""
    val_predictions, val_targets = predictions_of(model, validation, device)
    threshold = best_score_threshold(val_predictions, val_targets)
    predictions, targets = (
        (val_predictions, val_targets) if evaluated is validation else predictions_of(model, evaluated, device)
    )
    metrics = coco_figures(predictions, targets, class_names)
    metrics["scoreThreshold"] = threshold
    metrics["atThreshold"] = error_counts(predictions, targets, threshold)
    errors = errors_png(evaluated, predictions, targets, class_names, threshold)
    files = {DETECTIONS_FILE: detections_png(evaluated, predictions, class_names, threshold)}
    return Judged(
        metrics=metrics,
        headline={"map": metrics["map"], "map50": metrics["map50"]},
        sections=detector_sections(metrics, split, errors),
        files=files,
        card={"scoreThreshold": threshold},
    )


def detector_sections(metrics: dict[str, Any], split: str, errors: bytes) -> list[Section]:
    """The report's parts about a detector: headline figures, per class, by size, PR curves, the errors."""
    threshold, counts, sizes = metrics["scoreThreshold"], metrics["atThreshold"], metrics["bySize"]
    rows = [[c["class"], c["boxes"], number(c["ap"]), number(c["ap50"])] for c in metrics["perClass"]]
    return [
        Section(
            f"Results on the {split} set",
            (
                cards(
                    [
                        ("mAP@[.5:.95]", number(metrics["map"])),
                        ("mAP@.5", number(metrics["map50"])),
                        ("mAP@.75", number(metrics["map75"])),
                        ("images", str(metrics["images"])),
                    ]
                ),
                paragraph(
                    f"At the score threshold {threshold} (the best F1 on the validation set, model.json's "
                    f"scoreThreshold): {counts['truePositives']} true boxes found, {counts['misses']} missed, "
                    f"{counts['falsePositives']} false positives (IoU 0.5, same class)."
                ),
            ),
        ),
        Section("Per class", (table(["class", "true boxes", "AP@[.5:.95]", "AP@.5"], rows),)),
        Section(
            "mAP by object size",
            (
                table(
                    ["size (box area, pixels²)", "mAP@[.5:.95]"],
                    [
                        ["small (< 32²)", number(sizes["small"])],
                        ["medium (32² - 96²)", number(sizes["medium"])],
                        ["large (> 96²)", number(sizes["large"])],
                    ],
                ),
                paragraph("n/a: no true box of that size in the set.", "muted"),
            ),
        ),
        Section(
            "Precision-recall",
            (figure(pr_curves_png(metrics["perClass"], metrics["recallPoints"]), "precision-recall curves"),),
        ),
        Section("Misses and false positives", (figure(errors, "misses and false positives"),)),
    ]
