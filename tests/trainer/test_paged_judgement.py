"""The judgement after training in stream mode (`evaluation.paged`): within sizeLimit, the full mode's figures.

Against the moto server: the same ImageFolder (validation and test prefixes, one test image that does not
decode) judged with a fixed model in full mode and in stream mode with a sizeLimit a fraction of the
judged images; the figures, the pictures and the ONNX copy's check must be the same, the disk never
above the limit.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import Sample, build_index, prepare_images
from kubetune_trainer.evaluation.paged import judged_sets, page_numbers
from kubetune_trainer.storage import S3Store
from kubetune_trainer.stream import image_room, stream_root
from kubetune_trainer.tasks.classification import ClassificationTask
from tests.support.digits_world import DATA_BUCKET, REGION, DigitsWorld

PREPROCESSING = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3}
PREPROCESSING |= {"crop_pct": 1.0}


def run_config(world: DigitsWorld, base: str, cache: dict[str, str]) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "model": {"architecture": "resnet18", "checkpoint": "s3://models/base/resnet18.safetensors"},
            "data": {"train": f"{base}/train", "validation": f"{base}/val", "test": f"{base}/test", "cache": cache},
            "output": {"path": "s3://results/paged/", "formats": ["safetensors", "onnx"]},
            "storage": {"endpoint": world.endpoint, "region": REGION},
            "runName": "paged",
            "jobName": "paged",
        }
    )


def verdict(config: TrainerConfig, task: ClassificationTask, store: S3Store, tmp: Path) -> dict[str, Any]:
    """What the judgement publishes with a fixed model: figures, pictures, the ONNX copy's check."""
    torch.manual_seed(0)
    tmp.mkdir()
    model = nn.Sequential(nn.Flatten(), nn.Linear(3 * 32 * 32, len(task.index.class_names))).eval()
    with judged_sets(store, config, task, 0, PREPROCESSING) as (judged_task, validation, judged, split):
        result = judged_task.judge(model, validation, judged, split, torch.device("cpu"))
        exports = judged_task.export_formats(model, validation, tmp, result, PREPROCESSING)
        pager = getattr(judged.paths, "pager", None)
    found = {"split": split, "metrics": result.metrics, "sections": result.sections}
    return found | {"onnx": exports["onnx"]["check"], "peak": pager.peak if pager else None}


def test_stream_mode_judges_within_size_limit_with_the_full_modes_figures(
    world: DigitsWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    base = f"s3://{DATA_BUCKET}/paged"
    world.upload_folder(f"{base}/train", per_class=4)
    world.upload_folder(f"{base}/val", per_class=6, skip=4)
    world.upload_folder(f"{base}/test", per_class=8, skip=10)
    world.put(f"{base}/test/7/broken.png", b"not an image")
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    store = S3Store(world.endpoint, REGION)
    full_config = run_config(world, base, {"mode": "full"})
    task = ClassificationTask(full_config, build_index(store, full_config.data, None, seed=0))
    judged_bytes = sum(s.size for s in task.index.validation + task.index.test)
    limit_ki = max(2, judged_bytes // 4 // 1024)
    stream_config = run_config(world, base, {"mode": "stream", "sizeLimit": f"{limit_ki}Ki"})
    room = image_room(stream_config, 0)
    assert judged_bytes > 2 * room  # the judged images cannot be cached whole

    # Full mode: the driver dropped the unreadable image before the judgement.
    _, corrupt = prepare_images(store, task.images)
    full = verdict(full_config, task.without_corrupt(corrupt), store, tmp_path / "full")
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "stream-cache"))
    leftover = stream_root(store, task.images) / "rank-0" / "train-3.bin"  # training's last group files
    leftover.parent.mkdir(parents=True)
    leftover.write_bytes(b"x" * room)
    streamed = verdict(stream_config, task, store, tmp_path / "stream")

    assert full["split"] == streamed["split"] == "test" and full["metrics"]["images"] == 40
    assert streamed["metrics"] == full["metrics"]
    assert streamed["sections"] == full["sections"]  # the pictures too: the worst mistakes, drawn from disk
    assert streamed["onnx"] == full["onnx"] and full["onnx"]["images"] == 30
    assert 0 < streamed["peak"] <= room
    cache = tmp_path / "stream-cache"
    assert not leftover.exists() and not (cache / "datasets").exists()
    assert [p for p in cache.rglob("*") if p.is_file()] == []  # nothing left behind either


def test_pages_keep_the_judged_order_and_a_shard_together() -> None:
    loose = [Sample(f"l/{n}.png", 0, 100, "e") for n in range(5)]
    shard = [Sample(f"s/0.tar/{n}.png", 0, 100, "e", "s/0.tar", 512 * n) for n in range(4)]
    other = [Sample(f"s/1.tar/{n}.png", 0, 100, "e", "s/1.tar", 512 * n) for n in range(2)]
    assert page_numbers(loose + shard + other + loose[:1], cap=250) == [0, 0, 1, 1, 2, 3, 3, 3, 3, 4, 4, 5]
