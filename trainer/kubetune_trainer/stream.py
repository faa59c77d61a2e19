"""Stream mode (`data.cache.mode: stream`): images fetched ahead of use and dropped after it, in bounded disk.

Why not Ray Data: its streaming reads give no per-epoch order that is a function of the seed alone, nor a
way to start an epoch at its n-th sample, so neither the exact resume nor the elastic global batch
(`loaders.EpochOrder`) would survive; and its object store would hold what here is on a bounded disk.
Here the order stays the loaders' own, only arranged so that it can be streamed:

- **Groups.** A WebDataset shard is a group; other images (a manifest's, an ImageFolder's) are dealt into
  virtual shards of at most VIRTUAL_GROUP_IMAGES images and a sixteenth of sizeLimit, by the digest of
  their key (so each holds a mix of classes, whatever the listing order).
- **The order** of an epoch (`grouped_order`): the groups in a seeded permutation, taken `window` at a time
  (`shuffle_window`: as many as a third of sizeLimit holds, at most MAX_WINDOW), and the samples of each
  window in a seeded permutation: a shard-level shuffle plus a shuffle buffer of `window` whole groups. It
  is a function of the seed, the epoch and the index, so every rank, and a resumed run, computes the same.
  `EpochOrder` then does what it does for the full cache: pads, splits each global batch among the
  workers, skips what a checkpoint says was consumed. Each epoch therefore trains each sample once
  (`loaders` states the exact guarantee), and a resume mid-epoch repeats and skips none.
- **The window** (`Window`): a worker knows every batch it will read this epoch, hence when each group is
  first and last used. It fetches groups in the order of their first use, STREAM_THREADS at a time, as
  far ahead as its share of sizeLimit allows; hands out a batch only once its groups are on disk; and
  deletes a group's files once the loader processes are past its last use (`lag` batches: a DataLoader
  has at most prefetch_factor * num_workers batches in flight); an epoch's last groups stay until the next
  pass of either window (training or validation: one budget) begins. The peak is computed before the epoch
  starts: a sizeLimit too small for two windows fails the run naming it, never fills the disk.

- **The files** (`Fetcher`, `GroupImages`): a worker writes only its own samples of a group, one after
  another, into one file per group (named by the group's number, never by a remote name) and records in
  shared memory where each starts; the loader processes read the bytes from there and decode them. A
  shard's members come from one streamed GET of the shard, read at the offsets the driver's index found
  (`shards.read_members`, If-Match the indexed ETag): no tar header parsed again, no file per image (a
  file per image, written and renamed, cost ~2 ms an image: bench/findings.md, "Streaming"). Loose images
  come by GET. An image that does not decode, is missing from its shard or is not its indexed size is
  left out of its batch and counted (`Readable`).
"""

from __future__ import annotations

import io
import logging
import os
import shutil
from collections import deque
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch.utils.data import Dataset, Sampler, default_collate

from kubetune_trainer.cache import cache_root, digest
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import MAX_IMAGE_BYTES, DatasetIndex, Sample, open_image
from kubetune_trainer.errors import DataError
from kubetune_trainer.loaders import EpochOrder
from kubetune_trainer.shards import read_members
from kubetune_trainer.storage import S3Store, S3Uri

log = logging.getLogger(__name__)

STREAM_THREADS = 4  # groups fetched at once, per worker
OBJECT_THREADS = 16  # a virtual group's images fetched at once
MAX_WINDOW = 16  # groups one shuffle mixes
VIRTUAL_GROUP_IMAGES = 256
MAX_VIRTUAL_GROUP_BYTES = 64 * 1024**2


def streams(config: TrainerConfig, index: DatasetIndex, weights_bytes: int) -> bool:
    """Whether this run streams: data.cache.mode, or for auto whether the listed images and the base weights
    exceed sizeLimit. Either task: a detection run's boxes stay in its index, only the images stream."""
    mode = config.data.cache.mode
    if mode != "auto":
        return mode == "stream"
    return sum(s.size for s in index.samples) > image_room(config, weights_bytes)


def image_room(config: TrainerConfig, weights_bytes: int) -> int:
    """The bytes of sizeLimit the images may take: the base weights are cached on the same volume (the
    node cache's emptyDir, whose sizeLimit the kubelet enforces by evicting the pod)."""
    return max(0, config.data.cache.limit_bytes - weights_bytes)


def cache_line(config: TrainerConfig, index: DatasetIndex, weights_bytes: int) -> str:
    """What the log says of data.cache: the mode the run uses, and why for auto."""
    cache, images = config.data.cache, sum(s.size for s in index.samples)
    mode = "stream" if streams(config, index, weights_bytes) else "full"
    why = f" (auto: {images + weights_bytes:,} bytes of images and weights, sizeLimit {cache.limit_bytes:,})"
    return f"data.cache: {mode}{why if cache.mode == 'auto' else ''}"


def judged_images(index: DatasetIndex) -> DatasetIndex:
    """What the judgement after training reads when the run streams: its validation and test images only
    (`evaluation.paged`)."""
    return DatasetIndex(
        index.bucket,
        index.class_names,
        [],
        index.validation,
        corrupt=index.corrupt,
        shards=index.shards,
        test=index.test,
    )


# -- groups and the order -----------------------------------------------------------------------------


def sample_groups(samples: Sequence[Sample], limit: int) -> list[int]:
    """The group of each sample: its shard's, or a virtual shard's for a loose image (see the module)."""
    shards = sorted({s.source for s in samples if s.source})
    number = {key: n for n, key in enumerate(shards)}
    groups = [number.get(s.source, -1) for s in samples]
    loose = sorted((i for i, s in enumerate(samples) if not s.source), key=lambda i: digest(samples[i].key))
    cap = max(1, min(MAX_VIRTUAL_GROUP_BYTES, limit // 16))
    group, count, size = len(shards), 0, 0
    for i in loose:
        if count and (count >= VIRTUAL_GROUP_IMAGES or size + samples[i].size > cap):
            group, count, size = group + 1, 0, 0
        groups[i], count, size = group, count + 1, size + samples[i].size
    return groups


def group_bytes(samples: Sequence[Sample], groups: Sequence[int]) -> dict[int, int]:
    out: dict[int, int] = {}
    for sample, group in zip(samples, groups, strict=True):
        out[group] = out.get(group, 0) + sample.size
    return out


def shuffle_window(sizes: Mapping[int, int], limit: int) -> int:
    """Groups whose samples one shuffle mixes: as many of the largest as a third of sizeLimit holds, 1 to MAX_WINDOW."""
    largest = max(sizes.values(), default=1)
    return max(1, min(MAX_WINDOW, limit // (3 * max(1, largest))))


def grouped_order(groups: Sequence[int], seed: int, epoch: int, window: int) -> list[int]:
    """The epoch's order of the sample indices: groups in a seeded permutation, `window` at a time, and the
    samples of each window in a seeded permutation."""
    members: dict[int, list[int]] = {}
    for i, group in enumerate(groups):
        members.setdefault(group, []).append(i)
    generator = torch.Generator().manual_seed(seed + epoch)
    names = sorted(members)
    shuffled = [names[n] for n in torch.randperm(len(names), generator=generator).tolist()]
    order: list[int] = []
    for start in range(0, len(shuffled), window):
        pool = [i for group in shuffled[start : start + window] for i in members[group]]
        order += [pool[n] for n in torch.randperm(len(pool), generator=generator).tolist()]
    return order


# -- the window ---------------------------------------------------------------------------------------


@dataclass
class GroupUse:
    """One group in one worker's epoch: its batches' first and last use, its samples there, their bytes."""

    group: int
    first: int
    last: int
    members: list[int] = field(default_factory=list)
    size: int = 0


def plan_groups(batches: Sequence[Sequence[int]], groups: Sequence[int], samples: Sequence[Sample]) -> list[GroupUse]:
    """The groups `batches` (sample indices) read, in the order of their first use."""
    uses: dict[int, GroupUse] = {}
    planned: set[int] = set()  # an index the order repeats (padding) is fetched once
    for number, batch in enumerate(batches):
        for i in batch:
            use = uses.setdefault(groups[i], GroupUse(groups[i], number, number))
            use.last = number
            if i not in planned:
                planned.add(i)
                use.members.append(i)
                use.size += samples[i].size
    return sorted(uses.values(), key=lambda u: (u.first, u.group))


def peak_bytes(plan: Sequence[GroupUse], lag: int) -> int:
    """The most bytes on disk at once when each group is kept from its first use to `lag` batches past its last."""
    events: dict[int, int] = {}
    for use in plan:
        events[use.first] = events.get(use.first, 0) + use.size
        events[use.last + lag + 1] = events.get(use.last + lag + 1, 0) - use.size
    peak = held = 0
    for batch in sorted(events):
        held += events[batch]
        peak = max(peak, held)
    return peak


def group_file(folder: Path, part: str, group: int) -> Path:
    """The one file that holds a group's images of this worker (`part`: train or validation): named by
    numbers, never by a remote name."""
    return folder / f"{part}-{group}.bin"


class Fetcher:
    """Writes a group's images of this worker, one after another, into the group's one file, and records
    where each starts in `located` (-1: not on disk), which the loader processes share (`GroupImages`);
    deletes the file."""

    def __init__(self, store: S3Store, index: DatasetIndex, samples: Sequence[Sample], folder: Path, part: str) -> None:
        self.store, self.index, self.samples, self.folder, self.part = store, index, samples, folder, part
        self.objects = ThreadPoolExecutor(max_workers=OBJECT_THREADS, thread_name_prefix="stream-objects")
        # In shared memory, made before the loader processes start: they see each new value.
        self.located = torch.full((len(samples),), -1, dtype=torch.int64).share_memory_()

    def fetch(self, use: GroupUse) -> None:
        wanted = [i for i in use.members if self.samples[i].size <= MAX_IMAGE_BYTES]
        if not wanted:
            return
        pieces = self.shard_members(wanted) if self.samples[wanted[0]].source else self.objects_of(wanted)
        found, starts, at = [], [], 0
        with open(group_file(self.folder, self.part, use.group), "wb") as out:
            for i, data in pieces:
                if len(data) == self.samples[i].size:  # else missing: counted unreadable when its batch comes
                    out.write(data)
                    found.append(i)
                    starts.append(at)
                    at += len(data)
        if found:  # only once the file is whole: no batch reads it before `fetch` returns
            self.located[found] = torch.tensor(starts, dtype=torch.int64)

    def shard_members(self, wanted: Sequence[int]) -> Iterator[tuple[int, bytes]]:
        """The members of one shard at the offsets the index found them (`shards.read_members`)."""
        first = self.samples[wanted[0]]
        at_offset = {self.samples[i].offset: i for i in wanted}
        members = [(self.samples[i].offset, self.samples[i].size) for i in wanted]
        uri = S3Uri(self.index.bucket, first.source)
        for offset, data in read_members(self.store, uri, self.index.shards[first.source], first.etag, members):
            yield at_offset[offset], data

    def objects_of(self, wanted: Sequence[int]) -> Iterator[tuple[int, bytes]]:
        """Loose images (a virtual group's), OBJECT_THREADS GETs at a time; one grown since its listing fails."""

        def get(i: int) -> tuple[int, bytes]:
            sample = self.samples[i]
            return i, self.store.get_bytes(S3Uri(self.index.bucket, sample.key), max_bytes=sample.size)

        return self.objects.map(get, wanted)

    def drop(self, use: GroupUse) -> None:
        self.located[use.members] = -1
        group_file(self.folder, self.part, use.group).unlink(missing_ok=True)


class GroupImages(Dataset[Any]):
    """`files`'s items (the task's dataset: `data.ImageFiles`' labels and transform, or
    `detection_data.DetectionFiles`' boxes) with their images read from a window's group files: the
    image's bytes at the place `Fetcher.located` records, decoded in the loader process and handed to
    `files.item`. `files` lists the window's samples in the same order (both come from the task's index,
    filtered alike). An image not on disk (missing from its shard, or a size other than the indexed one)
    is an OSError (`Readable`)."""

    def __init__(self, window: Window, files: Any) -> None:
        fetcher: Fetcher = window.fetcher
        if len(files) != len(fetcher.samples):
            raise DataError(f"{fetcher.part}: {len(files)} items for the {len(fetcher.samples)} images it streams")
        self.folder, self.part, self.located = fetcher.folder, fetcher.part, fetcher.located
        self.groups, self.sizes = list(window.groups), [s.size for s in fetcher.samples]
        self.files = files

    def __len__(self) -> int:
        return len(self.files)

    def __getitem__(self, i: int) -> Any:
        start = int(self.located[i])
        if start < 0:
            raise FileNotFoundError(f"image {i} is not on disk: missing from its shard, or not its indexed size")
        with open(group_file(self.folder, self.part, self.groups[i]), "rb") as file:
            data = os.pread(file.fileno(), self.sizes[i], start)
        with open_image(io.BytesIO(data)) as image:
            rgb = image.convert("RGB")
        return self.files.item(i, rgb)


class Window:
    """One worker's groups on disk for the batches it reads (see the module): fetched ahead within `budget`
    bytes, dropped `lag` batches past their last use."""

    def __init__(self, fetcher: Fetcher, groups: Sequence[int], budget: int, lag: int) -> None:
        self.fetcher, self.groups, self.budget, self.lag = fetcher, groups, budget, lag
        self.held = 0  # bytes of the groups fetched or being fetched, not yet dropped
        self.peak = 0
        # Groups of the last run still on disk: the loader may still read them when the sampler is done.
        # Dropped when this window or a peer (the other part's window on the same budget) runs next, which
        # the loop does only once the loader has delivered every batch of the last run.
        self.leftover: list[GroupUse] = []
        self.peers: list[Window] = [self]

    def release(self) -> None:
        for use in self.leftover:
            self.fetcher.drop(use)
        self.leftover, self.held = [], 0

    def check(self, plan: Sequence[GroupUse]) -> None:
        need = peak_bytes(plan, self.lag)
        if need > self.budget:
            raise DataError(
                f"data.cache.sizeLimit: this worker's share of it ({self.budget:,} bytes) cannot hold the "
                f"{need:,} bytes its shuffle window and loader prefetch need at once: give a larger sizeLimit, "
                "smaller shards, or fewer workers per node"
            )

    def run(self, batches: Sequence[list[Any]], index_of: Callable[[Any], int]) -> Iterator[list[Any]]:
        for peer in self.peers:
            peer.release()
        plan = plan_groups([[index_of(k) for k in b] for b in batches], self.groups, self.fetcher.samples)
        self.check(plan)
        pending, started = deque(plan), dict[int, tuple[GroupUse, Future[None]]]()
        pool = ThreadPoolExecutor(max_workers=STREAM_THREADS, thread_name_prefix="stream-groups")
        try:
            for number, batch in enumerate(batches):
                for group, (use, _) in list(started.items()):
                    if use.last + self.lag < number:
                        self.fetcher.drop(started.pop(group)[0])
                        self.held -= use.size
                self.start(pool, pending, started, number)
                for use, future in started.values():
                    if use.first <= number:
                        future.result()
                yield batch
        finally:
            pool.shutdown(wait=True, cancel_futures=True)
            self.leftover = [use for use, _ in started.values()]

    def start(self, pool: ThreadPoolExecutor, pending: deque[GroupUse], started: dict[Any, Any], number: int) -> None:
        """Fetches for the groups batch `number` needs, then for later ones while the budget and threads allow."""
        while pending and self.held + pending[0].size <= self.budget:
            use = pending[0]
            in_flight = sum(1 for _, future in started.values() if not future.done())
            if use.first > number and in_flight >= STREAM_THREADS:
                break
            pending.popleft()
            self.held += use.size
            self.peak = max(self.peak, self.held)
            started[use.group] = (use, pool.submit(self.fetcher.fetch, use))
        if pending and pending[0].first <= number:  # `check` rules this out; never wait for what cannot come
            raise DataError(f"data.cache.sizeLimit: {self.budget:,} bytes cannot hold batch {number}'s images")


class StreamOrder(EpochOrder):
    """`EpochOrder` over the grouped order (`grouped_order`), its batches handed out through a `Window`."""

    def __init__(self, size: int, *, window: Window, shuffle: int, **kwargs: Any) -> None:
        super().__init__(size, **kwargs)
        self.window, self.shuffle = window, shuffle

    def order(self) -> list[int]:
        order = grouped_order(self.window.groups, self.seed, self.epoch, self.shuffle)
        while len(order) < self.padded:
            order += order[: self.padded - len(order)]
        return order

    def arrange(self, batches: Iterator[list[tuple[int, int]]]) -> Iterator[list[tuple[int, int]]]:
        return self.window.run(list(batches), lambda key: key[1])


class StreamEval(Sampler[list[int]]):
    """This worker's validation batches (every world-th image, exactly once across workers) in group order,
    through a `Window`."""

    def __init__(self, window: Window, batch_size: int, rank: int, world: int) -> None:
        mine = sorted(range(rank, len(window.groups), world), key=lambda i: (window.groups[i], i))
        self.batches = [mine[n : n + batch_size] for n in range(0, len(mine), batch_size)]
        self.window = window

    def __iter__(self) -> Iterator[list[int]]:
        return self.window.run(self.batches, int)

    def __len__(self) -> int:
        return len(self.batches)


# -- unreadable images --------------------------------------------------------------------------------


class Readable(Dataset[Any]):
    """`dataset` with an image that does not decode (or is missing from its shard) as None, not an error."""

    def __init__(self, dataset: Any) -> None:
        self.dataset = dataset

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, i: Any) -> Any:
        try:
            return self.dataset[i]
        except (OSError, ValueError, SyntaxError, Image.DecompressionBombError):  # what PIL raises for bad files
            return None


class ReadableBatches:
    """A collate function that leaves out the None of `Readable` (the loop counts them as unreadable)."""

    def __init__(self, collate: Callable[[Any], Any] | None) -> None:
        self.collate = collate or default_collate

    def __call__(self, batch: Sequence[Any]) -> Any:
        readable = [item for item in batch if item is not None]
        if not readable:
            raise DataError(f"none of the {len(batch)} images of a batch could be read (see the unreadable count)")
        return self.collate(readable)


# -- a worker's setup ---------------------------------------------------------------------------------


def stream_root(store: S3Store, index: DatasetIndex) -> Path:
    """The node cache's folder of this dataset's group files, the workers' folders below it."""
    return cache_root() / "stream" / digest(store.endpoint, index.bucket, index.cache_key)


def stream_folder(store: S3Store, index: DatasetIndex, rank: int) -> Path:
    """This worker's stream folder, emptied of what an earlier attempt left there."""
    folder = stream_root(store, index) / f"rank-{rank}"
    shutil.rmtree(folder, ignore_errors=True)
    folder.mkdir(parents=True, exist_ok=True)
    return folder


def loader_lag(loader_workers: int) -> int:
    """Batches a DataLoader may still be reading when its sampler hands out the next: it keeps
    prefetch_factor (2) per loader process in flight and asks for a new index only once the oldest has
    arrived whole, so 2N - 1; one more to spare. Without loader processes a batch is read before the next
    is asked for."""
    return 2 * loader_workers


@dataclass
class StreamSetup:
    """A worker's windows over its train and validation images, and the train order's shuffle."""

    train: Window
    validation: Window
    shuffle: int


def stream_setup(
    store: S3Store,
    config: TrainerConfig,
    index: DatasetIndex,
    rank: int,
    local_world: int,
    lag: int,
    weights_bytes: int = 0,
) -> StreamSetup:
    limit = image_room(config, weights_bytes)
    budget = limit // max(1, local_world)
    folder = stream_folder(store, index, rank)
    train_groups = sample_groups(index.train, limit)
    val_groups = sample_groups(index.validation, limit)
    shuffle = shuffle_window(group_bytes(index.train, train_groups), limit)
    train = Window(Fetcher(store, index, index.train, folder, "train"), train_groups, budget, lag)
    validation = Window(Fetcher(store, index, index.validation, folder, "validation"), val_groups, budget, lag)
    train.peers = validation.peers = [train, validation]  # one budget: never both on disk at once
    return StreamSetup(train, validation, shuffle)


def stream_datasets(setup: StreamSetup, files: tuple[Any, Any]) -> tuple[Readable, Readable]:
    """The task's training and validation datasets (`data.ImageFiles` or `detection_data.DetectionFiles`)
    read from the windows' group files instead of the node cache, an unreadable image as None."""
    return Readable(GroupImages(setup.train, files[0])), Readable(GroupImages(setup.validation, files[1]))
