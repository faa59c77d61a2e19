"""The report's pictures, as PNG bytes (matplotlib's Agg backend: no display, no fonts fetched)."""

from __future__ import annotations

import io
import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np

# Classes beyond this are drawn without a label per tick (the numbers stay in evaluation.json).
MAX_TICK_LABELS = 40
DPI = 100


def _pyplot() -> Any:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _png(fig: Any) -> bytes:
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=DPI, bbox_inches="tight")
    _pyplot().close(fig)
    return buffer.getvalue()


def confusion_png(confusion: Sequence[Sequence[int]], class_names: Sequence[str]) -> bytes:
    """Rows true, columns predicted; each row coloured by its share, counts written when few classes."""
    plt = _pyplot()
    counts = np.asarray(confusion, dtype=np.float64)
    shares = counts / np.maximum(counts.sum(axis=1, keepdims=True), 1)
    n = len(class_names)
    side = min(9.0, 2.5 + 0.45 * n)
    fig, ax = plt.subplots(figsize=(side, side))
    image = ax.imshow(shares, cmap="Blues", vmin=0, vmax=1)
    fig.colorbar(image, ax=ax, fraction=0.046, pad=0.04, label="share of the true class")
    if n <= MAX_TICK_LABELS:
        ax.set_xticks(range(n), [str(c) for c in class_names], rotation=90 if n > 8 else 0)
        ax.set_yticks(range(n), [str(c) for c in class_names])
    if n <= 20:
        for i in range(n):
            for j in range(n):
                colour = "white" if shares[i, j] > 0.5 else "black"
                ax.text(j, i, f"{int(counts[i, j])}", ha="center", va="center", color=colour, fontsize=8)
    ax.set_xlabel("predicted class")
    ax.set_ylabel("true class")
    ax.set_title("Confusion matrix")
    return _png(fig)


def reliability_png(bins: Sequence[Mapping[str, Any]], ece: float) -> bytes:
    """Accuracy against confidence per bin (bars), the diagonal of a perfectly calibrated model, and
    how many images each bin holds."""
    plt = _pyplot()
    fig, (top, bottom) = plt.subplots(
        2, 1, figsize=(5.5, 5.5), sharex=True, gridspec_kw={"height_ratios": [3, 1]}, constrained_layout=True
    )
    width = bins[0]["upper"] - bins[0]["lower"] if bins else 0.1
    held = [b for b in bins if b["count"]]  # an empty bin has no accuracy: nothing is drawn for it
    centres = [b["lower"] + width / 2 for b in held]
    accuracy = [float(b["accuracy"]) for b in held]
    confidence = [float(b["confidence"]) for b in held]
    top.bar(centres, accuracy, width=width * 0.95, color="#4c72b0", label="accuracy")
    # The gap to the mean confidence, outlined (above a bar: over-confident; inside it: under-confident).
    top.bar(
        centres,
        np.subtract(confidence, accuracy),
        bottom=accuracy,
        width=width * 0.95,
        color="none",
        edgecolor="#c44e52",
        hatch="//",
        label="gap to the mean confidence",
    )
    top.plot([0, 1], [0, 1], "k--", linewidth=1, label="perfectly calibrated")
    top.set_ylim(0, 1)
    top.set_ylabel("accuracy")
    top.set_title(f"Reliability diagram (ECE {ece:.3f})")
    top.legend(loc="upper left", fontsize=8)
    bottom.bar(centres, [b["count"] for b in held], width=width * 0.95, color="#8c8c8c")
    bottom.set_xlim(0, 1)
    bottom.set_xlabel("confidence (top-1 probability)")
    bottom.set_ylabel("images")
    return _png(fig)


@dataclass(frozen=True)
class Box:
    """A box drawn on an image: (x1, y1, x2, y2) in its pixels, a colour, a line style, a label."""

    xyxy: Sequence[float]
    colour: str
    style: str = "-"
    label: str = ""


@dataclass(frozen=True)
class Tile:
    """One image of a grid (H x W x 3, uint8 or floats in [0, 1]) with a caption and boxes."""

    image: np.ndarray
    caption: str
    boxes: Sequence[Box] = ()
    caption_colour: str = "black"


def grid_png(tiles: Sequence[Tile], title: str, columns: int = 3) -> bytes:
    """Images in a grid, each with its caption and boxes; an empty grid says so. Three columns and large
    captions: the picture is shrunk to a phone's width and the captions must stay readable there."""
    from matplotlib.patches import Rectangle

    plt = _pyplot()
    columns = max(1, min(columns, len(tiles)))
    rows = max(1, math.ceil(len(tiles) / columns))
    fig, axes = plt.subplots(rows, columns, figsize=(2.6 * columns, 3.0 * rows), squeeze=False)
    for ax in axes.flat:
        ax.axis("off")
    for ax, tile in zip(axes.flat, tiles, strict=False):
        ax.imshow(tile.image)
        ax.set_title(tile.caption, fontsize=12, color=tile.caption_colour)
        for box in tile.boxes:
            x1, y1, x2, y2 = box.xyxy
            ax.add_patch(
                Rectangle(
                    (x1, y1), x2 - x1, y2 - y1, fill=False, edgecolor=box.colour, linestyle=box.style, linewidth=1.5
                )
            )
            if box.label:
                ax.text(x1, y1, box.label, fontsize=9, color="black", backgroundcolor=box.colour)
    if not tiles:
        axes[0, 0].text(0.5, 0.5, "none", ha="center", va="center")
    fig.suptitle(title, fontsize=12)
    fig.tight_layout()
    return _png(fig)


def pr_curves_png(per_class: Sequence[Mapping[str, Any]], recall: Sequence[float]) -> bytes:
    """Precision against recall at IoU .5, one line per class with true boxes (AP@.5 in the legend)."""
    plt = _pyplot()
    fig, ax = plt.subplots(figsize=(6, 4.5))
    drawn = 0
    for entry in per_class:
        curve = entry.get("precisionAt50")
        if curve is None:
            continue
        ax.plot(recall, curve, linewidth=1.5, label=f"{entry['class']} (AP@.5 {entry['ap50']:.2f})")
        drawn += 1
    ax.set_xlim(0, 1)
    ax.set_ylim(0, 1.02)
    ax.set_xlabel("recall")
    ax.set_ylabel("precision")
    ax.set_title("Precision-recall at IoU 0.5")
    ax.grid(True, alpha=0.3)
    if drawn and drawn <= 20:
        ax.legend(loc="lower left", fontsize=7)
    return _png(fig)
