"""The judgement's images: cached whole in full mode, a page at a time within sizeLimit in stream mode.

Stream mode promises a node never holds more than sizeLimit less the base weights of images
(`stream.image_room`), the judgement after training included. So there the validation and test images
are dealt into pages of consecutive images in the judged sets' own order (a shard's members together;
loose images at most VIRTUAL_GROUP_IMAGES and a sixteenth of the room, as stream mode's groups), cached
into a folder of their own below the node cache exactly as the full mode caches them
(`data.cache_samples`: the same paths, the same decode checks), and dropped, least recently used first,
when the next page would not fit. While a set is read in order, the page after the one being read is
fetched beside it (one page ahead, its bytes counted in the room: it is fetched only when it fits beside
the page being read). A set that fits the room is therefore cached whole and read once; a larger one
passes through a page at a time, each page downloaded once, and the few pictures the report draws
afterwards fetch their page again. The training's group files are deleted first: the room is the
judgement's alone.

The datasets judged are the task's own over that folder (`Paged` only makes sure an item's page is on
disk before the task's dataset reads it), so the figures are the full mode's for the same images. The
full mode judges without the unreadable images, which mostly only their bytes reveal. Here the judgement
runs at once without those known unread (the listing's, refused keys, oversize images) and checks every
page it reads; the pages it did not read (a classifier reads only a few validation images beside a test
split) are fetched and checked after it. When an image
turns out unreadable, the judgement's result is void (it stops at the first page that shows one) and it
runs again without every unreadable image, now all known, reading the pages a second time: only a set
with an image that does not decode is downloaded about twice. Pages are fetched in the process that
reads them (and one thread beside it): the judgement's loaders have no loader processes.
"""

from __future__ import annotations

import shutil
from collections import OrderedDict
from collections.abc import Callable, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from pathlib import Path
from typing import Any, TypeVar

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
    unpack_ranges,
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

Result = TypeVar("Result")
Judging = Callable[[Task, Any, Any, str], Result]  # (task, validation set, set judged, its name) → result


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


class UnforeseenImageError(Exception):
    """A page read by the judgement holds an unreadable image the judged task still has: its result is void."""


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
        self.coming: dict[int, Future[dict[str, str | None]]] = {}  # pages being fetched ahead (held too)
        self.ahead = ThreadPoolExecutor(max_workers=1, thread_name_prefix="judged-page")
        self.found: dict[str, str | None] = {}
        self.checked: set[int] = set()
        self.foreseen: set[str] | None = None  # while judging: the unreadable images the judged task is without
        self.void = False  # a page checked while judging showed an unreadable image not foreseen
        self.peak = 0

    def path(self, sample: Sample) -> Path:
        return local_path(self.folder, sample.key, f"s3://{self.index.bucket}/{sample.key}")

    def size(self, page: int) -> int:
        """The bytes `page` holds on disk, refused if they can never fit the room."""
        size = sum(s.size for s in self.pages[page] if s.key not in self.refused and s.size <= MAX_IMAGE_BYTES)
        if size > self.room:
            raise DataError(
                f"data.cache.sizeLimit: the {self.room:,} bytes it leaves the images cannot hold the {size:,} bytes "
                f"of one shard or group of judged images ({self.pages[page][0].source or 'loose images'})"
            )
        return size

    def ensure(self, page: int) -> None:
        """`page` on disk and checked, the least recently used pages dropped to make room for it; raises
        `UnforeseenImageError` when a page read holds an unreadable image the judged task still has."""
        if page in self.coming:
            self.checked_in(page, self.coming.pop(page).result())
        elif page not in self.held:
            self.reserve(page, keep=set())
            self.checked_in(page, self.fetch(page))
        self.held.move_to_end(page)
        if self.void and self.foreseen is not None:
            raise UnforeseenImageError(f"an image of page {page} of the judged images or one before it does not decode")

    def prefetch(self, page: int) -> None:
        """`page` fetched beside the one being read (the most recent), if it fits beside it."""
        if page in self.held or page not in self.pages or self.coming:
            return
        size, current = self.size(page), next(reversed(self.held), None)
        if (self.held.get(current, 0) if current is not None else 0) + size > self.room:
            return
        self.reserve(page, keep={current} if current is not None else set())
        self.coming[page] = self.ahead.submit(self.fetch, page)

    def fetch(self, page: int) -> dict[str, str | None]:
        """`page` written and checked; a shard's members by their bytes alone (a page may hold part of it)."""
        return cache_samples(self.store, self.index, self.folder, self.pages[page], self.refused, unpack_ranges)

    def checked_in(self, page: int, found: Mapping[str, str | None]) -> None:
        self.found.update(found)
        self.checked.add(page)
        if self.foreseen is not None and any(why and key not in self.foreseen for key, why in found.items()):
            self.void = True

    def reserve(self, page: int, keep: set[int]) -> None:
        """Room for `page` (counted from now on), the least recently used pages but `keep` dropped."""
        size = self.size(page)
        while sum(self.held.values()) + size > self.room:
            self.drop(next(held for held in self.held if held not in keep))
        self.held[page] = size
        self.peak = max(self.peak, sum(self.held.values()))

    def drop(self, page: int) -> None:
        if page in self.coming:  # its files are being written: wait for them, then delete them
            self.checked_in(page, self.coming.pop(page).result())
        del self.held[page]
        for sample in self.pages[page]:
            if sample.key not in self.refused:
                self.path(sample).unlink(missing_ok=True)

    def unreadable(self) -> dict[str, str]:
        """The images known not to be readable: the listing's, and those the pages checked so far found."""
        return {**self.index.corrupt, **{key: why for key, why in self.found.items() if why}}

    def foresee(self) -> dict[str, str]:
        """The unreadable images known without reading any (refused keys, oversize images) and those found
        so far: the judged task is without them, and any other that a page read shows voids the judgement."""
        unread = [s for s in self.index.samples if s.key in self.refused or s.size > MAX_IMAGE_BYTES]
        self.found.update(cache_samples(self.store, self.index, self.folder, unread, self.refused))
        return self.judging_without(self.unreadable())

    def judging_without(self, unreadable: Mapping[str, str]) -> dict[str, str]:
        """A judgement begins whose task is without `unreadable`."""
        self.foreseen, self.void = set(unreadable), False
        return dict(unreadable)

    def check_the_rest(self) -> None:
        """Every page not checked yet fetched and checked, in order, the next one fetched beside it."""
        self.foreseen = None  # no judgement to void
        rest = [page for page in self.pages if page not in self.checked]
        for n, page in enumerate(rest):
            self.ensure(page)
            if n + 1 < len(rest):
                self.prefetch(rest[n + 1])

    def close(self) -> None:
        """Wait for the page fetched ahead, then remove the folder."""
        self.ahead.shutdown(wait=True, cancel_futures=True)
        shutil.rmtree(self.folder, ignore_errors=True)


class PagedPaths(Sequence[Any]):
    """A dataset's `paths`, each one on disk when asked for (a picture of the report reads it directly)."""

    def __init__(self, paths: Sequence[Any], pager: Pager) -> None:
        self.paths, self.pager = paths, pager
        self.pages = [pager.page_of[str(path)] for path in paths]
        # The page after each item's page in this set's order: the one fetched ahead while it is read.
        self.after: list[int | None] = []
        following: int | None = None
        for n in range(len(self.pages) - 1, -1, -1):
            if n + 1 < len(self.pages) and self.pages[n + 1] != self.pages[n]:
                following = self.pages[n + 1]
            self.after.append(following)
        self.after.reverse()

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: Any) -> Any:
        if isinstance(i, slice):
            return [self[n] for n in range(*i.indices(len(self)))]
        self.fetch(i)
        return self.paths[i]

    def fetch(self, i: int, in_order: bool = False) -> None:
        """The page of the i-th path on disk; read `in_order`, the next page fetched beside it."""
        self.pager.ensure(self.pages[i])
        after = self.after[i]
        if in_order and after is not None:
            self.pager.prefetch(after)


class Paged(torch.utils.data.Dataset[Any]):
    """A task's judged dataset (`data.ImageFiles`, `detection_data.DetectionFiles`: local files by `paths`)
    whose item's page is fetched before the dataset reads it; its other attributes are the dataset's."""

    def __init__(self, dataset: Any, pager: Pager) -> None:
        self.dataset, self.paths = dataset, PagedPaths(dataset.paths, pager)
        self.last = -1

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: int) -> Any:
        self.paths.fetch(i, in_order=i == self.last + 1)
        self.last = i
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


def judge_sets(
    store: S3Store,
    config: TrainerConfig,
    task: Task,
    weights_bytes: int,
    preprocessing: Mapping[str, Any],
    judging: Judging[Result],
) -> Result:
    """`judging` of the task without the unreadable judged images, its validation set, the set judged and
    its name: over the node cache in full mode, paged within sizeLimit in stream mode (the module's)."""
    if not streams(config, task.images, weights_bytes):
        folder, _ = prepare_images(store, task.images)
        return judging(task, *task.judged_sets(folder, preprocessing))
    shutil.rmtree(stream_root(store, task.images), ignore_errors=True)  # the training's group files
    index = judged_images(task.images)
    pager = Pager(store, index, judge_folder(store, index), image_room(config, weights_bytes))
    try:
        return judge_paged(pager, task, preprocessing, judging)
    finally:
        pager.close()


def judge_paged(pager: Pager, task: Task, preprocessing: Mapping[str, Any], judging: Judging[Result]) -> Result:
    """`judging` over `pager`'s pages, again when a page showed an image it did not foresee (the module's)."""
    unreadable = pager.foresee()
    while True:
        judged_task = task.without_corrupt(unreadable)
        validation, judged, split = judged_task.judged_sets(pager.folder, preprocessing)
        paged = Paged(validation, pager)
        try:
            result = judging(judged_task, paged, paged if judged is validation else Paged(judged, pager), split)
        except Exception:
            if not pager.void:
                raise  # not for an image it did not foresee
        pager.check_the_rest()
        if set(pager.unreadable()) == set(unreadable):
            return result  # every page checked, no image unforeseen: the full mode's judgement
        unreadable = pager.judging_without(pager.unreadable())
