"""After training: the exported model judged once, its report written, its other formats made.

`judge_node` runs where the node preparation ran (this process for a local run, a Ray task with one
worker's resources on a cluster: a GPU when the workers have one). It rebuilds the architecture, loads
the exported checkpoint's weights, and judges the test split (`data.test`), or the validation split
when the job has none (and the report says so), its images cached as `paged.judge_sets` says (in
stream mode within data.cache.sizeLimit). It writes under output.path, before the driver writes
model.json: `evaluation.json` (every figure), `report.html` (one self-contained page), the task's
pictures (detections.png) and the other formats of `output.formats` (checked against the model). What
it returns is plain data for model.json and the summary (it crosses Ray).
"""

from __future__ import annotations

import json
import logging
import tempfile
from collections.abc import Mapping, Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer.cache import cached_object
from kubetune_trainer.checkpoint import MODEL_FILE, exported_file
from kubetune_trainer.config import OUTPUT_FILES, TrainerConfig
from kubetune_trainer.evaluation.judged import VALIDATION, Judged
from kubetune_trainer.evaluation.paged import judge_sets
from kubetune_trainer.evaluation.report import Section, cards, facts, figure, number, paragraph, render
from kubetune_trainer.export import plot_curves
from kubetune_trainer.storage import ObjectInfo, S3Store, S3Uri
from kubetune_trainer.tasks import Task, task_from_wire

log = logging.getLogger(__name__)

EVALUATION_FORMAT = "kubetune.dev/evaluation/v1"
CONTENT_TYPES = {".json": "application/json", ".html": "text/html; charset=utf-8", ".png": "image/png"}


def load_exported(
    config: TrainerConfig, task: Task, store: S3Store, weights: ObjectInfo, checkpoint: S3Uri, device: torch.device
) -> torch.nn.Module:
    """The architecture (built as the workers build it) with the exported checkpoint's weights."""
    from safetensors.torch import load_model

    base = cached_object(store, S3Uri.parse(config.model.checkpoint), weights)
    model, _, _ = task.build_model(base, device)
    with tempfile.TemporaryDirectory(prefix="kubetune-judge-") as tmp:
        local = Path(tmp) / MODEL_FILE
        store.download_file(checkpoint.join(exported_file(config.training.ema_decay is not None)), local)
        load_model(model, str(local), device=str(device))
    return model.eval()


def headline_section(config: TrainerConfig, split: str, history: Sequence[Mapping[str, Any]], epoch: int) -> Section:
    """What was judged and which model it is: the split (saying so when it is the validation set), the epoch."""
    metric = config.selected_metric
    value = history[epoch - 1].get(metric) if 0 < epoch <= len(history) else None
    parts = [
        cards(
            [
                ("exported epoch", f"{epoch} of {len(history)}"),
                (f"best {metric}", number(value, 4)),
                ("judged on", f"{split} set"),
            ]
        ),
        paragraph(
            f"The model is the checkpoint of epoch {epoch}, the best of the run by {metric} "
            "(training.selectBy), not necessarily the last."
        ),
    ]
    if split == VALIDATION:
        parts.append(
            paragraph(
                "This job has no test set (data.test), so these figures are on the validation set, which also "
                "picked the exported epoch: they are optimistic. Give data.test for an unbiased estimate.",
                "note",
            )
        )
    return Section("Model", tuple(parts))


def training_section(config: TrainerConfig, task: Task, history: Sequence[Mapping[str, Any]]) -> Section:
    curves = plot_curves(history, task.panels, f"{config.job_name}: {config.model.architecture}")
    return Section("Training", (figure(curves, "training curves", "per epoch; history.json has the numbers"),))


def exports_section(exports: Mapping[str, Mapping[str, Any]]) -> Section:
    """Each file under output.path a server can load, and how the copy was checked against the model."""
    items = [(f"safetensors: {OUTPUT_FILES['weights']}", "the weights; model.json says how to rebuild the model")]
    for name, made in exports.items():
        if "error" in made:
            items.append((f"{name}: not made", str(made["error"])))
            continue
        check = made.get("check") or {}
        if "sameTop1" in check:
            note = (
                f"checked with onnxruntime: the same top-1 on {check['sameTop1']} of {check['images']} validation "
                f"images, largest logit difference {check['maxAbsLogitDifference']:.2e}"
            )
        elif "sameDetections" in check:
            note = (
                f"checked with onnxruntime: the same detections on {check['sameDetections']} of {check['images']} "
                "validation images"
            )
        else:
            note = str(made.get("how", ""))
        items.append((f"{name}: {made.get('file', '')}", note))
    return Section("Exported files", (facts(items),))


def report_html(
    config: TrainerConfig,
    task: Task,
    judged: Judged,
    split: str,
    history: Sequence[Mapping[str, Any]],
    epoch: int,
    exports: Mapping[str, Mapping[str, Any]],
) -> str:
    """The page: which model and split, the headline results, training, the task's details, the files."""
    subtitle = (
        f"{config.model.architecture}, fine-tuned from {config.model.checkpoint}; written "
        f"{datetime.now(UTC).strftime('%Y-%m-%d %H:%M UTC')}"
    )
    results, *details = judged.sections
    sections = [
        headline_section(config, split, history, epoch),
        results,
        training_section(config, task, history),
        *details,
        exports_section(exports),
    ]
    return render(f"{config.job_name}: evaluation report", subtitle, sections)


def upload(store: S3Store, folder: Path, out: S3Uri) -> list[str]:
    """Every file of `folder` under `out` (names are ours: the folder holds only what this step wrote)."""
    names = sorted(p.name for p in folder.iterdir() if p.is_file())
    for name in names:
        content_type = CONTENT_TYPES.get(Path(name).suffix)
        if content_type:  # the report's small files, typed so that a browser opens them from S3 as they are
            store.put_bytes(out.join(name), (folder / name).read_bytes(), content_type)
        else:  # model files: multipart when large
            store.upload_file(folder / name, out.join(name))
    return names


def judge_node(
    config_wire: Mapping[str, Any],
    task_wire: Mapping[str, Any],
    weights: ObjectInfo,
    preprocessing: Mapping[str, Any],
    checkpoint: str,
    history: Sequence[Mapping[str, Any]],
    epoch: int,
) -> dict[str, Any]:
    """Judge the exported checkpoint, write the report and the other formats under output.path."""
    config = TrainerConfig.model_validate(config_wire)
    task = task_from_wire(config, task_wire)
    store = S3Store.for_spec(config.storage)
    device = torch.device("cuda" if torch.cuda.is_available() and config.scaling.gpus_per_worker else "cpu")
    model = load_exported(config, task, store, weights, S3Uri.parse(checkpoint), device)
    with tempfile.TemporaryDirectory(prefix="kubetune-report-") as tmp:
        out_dir = Path(tmp)

        def judging(task: Task, validation: Any, judged_set: Any, split: str) -> tuple[Task, Judged, Any, str]:
            judged = task.judge(model, validation, judged_set, split, device)
            return task, judged, task.export_formats(model, validation, out_dir, judged, preprocessing), split

        task, judged, exports, split = judge_sets(store, config, task, weights.size, preprocessing, judging)
        evaluation = {"format": EVALUATION_FORMAT, "split": split, "epoch": epoch, "metrics": judged.metrics}
        (out_dir / OUTPUT_FILES["evaluation"]).write_text(json.dumps(evaluation, indent=2))
        for name, data in judged.files.items():
            (out_dir / name).write_bytes(data)
        html = report_html(config, task, judged, split, history, epoch, exports)
        (out_dir / OUTPUT_FILES["report"]).write_text(html, encoding="utf-8")
        files = upload(store, out_dir, S3Uri.parse(config.output.path))
    log.info("evaluation on the %s set: %s", split, ", ".join(f"{k} {v:.4f}" for k, v in judged.headline.items()))
    return {"split": split, "headline": judged.headline, "card": judged.card, "exports": exports, "files": files}
