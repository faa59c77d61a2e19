"""data.cache.mode stream as users run it: `kubetune run job.yaml --local`, from WebDataset shards (two DDP
workers) and from a manifest (one), each with a sizeLimit smaller than its images, each preempted mid-epoch
2 (SIGTERM to a worker: it checkpoints that step and Ray Train restarts the workers from it). The trainer's
own accounting (`coverage` in the checkpoint's progress.json: per epoch the images trained and the sums of
their keys' hashes) must show every training image exactly once in each epoch.

Budget: 30 digits of each class 5-9 (150 training images, 30 for validation), test_resnet at 32 px, head
only, 2 epochs of 15 global batches of 10; both runs at once, each with its own local Ray.
"""

from __future__ import annotations

import csv
import io
import json
import re
import subprocess
import tarfile
from typing import Any

import pytest

from kubetune_trainer.loaders import coverage_hashes
from tests.support.digits_world import DATA_BUCKET, OUT_BUCKET, DigitsWorld
from tests.support.trainer_faults import SIGTERM_LAST_RANK_MID_EPOCH_2

pytestmark = pytest.mark.slow

PER_CLASS, EPOCHS, SHARDS = 30, 2, 15
# sizeLimit holds the base weights too (test_resnet: 1,508,964 bytes, cached on the same volume) and leaves
# the images IMAGE_ROOM: below each dataset's images (asserted), above two shards' worth of a worker's images.
IMAGE_ROOM = 48 * 1024
LIMIT = "1522Ki"  # 1,508,964 + 49,152 bytes, rounded up to a KiB
SPEC: dict[str, Any] = {
    "epochs": EPOCHS,
    "strategy": "head",
    "trainable_layers": None,
    "cpus_per_worker": 1,
    "cache": {"mode": "stream", "sizeLimit": LIMIT},
    "run_policy": {"preemptionGraceSeconds": 30},
}


def shard_keys(world: DigitsWorld, pattern_prefix: str, shards: int) -> dict[str, int]:
    """Each image of the shards as the trainer keys it (`<shard key>/<member>`), with its size."""
    keys: dict[str, int] = {}
    for n in range(shards):
        uri = f"{pattern_prefix}/train-{n:03d}.tar"
        with tarfile.open(fileobj=io.BytesIO(world.get(uri)), mode="r") as tar:
            for info in tar:
                if info.name.endswith(".png"):
                    keys[f"{uri.removeprefix(f's3://{DATA_BUCKET}/')}/{info.name}"] = info.size
    return keys


def manifest_keys(world: DigitsWorld, uri: str) -> dict[str, int]:
    rows = list(csv.reader(io.StringIO(world.get(uri).decode())))[1:]
    return {row[0].removeprefix(f"s3://{DATA_BUCKET}/"): len(world.get(row[0])) for row in rows}


def start(world: DigitsWorld, name: str, **spec: Any) -> subprocess.Popen[str]:
    manifest = world.job(name, output=f"s3://{OUT_BUCKET}/stream/{name}", **{**SPEC, **spec})
    return world.kubetune_popen(manifest, **SIGTERM_LAST_RANK_MID_EPOCH_2)


def final_coverage(world: DigitsWorld, name: str, **spec: Any) -> list[dict[str, int]]:
    run = world.run_uri(name, output=f"s3://{OUT_BUCKET}/stream/{name}", **{**SPEC, **spec})
    last = max(k for k in world.keys(run) if re.search(rf"/epoch-{EPOCHS:04d}[^/]*/progress\.json$", k))
    coverage: list[dict[str, int]] = json.loads(world.get(f"s3://{OUT_BUCKET}/{last}"))["coverage"]
    return coverage


def test_stream_mode_trains_each_image_once_per_epoch_across_a_mid_epoch_resume(pretrained: DigitsWorld) -> None:
    world = pretrained
    shards = world.upload_shards(f"s3://{DATA_BUCKET}/stream-shards", per_class=PER_CLASS, shards=SHARDS)
    val_shards = world.upload_shards(f"s3://{DATA_BUCKET}/stream-shards-val", per_class=6, shards=1)
    manifest = world.upload_manifest(f"s3://{DATA_BUCKET}/stream-manifest/train.csv", per_class=PER_CLASS)
    val_manifest = world.upload_manifest(f"s3://{DATA_BUCKET}/stream-manifest-val/val.csv", per_class=6)
    jobs = {
        "stream-shards": {
            "train": shards,
            "validation": val_shards,
            "data_format": "webdataset",
            "workers": 2,
            "batch_size": 5,
        },
        "stream-manifest": {"train": manifest, "validation": val_manifest, "data_format": "manifest", "batch_size": 10},
    }
    expected = {
        "stream-shards": shard_keys(world, f"s3://{DATA_BUCKET}/stream-shards", SHARDS),
        "stream-manifest": manifest_keys(world, manifest),
    }
    runs = {name: start(world, name, **spec) for name, spec in jobs.items()}
    outputs = {name: proc.communicate(timeout=500)[0] for name, proc in runs.items()}

    for name, proc in runs.items():
        out = outputs[name]
        assert proc.returncode == 0, f"{name} run failed:\n{out}"
        assert sum(expected[name].values()) > IMAGE_ROOM, "the images must not fit what sizeLimit leaves them"
        assert "data.cache: stream" in out, out
        assert re.search(r"resumed from \S+/epoch-0001-step-\d{8}", out), out  # mid-epoch 2
        keys = expected[name]
        hashes = [coverage_hashes(key) for key in keys]
        whole_epoch = {"samples": len(keys), "hashA": sum(a for a, _ in hashes), "hashB": sum(b for _, b in hashes)}
        coverage = final_coverage(world, name, **jobs[name])
        assert [entry["epoch"] for entry in coverage] == [1, 2]
        for entry in coverage:
            assert {k: entry[k] for k in whole_epoch} == whole_epoch, f"{name}: epoch {entry['epoch']}"
            assert entry["unreadable"] == 0
