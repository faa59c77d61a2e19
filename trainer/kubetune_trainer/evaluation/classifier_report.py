"""A classifier judged on one split: probabilities for every image, the figures, the pictures."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np
import torch
from torch import nn

from kubetune_trainer.evaluation.classification import classification_metrics, worst_mistakes
from kubetune_trainer.evaluation.figures import Tile, confusion_png, grid_png, reliability_png
from kubetune_trainer.evaluation.judged import Judged
from kubetune_trainer.evaluation.report import Section, cards, figure, number, paragraph, percent, table

BATCH = 64
THUMBNAIL = 96  # pixels, the longer side of a mistake's picture


@torch.no_grad()
def probabilities(model: nn.Module, dataset: Any, device: torch.device, batch: int = BATCH) -> np.ndarray:
    """Softmax probabilities (N x classes, float64) for every image of `dataset`, in order."""
    model.eval()
    loader = torch.utils.data.DataLoader(dataset, batch_size=batch, shuffle=False)
    parts = [torch.softmax(model(images.to(device)).float(), dim=1).double().cpu() for images, _ in loader]
    return torch.cat(parts).numpy() if parts else np.zeros((0, 0))


def thumbnail(path: str) -> np.ndarray:
    from kubetune_trainer.data import open_image

    with open_image(path) as image:
        rgb = image.convert("RGB")
    rgb.thumbnail((THUMBNAIL, THUMBNAIL))
    return np.asarray(rgb)


def mistakes_png(dataset: Any, probs: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> bytes:
    worst = worst_mistakes(probs, labels)
    # Read in the set's order: a set paged within sizeLimit (`evaluation.paged`) then fetches a page once.
    thumbnails = {i: thumbnail(dataset.paths[i]) for i in sorted(worst)}
    tiles = []
    for i in worst:
        predicted = int(probs[i].argmax())
        caption = f"true {class_names[labels[i]]}\npredicted {class_names[predicted]} {probs[i, predicted]:.0%}"
        tiles.append(Tile(thumbnails[i], caption, caption_colour="#b42318"))
    return grid_png(tiles, "Most confident mistakes")


def judge_classifier(
    model: nn.Module, dataset: Any, class_names: Sequence[str], device: torch.device, split: str
) -> Judged:
    """The figures of `dataset` (an `ImageFiles`) and the report's sections about them."""
    labels = np.asarray(dataset.labels, dtype=np.int64)
    probs = probabilities(model, dataset, device)
    metrics = classification_metrics(probs.reshape(len(labels), len(class_names)), labels, class_names)
    k = metrics["topK"]
    headline = {"accuracy": metrics["accuracy"], f"top{k}Accuracy": metrics["topKAccuracy"]}
    headline |= {"macroF1": metrics["averages"]["macro"]["f1"], "ece": metrics["calibration"]["ece"]}
    rows = [
        [c["class"], number(c["precision"]), number(c["recall"]), number(c["f1"]), c["support"]]
        for c in metrics["perClass"]
    ]
    for name, avg in metrics["averages"].items():
        rows.append(
            [f"{name} average", number(avg["precision"]), number(avg["recall"]), number(avg["f1"]), len(labels)]
        )
    sections = [
        Section(
            f"Results on the {split} set",
            (
                cards(
                    [
                        ("top-1 accuracy", percent(metrics["accuracy"])),
                        (f"top-{k} accuracy", percent(metrics["topKAccuracy"])),
                        ("macro F1", number(metrics["averages"]["macro"]["f1"])),
                        ("ECE", number(metrics["calibration"]["ece"])),
                        ("images", str(len(labels))),
                    ]
                ),
            ),
        ),
        Section("Per class", (table(["class", "precision", "recall", "F1", "support"], rows),)),
        Section(
            "Confusion matrix",
            (figure(confusion_png(metrics["confusionMatrix"], class_names), "confusion matrix", "rows: true class"),),
        ),
        Section(
            "Calibration",
            (
                paragraph(
                    "Expected calibration error: how far the top-1 probability is from the accuracy it "
                    f"predicts, over {len(metrics['calibration']['bins'])} confidence bins (0 is perfect)."
                ),
                figure(
                    reliability_png(metrics["calibration"]["bins"], metrics["calibration"]["ece"]),
                    "reliability diagram",
                ),
            ),
        ),
        Section(
            "Worst mistakes",
            (figure(mistakes_png(dataset, probs, labels, class_names), "most confident mistakes"),),
        ),
    ]
    return Judged(metrics=metrics, headline=headline, sections=sections)
