"""The result of a run, under `output.path`: the model and what it takes to use and judge it.

    model.safetensors      the weights of the best epoch by training.selectBy (a server-side copy of its checkpoint's)
    model.json             architecture, classes in index order, preprocessing, the exported epoch's metrics,
                           the evaluation's headline figures, the other formats and their checks, provenance
    history.json           one entry per epoch: trainLoss, valLoss, valAccuracy, imagesPerSecond, learningRate
    training-curves.png    loss and accuracy (detection: mAP) per epoch
    evaluation.json, report.html, model.onnx, model.torchscript.pt, detections.png: written by the
                           evaluation after training (`evaluation.step`), before model.json

Reload a classifier outside the trainer:

    card = json.load(open("model.json"))
    model = timm.create_model(card["architecture"], num_classes=card["numClasses"])
    safetensors.torch.load_model(model, "model.safetensors")
    transform = timm.data.create_transform(**card["dataConfig"], is_training=False)

and a detector (labels are 1..numClasses, `classNames[label - 1]`; 0 is the background):

    model = getattr(torchvision.models.detection, card["architecture"])(
        weights=None, weights_backbone=None, num_classes=card["numClasses"] + 1)
    t = card["transform"]
    model.transform.min_size, model.transform.max_size = (t["minSize"],), t["maxSize"]
    model.transform.fixed_size = tuple(t["fixedSize"]) if t["fixedSize"] else None
    safetensors.torch.load_model(model, "model.safetensors")
    model.eval()(images)   # float RGB tensors in [0, 1]; the model resizes and normalises them

The pieces (history, curves with any panels, the model card's common part) are task-agnostic so other
tasks (detection) export through the same functions with their own metrics.
"""

from __future__ import annotations

import io
import json
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any

from kubetune_trainer.checkpoint import MODEL_FILE, PROGRESS_FILE, exported_file
from kubetune_trainer.config import OUTPUT_FILES, TrainerConfig, data_format
from kubetune_trainer.data import DatasetIndex
from kubetune_trainer.detection_data import DetectionIndex
from kubetune_trainer.detection_eval import SCORE_THRESHOLD
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.evaluation.detector_report import DETECTIONS_FILE
from kubetune_trainer.model import WeightsReport
from kubetune_trainer.options import stopped_early
from kubetune_trainer.progress_model import card_metrics
from kubetune_trainer.storage import S3Store, S3Uri

MODEL_FORMAT = "kubetune.dev/model/v1"
HISTORY_FILE = OUTPUT_FILES["history"]
CARD_FILE = OUTPUT_FILES["card"]
CURVES_FILE = OUTPUT_FILES["curves"]
# What every export writes beside the model (MODEL_FILE), in the order the summary names them.
PUBLISHED_FILES = (CARD_FILE, HISTORY_FILE, CURVES_FILE)
RANGE_TEST_FILE = "lr-range-test.png"  # written by the workers' range test (`lr_range`), not by the export


@dataclass(frozen=True)
class Panel:
    """One plot of the curves figure: `series` are (history key, legend label)."""

    title: str
    ylabel: str
    series: tuple[tuple[str, str], ...]
    percent: bool = False


CLASSIFICATION_PANELS = (
    Panel("Loss", "cross-entropy", (("trainLoss", "train"), ("valLoss", "validation"))),
    Panel("Validation accuracy", "top-1", (("valAccuracy", "validation"),), percent=True),
)
DETECTION_PANELS = (
    Panel("Loss", "sum of the detector's losses", (("trainLoss", "train"),)),
    Panel("Validation mAP", "COCO mAP", (("valMap", "mAP@[.5:.95]"), ("valMap50", "mAP@.5")), percent=True),
)


def plot_curves(history: Sequence[Mapping[str, Any]], panels: Sequence[Panel], title: str) -> bytes:
    """A PNG with one panel per metric group, epochs on x, final values annotated."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import MaxNLocator, PercentFormatter

    epochs = [int(e["epoch"]) for e in history]
    fig, axes = plt.subplots(1, len(panels), figsize=(5.5 * len(panels), 4.2), dpi=110, squeeze=False)
    for ax, panel in zip(axes[0], panels, strict=True):
        for key, label in panel.series:
            points = [(x, e[key]) for x, e in zip(epochs, history, strict=True) if e.get(key) is not None]
            if not points:
                continue
            xs, ys = zip(*points, strict=True)
            (line,) = ax.plot(xs, ys, marker="o", linewidth=2, label=label)
            final = f"{ys[-1]:.1%}" if panel.percent else f"{ys[-1]:.4f}"
            ax.annotate(
                final,
                (xs[-1], ys[-1]),
                textcoords="offset points",
                xytext=(0, 8),
                ha="center",
                color=line.get_color(),
                fontsize=9,
            )
        ax.margins(x=0.08, y=0.15)  # room for the annotations of the final values
        ax.set_title(panel.title)
        ax.set_xlabel("epoch")
        ax.set_ylabel(panel.ylabel)
        ax.xaxis.set_major_locator(MaxNLocator(integer=True))
        if panel.percent:
            ax.yaxis.set_major_formatter(PercentFormatter(1.0))
        ax.grid(True, alpha=0.3)
        ax.legend(loc="best")
    return titled_png(fig, title)


def titled_png(fig: Any, title: str) -> bytes:
    """A matplotlib figure, titled and laid out, as PNG bytes (and closed)."""
    import matplotlib.pyplot as plt

    fig.suptitle(title)
    fig.tight_layout()
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png")
    plt.close(fig)
    return buffer.getvalue()


def _provenance(
    config: TrainerConfig,
    weights: WeightsReport,
    history: Sequence[Mapping[str, Any]],
    finished_at: datetime,
    best_epoch: int,
) -> dict[str, Any]:
    """Where a model came from, the same for every task: `epoch` is the one exported, the best by
    `selectBy` of the `epochs` trained."""
    return {
        "epoch": best_epoch,
        "selectBy": config.selected_metric,
        "epochs": len(history),
        "finishedAt": finished_at.astimezone(UTC).isoformat().replace("+00:00", "Z"),
        "baseCheckpoint": config.model.checkpoint,
        "strategy": config.model.strategy,
        "trainableLayers": config.model.trainable_layers,
        "training": config.training.wire(),
        "weightLoading": weights.wire(),
    }


def classification_card(
    config: TrainerConfig,
    index: DatasetIndex,
    data_config: Mapping[str, Any],
    weights: WeightsReport,
    history: Sequence[Mapping[str, Any]],
    finished_at: datetime,
    best_epoch: int,
) -> dict[str, Any]:
    """model.json: everything needed to use the model, and where it came from; `metrics` are the exported
    (best) epoch's."""
    final = exported_entry(history, best_epoch)
    size = data_config["input_size"]
    return {
        "format": MODEL_FORMAT,
        "task": "classification",
        "architecture": config.model.architecture,
        "numClasses": len(index.class_names),
        "classNames": index.class_names,
        "imageSize": int(size[-1]),
        "mean": list(data_config["mean"]),
        "std": list(data_config["std"]),
        "interpolation": data_config.get("interpolation"),
        "cropPct": data_config.get("crop_pct"),
        # timm's own keys: timm.data.create_transform(**dataConfig, is_training=False)
        "dataConfig": dict(data_config),
        "metrics": card_metrics(final),
        **_provenance(config, weights, history, finished_at, best_epoch),
        "data": {
            "format": data_format(config.task, config.data),
            "train": config.data.train,
            "validation": config.data.validation,
            "validationSplit": None if config.data.validation else config.data.validation_split,
            "test": config.data.test,
            "trainImages": len(index.train),
            "validationImages": len(index.validation),
            "testImages": len(index.test),
            "corruptImages": len(index.corrupt),
        },
        "job": {"name": config.job_name, "namespace": config.namespace, "runName": config.run_name},
        "files": dict(OUTPUT_FILES),
    }


def detection_card(
    config: TrainerConfig,
    detection: DetectionIndex,
    transform: Mapping[str, Any],
    weights: WeightsReport,
    history: Sequence[Mapping[str, Any]],
    finished_at: datetime,
    best_epoch: int,
    score_threshold: float = SCORE_THRESHOLD,
) -> dict[str, Any]:
    """model.json of a detector: what rebuilds it outside the trainer (architecture, classes, the model's
    own transform), the exported (best) epoch's mAP, the score threshold detections.png draws at (the
    validation set's best F1), and what the annotations held (boxes kept, clipped and dropped)."""
    final = exported_entry(history, best_epoch)
    annotations = config.data.annotations
    return {
        "format": MODEL_FORMAT,
        "task": "detection",
        "architecture": config.model.architecture,
        "numClasses": len(detection.class_names),
        "classNames": detection.class_names,
        "labels": "label i (1-based) is classNames[i - 1]; 0 is the background",
        "imageSize": config.data.image_size or int(transform["minSize"]),
        # torchvision's GeneralizedRCNNTransform settings: min_size, max_size, fixed_size, mean, std.
        "transform": dict(transform),
        "scoreThreshold": score_threshold,
        "metrics": card_metrics(final),
        **_provenance(config, weights, history, finished_at, best_epoch),
        "data": {
            "format": data_format(config.task, config.data),
            "train": config.data.train,
            "validation": config.data.validation or config.data.train,
            "test": (config.data.test or config.data.validation or config.data.train) if detection.test else None,
            "annotations": annotations.wire() if annotations else None,
            "trainImages": len(detection.train),
            "validationImages": len(detection.validation),
            "testImages": len(detection.test),
            "trainBoxes": sum(len(s.boxes) for s in detection.train),
            "validationBoxes": sum(len(s.boxes) for s in detection.validation),
            # Per annotation file: images, imagesWithoutBoxes, imagesMissing, imagesCorrupt, boxes,
            # boxesClipped, boxesDroppedEmpty/Outside/UnknownCategory/UnknownImage.
            "counts": detection.counts,
        },
        "job": {"name": config.job_name, "namespace": config.namespace, "runName": config.run_name},
        "files": {**OUTPUT_FILES, "detections": DETECTIONS_FILE},
    }


def exported_entry(history: Sequence[Mapping[str, Any]], best_epoch: int) -> dict[str, Any]:
    """The history entry of the exported epoch (1-based)."""
    return dict(history[best_epoch - 1]) if 0 < best_epoch <= len(history) else {}


def with_effective_training(card: Mapping[str, Any], effective: Mapping[str, Any] | None) -> dict[str, Any]:
    """The card with what the run trained with (`optim.effective_training`: learning rates and where they
    came from, warm-up, augmentation), and the range test's picture among its files when there was one."""
    out = dict(card)
    if not effective:
        return out
    out["effectiveTraining"] = dict(effective)
    if "rangeTest" in effective:
        out["files"] = {**out.get("files", {}), "rangeTest": RANGE_TEST_FILE}
    return out


def read_progress_json(store: S3Store, checkpoint: S3Uri) -> dict[str, Any]:
    """A checkpoint's progress.json: `epoch` (the epochs it holds), `history` (all of them, then)."""
    progress: dict[str, Any] = json.loads(store.get_bytes(checkpoint.join(PROGRESS_FILE)))
    return progress


def export_model(
    store: S3Store,
    config: TrainerConfig,
    checkpoint: S3Uri,
    card: Mapping[str, Any],
    history: Sequence[Mapping[str, Any]],
    panels: Sequence[Panel] = CLASSIFICATION_PANELS,
) -> S3Uri:
    """Write the files under output.path (overwriting: exporting twice gives the same result); the weights
    are `checkpoint`'s (the best epoch's), the history the whole run's."""
    early = stopped_early(history, config.training, config.selected_metric)
    if len(history) != config.training.epochs and not early:
        raise TrainerError(f"the run's history has {len(history)} epochs, expected {config.training.epochs}")
    out = S3Uri.parse(config.output.path)
    store.copy(checkpoint.join(exported_file(config.training.ema_decay is not None)), out.join(MODEL_FILE))
    store.put_bytes(out.join(HISTORY_FILE), json.dumps(list(history), indent=2).encode(), "application/json")
    store.put_bytes(
        out.join(CURVES_FILE),
        plot_curves(history, panels, f"{config.job_name}: {config.model.architecture}"),
        "image/png",
    )
    # model.json last: its presence says the export is complete.
    store.put_bytes(out.join(CARD_FILE), json.dumps(dict(card), indent=2).encode(), "application/json")
    return out
