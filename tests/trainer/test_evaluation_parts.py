"""After training, part by part (fast): the figures against scikit-learn, the best-epoch rule, the ONNX and
TorchScript copies against torch, and the report page in a real headless Chromium."""

from __future__ import annotations

import itertools
import json
import math
from pathlib import Path
from types import SimpleNamespace

import numpy as np
import pytest
import torch
from torch import nn

from kubetune_trainer.evaluation.classification import classification_metrics, worst_mistakes
from kubetune_trainer.evaluation.figures import confusion_png, reliability_png
from kubetune_trainer.evaluation.report import Section, cards, figure, paragraph, render, table
from kubetune_trainer.loop import checkpoint_figures
from kubetune_trainer.model_formats import ONNX_FILE, TORCHSCRIPT_FILE, export_classifier, export_detector
from kubetune_trainer.progress_model import validation_keys
from kubetune_trainer.selection import best_entry, best_epoch, checkpoint_config
from tests.support.browser import keep_screenshot, open_page

CLASSES = ["cat", "dog", "fox", "owl", "yak", "emu", "gnu"]


def predictions(n: int = 300, seed: int = 0) -> tuple[np.ndarray, np.ndarray]:
    """Probabilities that are right about 60% of the time; class 6 is never the true class, class 5 never
    predicted (the zero-division corners)."""
    rng = np.random.default_rng(seed)
    labels = rng.integers(0, 6, n)
    logits = rng.normal(size=(n, len(CLASSES)))
    logits[np.arange(n), labels] += 1.5
    logits[:, 5] -= 10
    probabilities = np.exp(logits) / np.exp(logits).sum(1, keepdims=True)
    return probabilities, labels


def test_classification_figures_are_scikit_learns() -> None:
    from sklearn.metrics import confusion_matrix, precision_recall_fscore_support, top_k_accuracy_score

    probabilities, labels = predictions()
    got = classification_metrics(probabilities, labels, CLASSES)
    predicted = probabilities.argmax(1)
    everyone = list(range(len(CLASSES)))
    precision, recall, f1, support = precision_recall_fscore_support(
        labels, predicted, labels=everyone, zero_division=0
    )
    assert [c["class"] for c in got["perClass"]] == CLASSES
    assert [c["support"] for c in got["perClass"]] == support.tolist()
    assert np.allclose([c["precision"] for c in got["perClass"]], precision)
    assert np.allclose([c["recall"] for c in got["perClass"]], recall)
    assert np.allclose([c["f1"] for c in got["perClass"]], f1)
    assert got["averages"]["macro"]["f1"] == pytest.approx(f1.mean())
    assert got["confusionMatrix"] == confusion_matrix(labels, predicted, labels=everyone).tolist()
    assert got["accuracy"] == pytest.approx((predicted == labels).mean())
    assert got["topK"] == 5
    assert got["topKAccuracy"] == pytest.approx(top_k_accuracy_score(labels, probabilities, k=5, labels=everyone))


def test_calibration_error_is_the_weighted_gap_per_confidence_bin() -> None:
    probabilities, labels = predictions()
    confidence, correct = probabilities.max(1), probabilities.argmax(1) == labels
    edges = np.linspace(0, 1, 16)
    expected = sum(
        abs(correct[m].mean() - confidence[m].mean()) * m.mean()
        for lo, hi in itertools.pairwise(edges)
        if (m := (confidence > lo) & (confidence <= hi)).any()
    )
    calibration = classification_metrics(probabilities, labels, CLASSES)["calibration"]
    assert calibration["ece"] == pytest.approx(expected)
    assert sum(b["count"] for b in calibration["bins"]) == len(labels)
    # A model that is always right and always sure is perfectly calibrated.
    sure = np.eye(len(CLASSES))[labels]
    assert classification_metrics(sure, labels, CLASSES)["calibration"]["ece"] == pytest.approx(0)


def test_worst_mistakes_are_wrong_and_most_confident_first() -> None:
    probabilities, labels = predictions()
    worst = worst_mistakes(probabilities, labels, count=10)
    assert len(worst) == 10 and all(probabilities[i].argmax() != labels[i] for i in worst)
    confidence = [probabilities[i].max() for i in worst]
    assert confidence == sorted(confidence, reverse=True)
    wrong = probabilities.argmax(1) != labels
    assert confidence[0] == probabilities[wrong].max(1).max()


@pytest.mark.parametrize(
    ("metric", "figures", "best"),
    [
        ("valAccuracy", [0.5, 0.8, 0.7], 2),
        ("valLoss", [0.9, 0.4, 0.6], 2),
        ("valAccuracy", [0.8, 0.8, 0.1], 2),  # of equals, the later epoch (Ray Train keeps that one)
        ("valMap", [0.2, math.nan, 0.1], 1),  # NaN ranks below every number
    ],
)
def test_the_best_epoch_by_the_chosen_metric(metric: str, figures: list[float], best: int) -> None:
    history = [{"epoch": i + 1, metric: value} for i, value in enumerate(figures)]
    assert best_epoch(history, metric) == best
    assert checkpoint_config(1, metric)["checkpoint_score_order"] == ("min" if metric == "valLoss" else "max")
    assert best_epoch([], metric) is None


@pytest.mark.parametrize("metric", ["valAccuracy", "valLoss"])
def test_a_mid_epoch_checkpoint_is_never_the_best_one(metric: str) -> None:
    # Epoch 1 ended with its validation; a preemption then saved step 7 of epoch 2, before any validation.
    history = [{"epoch": 1, "trainLoss": 0.9, "valLoss": 0.7, "valAccuracy": 0.6}]
    epoch_end = checkpoint_figures(
        SimpleNamespace(history=history, step=4), validation_keys("classification"), mid_epoch=False
    )
    mid_epoch = checkpoint_figures(
        SimpleNamespace(history=history, step=7), validation_keys("classification"), mid_epoch=True
    )
    assert epoch_end[metric] == history[0][metric]
    assert best_entry([epoch_end, mid_epoch], metric) is epoch_end
    assert best_entry([mid_epoch, epoch_end], metric) is epoch_end
    # Ray Train's snapshot of its checkpoints is strict JSON: a resumed driver must rank them the same.
    assert json.loads(json.dumps(mid_epoch, allow_nan=False)) == mid_epoch


class TinyClassifier(nn.Module):
    def __init__(self, classes: int = 3) -> None:
        super().__init__()
        self.features = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU())
        self.head = nn.Linear(8, classes)

    def forward(self, images: torch.Tensor) -> torch.Tensor:
        return self.head(self.features(images).mean(dim=(2, 3)))


def test_onnx_and_torchscript_copies_predict_what_the_model_predicts(tmp_path: Path) -> None:
    import onnxruntime

    torch.manual_seed(0)
    model = TinyClassifier().eval()
    images = torch.rand(40, 3, 16, 16)
    dataset = [(image, 0) for image in images]
    made = export_classifier(model, ["safetensors", "onnx", "torchscript"], dataset, tmp_path, 16)
    check = made["onnx"]["check"]
    assert check["images"] == check["sameTop1"] == 40 and check["maxAbsLogitDifference"] < 1e-4
    with torch.no_grad():
        expected = model(images).numpy()
    session = onnxruntime.InferenceSession(str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"])
    assert np.abs(session.run(["logits"], {"image": images.numpy()})[0] - expected).max() < 1e-4
    scripted = torch.jit.load(str(tmp_path / TORCHSCRIPT_FILE))
    with torch.no_grad():
        assert np.abs(scripted(images).numpy() - expected).max() < 1e-5
    assert model.training is False and sorted(p.name for p in tmp_path.iterdir()) == [ONNX_FILE, TORCHSCRIPT_FILE]


def test_a_format_that_cannot_be_made_is_a_message_not_a_failed_run(tmp_path: Path) -> None:
    class NoTrace(TinyClassifier):
        def forward(self, images: torch.Tensor) -> torch.Tensor:
            # Data-dependent Python: traced on zeros, the copy keeps the other branch and disagrees.
            if images.sum().item() > 0:
                return super().forward(images)
            return -super().forward(images)

    made = export_classifier(NoTrace().eval(), ["safetensors", "onnx"], [(torch.rand(3, 16, 16), 0)] * 4, tmp_path, 16)
    assert made["onnx"]["error"].startswith("could not export onnx: ")
    assert not (tmp_path / ONNX_FILE).exists(), "a copy that fails its check is not published"


def test_a_detectors_onnx_copy_finds_the_boxes_the_model_finds(tmp_path: Path) -> None:
    """SSD returns boxes, scores, labels (R-CNN boxes, labels, scores): the copy's outputs keep the names."""
    import onnxruntime
    import torchvision.models.detection as zoo

    torch.manual_seed(0)
    model = zoo.ssdlite320_mobilenet_v3_large(weights=None, weights_backbone=None, num_classes=3).eval()
    model.transform.fixed_size = (64, 64)
    with torch.no_grad():  # a head that tells boxes apart (a fresh one scores every box alike)
        for parameter in model.head.parameters():
            parameter.add_(torch.randn(parameter.shape) * 0.5)
    dataset = [(torch.rand(3, 64, 64), {}) for _ in range(3)]
    made = export_detector(model, ["safetensors", "onnx"], dataset, tmp_path, threshold=0.99)["onnx"]
    assert made["outputs"] == ["boxes", "scores", "labels"] and made["check"]["sameDetections"] == 3, made
    session = onnxruntime.InferenceSession(str(tmp_path / ONNX_FILE), providers=["CPUExecutionProvider"])
    got = dict(zip(made["outputs"], session.run(made["outputs"], {"images": dataset[0][0].numpy()}), strict=True))
    with torch.no_grad():
        expected = model([dataset[0][0]])[0]
    kept = expected["scores"].numpy() >= 0.99
    assert kept.sum() > 0 and np.array_equal(
        np.sort(got["labels"][got["scores"] >= 0.99]), np.sort(expected["labels"].numpy()[kept])
    )


def test_the_report_page_shows_its_pictures_and_no_injected_markup(tmp_path: Path) -> None:
    """Class names come from bucket folders: markup in one is shown as text, never run or fetched."""
    hostile = ['<img src="https://example.com/x.png">', "<script>alert(1)</script>", "b"]
    confusion = [[5, 1, 0], [2, 3, 0], [0, 0, 4]]
    bins = [
        {"lower": i / 4, "upper": (i + 1) / 4, "count": 3, "confidence": i / 4 + 0.1, "accuracy": 0.5} for i in range(4)
    ]
    page_html = render(
        "job <b>: evaluation report",
        "subtitle",
        [
            Section("Results", (cards([("top-1 accuracy", "80.0%")]), paragraph("a note", "note"))),
            Section("Per class", (table(["class", "precision"], [[name, "0.5"] for name in hostile]),)),
            Section("Pictures", (figure(confusion_png(confusion, hostile), "confusion matrix"),)),
            Section("Calibration", (figure(reliability_png(bins, 0.1), "reliability diagram"),)),
        ],
    )
    path = tmp_path / "report.html"
    path.write_text(page_html)
    page = open_page(path)
    keep_screenshot(page, "report-parts.png", tmp_path)
    assert page.title == "job <b>: evaluation report"
    assert [i["alt"] for i in page.images] == ["confusion matrix", "reliability diagram"]
    assert all(i["naturalWidth"] > 0 for i in page.images)
    assert page.console == [] and page.errors == [] and page.requests == []
    assert "<script>alert(1)</script>" in page.text and not page.overflow
