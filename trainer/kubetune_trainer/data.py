"""Images from S3 in ImageFolder layout (<prefix>/<class>/<image>), cached on each node, and their transforms.

The driver lists the bucket once (class folders in parallel) and decides the split: classes are the
sorted folder names, validation is `data.validation` or a seeded, per-class split of train. Each node
then downloads the listed images once into a local cache with many boto3 threads, decoding each image
as it arrives; unreadable ones are skipped and counted, and more than MAX_CORRUPT_FRACTION of them
fails the run. Training reads local files through a plain torch DataLoader.

Whoever can write to the bucket chooses the keys and the bytes, so both are bounded: a key that would
leave the cache folder (`localpaths`) is refused at listing and counted like an unreadable image, as is
an image over MAX_IMAGE_BYTES (never downloaded), over MAX_IMAGE_PIXELS (never decoded) or in another
format than IMAGE_FORMATS (PIL would otherwise open whatever it recognises, EPS or PSD included). A
key that is also the folder of another (`x/a.png` beside `x/a.png/b.png`: S3 allows both, a disk does
not) is refused when the images are cached (`cache_refusals`), counted the same way.

Why a node cache rather than Ray Data streaming from S3: fine-tuning sets are small enough to fit a
node's disk, are read once per epoch for several epochs, and a map-style dataset keeps the
DistributedSampler's exact sharding, seeded shuffling and exact resume; the download is paid once per
node instead of once per epoch, and later epochs read at local-disk speed.
"""

from __future__ import annotations

import bisect
import io
import json
import logging
import os
import random
import threading
from collections.abc import Callable, Iterable, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, Protocol, TypeVar

import torch
from PIL import Image, UnidentifiedImageError

from kubetune_trainer.augment import build_transforms
from kubetune_trainer.cache import cache_root, digest, node_lock
from kubetune_trainer.config import MAX_CLASSES, DataSpec
from kubetune_trainer.errors import ConfigError, DataError, first_line
from kubetune_trainer.localpaths import local_path, unsafe_reason
from kubetune_trainer.shards import SHARD_THREADS, extract_members, member_runs, read_run, write_atomically
from kubetune_trainer.storage import (
    DOWNLOAD_THREADS,
    MAX_LISTED_OBJECTS,
    ObjectInfo,
    S3Store,
    S3Uri,
    listing_too_long,
)

log = logging.getLogger(__name__)

IMAGE_SUFFIXES = (".jpg", ".jpeg", ".png", ".webp")
# What PIL may open an image as, whatever its suffix says (a phone's JPEG may be a PNG inside).
IMAGE_FORMATS = ("JPEG", "PNG", "WEBP")
MAX_CORRUPT_FRACTION = 0.01
EXAMPLES = 5  # unreadable images named in a message
# PIL's own decompression-bomb threshold (Image.MAX_IMAGE_PIXELS, where it only warns), made a refusal
# whatever a library sets PIL's to: 0.25 GiB as RGB. A file over MAX_IMAGE_BYTES is not even downloaded.
MAX_IMAGE_PIXELS = 89_478_485
MAX_IMAGE_BYTES = 256 * 1024 * 1024
LIST_THREADS = 16
FIRST_PAGE_KEYS = 1000  # S3's largest page


@dataclass(frozen=True)
class Sample:
    """One image: its key in the bucket, its class index, and size/ETag to validate the cached copy.

    An image inside a WebDataset shard has the shard's key as `source` and `<shard key>/<member name>` as
    its key (its path in the node cache), its member's size, the shard's ETag, and `offset`: where the
    member's bytes start in the shard, as tarfile found it when the driver indexed it (stream mode reads
    them from there, `stream.Fetcher`)."""

    key: str
    label: int
    size: int
    etag: str
    source: str = ""
    offset: int = -1

    def wire(self) -> list[Any]:
        return [self.key, self.label, self.size, self.etag, *([self.source, self.offset] if self.source else [])]

    @classmethod
    def from_wire(cls, row: Sequence[Any]) -> Sample:
        source, offset = str(row[4]) if len(row) > 4 else "", int(row[5]) if len(row) > 5 else -1
        return cls(str(row[0]), int(row[1]), int(row[2]), str(row[3]), source, offset)


@dataclass
class DatasetIndex:
    """What a run trains and validates on; made by the driver, shipped to the workers."""

    bucket: str
    class_names: list[str]
    train: list[Sample]
    validation: list[Sample]
    ignored_objects: int = 0
    corrupt: dict[str, str] = field(default_factory=dict)
    # Digest of the full listing (keys, ETags, sizes): names the node cache of this dataset.
    cache_key: str = ""
    # The WebDataset shards the samples come from (key → size), if any (`Sample.source`).
    shards: dict[str, int] = field(default_factory=dict)
    # data.test's images: judged once after training with the exported model (not trained or validated on).
    test: list[Sample] = field(default_factory=list)

    def __post_init__(self) -> None:
        if not self.cache_key:
            self.cache_key = digest(sorted((s.key, s.etag, s.size) for s in self.samples))

    @property
    def samples(self) -> list[Sample]:
        return self.train + self.validation + self.test

    def wire(self) -> dict[str, Any]:
        # Tuples rather than dicts: an index can hold a million samples.
        return {
            "bucket": self.bucket,
            "classNames": self.class_names,
            "train": [s.wire() for s in self.train],
            "validation": [s.wire() for s in self.validation],
            "test": [s.wire() for s in self.test],
            "ignoredObjects": self.ignored_objects,
            "corrupt": self.corrupt,
            "cacheKey": self.cache_key,
            "shards": self.shards,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> DatasetIndex:
        return cls(
            bucket=data["bucket"],
            class_names=list(data["classNames"]),
            train=[Sample.from_wire(row) for row in data["train"]],
            validation=[Sample.from_wire(row) for row in data["validation"]],
            ignored_objects=int(data.get("ignoredObjects", 0)),
            corrupt=dict(data.get("corrupt", {})),
            cache_key=str(data.get("cacheKey", "")),
            shards={str(k): int(v) for k, v in data.get("shards", {}).items()},
            test=[Sample.from_wire(row) for row in data.get("test", [])],
        )

    def without_corrupt(self, corrupt: Mapping[str, str]) -> DatasetIndex:
        return DatasetIndex(
            bucket=self.bucket,
            class_names=self.class_names,
            train=[s for s in self.train if s.key not in corrupt],
            validation=[s for s in self.validation if s.key not in corrupt],
            ignored_objects=self.ignored_objects,
            corrupt=dict(corrupt),
            cache_key=self.cache_key,
            shards=self.shards,
            test=[s for s in self.test if s.key not in corrupt],
        )


# -- listing and splitting (driver) ---------------------------------------------------------------


def is_image(key: str) -> bool:
    return key.lower().endswith(IMAGE_SUFFIXES)


@dataclass
class Listing:
    """An ImageFolder as listed: images per class folder, other objects ignored, and the image keys
    refused because they would leave the cache folder (key → why)."""

    by_class: dict[str, list[ObjectInfo]]
    ignored: int
    refused: dict[str, str]


def refusal(key: str) -> str | None:
    """Why an image key cannot be cached (counted like an unreadable image), or None."""
    reason = unsafe_reason(key)
    return f"refused: the key {reason}" if reason else None


# Why an image key another key lies below is refused (`folder_clashes`): S3 allows both, a folder does not.
FOLDER_CLASH = "refused: the key is also the folder of another image's key"


def list_image_folder(store: S3Store, prefix: S3Uri) -> Listing:
    """Images per class folder under `prefix` (nested folders belong to their class), the count of
    other objects ignored in them, and the image keys refused (a folder named "." or ".." is no class:
    its images are refused).

    A dataset that fits one listing page is listed with that one request; a bigger one is listed per
    class folder in parallel, since S3 pages through one prefix 1,000 keys at a time.
    """
    listed = _list_classes(store, prefix)
    if not listed:
        raise DataError(
            f"no class folders under {prefix}/: expected images at {prefix}/<class>/<image>{'.jpg/.jpeg/.png/.webp'}"
        )
    out = Listing({}, 0, {})
    for name in sorted(listed):
        images = sorted((o for o in listed[name] if is_image(o.key)), key=lambda o: o.key)
        out.ignored += len(listed[name]) - len(images)
        out.refused.update((o.key, why) for o in images if (why := refusal(o.key)))
        if unsafe_reason(name) is None:
            out.by_class[name] = [o for o in images if o.key not in out.refused]
    return out


def _list_classes(store: S3Store, prefix: S3Uri) -> dict[str, list[ObjectInfo]]:
    """Every object under `prefix` by class folder, at most MAX_LISTED_OBJECTS in all."""
    base = prefix.folder
    first, complete = store.list_first_page(prefix, FIRST_PAGE_KEYS)
    listed: dict[str, list[ObjectInfo]] = {}
    if complete:
        for info in first:
            name, sep, _ = info.key[len(base) :].partition("/")
            if sep and name:  # files directly under the prefix belong to no class
                listed.setdefault(name, []).append(info)
        return listed
    classes = store.list_folders(prefix, MAX_CLASSES)
    return dict(zip(classes, list_prefixes(store, [prefix.join(name) for name in classes], prefix), strict=True))


def list_prefixes(store: S3Store, prefixes: Sequence[S3Uri], where: S3Uri) -> list[list[ObjectInfo]]:
    """Every object under each prefix, listed in parallel, at most MAX_LISTED_OBJECTS in all (StorageError
    naming `where` past that)."""
    total = [0]
    lock = threading.Lock()

    def list_one(prefix: S3Uri) -> list[ObjectInfo]:
        # Each listing may take what the finished ones left; at most LIST_THREADS run past the limit at once.
        objects = store.list_objects(prefix, MAX_LISTED_OBJECTS - total[0])
        with lock:
            total[0] += len(objects)
            if total[0] > MAX_LISTED_OBJECTS:
                raise listing_too_long(where, MAX_LISTED_OBJECTS)
        return objects

    with ThreadPoolExecutor(max_workers=min(LIST_THREADS, max(1, len(prefixes)))) as pool:
        return list(pool.map(list_one, prefixes))


class Keyed(Protocol):
    @property
    def key(self) -> str: ...


K = TypeVar("K", bound=Keyed)


def split_per_class(
    by_class: Mapping[str, Sequence[K]], fraction: float, seed: int
) -> tuple[dict[str, list[K]], dict[str, list[K]]]:
    """A seeded split that keeps every class in both parts when it has two images or more.

    The same keys, fraction and seed give the same split, whatever order S3 listed them in.
    """
    train: dict[str, list[K]] = {}
    validation: dict[str, list[K]] = {}
    for name, objects in by_class.items():
        ordered = sorted(objects, key=lambda o: o.key)
        random.Random(f"{seed}/{name}").shuffle(ordered)
        n_val = round(len(ordered) * fraction)
        n_val = max(1, min(n_val, len(ordered) - 1)) if len(ordered) >= 2 else 0
        validation[name] = sorted(ordered[:n_val], key=lambda o: o.key)
        train[name] = sorted(ordered[n_val:], key=lambda o: o.key)
    return train, validation


def list_subset(
    store: S3Store, uri: str, field_name: str, train_prefix: S3Uri, class_names: Sequence[str]
) -> tuple[dict[str, list[ObjectInfo]], int, dict[str, str]]:
    """data.validation's or data.test's class folders: in train's bucket, each one a class of train."""
    prefix = S3Uri.parse(uri)
    if prefix.bucket != train_prefix.bucket:
        raise ConfigError(f"{field_name}: must be in the bucket of data.train ({train_prefix.bucket})")
    listing = list_image_folder(store, prefix)
    check_known_classes(listing.by_class, class_names, f"class folder(s) {{}} under {prefix}/", f"{train_prefix}/")
    return listing.by_class, listing.ignored, dict(listing.refused)


def build_index(store: S3Store, data: DataSpec, num_classes: int | None, seed: int) -> DatasetIndex:
    """List the dataset, name the classes and split it: everything the workers need to load it."""
    train_prefix = S3Uri.parse(data.train)
    listing = list_image_folder(store, train_prefix)
    by_class, ignored, refused = listing.by_class, listing.ignored, dict(listing.refused)
    empty = [c for c, images in by_class.items() if not images]
    if empty:
        raise DataError(
            f"class folder(s) {', '.join(repr(c) for c in empty)} under {train_prefix}/ hold no images "
            f"({'/'.join(IMAGE_SUFFIXES)})"
        )
    class_names = sorted(by_class)
    check_class_count(num_classes, class_names, f"class folders under {train_prefix}/")
    if data.validation:
        val_by_class, val_ignored, val_refused = list_subset(
            store, data.validation, "data.validation", train_prefix, class_names
        )
        ignored += val_ignored
        refused.update(val_refused)
        train_split, val_split = dict(by_class), val_by_class
    else:
        train_split, val_split = split_per_class(by_class, data.validation_split, seed)
    test_split: dict[str, list[ObjectInfo]] = {}
    if data.test:
        test_split, test_ignored, test_refused = list_subset(store, data.test, "data.test", train_prefix, class_names)
        ignored += test_ignored
        refused.update(test_refused)

    label = {name: i for i, name in enumerate(class_names)}

    def samples(split: Mapping[str, Sequence[ObjectInfo]]) -> list[Sample]:
        return [Sample(o.key, label[c], o.size, o.etag) for c in sorted(split) for o in split[c]]

    index = DatasetIndex(
        train_prefix.bucket,
        class_names,
        samples(train_split),
        samples(val_split),
        ignored,
        corrupt=refused,
        test=samples(test_split),
    )
    check_validation(index, f"{train_prefix}/")
    return index


def check_class_count(num_classes: int | None, class_names: Sequence[str], what: str) -> None:
    """model.numClasses, when given, must be the number of classes the data has (`what` names them)."""
    if num_classes is not None and num_classes != len(class_names):
        raise ConfigError(
            f"model.numClasses: {num_classes} does not match the {len(class_names)} {what} "
            f"({', '.join(class_names[:10])}{', …' if len(class_names) > 10 else ''})"
        )


def check_known_classes(validation: Iterable[str], class_names: Sequence[str], what: str, train: object) -> None:
    """Validation may only hold classes of train; `what` says where, with {} for the unknown names."""
    unknown = sorted(set(validation) - set(class_names))
    if unknown:
        raise DataError(f"{what.format(', '.join(repr(c) for c in unknown[:10]))} are not classes of {train}")


def check_validation(index: DatasetIndex, train: str) -> None:
    if not index.validation:
        raise DataError(f"no validation images: give data.validation or put at least 2 images per class in {train}")


# -- the node cache (workers, or the driver when it shares the node) -------------------------------


def dataset_dir(store: S3Store, index: DatasetIndex, root: Path | None = None) -> Path:
    """The cache folder of this listing: a changed, added or removed image gives a new one."""
    return (root or cache_root()) / "datasets" / digest(store.endpoint, index.bucket, index.cache_key)


def open_image(path: Path | str | IO[bytes]) -> Image.Image:
    """PIL's image of `path` (header read, not decoded yet), refused unless it is one of IMAGE_FORMATS
    and within MAX_IMAGE_PIXELS."""
    image = Image.open(path, formats=IMAGE_FORMATS)
    if image.width * image.height > MAX_IMAGE_PIXELS:
        image.close()
        raise Image.DecompressionBombError(
            f"{image.width}x{image.height} pixels, more than the {MAX_IMAGE_PIXELS:,} allowed"
        )
    return image


def verify_image(path: Path) -> str | None:
    """None when the image decodes, else why not.

    A JPEG is decoded at 1/8 scale: that still reads every compressed byte, so a truncated or garbled
    file fails just the same, for a fraction of a full decode (which the first epoch does anyway).
    """
    try:
        with open_image(path) as image:
            if image.format in ("JPEG", "MPO"):
                image.draft("RGB", (max(1, image.width // 8), max(1, image.height // 8)))
            image.convert("RGB")
    except UnidentifiedImageError:
        return f"UnidentifiedImageError: not a {', '.join(IMAGE_FORMATS)} image"
    except Exception as error:  # PIL raises many types for bad files; any of them means unreadable.
        return first_line(error, 200)
    return None


def prepare_images(store: S3Store, index: DatasetIndex, root: Path | None = None) -> tuple[Path, dict[str, str]]:
    """Download and decode-check the images of `index` once per node; returns the folder and the
    unreadable images (key → reason; the index's own `corrupt`, e.g. keys refused at listing, included).
    Other processes on the node wait for the first one, then find every image already checked in the
    folder's `checked.json`."""
    folder = dataset_dir(store, index, root)
    checked_file = folder / "checked.json"
    folder.mkdir(parents=True, exist_ok=True)  # even when every image is refused unread
    with node_lock(folder):
        checked: dict[str, str | None] = json.loads(checked_file.read_text()) if checked_file.is_file() else {}
        todo = [s for s in index.samples if _needs_check(folder, index.bucket, s, checked)]
        if todo:
            checked.update(cache_samples(store, index, folder, todo, cache_refusals(index.samples)))
            tmp = checked_file.with_suffix(".tmp")
            tmp.write_text(json.dumps(checked))
            os.replace(tmp, checked_file)
    corrupt = {**index.corrupt, **{s.key: reason for s in index.samples if (reason := checked.get(s.key))}}
    return folder, corrupt


def folder_clashes(keys: Iterable[str]) -> set[str]:
    """The keys another key lies below (`x/a.png` beside `x/a.png/b.png`): in one folder such a key would
    have to be a file and a folder at once."""
    ordered = sorted(set(keys))
    clashes = set()
    for key in ordered:
        at = bisect.bisect_left(ordered, key + "/")  # the keys below `key`, if any, sort from here on
        if at < len(ordered) and ordered[at].startswith(key + "/"):
            clashes.add(key)
    return clashes


def cache_refusals(samples: Sequence[Sample]) -> dict[str, str]:
    """Why each image of `samples` cannot be a file of one cache folder (key → why): its key would leave
    the folder (`refusal`), or it is the folder of another image's key (`FOLDER_CLASH`)."""
    refused = {s.key: why for s in samples if (why := refusal(s.key))}
    clashes = folder_clashes(s.key for s in samples if s.key not in refused)
    return refused | dict.fromkeys(sorted(clashes), FOLDER_CLASH)


Unpack = Callable[[S3Store, DatasetIndex, Path, Sequence[Sample]], None]


def cache_samples(
    store: S3Store,
    index: DatasetIndex,
    folder: Path,
    samples: Sequence[Sample],
    refused: Mapping[str, str],
    unpack: Unpack | None = None,
) -> dict[str, str | None]:
    """`samples` of `index` written into `folder` (`local_path` of each key) and decode-checked: key →
    why it is unreadable, or None. `refused` (`cache_refusals` of every image the folder may hold) are
    never written. Shard members come by `unpack` (`unpack_shards` unless told)."""
    (unpack or unpack_shards)(store, index, folder, [s for s in samples if s.source and s.key not in refused])

    def ensure(sample: Sample) -> tuple[str, str | None]:
        if sample.key in refused:
            return sample.key, refused[sample.key]
        if sample.size > MAX_IMAGE_BYTES:
            return sample.key, f"refused: {sample.size:,} bytes, more than the {MAX_IMAGE_BYTES:,} allowed"
        path = local_path(folder, sample.key, f"s3://{index.bucket}/{sample.key}")
        if not (path.is_file() and path.stat().st_size == sample.size):
            if sample.source:  # unpack_shards wrote every member it found whole
                return sample.key, f"missing: not found whole in s3://{index.bucket}/{sample.source}"
            store.download_file(S3Uri(index.bucket, sample.key), path, size=sample.size)
        return sample.key, verify_image(path)

    with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS, thread_name_prefix="images") as pool:
        return dict(pool.map(ensure, samples))


def unpack_shards(store: S3Store, index: DatasetIndex, folder: Path, samples: Sequence[Sample]) -> None:
    """The image members of `samples` written from their WebDataset shards, one streamed read a shard,
    several shards at a time (`shards.extract_members`: regular members only, sizes as indexed)."""
    by_shard: dict[str, dict[str, tuple[int, Path]]] = {}
    for sample in samples:
        if sample.size <= MAX_IMAGE_BYTES:
            path = local_path(folder, sample.key, f"s3://{index.bucket}/{sample.key}")
            by_shard.setdefault(sample.source, {})[sample.key[len(sample.source) + 1 :]] = (sample.size, path)

    def unpack(shard: str) -> None:
        uri = S3Uri(index.bucket, shard)
        extract_members(store, uri, index.shards[shard], by_shard[shard], MAX_IMAGE_BYTES)

    with ThreadPoolExecutor(max_workers=min(SHARD_THREADS, len(by_shard)) or 1, thread_name_prefix="shards") as pool:
        list(pool.map(unpack, sorted(by_shard)))


def unpack_ranges(store: S3Store, index: DatasetIndex, folder: Path, samples: Sequence[Sample]) -> None:
    """The image members of `samples` written from their WebDataset shards at the offsets the index found
    (`shards.member_runs`: one ranged GET a run of nearby members, If-Match the indexed ETag), several
    runs at a time: members of a shard that are not wanted are not downloaded (`evaluation.paged`'s pages
    hold a part of a shard where the judged order leaves it)."""
    wanted = [s for s in samples if s.size <= MAX_IMAGE_BYTES]
    at = {(s.source, s.offset): s for s in wanted}
    runs = [
        (shard, run)
        for shard in sorted({s.source for s in wanted})
        for run in member_runs([(s.offset, s.size) for s in wanted if s.source == shard])
    ]

    def unpack(shard: str, run: Sequence[tuple[int, int]]) -> None:
        etag = at[(shard, run[0][0])].etag
        for offset, data in read_run(store, S3Uri(index.bucket, shard), etag, run):
            sample = at[(shard, offset)]
            path = local_path(folder, sample.key, f"s3://{index.bucket}/{sample.key}")
            write_atomically(path, io.BytesIO(data).read)

    with ThreadPoolExecutor(max_workers=DOWNLOAD_THREADS, thread_name_prefix="ranges") as pool:
        list(pool.map(lambda job: unpack(*job), runs))


def _needs_check(folder: Path, bucket: str, sample: Sample, checked: Mapping[str, str | None]) -> bool:
    """Not checked yet, or found readable but its file is gone since (a readable image's key is safe)."""
    if sample.key not in checked:
        return True
    return checked[sample.key] is None and not local_path(folder, sample.key, f"s3://{bucket}/{sample.key}").is_file()


def check_corrupt(index: DatasetIndex, corrupt: Mapping[str, str]) -> None:
    """Fail when more than MAX_CORRUPT_FRACTION of the images are unreadable; else log what is skipped."""
    if not corrupt:
        return
    total = len({s.key for s in index.samples} | set(corrupt))  # refused keys never became samples
    examples = "; ".join(f"s3://{index.bucket}/{k} ({why})" for k, why in sorted(corrupt.items())[:EXAMPLES])
    share = len(corrupt) / total
    if share > MAX_CORRUPT_FRACTION:
        raise DataError(
            f"{len(corrupt)} of {total} images ({share:.1%}) are corrupt or unreadable, more than the "
            f"{MAX_CORRUPT_FRACTION:.0%} allowed; e.g. {examples}"
        )
    log.warning("skipping %d unreadable image(s) of %d: %s", len(corrupt), total, examples)


# -- torch side (workers) -------------------------------------------------------------------------


class ImageFiles(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    """Local image files and their labels, decoded to RGB and transformed on access."""

    def __init__(self, paths: Sequence[Path], labels: Sequence[int], transform: Callable[[Any], Any]) -> None:
        self.paths = [str(p) for p in paths]
        self.labels = list(labels)
        self.transform = transform

    def __len__(self) -> int:
        return len(self.paths)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        with open_image(self.paths[i]) as image:
            rgb = image.convert("RGB")
        return self.item(i, rgb)

    def item(self, i: int, rgb: Image.Image) -> tuple[torch.Tensor, int]:
        """Image `i`'s training item from its decoded pixels (stream mode decodes them from its group
        file: `stream.GroupImages`)."""
        return self.transform(rgb), self.labels[i]


def image_files(
    folder: Path, index: DatasetIndex, samples: Sequence[Sample], transform: Callable[[Any], Any]
) -> ImageFiles:
    """`samples` of `index` as a dataset over the node cache in `folder`."""
    paths = [local_path(folder, s.key, f"s3://{index.bucket}/{s.key}") for s in samples]
    return ImageFiles(paths, [s.label for s in samples], transform)


def datasets(
    folder: Path, index: DatasetIndex, data_cfg: Mapping[str, Any], augment: str, rand_augment: str | None = None
) -> tuple[ImageFiles, ImageFiles]:
    """Training images with the `augment` policy's transform (and timm's RandAugment by `rand_augment`:
    `augment.build_transforms`), validation images with the evaluation one."""
    train_tf, eval_tf = build_transforms(data_cfg, augment, rand_augment)
    return image_files(folder, index, index.train, train_tf), image_files(folder, index, index.validation, eval_tf)
