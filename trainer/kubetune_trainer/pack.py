"""`kubetune data pack SRC DEST`: an ImageFolder or COCO dataset as WebDataset shards, or as a manifest.

SRC and DEST are local folders or s3:// prefixes (S3 as `kubetune run --local` reaches it: --s3-endpoint,
else AWS_ENDPOINT_URL; credentials from the environment). The samples are sorted by name, then dealt in
a seeded shuffle (--seed) so that every shard mixes the classes, and written as shards
`<DEST>/train-000000.tar`, ... within --shard-size samples and --max-shard-bytes each
(`pack_writers`); with --to manifest, `<DEST>/train.csv` (classification) or `<DEST>/train.jsonl`
(detection) naming the images where they are. --validation packs a second part the same way. Existing
files are replaced only with --overwrite; a failure removes what this pack wrote. stdout gets the
`data:` values to paste into a FineTuneJob; stderr a progress bar (on a terminal, without --quiet) and
what was left out.
"""

from __future__ import annotations

import os
import random
import re
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from functools import partial
from pathlib import Path
from typing import TextIO

from pydantic import ValidationError

from kubetune_trainer.config import DEFAULT_REGION, MAX_SHARDS, StorageSpec, prefixes_overlap
from kubetune_trainer.errors import DataError, TrainerError
from kubetune_trainer.pack_sources import (
    Folder,
    Gathered,
    Item,
    LocalFolder,
    S3Folder,
    coco_dataset,
    image_folder,
    read_annotations,
)
from kubetune_trainer.pack_writers import (
    Destination,
    LocalDestination,
    Published,
    S3Destination,
    check_free,
    manifest_text,
    plan_shards,
    read_ahead,
    shard_name,
    shard_pattern,
    write_tar,
)
from kubetune_trainer.reporting import format_duration
from kubetune_trainer.shards import MAX_SHARD_BYTES, MAX_SHARD_MEMBERS
from kubetune_trainer.storage import S3Store, S3Uri, resolve_endpoint

MiB = 1024 * 1024
DEFAULT_SHARD_SAMPLES = 10_000
DEFAULT_SHARD_BYTES = 256 * MiB
MIN_SHARD_BYTES = MiB
MAX_SHARD_SAMPLES = MAX_SHARD_MEMBERS // 2  # an image and a label member each
EXAMPLES = 5
UNITS = {"": 1, "k": 1000, "kb": 1000, "kib": 1024, "m": 1000**2, "mb": 1000**2, "mib": MiB, "g": 1000**3}
UNITS |= {"gb": 1000**3, "gib": 1024**3}
TARGETS = ("webdataset", "manifest")
SIZE = re.compile(r"^\s*([0-9]+(?:\.[0-9]+)?)\s*([a-z]*)\s*$", re.I)


@dataclass(frozen=True)
class PackOptions:
    src: str
    dest: str
    to: str = "webdataset"
    annotations: str | None = None
    validation: str | None = None
    validation_annotations: str | None = None
    shard_size: int = DEFAULT_SHARD_SAMPLES
    max_shard_bytes: str = f"{DEFAULT_SHARD_BYTES // MiB}MiB"
    seed: int = 0
    s3_endpoint: str | None = None
    region: str | None = None
    overwrite: bool = False
    quiet: bool = False


class ArgumentError(Exception):
    """A command-line value that cannot work; the message names the argument."""


def byte_size(text: str) -> int:
    """`256MiB`, `1G`, `500000` as bytes, within MIN_SHARD_BYTES..MAX_SHARD_BYTES."""
    match = SIZE.match(text)
    if not match or match.group(2).lower() not in UNITS:
        raise ArgumentError(f"--max-shard-bytes: a size like 256MiB, 1GB or 500000 (got {text!r})")
    size = int(float(match.group(1)) * UNITS[match.group(2).lower()])
    if not MIN_SHARD_BYTES <= size <= MAX_SHARD_BYTES:
        raise ArgumentError(
            f"--max-shard-bytes: {MIN_SHARD_BYTES:,} to {MAX_SHARD_BYTES:,} bytes, the most a shard may have (got {text})"
        )
    return size


def check_options(options: PackOptions) -> int:
    """The options' rules across arguments; returns --max-shard-bytes in bytes."""
    if options.to not in TARGETS:
        raise ArgumentError(f"--to: one of {', '.join(TARGETS)} (got {options.to})")
    if not 1 <= options.shard_size <= MAX_SHARD_SAMPLES:
        raise ArgumentError(f"--shard-size: 1 to {MAX_SHARD_SAMPLES:,} samples (got {options.shard_size})")
    if options.validation_annotations and not (options.annotations and options.validation):
        raise ArgumentError("--validation-annotations: only with --annotations and --validation")
    if options.annotations and options.validation and not options.validation_annotations:
        raise ArgumentError("--validation: a COCO dataset's validation images need --validation-annotations too")
    for argument, value in (("SRC", options.src), ("DEST", options.dest), ("--validation", options.validation)):
        if value is not None and "://" in value and not value.startswith("s3://"):
            raise ArgumentError(f"{argument}: a local folder or an s3:// prefix (got {value})")
    return byte_size(options.max_shard_bytes)


# -- the command ---------------------------------------------------------------------------------


def pack(options: PackOptions, out: TextIO | None = None, err: TextIO | None = None) -> int:
    """The whole command: exit 0 when packed, 1 when the data or S3 fails it, 2 for a bad argument.
    The data: values go to `out`, everything else to `err` (stdout and stderr when they are left out)."""
    out, err = out or sys.stdout, err or sys.stderr
    try:
        max_bytes = check_options(options)
        store = open_store(options)
        destination = open_destination(options.dest, store)
        sources = open_sources(options, store)
        check_apart(sources)
        if options.to == "manifest":
            for source in sources.values():
                manifest_uri(source.folder, destination, source.argument)
    except ArgumentError as error:
        print(f"kubetune data pack: error: {error}", file=err)
        return 2
    console = Console(err, quiet=options.quiet)
    try:
        parts = {part: gather(source, store) for part, source in sources.items()}
        written = write(options, sources, parts, destination, max_bytes, console)
    except (TrainerError, OSError) as error:
        print(f"kubetune data pack: {error}", file=err)
        return 1
    except KeyboardInterrupt:
        print("kubetune data pack: interrupted; what it had written is removed", file=err)
        return 130
    out.write(paste_values(options.to, destination, written))
    return 0


def open_store(options: PackOptions) -> S3Store | None:
    """The S3 client, when an argument names s3:// (the endpoint as `kubetune run --local` resolves it)."""
    named = [options.src, options.dest, options.validation, options.annotations, options.validation_annotations]
    if not any(value and value.startswith("s3://") for value in named):
        return None
    region = options.region or os.environ.get("AWS_REGION") or os.environ.get("AWS_DEFAULT_REGION") or DEFAULT_REGION
    try:
        storage = StorageSpec(endpoint=resolve_endpoint(None, options.s3_endpoint), region=region)
    except ValidationError as error:
        field = "--s3-endpoint" if error.errors()[0]["loc"][0] == "endpoint" else "--region"
        raise ArgumentError(f"{field}: {error.errors()[0]['msg']}") from None
    return S3Store.for_spec(storage)


def open_folder(location: str, store: S3Store | None, argument: str) -> Folder:
    if location.startswith("s3://"):
        assert store is not None
        return S3Folder(store, s3_prefix(location, argument), location.rstrip("/"))
    if not Path(location).is_dir():
        raise ArgumentError(f"{argument}: no such folder: {location}")
    return LocalFolder(Path(location), location.rstrip("/") or "/")


def open_destination(location: str, store: S3Store | None) -> Destination:
    if location.startswith("s3://"):
        assert store is not None
        prefix = s3_prefix(location, "DEST")
        try:
            store.check_bucket(prefix)
        except TrainerError as error:
            raise ArgumentError(f"DEST: {error}") from None
        return S3Destination(store, prefix, location.rstrip("/"))
    root = Path(location)
    if root.exists() and not root.is_dir():
        raise ArgumentError(f"DEST: {location} is a file, not a folder")
    return LocalDestination(root, location.rstrip("/") or "/")


def s3_prefix(location: str, argument: str) -> S3Uri:
    try:
        return S3Uri.parse(location)
    except TrainerError:
        raise ArgumentError(f"{argument}: not an s3:// prefix: {location!r}") from None


@dataclass(frozen=True)
class Source:
    """One part's source: its folder, the argument that names it, and its COCO file and that file's
    argument (None for an ImageFolder)."""

    folder: Folder
    argument: str
    annotations: tuple[str, str] | None = None


def open_sources(options: PackOptions, store: S3Store | None) -> dict[str, Source]:
    named = {"train": (options.src, "SRC", options.annotations, "--annotations")}
    if options.validation:
        named["validation"] = (
            options.validation,
            "--validation",
            options.validation_annotations,
            "--validation-annotations",
        )
    return {
        part: Source(open_folder(location, store, argument), argument, (coco, coco_argument) if coco else None)
        for part, (location, argument, coco, coco_argument) in named.items()
    }


def check_apart(sources: dict[str, Source]) -> None:
    """Class folders of validation inside train's (or the other way round) would be trained on: refused.
    (COCO files may share one image folder: which images are whose is in the files.)"""
    if "validation" not in sources or sources["train"].annotations is not None:
        return
    train, validation = sources["train"].folder, sources["validation"].folder
    if isinstance(train, S3Folder) and isinstance(validation, S3Folder):
        overlap = prefixes_overlap(str(train.prefix), str(validation.prefix))
    elif isinstance(train, LocalFolder) and isinstance(validation, LocalFolder):
        a, b = train.root.resolve(), validation.root.resolve()
        overlap = a.is_relative_to(b) or b.is_relative_to(a)
    else:
        overlap = False
    if overlap:
        raise ArgumentError(
            f"--validation: {validation.where} overlaps SRC {train.where}: validation images would also be trained on"
        )


def gather(source: Source, store: S3Store | None) -> Gathered:
    """A part's images, by the source's rules: an ImageFolder, or the images of a COCO file."""
    if source.annotations is None:
        return image_folder(source.folder, source.argument)
    location, argument = source.annotations
    return coco_dataset(source.folder, read_annotations(location, store, argument), location)


def manifest_uri(folder: Folder, destination: Destination, argument: str) -> Callable[[str], str]:
    """How a manifest in `destination` names the images of `folder` where they are: by s3:// URI in its
    own bucket, or (local folders) by a path relative to its own folder, as the trainer reads them."""
    if isinstance(folder, S3Folder) and isinstance(destination, S3Destination):
        if folder.prefix.bucket != destination.prefix.bucket:
            raise ArgumentError(
                f"--to manifest: a manifest names images in its own bucket; {argument} {folder.where} is not in "
                f"the bucket of DEST {destination.where}"
            )
        return folder.uri
    if isinstance(folder, LocalFolder) and isinstance(destination, LocalDestination):
        root, base = folder.root.resolve(), destination.root.resolve()
        if not root.is_relative_to(base):
            raise ArgumentError(
                f"--to manifest: a local manifest names images by their path below its own folder, so "
                f"{argument} {folder.where} must lie inside DEST {destination.where}"
            )
        inside = root.relative_to(base).as_posix()
        return lambda name: name if inside == "." else f"{inside}/{name}"
    raise ArgumentError(
        f"--to manifest: the manifest names the images where they are, so {argument} and DEST are both "
        "s3:// prefixes (of one bucket) or both local folders; to move local images to S3, pack them as shards"
    )


# -- writing -------------------------------------------------------------------------------------


def write(
    options: PackOptions,
    sources: dict[str, Source],
    parts: dict[str, Gathered],
    destination: Destination,
    max_bytes: int,
    console: Console,
) -> dict[str, str]:
    """Every part written; the name (or shard pattern) of each. A failure removes what was written."""
    manifest = options.to == "manifest"
    taken = re.compile(
        rf"({'|'.join(parts)})\.(csv|jsonl)" if manifest else rf"({'|'.join(parts)})-[0-9]+\.tar"
    ).fullmatch
    replaced = check_free(destination, lambda name: bool(taken(name)), options.overwrite)
    published = Published(destination)
    written: dict[str, str] = {}
    try:
        for part, gathered in parts.items():
            if manifest:
                uri = manifest_uri(gathered.folder, destination, sources[part].argument)
                text_of = manifest_text(gathered.items, uri)
                written[part] = part + text_of[0]
                published.write(written[part], partial(Path.write_text, data=text_of[1], encoding="utf-8"))
            else:
                written[part] = write_shards(gathered, part, published, options, max_bytes, console)
            console.summary(part, gathered, destination.uri(written[part]))
    except BaseException:
        published.undo()
        raise
    for stale in sorted(set(replaced) - set(published.names)):
        destination.remove(stale)
    return written


def dealt(items: Sequence[Item], seed: int) -> list[Item]:
    """The items sorted by name, then in a seeded shuffle: the same input and seed, the same order."""
    ordered = sorted(items, key=lambda item: item.name)
    random.Random(seed).shuffle(ordered)
    return ordered


def write_shards(
    gathered: Gathered, part: str, published: Published, options: PackOptions, max_bytes: int, console: Console
) -> str:
    items = dealt(gathered.items, options.seed)
    plan = plan_shards(items, options.shard_size, max_bytes)
    if len(plan) > MAX_SHARDS:
        raise DataError(
            f"--shard-size/--max-shard-bytes: {part} would take {len(plan):,} shards, more than the {MAX_SHARDS:,} "
            "a pattern may name; allow bigger shards"
        )
    bar = console.bar(part, len(items), sum(item.size for item in items), len(plan))
    for n, positions in enumerate(plan):
        samples = bar.counted(read_ahead(gathered.folder, items, positions))
        published.write(shard_name(part, n), partial(write_tar, samples=samples))
    bar.close()
    return shard_pattern(part, len(plan))


def paste_values(to: str, destination: Destination, written: dict[str, str]) -> str:
    """The `data:` fields of a FineTuneJob that trains from what was written."""
    local = isinstance(destination, LocalDestination)
    base = "s3://BUCKET/PREFIX" if local else destination.where
    lines = [f"  {part}: {base}/{name}" for part, name in written.items()]
    note = (
        f"# {destination.where} is a local folder: copy its files to an s3:// prefix "
        f"(aws s3 sync {destination.where} s3://BUCKET/PREFIX/) and put that prefix in place of s3://BUCKET/PREFIX\n"
        if local
        else ""
    )
    return note + "\n".join(["data:", f"  format: {to}", *lines]) + "\n"


# -- the console ---------------------------------------------------------------------------------


class Console:
    """stderr: a progress bar on a terminal, and what each part holds and left out (none with --quiet)."""

    def __init__(self, stream: TextIO, quiet: bool) -> None:
        self.stream = None if quiet else stream
        self.live = not quiet and stream.isatty()

    def bar(self, part: str, images: int, size: int, shards: int) -> Bar:
        return Bar(self.stream if self.live else None, part, images, size, shards)

    def summary(self, part: str, gathered: Gathered, where: str) -> None:
        if self.stream is None:
            return
        what = "categories" if gathered.items and gathered.items[0].boxes is not None else "classes"
        lines = [f"{part}: {len(gathered.items):,} images, {len(gathered.classes)} {what} -> {where}"]
        if gathered.ignored:
            lines.append(f"{part}: left out {gathered.ignored:,} file(s) that are no image in a class folder")
        if gathered.missing:
            lines.append(
                f"{part}: left out {gathered.missing:,} image(s) the annotations name but {gathered.folder.where} lacks"
            )
        if gathered.orphan_boxes:
            lines.append(f"{part}: left out {gathered.orphan_boxes:,} annotation(s) of no image the file lists")
        if gathered.refused:
            examples = [f"{name} ({why})" for name, why in sorted(gathered.refused.items())[:EXAMPLES]]
            lines.append(f"{part}: refused {len(gathered.refused):,} image(s): " + "; ".join(examples))
        print("\n".join(lines), file=self.stream)


class Bar:
    """`train [##########--------------]  41%  6,150/15,000 images  shard 1/2  38.2 MB/s  ETA 00:04`"""

    WIDTH = 24
    EVERY = 0.1  # seconds between redraws

    def __init__(self, stream: TextIO | None, part: str, images: int, size: int, shards: int) -> None:
        self.stream, self.part, self.images, self.size, self.shards = stream, part, images, size, shards
        self.done = self.bytes = self.shard = 0
        self.start = self.drawn = time.monotonic()

    def counted(self, samples: Iterator[tuple[int, Item, bytes]]) -> Iterator[tuple[int, Item, bytes]]:
        self.shard += 1
        for sample in samples:
            yield sample
            self.done += 1
            self.bytes += len(sample[2])
            self.draw()

    def draw(self, force: bool = False) -> None:
        now = time.monotonic()
        if self.stream is None or (not force and now - self.drawn < self.EVERY):
            return
        self.drawn = now
        fraction = self.bytes / self.size if self.size else 1.0
        filled = round(self.WIDTH * fraction)
        rate = self.bytes / max(now - self.start, 1e-6)
        eta = (self.size - self.bytes) / rate if rate > 0 else None
        line = (
            f"\r{self.part} [{'#' * filled}{'-' * (self.WIDTH - filled)}] {100 * fraction:3.0f}%  "
            f"{self.done:,}/{self.images:,} images  shard {self.shard}/{self.shards}  "
            f"{rate / 1e6:.1f} MB/s  ETA {format_duration(eta)}"
        )
        self.stream.write(line)
        self.stream.flush()

    def close(self) -> None:
        if self.stream is not None:
            self.draw(force=True)
            self.stream.write("\n")
