"""The judgement's images: cached whole in full mode, a page at a time within sizeLimit in stream mode.

Stream mode promises a node never holds more than sizeLimit less the base weights of images
(`stream.image_room`), the judgement after training included. So there the validation and test images
are dealt into pages of consecutive images in the judged sets' own order (a shard's members together;
loose images at most VIRTUAL_GROUP_IMAGES and a sixteenth of the room, as stream mode's groups), cached
into a folder of their own below the node cache exactly as the full mode caches them
(`data.cache_samples`: the same paths, the same checks), and dropped, least recently used first, when the
next page would not fit. A set that fits the room is therefore cached whole and read once; a larger one
passes through a page at a time, and the few pictures the report draws afterwards fetch their page again.
The training's group files are deleted first: the room is the judgement's alone.

The datasets judged are the task's own over that folder (`Paged` only makes sure an item's page is on
disk before the task's dataset reads it), so the figures are the full mode's for the same images. The
full mode drops unreadable images before the judgement; here a first pass fetches and checks every page
(kept while they fit) and the task judged is the one without them. Pages are fetched in the process
that reads them: the judgement's loaders have no loader processes.
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from collections.abc import Iterator, Mapping, Sequence
from contextlib import contextmanager
from pathlib import Path
from typing import Any

import torch

from kubetune_trainer.cache import cache_root, digest
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import (
    MAX_IMAGE_BYTES,
    DatasetIndex,
    Sample,
    cache_refusals,
    cache_samples,
    prepare_images,
)
from kubetune_trainer.errors import DataError
from kubetune_trainer.localpaths import local_path
from kubetune_trainer.storage import S3Store
from kubetune_trainer.stream import (
    MAX_VIRTUAL_GROUP_BYTES,
    VIRTUAL_GROUP_IMAGES,
    image_room,
    judged_images,
    stream_root,
    streams,
)
from kubetune_trainer.tasks import Task


def page_numbers(samples: Sequence[Sample], cap: int) -> list[int]:
    """The page of each sample: consecutive samples, a new page where the shard changes, or for loose
    images past VIRTUAL_GROUP_IMAGES or `cap` bytes."""
    pages: list[int] = []
    page, source, count, size = -1, None, 0, 0
    for sample in samples:
        full = not sample.source and (count >= VIRTUAL_GROUP_IMAGES or size + sample.size > cap)
        if sample.source != source or full:
            page, source, count, size = page + 1, sample.source, 0, 0
        pages.append(page)
        count, size = count + 1, size + sample.size
    return pages


class Pager:
    """The images of `index` (validation and test) in `folder`, a page at a time, within `room` bytes."""

    def __init__(self, store: S3Store, index: DatasetIndex, folder: Path, room: int) -> None:
        self.store, self.index, self.folder, self.room = store, index, folder, room
        self.refused = cache_refusals(index.samples)  # over every page: a clash may span two
        self.pages: dict[int, list[Sample]] = {}
        cap = max(1, min(MAX_VIRTUAL_GROUP_BYTES, room // 16))
        for sample, page in zip(index.samples, page_numbers(index.samples, cap), strict=True):
            self.pages.setdefault(page, []).append(sample)
        self.page_of = {
            str(self.path(s)): page
            for page, samples in self.pages.items()
            for s in samples
            if s.key not in self.refused
        }
        self.held: OrderedDict[int, int] = OrderedDict()  # page → bytes, least recently used first
        self.found: dict[str, str | None] = {}
        self.peak = 0

    def path(self, sample: Sample) -> Path:
        return local_path(self.folder, sample.key, f"s3://{self.index.bucket}/{sample.key}")

    def ensure(self, page: int) -> None:
        """`page` on disk, the least recently used pages dropped to make room for it."""
        if page in self.held:
            self.held.move_to_end(page)
            return
        size = sum(s.size for s in self.pages[page] if s.key not in self.refused and s.size <= MAX_IMAGE_BYTES)
        if size > self.room:
            raise DataError(
                f"data.cache.sizeLimit: the {self.room:,} bytes it leaves the images cannot hold the {size:,} bytes "
                f"of one shard or group of judged images ({self.pages[page][0].source or 'loose images'})"
            )
        while self.held and sum(self.held.values()) + size > self.room:
            self.drop(next(iter(self.held)))
        self.found.update(cache_samples(self.store, self.index, self.folder, self.pages[page], self.refused))
        self.held[page] = size
        self.peak = max(self.peak, sum(self.held.values()))

    def drop(self, page: int) -> None:
        del self.held[page]
        for sample in self.pages[page]:
            if sample.key not in self.refused:
                self.path(sample).unlink(missing_ok=True)

    def unreadable(self) -> dict[str, str]:
        """Every page fetched and decode-checked (kept while they fit): the images that are not readable."""
        for page in self.pages:
            self.ensure(page)
        return {**self.index.corrupt, **{key: why for key, why in self.found.items() if why}}


class PagedPaths(Sequence[Any]):
    """A dataset's `paths`, each one on disk when asked for (a picture of the report reads it directly)."""

    def __init__(self, paths: Sequence[Any], pager: Pager) -> None:
        self.paths, self.pager = paths, pager

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[n] for n in range(*i.indices(len(self)))]
        self.fetch(i)
        return self.paths[i]

    def fetch(self, i: int) -> None:
        """The page of the i-th path on disk."""
        self.pager.ensure(self.pager.page_of[str(self.paths[i])])


class Paged(torch.utils.data.Dataset[Any]):
    """A task's judged dataset (`data.ImageFiles`, `detection_data.DetectionFiles`: local files by `paths`)
    whose item's page is fetched before the dataset reads it; its other attributes are the dataset's."""

    def __init__(self, dataset: Any, pager: Pager) -> None:
        self.dataset, self.paths = dataset, PagedPaths(dataset.paths, pager)

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        self.paths.fetch(i)
        return self.dataset[i]

    def __getattr__(self, name: str) -> Any:
        if name == "dataset":  # not set yet (a copy being made): no attribute to delegate to
            raise AttributeError(name)
        return getattr(self.dataset, name)


def judge_folder(store: S3Store, index: DatasetIndex) -> Path:
    """The judgement's own folder below the node cache, emptied of what an earlier attempt left there."""
    folder = cache_root() / "judge" / digest(store.endpoint, index.bucket, index.cache_key)
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True)
    return folder


@contextmanager
def judged_sets(
    store: S3Store, config: TrainerConfig, task: Task, weights_bytes: int, preprocessing: Mapping[str, Any]
) -> Iterator[tuple[Task, Any, Any, str]]:
    """(the task without the unreadable judged images, the validation set, the set judged, its name):
    over the node cache in full mode, paged within sizeLimit in stream mode (the module's)."""
    if not streams(config, task.images, weights_bytes):
        folder, _ = prepare_images(store, task.images)
        yield (task, *task.judged_sets(folder, preprocessing))
        return
    shutil.rmtree(stream_root(store, task.images), ignore_errors=True)  # the training's group files
    index = judged_images(task.images)
    pager = Pager(store, index, judge_folder(store, index), image_room(config, weights_bytes))
    try:
        judged_task = task.without_corrupt(pager.unreadable())
        validation, judged, split = judged_task.judged_sets(pager.folder, preprocessing)
        paged = Paged(validation, pager)
        yield judged_task, paged, paged if judged is validation else Paged(judged, pager), split
    finally:
        shutil.rmtree(pager.folder, ignore_errors=True)
