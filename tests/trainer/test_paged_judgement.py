"""The judgement after training in stream mode (`evaluation.paged`): within sizeLimit, the full mode's figures.

Against the moto server: the same ImageFolder (validation and test prefixes, one test image that does not
decode) judged with a fixed model in full mode and in stream mode with a sizeLimit a fraction of the
judged images; the figures, the pictures and the ONNX copy's check must be the same, the disk never
above the limit.
"""

from __future__ import annotations

import contextlib
import threading
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import torch
from torch import nn

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import Sample, prepare_images
from kubetune_trainer.evaluation.classification import WORST_MISTAKES
from kubetune_trainer.evaluation.paged import judge_sets, page_numbers
from kubetune_trainer.storage import S3Store, S3Uri
from kubetune_trainer.stream import image_room, stream_root
from kubetune_trainer.tasks import Task
from kubetune_trainer.tasks.classification import ClassificationTask
from tests.support.digits_world import DATA_BUCKET, REGION, DigitsWorld

PREPROCESSING = {"input_size": (3, 32, 32), "interpolation": "bilinear", "mean": (0.5,) * 3, "std": (0.5,) * 3}
PREPROCESSING |= {"crop_pct": 1.0}


def write_dataset(world: DigitsWorld, base: str, data_format: str, broken: bool = True) -> dict[str, str]:
    """data.train, validation and test of `data_format` under `base`, one test image that does not decode."""
    parts = {"train": (4, 0), "val": (6, 4), "test": (8, 10)}  # images per class, after the first `skip`
    uris = {part: world.upload_folder(f"{base}/{part}", n, skip=skip) for part, (n, skip) in parts.items()}
    if broken:
        world.put(f"{base}/test/7/broken.png", b"not an image")
        uris["test"].append(f"{base}/test/7/broken.png")
    if data_format == "imagefolder":
        return {part: f"{base}/{part}" for part in parts}
    if data_format == "manifest":
        for part, images in uris.items():
            rows = [f"{uri},{uri.split('/')[-2]}" for uri in images]
            world.put(f"{base}/{part}.csv", "\n".join(rows).encode())
        return {part: f"{base}/{part}.csv" for part in parts}
    return {part: world.upload_shards(f"{base}/{part}-shards", n, shards=3) for part, (n, _) in parts.items()}


def run_config(world: DigitsWorld, data_format: str, uris: dict[str, str], cache: dict[str, str]) -> TrainerConfig:
    data = {"format": data_format, "train": uris["train"], "validation": uris["val"], "test": uris["test"]}
    return TrainerConfig.model_validate(
        {
            "model": {"architecture": "resnet18", "checkpoint": "s3://models/base/resnet18.safetensors"},
            "data": data | {"cache": cache},
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

    def judging(judged_task: Task, validation: Any, judged: Any, split: str) -> dict[str, Any]:
        result = judged_task.judge(model, validation, judged, split, torch.device("cpu"))
        exports = judged_task.export_formats(model, validation, tmp, result, PREPROCESSING)
        pager = getattr(judged.paths, "pager", None)
        found = {"split": split, "metrics": result.metrics, "sections": result.sections}
        return found | {"onnx": exports["onnx"]["check"], "peak": pager.peak if pager else None}

    return judge_sets(store, config, task, 0, PREPROCESSING, judging)


@pytest.mark.parametrize("data_format", ["imagefolder", "manifest", "webdataset"])
def test_stream_mode_judges_within_size_limit_with_the_full_modes_figures(
    world: DigitsWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_format: str
) -> None:
    uris = write_dataset(world, f"s3://{DATA_BUCKET}/paged-{data_format}", data_format)
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    store = S3Store(world.endpoint, REGION)
    full_config = run_config(world, data_format, uris, {"mode": "full"})
    task = ClassificationTask.find(full_config, store)
    assert len(task.index.test) == (40 if data_format == "webdataset" else 41)  # the shards hold no broken image
    judged_bytes = sum(s.size for s in task.index.validation + task.index.test)
    limit_ki = max(2, judged_bytes // 4 // 1024)
    stream_config = run_config(world, data_format, uris, {"mode": "stream", "sizeLimit": f"{limit_ki}Ki"})
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


class CountedGets:
    """What a real S3 client downloads, from botocore's own events: the GETs of each key, their bytes, and
    the most bytes on disk under `cache` when a GET was sent."""

    def __init__(self, store: S3Store, cache: Path) -> None:
        self.cache, self.lock = cache, threading.Lock()
        self.gets: Counter[str] = Counter()
        self.bytes = self.disk = 0
        store.client.meta.events.register("provide-client-params.s3.GetObject", self.sent)
        store.client.meta.events.register("after-call.s3.GetObject", self.received)

    def sent(self, params: dict[str, Any], **_: Any) -> None:
        with self.lock:
            self.gets[params["Key"]] += 1
            self.disk = max(self.disk, disk_bytes(self.cache))

    def received(self, parsed: dict[str, Any], **_: Any) -> None:
        with self.lock:
            self.bytes += int(parsed.get("ContentLength", 0))


def disk_bytes(root: Path) -> int:
    """The bytes of the files under `root` (a file deleted while counted counts nothing)."""
    total = 0
    for path in root.rglob("*"):
        with contextlib.suppress(FileNotFoundError):
            total += path.stat().st_size if path.is_file() else 0
    return total


@pytest.mark.parametrize("data_format", ["imagefolder", "webdataset"])
def test_an_oversize_judged_set_is_downloaded_about_once_within_the_limit(
    world: DigitsWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, data_format: str
) -> None:
    uris = write_dataset(world, f"s3://{DATA_BUCKET}/once-{data_format}", data_format, broken=False)
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    store = S3Store(world.endpoint, REGION)
    task = ClassificationTask.find(run_config(world, data_format, uris, {"mode": "full"}), store)
    judged = task.index.validation + task.index.test
    objects = {s.source or s.key for s in judged}  # what the judged images are in: a shard for its members
    once = sum(store.head(S3Uri(DATA_BUCKET, key)).size for key in objects)
    limit_ki = max(2, sum(s.size for s in judged) // 4 // 1024)
    config = run_config(world, data_format, uris, {"mode": "stream", "sizeLimit": f"{limit_ki}Ki"})
    room = image_room(config, 0)
    assert once > 2 * room

    counted = CountedGets(store, tmp_path / "cache")
    streamed = verdict(config, task, store, tmp_path / "report")

    # About once: every object holding a judged image is read, and about its bytes once (a shard's members
    # by range: less than the shard). Only the report's worst mistakes (up to 12 pictures) fetch their
    # pages again. Checking every page first and then judging read it all twice (measured 2.1x the loose
    # images; 10.9x the shards, each read whole for each class's part of it).
    assert set(counted.gets) == objects and streamed["metrics"]["images"] == len(task.index.test)
    assert counted.bytes < 1.25 * once
    again = {key for key, gets in counted.gets.items() if gets > 1}
    assert data_format != "imagefolder" or (max(counted.gets.values()) == 2 and len(again) <= WORST_MISTAKES)
    assert 0 < counted.disk <= room and streamed["peak"] <= room
