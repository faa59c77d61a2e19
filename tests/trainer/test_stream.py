"""Stream mode's parts (`kubetune_trainer.stream`): the grouped order, the window's disk bound, the spec.

The run itself (shards and a manifest, preempted mid-epoch, coverage from the trainer's own accounting) is
tests/trainer/test_stream_e2e.py.
"""

from __future__ import annotations

import copy
import io
from collections.abc import Sequence
from pathlib import Path
from typing import Any

import pytest
import torch
from pydantic import ValidationError

from kubetune_operator.spec import FineTuneJob
from kubetune_operator.trainer_config import trainer_config
from kubetune_trainer.data import Sample
from kubetune_trainer.errors import DataError
from kubetune_trainer.stream import (
    GroupUse,
    ReadableBatches,
    StreamOrder,
    Window,
    grouped_order,
    sample_groups,
    shuffle_window,
)
from tests.support.digits_world import DigitsWorld
from tests.unit.test_spec import MINIMAL


def shard_samples(shards: int, per_shard: int, size: int = 100) -> list[Sample]:
    return [
        Sample(f"s/{n:02d}.tar/{i:03d}.png", 0, size, "etag", f"s/{n:02d}.tar")
        for n in range(shards)
        for i in range(per_shard)
    ]


class DiskFetcher:
    """Writes each sample's bytes into a folder, as `stream.Fetcher` does, and records what is on disk."""

    def __init__(self, samples: Sequence[Sample], folder: Path) -> None:
        self.samples, self.folder = list(samples), folder

    def path(self, i: int) -> Path:
        return self.folder / f"{i}.bin"

    def fetch(self, use: GroupUse) -> None:
        for i in use.members:
            self.path(i).write_bytes(b"x" * self.samples[i].size)

    def drop(self, use: GroupUse) -> None:
        for i in use.members:
            self.path(i).unlink(missing_ok=True)

    def on_disk(self) -> int:
        return sum(p.stat().st_size for p in self.folder.iterdir())


def test_an_epoch_order_is_a_seeded_permutation_that_keeps_windows_of_groups_together() -> None:
    groups = sample_groups(shard_samples(6, 5), limit=10_000)
    order = grouped_order(groups, seed=7, epoch=0, window=2)

    assert sorted(order) == list(range(30))
    assert order == grouped_order(groups, seed=7, epoch=0, window=2)
    assert order != grouped_order(groups, seed=7, epoch=1, window=2)
    # Each window of 2 shards is 10 consecutive positions, holding exactly those 2 shards' samples.
    for start in range(0, 30, 10):
        assert len({groups[i] for i in order[start : start + 10]}) == 2


def test_loose_images_are_dealt_into_mixed_virtual_shards_within_a_sixteenth_of_the_limit() -> None:
    loose = [Sample(f"img/{c}/{n}.png", c, 100, "e") for c in range(4) for n in range(50)]
    groups = sample_groups(loose, limit=16 * 1000)  # 1000 bytes a group: 10 images
    sizes: dict[int, list[int]] = {}
    for sample, group in zip(loose, groups, strict=True):
        sizes.setdefault(group, []).append(sample.label)
    assert all(len(labels) <= 10 for labels in sizes.values()) and len(sizes) == 20
    assert sum(len(set(labels)) > 1 for labels in sizes.values()) >= 15  # classes mixed, not one per group
    assert shuffle_window({0: 1000}, 16_000) == 5


def test_the_window_keeps_disk_within_its_budget_and_has_each_batch_on_disk_when_handed_out(tmp_path: Path) -> None:
    samples = shard_samples(8, 10)  # 8 groups of 1000 bytes
    groups = sample_groups(samples, limit=10_000)
    fetcher = DiskFetcher(samples, tmp_path)
    window = Window(fetcher, groups, budget=3_500, lag=1)  # type: ignore[arg-type]
    order = grouped_order(groups, seed=1, epoch=0, window=1)
    batches = [order[n : n + 4] for n in range(0, len(order), 4)]

    seen = []
    for batch in window.run(batches, int):
        assert all(fetcher.path(i).is_file() for i in batch)
        assert fetcher.on_disk() <= 3_500
        seen += batch
    assert sorted(seen) == list(range(80))
    # The last batches stay readable after the sampler is done (loader processes may still read them),
    # until the next pass of the window begins.
    assert all(fetcher.path(i).is_file() for i in batches[-1]) and fetcher.on_disk() <= 3_500
    window.release()
    assert fetcher.on_disk() == 0
    assert 2_000 <= window.peak <= 3_500


def test_a_limit_too_small_for_the_window_fails_naming_size_limit(tmp_path: Path) -> None:
    samples = shard_samples(4, 10)
    groups = sample_groups(samples, limit=10_000)
    window = Window(DiskFetcher(samples, tmp_path), groups, budget=1_500, lag=5)  # type: ignore[arg-type]
    order = grouped_order(groups, seed=1, epoch=0, window=1)
    with pytest.raises(DataError, match=r"data\.cache\.sizeLimit: .*1,500 bytes.*cannot hold"):
        list(window.run([order[n : n + 4] for n in range(0, 40, 4)], int))


def test_a_resume_mid_epoch_hands_out_exactly_the_rest_of_the_epoch_on_every_worker(tmp_path: Path) -> None:
    samples = shard_samples(5, 8)
    groups = sample_groups(samples, limit=10_000)

    def epoch(rank: int, skip: int) -> list[int]:
        window = Window(DiskFetcher(samples, tmp_path / str(rank)), groups, budget=10_000, lag=0)  # type: ignore[arg-type]
        (tmp_path / str(rank)).mkdir(exist_ok=True)
        order = StreamOrder(40, window=window, shuffle=2, seed=3, batch_size=4, reference=2, rank=rank, world=2)
        order.set_epoch(1, skip)
        return [i for batch in order for _, i in batch]

    whole = [epoch(0, 0), epoch(1, 0)]
    assert sorted(whole[0] + whole[1]) == list(range(40))  # every sample once across the workers
    resumed = [epoch(0, 16), epoch(1, 16)]  # 2 global batches of 8 consumed before the resume
    assert resumed == [whole[0][8:], whole[1][8:]]


def test_unreadable_images_are_left_out_of_their_batch() -> None:
    collate = ReadableBatches(None)
    assert collate([(1, 0), None, (3, 1)])[0].tolist() == [1, 3]
    with pytest.raises(DataError, match="none of the 2 images"):
        collate([None, None])


def job(cache: dict[str, Any], resources: dict[str, Any] | None = None) -> dict[str, Any]:
    body = copy.deepcopy(MINIMAL)
    body["spec"]["data"]["cache"] = cache
    if resources:
        body["spec"]["resources"] = resources
    return body


def test_size_limit_defaults_to_the_cache_volume_and_may_not_exceed_it() -> None:
    config = trainer_config(FineTuneJob.from_body(job({"mode": "stream"}, {"cacheSize": "50Gi"})))
    assert config.data.cache.size_limit == "50Gi" and config.data.cache.limit_bytes == 50 * 1024**3

    with pytest.raises(ValidationError, match=r"data\.cache\.sizeLimit: must be at most resources\.cacheSize \(20Gi\)"):
        FineTuneJob.from_body(job({"sizeLimit": "30Gi"}))


def test_cache_fields_name_what_is_allowed() -> None:
    from kubetune_operator.messages import format_validation_error

    for cache, expected in (
        ({"mode": "lazy"}, ("spec.data.cache.mode", "full", "stream", "auto")),
        ({"sizeLimit": "2GB"}, ("spec.data.cache.sizeLimit", "Ki, Mi, Gi or Ti")),
    ):
        with pytest.raises(ValidationError) as caught:
            FineTuneJob.from_body(job(cache))
        (message,) = format_validation_error(caught.value, "job.yaml")
        assert all(part in message for part in expected), message


def test_detection_jobs_stream_like_classification_ones() -> None:
    """One rule for both tasks: stream streams, auto streams what does not fit (the detection dataset's
    parts: tests/trainer/test_detection_stream.py)."""
    from kubetune_trainer.data import DatasetIndex
    from kubetune_trainer.stream import streams

    index = DatasetIndex("datasets", ["a"], shard_samples(4, 10, size=1024), [])  # 40 KiB of images
    for mode, limit, streamed in (("stream", "100Ki", True), ("auto", "100Ki", False), ("auto", "40Ki", True)):
        body = job({"mode": mode, "sizeLimit": limit})
        body["spec"]["task"] = "detection"
        body["spec"]["model"]["architecture"] = "fasterrcnn_mobilenet_v3_large_320_fpn"
        body["spec"]["data"].update({"format": "manifest", "train": "s3://datasets/m/boxes.jsonl"})
        config = trainer_config(FineTuneJob.from_body(body))
        assert streams(config, index, 1024) is streamed, (mode, limit)


def test_auto_streams_when_the_listed_images_and_weights_do_not_fit_the_limit() -> None:
    from kubetune_trainer.data import DatasetIndex
    from kubetune_trainer.stream import cache_line, streams

    index = DatasetIndex("datasets", ["a"], shard_samples(4, 10, size=1024), [])  # 40 KiB of images
    for limit, weights, streamed in (("100Ki", 1024, False), ("40Ki", 1024, True), ("100Ki", 70 * 1024, True)):
        config = trainer_config(FineTuneJob.from_body(job({"mode": "auto", "sizeLimit": limit})))
        assert streams(config, index, weights) is streamed, (limit, weights)
        assert cache_line(config, index, weights).startswith(f"data.cache: {'stream' if streamed else 'full'} (auto: ")


def test_the_windows_leave_the_base_weights_room_on_the_cache_volume(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """The base weights are cached on the node cache's emptyDir too, whose sizeLimit (cacheSize, sizeLimit's
    default) the kubelet enforces by evicting the pod: the images stream within sizeLimit less the weights."""
    from types import SimpleNamespace

    from kubetune_trainer.data import DatasetIndex
    from kubetune_trainer.stream import stream_setup

    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path))
    index = DatasetIndex("datasets", ["a"], shard_samples(4, 10, size=1024), shard_samples(1, 10, size=1024))
    config = trainer_config(FineTuneJob.from_body(job({"mode": "stream"}, {"cacheSize": "1Mi"})))
    store: Any = SimpleNamespace(endpoint="http://s3.test")
    weights = 300 * 1024
    setup = stream_setup(store, config, index, rank=0, local_world=2, lag=2, weights_bytes=weights)
    assert setup.train.budget == setup.validation.budget == (1024**2 - weights) // 2


def test_byte_ranges_reads_each_range_once_across_chunks_and_stops_at_the_end(monkeypatch: pytest.MonkeyPatch) -> None:
    from kubetune_trainer import shards

    monkeypatch.setattr(shards, "READ_CHUNK", 7)
    data = bytes(range(100))
    stream = io.BytesIO(data)
    ranges = [(0, 3), (3, 2), (10, 20), (29, 1), (64, 30), (95, 10)]  # (29, 1) overlaps: never in a tar
    got = dict(shards.byte_ranges(stream.read, ranges))
    assert got == {0: data[0:3], 3: data[3:5], 10: data[10:30], 64: data[64:94]}  # 95..105: the stream ends


def test_stream_reads_shard_members_by_offset_and_never_writes_a_member_name(
    world: DigitsWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.data import datasets
    from kubetune_trainer.errors import StorageError
    from kubetune_trainer.formats import classification_index
    from kubetune_trainer.storage import S3Store
    from kubetune_trainer.stream import stream_datasets, stream_setup
    from tests.support.digits_world import REGION, digit_png, tar_bytes
    from tests.trainer.test_formats import hostile_tar

    images = [digit_png(image) for image, _ in world.digits(range(0, 2))[:6]]
    long = "x" * 150  # a pax header holds its name: the offset is past it
    members = [(f"{long}/{n}.png" if n == 5 else f"{n}.png", png) for n, png in enumerate(images)]
    labelled = [m for n, member in enumerate(members) for m in (member, (f"{member[0][:-4]}.cls", str(n % 2).encode()))]
    world.put("s3://datasets/stream-parts/s-0.tar", tar_bytes(labelled))
    world.put("s3://datasets/stream-parts/s-1.tar", hostile_tar(images[0]))
    monkeypatch.setenv("KUBETUNE_CACHE_DIR", str(tmp_path / "cache"))
    store = S3Store(world.endpoint, REGION)
    config = TrainerConfig.model_validate(
        {
            "model": {"architecture": "resnet18", "checkpoint": "s3://models/base/resnet18.safetensors"},
            "data": {
                "format": "webdataset",
                "train": "s3://datasets/stream-parts/s-{0..1}.tar",
                "validationSplit": 0.01,
            },
            "output": {"path": "s3://results/stream-parts/"},
            "storage": {"endpoint": world.endpoint, "region": REGION},
            "runName": "stream-parts",
            "jobName": "stream-parts",
        }
    )
    index = classification_index(store, config)
    setup = stream_setup(store, config, index, rank=0, local_world=1, lag=0)
    cfg = {
        "input_size": (3, 32, 32),
        "interpolation": "bilinear",
        "mean": (0.5,) * 3,
        "std": (0.5,) * 3,
        "crop_pct": 1.0,
    }
    train, _ = stream_datasets(setup, datasets(setup.train.fetcher.folder, index, cfg, "none"))
    everything = list(range(len(index.train)))
    for batch in setup.train.run([everything], int):
        read = {index.train[i].key: train[i] for i in batch}
    folder = setup.train.fetcher.folder
    assert sorted(p.name for p in folder.rglob("*")) == [f"train-{g}.bin" for g in sorted(set(setup.train.groups))]
    assert len(read) == len(index.train) >= 6
    # Every training image decodes but the one that is no image (the loop counts it unreadable).
    assert [key for key, item in read.items() if item is None] == ["stream-parts/s-1.tar/broken.png"]
    original = datasets(tmp_path, index, cfg, "none")[0].transform
    five = next(i for i, s in enumerate(index.train) if s.key.endswith(f"{long}/5.png"))
    from PIL import Image

    assert torch.equal(train[five][0], original(Image.open(io.BytesIO(images[5])).convert("RGB")))
    setup.train.release()
    assert not list(folder.iterdir())

    world.put("s3://datasets/stream-parts/s-0.tar", tar_bytes(labelled[::-1]))  # changed since it was indexed
    with pytest.raises(StorageError, match=r"s-0\.tar changed since the run listed it"):
        list(setup.train.run([everything], int))


def test_a_shard_samples_offset_travels_with_the_index() -> None:
    from kubetune_trainer.data import DatasetIndex

    sample = Sample("s/0.tar/1.jpg", 1, 10, "etag", "s/0.tar", 1536)
    index = DatasetIndex("b", ["a", "b"], [sample, Sample("img/a/2.jpg", 0, 5, "e2")], [])
    assert DatasetIndex.from_wire(index.wire()).train == index.train
