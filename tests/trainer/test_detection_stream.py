"""Stream mode for detection: the images stream through the classification windows and group files, the boxes
come from the run's index.

Real shards, a manifest and COCO annotation files in the session's moto S3, the real index (`formats.detection_index`), the real
windows and fetcher (`stream.stream_setup`), and the task's own datasets: two workers' epoch covers each
training image once, a resume mid-epoch hands out exactly the rest, each image decodes from its group
file to what full mode reads from the node cache with the same boxes, and the bad boxes and the broken
image are counted as full mode counts them. The run itself is tests/trainer/test_stream_e2e.py.
"""

from __future__ import annotations

import json
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import pytest
import torch

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import prepare_images
from kubetune_trainer.detection_data import collate
from kubetune_trainer.storage import S3Store
from kubetune_trainer.stream import ReadableBatches, StreamOrder, stream_datasets, stream_setup, streams
from kubetune_trainer.tasks.detection import DetectionTask
from tests.support.digits_world import REGION, DigitsWorld, digit_png, tar_bytes

PREFIX = "s3://datasets/detection-stream"
SHARDS, PER_SHARD = 4, 6
BROKEN = 5  # the image that is no PNG
# Image 0's boxes: one kept, one clipped to the 32 px image, one of no area (dropped, counted).
FIRST_BOXES = [([2, 2, 10, 10], "a"), ([28, 28, 10, 10], "b"), ([4, 4, 0, 6], "a")]


def boxes_of(n: int) -> list[tuple[list[int], str]]:
    return FIRST_BOXES if n == 0 else [([n % 20, 3, 8, 9], "ab"[n % 2])]


def item(n: int) -> dict[str, Any]:
    return {"width": 32, "height": 32, "annotations": [{"bbox": b, "category": c} for b, c in boxes_of(n)]}


def coco_file(numbers: range) -> dict[str, Any]:
    """The COCO annotations of images `numbers` (`<n>.png`), the same boxes as `item`'s."""
    images = [{"id": n + 1, "file_name": f"{n:03d}.png", "width": 32, "height": 32} for n in numbers]
    annotations = [
        {"id": 100 * n + j, "image_id": n + 1, "category_id": 1 + "ab".index(c), "bbox": b, "area": b[2] * b[3]}
        for n in numbers
        for j, (b, c) in enumerate(boxes_of(n))
    ]
    return {
        "images": images,
        "annotations": annotations,
        "categories": [{"id": 1, "name": "a"}, {"id": 2, "name": "b"}],
    }


def upload(world: DigitsWorld, data_format: str) -> dict[str, Any]:
    """SHARDS * PER_SHARD training images and 4 validation ones; data.train and data.validation (or
    data.annotations for COCO)."""
    pngs = [digit_png(pixels) for pixels, _ in world.digits(range(10))[: SHARDS * PER_SHARD + 4]]
    pngs[BROKEN] = b"not a png at all"
    root = f"{PREFIX}/{data_format}"
    if data_format == "coco":
        world.put_many({f"{root}/images/{n:03d}.png": png for n, png in enumerate(pngs)})
        world.put(f"{root}/train.json", json.dumps(coco_file(range(SHARDS * PER_SHARD))).encode())
        world.put(f"{root}/val.json", json.dumps(coco_file(range(SHARDS * PER_SHARD, len(pngs)))).encode())
        annotations = {"train": f"{root}/train.json", "validation": f"{root}/val.json"}
        return {"train": f"{root}/images/", "annotations": annotations}
    if data_format == "webdataset":
        for shard in range(SHARDS + 1):  # the last one: validation
            numbers = range(shard * PER_SHARD, min(len(pngs), (shard + 1) * PER_SHARD))
            members = [
                m for n in numbers for m in ((f"{n:03d}.png", pngs[n]), (f"{n:03d}.json", json.dumps(item(n)).encode()))
            ]
            world.put(f"{root}/{'val' if shard == SHARDS else 'train'}-{shard}.tar", tar_bytes(members))
        return {"train": f"{root}/train-{{0..{SHARDS - 1}}}.tar", "validation": f"{root}/val-{SHARDS}.tar"}
    world.put_many({f"{root}/images/{n:03d}.png": png for n, png in enumerate(pngs)})
    lines = [json.dumps({"uri": f"images/{n:03d}.png", **item(n)}) for n in range(len(pngs))]
    world.put(f"{root}/train.jsonl", "\n".join(lines[: SHARDS * PER_SHARD]).encode())
    world.put(f"{root}/val.jsonl", "\n".join(lines[SHARDS * PER_SHARD :]).encode())
    return {"train": f"{root}/train.jsonl", "validation": f"{root}/val.jsonl"}


def config(world: DigitsWorld, data: Mapping[str, Any]) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "task": "detection",
            "model": {"architecture": "ssdlite320_mobilenet_v3_large", "checkpoint": "s3://models/base/d.safetensors"},
            "data": {**data, "augment": "none", "cache": {"mode": "stream", "sizeLimit": "64Ki"}},
            "training": {"seed": 5},
            "output": {"path": "s3://results/detection-stream/"},
            "storage": {"endpoint": world.endpoint, "region": REGION},
            "runName": "detection-stream",
            "jobName": "detection-stream",
        }
    )


def read_epoch(task: DetectionTask, store: S3Store, rank: int, skip: int = 0) -> list[tuple[int, Any]]:
    """What worker `rank` of 2 trains in epoch 1 from `skip` images of its order on: (index, item) each."""
    setup = stream_setup(store, task.config, task.images, rank=rank, local_world=2, lag=0)
    train, _ = stream_datasets(setup, task.datasets(setup.train.fetcher.folder, {}))
    order = StreamOrder(
        len(train), window=setup.train, shuffle=setup.shuffle, seed=5, batch_size=3, reference=2, rank=rank, world=2
    )
    order.set_epoch(1, skip)
    read = [(i, train[i]) for batch in order for _, i in batch]
    setup.train.release()
    assert not list(setup.train.fetcher.folder.iterdir())  # the window leaves nothing behind
    return read


@pytest.mark.parametrize("data_format", ["webdataset", "manifest", "coco"])
def test_a_detection_epoch_streams_each_image_once_with_its_indexed_boxes(
    world: DigitsWorld, data_format: str, tmp_path: Path
) -> None:
    store = S3Store(world.endpoint, REGION)
    task = DetectionTask.find(config(world, {"format": data_format, **upload(world, data_format)}), store)
    assert streams(task.config, task.images, 0)
    keys = [s.key for s in task.images.train]
    assert keys == [s.key for s in task.boxes.train] == task.train_keys() and len(keys) == SHARDS * PER_SHARD

    whole = [read_epoch(task, store, rank) for rank in (0, 1)]
    handed = [i for worker in whole for i, _ in worker]
    assert sorted(handed) == list(range(len(keys)))  # 24 images, 2 workers, global batch 6: each once

    # Each image decodes from its group file to what full mode reads from the node cache, with the boxes
    # of the index (image 0's clipped, its box of no area left out); the broken one is left out of its
    # batch (None), as the loop counts it.
    assert sum(got is None for worker in whole for _, got in worker) == 1
    folder, corrupt = prepare_images(store, task.images, tmp_path)
    full, _ = task.datasets(folder, {})
    for i, got in (pair for worker in whole for pair in worker):
        if keys[i].endswith(f"{BROKEN:03d}.png"):
            assert got is None and keys[i] in corrupt
            continue
        image, target = full[i]
        assert torch.equal(got[0], image) and torch.equal(got[1]["boxes"], target["boxes"])
        assert got[1]["labels"].tolist() == task.boxes.train[i].labels
    first = next(got for worker in whole for i, got in worker if keys[i].endswith("000.png"))
    assert first[1]["boxes"].tolist() == [[2, 2, 12, 12], [28, 28, 32, 32]]
    counts = task.boxes.counts["train"]
    assert (counts["boxes"], counts["boxesClipped"], counts["boxesDroppedEmpty"]) == (len(keys) + 1, 1, 1)

    # A resume after 2 global batches (12 images) hands out exactly the rest of each worker's epoch.
    resumed = [read_epoch(task, store, rank, skip=12) for rank in (0, 1)]
    assert [[i for i, _ in worker] for worker in resumed] == [[i for i, _ in worker][6:] for worker in whole]

    # The loop's collate leaves the broken image out of its batch and keeps lists of boxes.
    batch = [*(got for _, got in whole[0][:6]), None]
    images, targets = ReadableBatches(collate)(batch)
    assert len(images) == len(targets) == sum(1 for got in batch if got is not None)
