"""sweep.png: the sweep's metric by trial over epochs, and each swept field against the trials' best value."""

from __future__ import annotations

from collections.abc import Mapping
from typing import Any

from kubetune_trainer.export import titled_png


def plot_sweep(document: Mapping[str, Any], title: str) -> bytes:
    """A PNG from sweep.json's `document`: one panel of curves (stopped trials dashed, the best bold), then
    one panel per swept field (log x for positive numbers spanning a decade or more)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    trials = list(document["trials"])
    metric = str(document["metric"])
    best = (document.get("best") or {}).get("trial")
    fields = list(trials[0]["parameters"]) if trials else []
    fig, axes = plt.subplots(1, 1 + len(fields), figsize=(5.5 * (1 + len(fields)), 4.2), dpi=110, squeeze=False)
    curves = axes[0][0]
    for trial in trials:
        points = [(i + 1, v) for i, v in enumerate(trial["curve"]) if isinstance(v, int | float)]
        if not points:
            continue
        style = "--" if trial["stoppedEarly"] else "-"
        width = 2.5 if trial["id"] == best else 1.0
        curves.plot(*zip(*points, strict=True), style, linewidth=width, marker="o", markersize=3, label=trial["id"])
    curves.set_xlabel("epoch")
    curves.set_ylabel(metric)
    curves.set_title("by trial (dashed: stopped early)")
    if len(trials) <= 12:
        curves.legend(fontsize=7)
    for ax, field in zip(axes[0][1:], fields, strict=True):
        xs, ys = [], []
        for trial in trials:
            value = (trial.get("best") or {}).get(metric)
            if isinstance(value, int | float):
                xs.append(trial["parameters"][field])
                ys.append(value)
        ax.scatter(xs, ys)
        numbers = [x for x in xs if isinstance(x, int | float) and x > 0]
        if numbers and len(numbers) == len(xs) and max(numbers) >= 10 * min(numbers):
            ax.set_xscale("log")
        ax.set_xlabel(field)
        ax.set_ylabel(f"best {metric}")
    return titled_png(fig, title)
