"""A classifier's figures on a held-out split, from its predicted probabilities (numpy only, no torch).

Per class: precision, recall, F1 and support (scikit-learn's definitions: a class never predicted has
precision 0, one never present recall 0); overall top-1 and top-k accuracy (k = 5, or fewer classes),
macro and support-weighted averages; the confusion matrix (rows true, columns predicted); calibration as
the expected calibration error over equal-width confidence bins, with the bins for a reliability diagram;
and the worst mistakes (wrong, and most confident about it).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import numpy as np

TOP_K = 5
CALIBRATION_BINS = 15
WORST_MISTAKES = 12


def _ratio(numerator: np.ndarray, denominator: np.ndarray) -> np.ndarray:
    return np.divide(numerator, denominator, out=np.zeros_like(numerator, dtype=np.float64), where=denominator > 0)


def per_class(confusion: np.ndarray, class_names: Sequence[str]) -> list[dict[str, Any]]:
    """Precision, recall, F1 and support of each class, from the confusion matrix (rows true)."""
    true_positive = np.diag(confusion).astype(np.float64)
    predicted = confusion.sum(axis=0).astype(np.float64)
    support = confusion.sum(axis=1).astype(np.float64)
    precision, recall = _ratio(true_positive, predicted), _ratio(true_positive, support)
    f1 = _ratio(2 * precision * recall, precision + recall)
    return [
        {
            "class": name,
            "precision": float(precision[i]),
            "recall": float(recall[i]),
            "f1": float(f1[i]),
            "support": int(support[i]),
        }
        for i, name in enumerate(class_names)
    ]


def averages(classes: Sequence[dict[str, Any]]) -> dict[str, dict[str, float]]:
    """Macro (each class alike) and weighted (by support) precision, recall and F1."""
    support = np.array([c["support"] for c in classes], dtype=np.float64)
    out: dict[str, dict[str, float]] = {"macro": {}, "weighted": {}}
    for key in ("precision", "recall", "f1"):
        values = np.array([c[key] for c in classes], dtype=np.float64)
        out["macro"][key] = float(values.mean()) if len(values) else 0.0
        out["weighted"][key] = float((values * support).sum() / support.sum()) if support.sum() else 0.0
    return out


def calibration(confidence: np.ndarray, correct: np.ndarray, bins: int = CALIBRATION_BINS) -> dict[str, Any]:
    """Expected calibration error (the support-weighted gap between confidence and accuracy per bin) and the
    bins of the reliability diagram: (lower, upper] confidence, count, mean confidence, accuracy."""
    edges = np.linspace(0.0, 1.0, bins + 1)
    # Bin i holds confidences in (edges[i], edges[i + 1]]; a confidence of 0 joins the first.
    which = np.clip(np.searchsorted(edges, confidence, side="left") - 1, 0, bins - 1)
    table, ece = [], 0.0
    for i in range(bins):
        member = which == i
        count = int(member.sum())
        mean_confidence = float(confidence[member].mean()) if count else None
        accuracy = float(correct[member].mean()) if count else None
        if count and mean_confidence is not None and accuracy is not None:
            ece += count / max(len(confidence), 1) * abs(accuracy - mean_confidence)
        table.append(
            {
                "lower": float(edges[i]),
                "upper": float(edges[i + 1]),
                "count": count,
                "confidence": mean_confidence,
                "accuracy": accuracy,
            }
        )
    return {"ece": float(ece), "bins": table}


def top_k_accuracy(probabilities: np.ndarray, labels: np.ndarray, k: int) -> float:
    """Share of images whose true class is among the k most probable (ties broken by class order)."""
    if not len(labels):
        return 0.0
    top = np.argsort(-probabilities, axis=1, kind="stable")[:, :k]
    return float((top == labels[:, None]).any(axis=1).mean())


def worst_mistakes(probabilities: np.ndarray, labels: np.ndarray, count: int = WORST_MISTAKES) -> list[int]:
    """Indices of the wrongly classified images, most confident first."""
    predicted = probabilities.argmax(axis=1)
    wrong = np.flatnonzero(predicted != labels)
    confidence = probabilities[wrong, predicted[wrong]]
    return [int(i) for i in wrong[np.argsort(-confidence, kind="stable")][:count]]


def classification_metrics(probabilities: np.ndarray, labels: np.ndarray, class_names: Sequence[str]) -> dict[str, Any]:
    """Every figure of the report, JSON-ready (evaluation.json's `metrics`)."""
    n = len(class_names)
    predicted = probabilities.argmax(axis=1) if len(labels) else np.zeros(0, dtype=np.int64)
    confusion = np.zeros((n, n), dtype=np.int64)
    np.add.at(confusion, (labels, predicted), 1)
    classes = per_class(confusion, class_names)
    k = min(TOP_K, n)
    confidence = probabilities.max(axis=1) if len(labels) else np.zeros(0)
    return {
        "images": len(labels),
        "accuracy": float((predicted == labels).mean()) if len(labels) else 0.0,
        "topK": k,
        "topKAccuracy": top_k_accuracy(probabilities, labels, k),
        "perClass": classes,
        "averages": averages(classes),
        "confusionMatrix": confusion.tolist(),
        "calibration": calibration(confidence, predicted == labels),
    }
