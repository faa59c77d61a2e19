"""data.cache.mode stream as users run it: `kubetune run job.yaml --local`, from WebDataset shards (two DDP
workers) and from a manifest (one), each with a sizeLimit smaller than its images, each preempted mid-epoch
2 (SIGTERM to a worker: it checkpoints that step and Ray Train restarts the workers from it). The trainer's
own accounting (`coverage` in the checkpoint's progress.json: per epoch the images trained and the sums of
their keys' hashes) must show every training image exactly once in each epoch.

Budget: 30 digits of each class 5-9 (150 training images, 30 for validation), test_resnet at 32 px, head
only, 2 epochs of 15 global batches of 10; both runs at once, each with its own local Ray.

Detection streams the same way (its boxes from the index, its images through the same windows): a third
run fine-tunes SSDlite at 64 px (random base weights: only the accounting is checked) on 48 shapes images
in WebDataset shards with `.json` boxes, one worker, 2 epochs of 6 batches of 8, preempted mid-epoch 2
likewise. It starts with the module and trains beside the other two: three local Rays at once, whose
start-up and shutdown overlap (2 shared cores).
"""

from __future__ import annotations

import csv
import io
import json
import math
import re
import subprocess
import tarfile
from collections.abc import Iterator
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from typing import Any

import pytest

from kubetune_trainer.loaders import coverage_hashes
from tests.support.digits_world import DATA_BUCKET, MODEL_BUCKET, OUT_BUCKET, PRETRAINED, DigitsWorld, tar_bytes
from tests.support.shapes_world import DETECTOR, DETECTOR_SIZE, FINETUNE_CLASSES, make_shapes, random_detector
from tests.support.trainer_faults import SIGTERM_LAST_RANK_MID_EPOCH_2

pytestmark = pytest.mark.slow

PER_CLASS, EPOCHS, SHARDS = 30, 2, 15
# sizeLimit leaves the images IMAGE_ROOM beside the base weights (cached on the same volume): below each
# dataset's images (asserted), above two shards' worth of a worker's images.
IMAGE_ROOM = 48 * 1024
SPEC: dict[str, Any] = {
    "epochs": EPOCHS,
    "strategy": "head",
    "trainable_layers": None,
    "cpus_per_worker": 1,
    "run_policy": {"preemptionGraceSeconds": 30},
}


def stream_cache(weights: bytes, room: int) -> dict[str, Any]:
    """data.cache streaming with sizeLimit = the base weights plus `room` for the images, rounded up to a KiB."""
    return {"mode": "stream", "sizeLimit": f"{math.ceil((len(weights) + room) / 1024)}Ki"}


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
    cache = stream_cache(world.get(PRETRAINED), IMAGE_ROOM)
    jobs: dict[str, dict[str, Any]] = {
        "stream-shards": {
            "train": shards,
            "validation": val_shards,
            "data_format": "webdataset",
            "workers": 2,
            "batch_size": 5,
            "cache": cache,
        },
        "stream-manifest": {
            "train": manifest,
            "validation": val_manifest,
            "data_format": "manifest",
            "batch_size": 10,
            "cache": cache,
        },
    }
    expected = {
        "stream-shards": shard_keys(world, f"s3://{DATA_BUCKET}/stream-shards", SHARDS),
        "stream-manifest": manifest_keys(world, manifest),
    }
    runs = {name: start(world, name, **spec) for name, spec in jobs.items()}
    outputs = {name: proc.communicate(timeout=600)[0] for name, proc in runs.items()}

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


DETECTION_SHARDS, PER_DETECTION_SHARD = 6, 8
DETECTION_ROOM = 256 * 1024  # below the 48 images (asserted), above two shards


def upload_shapes_shards(world: DigitsWorld, prefix: str, shards: int, seed: int) -> dict[str, int]:
    """Shapes images with their boxes as WebDataset shards (`<n>.png`, `<n>.json`: COCO-convention boxes
    with category names), as `kubetune data pack` writes them; each image's key, as the trainer keys it,
    with its size."""
    shapes = make_shapes(FINETUNE_CLASSES, shards * PER_DETECTION_SHARD, seed=seed, size=DETECTOR_SIZE)
    pngs, keys = list(shapes.pngs().values()), {}
    for shard in range(shards):
        members = []
        for n in range(shard * PER_DETECTION_SHARD, (shard + 1) * PER_DETECTION_SHARD):
            boxes = [{"bbox": [x, y, w, h], "category": FINETUNE_CLASSES[c]} for x, y, w, h, c in shapes.boxes[n]]
            item = {"width": DETECTOR_SIZE, "height": DETECTOR_SIZE, "annotations": boxes}
            members += [(f"{n:04d}.png", pngs[n]), (f"{n:04d}.json", json.dumps(item).encode())]
            keys[f"{prefix.removeprefix(f's3://{DATA_BUCKET}/')}/{shard:03d}.tar/{n:04d}.png"] = len(pngs[n])
        world.put(f"{prefix}/{shard:03d}.tar", tar_bytes(members))
    return keys


def detection_job(world: DigitsWorld, name: str, cache: dict[str, Any], checkpoint: str) -> dict[str, Any]:
    """The digits job's manifest (`DigitsWorld.manifest`) made a detection job on the shapes shards."""
    prefix = f"s3://{DATA_BUCKET}/{name}"
    job = world.manifest(
        name,
        **{**SPEC, "cache": cache},
        output=f"s3://{OUT_BUCKET}/stream/{name}",
        checkpoint=checkpoint,
        train=f"{prefix}/train/{{000..{DETECTION_SHARDS - 1:03d}}}.tar",
        validation=f"{prefix}/val/000.tar",
        data_format="webdataset",
        batch_size=8,
    )
    job["spec"]["task"] = "detection"
    job["spec"]["model"]["architecture"] = DETECTOR
    job["spec"]["data"]["imageSize"] = DETECTOR_SIZE
    return job


@dataclass
class DetectionRun:
    """The detection run's job, the keys of its training images (with their sizes) and what it printed."""

    job: dict[str, Any]
    keys: dict[str, int]
    returncode: int
    output: str


def run_detection(world: DigitsWorld) -> DetectionRun:
    import yaml

    name = "stream-detection"
    keys = upload_shapes_shards(world, f"s3://{DATA_BUCKET}/{name}/train", DETECTION_SHARDS, seed=30)
    upload_shapes_shards(world, f"s3://{DATA_BUCKET}/{name}/val", 1, seed=31)
    weights = random_detector(world.workdir / "stream-detector.safetensors").read_bytes()
    checkpoint = f"s3://{MODEL_BUCKET}/stream-detection/{DETECTOR}.safetensors"
    world.put(checkpoint, weights)
    job = detection_job(world, name, stream_cache(weights, DETECTION_ROOM), checkpoint)
    manifest = world.workdir / f"{name}.yaml"
    manifest.write_text(yaml.safe_dump(job, sort_keys=False))
    proc = world.kubetune_popen(manifest, **SIGTERM_LAST_RANK_MID_EPOCH_2)
    out = proc.communicate(timeout=500)[0]
    return DetectionRun(job, keys, proc.returncode, out)


@pytest.fixture(scope="module", autouse=True)
def detection(world: DigitsWorld) -> Iterator[Future[DetectionRun]]:
    """The detection run, started with the module so that it trains beside the classification runs (each
    with its own local Ray: much of a run is Ray starting and stopping, which runs side by side overlap)."""
    with ThreadPoolExecutor(1) as pool:
        yield pool.submit(run_detection, world)


def test_a_detection_run_streams_each_image_once_per_epoch_across_a_mid_epoch_resume(
    world: DigitsWorld, detection: Future[DetectionRun]
) -> None:
    from kubetune_operator.spec import FineTuneJob
    from kubetune_operator.trainer_config import trainer_config

    run = detection.result()
    job, keys, out = run.job, run.keys, run.output

    assert run.returncode == 0, out
    assert sum(keys.values()) > DETECTION_ROOM, "the images must not fit what sizeLimit leaves them"
    assert "data.cache: stream" in out, out
    assert re.search(r"resumed from \S+/epoch-0001-step-\d{8}", out), out  # mid-epoch 2
    folder = f"{job['spec']['output']['path']}/checkpoints/{trainer_config(FineTuneJob.model_validate(job)).run_name}"
    last = max(k for k in world.keys(folder) if re.search(rf"/epoch-{EPOCHS:04d}[^/]*/progress\.json$", k))
    coverage = json.loads(world.get(f"s3://{OUT_BUCKET}/{last}"))["coverage"]
    hashes = [coverage_hashes(key) for key in keys]
    whole_epoch = {"samples": len(keys), "hashA": sum(a for a, _ in hashes), "hashB": sum(b for _, b in hashes)}
    assert [entry["epoch"] for entry in coverage] == [1, 2]
    for entry in coverage:
        assert {k: entry[k] for k in whole_epoch} == whole_epoch, f"epoch {entry['epoch']}"
        assert entry["unreadable"] == 0
