"""WebDataset tar shards in S3: the shards a pattern names, what each holds, and its images on local disk.

A WebDataset shard is a tar file whose members are grouped into samples by name: `dir/000123.jpg`,
`dir/000123.cls` and `dir/000123.json` are one sample, keyed `dir/000123` (the name up to the first
"." of its last segment, as the `webdataset` package groups them). Shards are read here with the
standard library's `tarfile` in stream mode, straight from the GET response, never with `extract`:
whoever writes the bucket writes the tar, so

- only regular members are read; a link (symbolic or hard), device, FIFO, directory or sparse member
  is never written anywhere (an image that is one is refused and counted like an unreadable image);
- each member name becomes a local path only through `localpaths.local_path` (an image member whose
  name would leave its folder is refused and counted, a leading "./" is dropped first);
- sizes are bounded: the shard (MAX_SHARD_BYTES, and never more than its listed size is read), its
  members (MAX_SHARD_MEMBERS), an image member (`data.MAX_IMAGE_BYTES`, checked by the caller), a
  label member (MAX_LABEL_BYTES), the labels of one shard together (MAX_SHARD_LABEL_BYTES), the images
  and label bytes of all the shards of a part together (`PartBudget`: MAX_PART_IMAGES, and the label
  bytes a COCO file may hold; up to 100,000 shards could otherwise hold 10^11 members), and the pax or
  GNU long-name headers tarfile reads into memory (MAX_HEADER_BYTES).

Why `tarfile` rather than the `webdataset` package: the package's readers open URLs through its own
`gopen` (curl pipes for http, no boto3 credentials or endpoint settings), and hand every member's
bytes to the caller with none of the bounds above; what is needed here (group members by key, stream a
tar once) is a few lines on top of `tarfile`, with no new dependency.
"""

from __future__ import annotations

import os
import tarfile
import tempfile
import threading
from collections.abc import Callable, Iterator, Mapping, Sequence
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any, cast

from kubetune_trainer.config import SHARD_SUFFIX, expand_braces
from kubetune_trainer.errors import DataError, StorageError
from kubetune_trainer.localpaths import unsafe_reason
from kubetune_trainer.storage import MAX_LISTED_OBJECTS, ObjectInfo, S3Store, S3Uri

MAX_SHARD_BYTES = 64 * 1024**3
MAX_SHARD_MEMBERS = 1_000_000
MAX_LABEL_BYTES = 1024 * 1024
MAX_SHARD_LABEL_BYTES = 256 * 1024 * 1024
MAX_HEADER_BYTES = 1024 * 1024
# The images of one part's shards together: stream mode's scale (docs/trainer.md: sets of 1-50 M images).
MAX_PART_IMAGES = 50_000_000
SHARD_THREADS = 8
READ_CHUNK = 1024 * 1024  # bytes of a shard read at once when its members are read by offset
# Bytes between two wanted members that a ranged read goes through rather than asking for each apart:
# a tar's headers and a sample's small label members lie between two images of a shard.
MEMBER_GAP = 8 * 1024
IMAGE_EXTENSIONS = ("jpg", "jpeg", "png", "webp")
LABEL_EXTENSIONS = ("cls", "json")
_LONG_HEADERS = (tarfile.GNUTYPE_LONGNAME, tarfile.GNUTYPE_LONGLINK, tarfile.XHDTYPE, tarfile.XGLTYPE)


class BoundedTarInfo(tarfile.TarInfo):
    """tarfile's member header, refusing a pax or GNU long-name header over MAX_HEADER_BYTES before
    tarfile reads it into memory."""

    def _proc_member(self, tarfile_: tarfile.TarFile) -> Any:
        if self.type in (*_LONG_HEADERS, tarfile.SOLARIS_XHDTYPE) and self.size > MAX_HEADER_BYTES:
            raise tarfile.HeaderError(f"a {self.size:,}-byte extended header, more than {MAX_HEADER_BYTES:,} allowed")
        return super()._proc_member(tarfile_)  # type: ignore[misc]


class PartBudget:
    """The images and label bytes the shards of one part may hold together, counted as they are scanned
    (several at a time): once over, the scan fails naming the shard, and the shards not scanned yet are
    never opened."""

    def __init__(self, max_images: int, max_label_bytes: int) -> None:
        self.max_images, self.max_label_bytes = max_images, max_label_bytes
        self.images = self.label_bytes = 0
        self.over: str | None = None
        self.lock = threading.Lock()

    def take(self, uri: S3Uri, images: int = 0, label_bytes: int = 0) -> None:
        """Count what `uri` adds; DataError once the part holds too much (and for every shard after)."""
        with self.lock:
            self.images += images
            self.label_bytes += label_bytes
            if self.over is None and self.images > self.max_images:
                self.over = f"more than {self.max_images:,} images, the most a part may have"
            elif self.over is None and self.label_bytes > self.max_label_bytes:
                self.over = f"label members of more than {self.max_label_bytes:,} bytes in all"
            if self.over is not None:
                raise DataError(f"{uri}: the shards of this part hold {self.over}")


@dataclass
class ShardSample:
    """One sample of a shard: its image member (name and size) and its label member's bytes, if any."""

    image: str
    size: int
    label: bytes | None = None
    label_kind: str = ""  # "cls" or "json"
    offset: int = -1  # where the image member's bytes start in the shard

    def label_text(self, where: str) -> str:
        try:
            return (self.label or b"").decode("utf-8").strip()
        except UnicodeDecodeError:
            raise DataError(f"{where}: not UTF-8 text") from None


@dataclass
class ShardScan:
    """What one shard holds: its samples by key, the image members refused (member name → why), and the
    members that belong to no usable sample (other extensions, samples without an image)."""

    shard: ObjectInfo
    samples: dict[str, ShardSample] = field(default_factory=dict)
    refused: dict[str, str] = field(default_factory=dict)
    ignored: int = 0


def sample_key(name: str) -> tuple[str, str]:
    """(key, extension) of a member name, as WebDataset groups them: `a/000123.seg.png` → (`a/000123`, `seg.png`)."""
    directory, slash, base = name.rpartition("/")
    stem, _, extension = base.partition(".")
    return directory + slash + stem, extension.lower()


def member_name(info: tarfile.TarInfo) -> str:
    """The member's name without a leading "./" (what `tar -C dir -cf x.tar .` writes)."""
    return info.name[2:] if info.name.startswith("./") else info.name


def member_refusal(info: tarfile.TarInfo) -> str | None:
    """Why a member cannot be read as a file, or None."""
    if not info.isfile() or info.issparse():
        kind = "a symbolic link" if info.issym() else "a hard link" if info.islnk() else "not a regular file"
        return f"refused: the tar member is {kind}"
    reason = unsafe_reason(member_name(info))
    return f"refused: the tar member name {reason}" if reason else None


class BoundedBody:
    """A GET response's body for tarfile's stream mode, failing past `limit` bytes."""

    def __init__(self, body: Any, uri: S3Uri, limit: int) -> None:
        self.body, self.uri, self.limit, self.read_bytes = body, uri, limit, 0

    def read(self, size: int = -1) -> bytes:
        chunk: bytes = self.body.read(size if size >= 0 else None)
        self.read_bytes += len(chunk)
        if self.read_bytes > self.limit:
            raise StorageError(f"{self.uri} is more than the {self.limit:,} bytes it was listed with")
        return chunk


def read_shard(store: S3Store, uri: S3Uri, size: int) -> Iterator[tuple[tarfile.TarInfo, IO[bytes] | None]]:
    """Each member of the shard with a reader of its bytes (None when it is no regular file), in order,
    read once from one GET; DataError naming the shard when it is no tar or holds too many members."""
    if size > MAX_SHARD_BYTES:
        raise DataError(f"{uri} is {size:,} bytes, more than the {MAX_SHARD_BYTES:,} a shard may have")
    with store.open_body(uri) as body:
        try:
            with tarfile.open(
                fileobj=cast(IO[bytes], BoundedBody(body, uri, size)), mode="r|", tarinfo=BoundedTarInfo
            ) as tar:
                for count, info in enumerate(tar, start=1):
                    if count > MAX_SHARD_MEMBERS:
                        raise DataError(f"{uri} holds more than {MAX_SHARD_MEMBERS:,} tar members")
                    yield info, tar.extractfile(info) if member_refusal(info) is None else None
        except tarfile.TarError as error:
            raise DataError(f"{uri} is not a readable tar shard: {error}") from None


def scan_shard(store: S3Store, shard: ObjectInfo, bucket: str, budget: PartBudget) -> ShardScan:
    """The samples of one shard: image members by key with their .cls or .json label member's bytes."""
    uri = S3Uri(bucket, shard.key)
    budget.take(uri)
    scan = ShardScan(shard)
    labels: dict[str, tuple[bytes, str]] = {}
    label_bytes = 0
    for info, reader in read_shard(store, uri, shard.size):
        key, extension = sample_key(member_name(info))
        if extension in IMAGE_EXTENSIONS:
            why = member_refusal(info)
            if why is not None:
                scan.refused[info.name] = why
            elif key not in scan.samples:
                budget.take(uri, images=1)
                scan.samples[key] = ShardSample(member_name(info), info.size, offset=info.offset_data)
            else:
                scan.ignored += 1  # a second image of the sample: the first one is its image
            continue
        if extension not in LABEL_EXTENSIONS or reader is None or key in labels:
            scan.ignored += 1
            continue
        if info.size > MAX_LABEL_BYTES:
            raise DataError(f"{uri}: the label member {info.name!r} is over {MAX_LABEL_BYTES:,} bytes")
        label_bytes += info.size
        budget.take(uri, label_bytes=info.size)
        if label_bytes > MAX_SHARD_LABEL_BYTES:
            raise DataError(f"{uri}: its label members hold more than {MAX_SHARD_LABEL_BYTES:,} bytes")
        labels[key] = (reader.read(), extension)
    for key, sample in scan.samples.items():
        if key in labels:
            sample.label, sample.label_kind = labels.pop(key)
    scan.ignored += len(labels)  # labels of no image
    return scan


def list_shards(store: S3Store, pattern: str, field_name: str) -> tuple[str, list[ObjectInfo]]:
    """The bucket and the shards `pattern` names (`expand_braces`), as listed; DataError naming the missing
    ones. Their folders are listed, not each shard fetched: 128 shards in one folder cost one listing."""
    uris = [S3Uri.parse(uri) for uri in expand_braces(pattern)]
    bucket = uris[0].bucket
    folders = sorted({uri.key.rpartition("/")[0] for uri in uris})
    listed: dict[str, ObjectInfo] = {}
    for folder in folders:
        prefix = S3Uri(bucket, folder)
        for info in store.list_objects(prefix, MAX_LISTED_OBJECTS):
            if info.key.endswith(SHARD_SUFFIX):
                listed[info.key] = info
    missing = [str(uri) for uri in uris if uri.key not in listed]
    if missing:
        raise DataError(
            f"data.{field_name}: {len(missing)} of the {len(uris)} shards {pattern} names are missing, "
            f"e.g. {', '.join(missing[:3])}"
        )
    return bucket, [listed[uri.key] for uri in uris]


def scan_shards(store: S3Store, bucket: str, shards: list[ObjectInfo], budget: PartBudget) -> list[ShardScan]:
    """Every shard scanned, several at a time (each is one streamed GET), within the part's `budget`."""
    with ThreadPoolExecutor(max_workers=min(SHARD_THREADS, len(shards)) or 1, thread_name_prefix="shards") as pool:
        return list(pool.map(lambda shard: scan_shard(store, shard, bucket, budget), shards))


def extract_members(store: S3Store, uri: S3Uri, size: int, wanted: Mapping[str, tuple[int, Path]], limit: int) -> None:
    """Write the members named in `wanted` (member name → (size, local path)) from one streamed read of
    the shard; a member whose size is not the indexed one, or over `limit`, is left out (the caller
    counts what is missing as unreadable). Each file appears whole or not at all."""
    for info, reader in read_shard(store, uri, size):
        name = member_name(info)
        if reader is None or name not in wanted or wanted[name][0] != info.size or info.size > limit:
            continue
        write_atomically(wanted[name][1], reader.read)


def read_members(
    store: S3Store, uri: S3Uri, size: int, etag: str, members: Sequence[tuple[int, int]]
) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of each member at (offset, size) in the shard, as the driver's index found them
    (`ShardSample.offset`): one streamed read of the shard, no tar header parsed again, so no member name
    is read at all. Only while the shard still has the ETag it was indexed with (StorageError otherwise:
    the offsets would be another tar's); a member the shard ends before is left out."""
    if size > MAX_SHARD_BYTES:
        raise DataError(f"{uri} is {size:,} bytes, more than the {MAX_SHARD_BYTES:,} a shard may have")
    with store.open_body(uri, etag) as body:
        yield from byte_ranges(BoundedBody(body, uri, size).read, sorted(members))


def member_runs(members: Sequence[tuple[int, int]], gap: int = MEMBER_GAP) -> list[list[tuple[int, int]]]:
    """`members` (offset, size) sorted into runs that one ranged GET each reads: a new run where more than
    `gap` bytes lie between a member and the next."""
    runs: list[list[tuple[int, int]]] = []
    end = 0
    for offset, size in sorted(members):
        if not runs or offset - end > gap:
            runs.append([])
        runs[-1].append((offset, size))
        end = max(end, offset + size)
    return runs


def read_run(store: S3Store, uri: S3Uri, etag: str, run: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
    """(offset, bytes) of each member of `run` (one of `member_runs`, sorted) as the driver's index found
    them, from one ranged GET of the shard while it still has the ETag it was indexed with (StorageError
    otherwise); a member the shard ends before is left out."""
    start, end = run[0][0], max(offset + size for offset, size in run)
    with store.open_body(uri, etag, (start, end)) as body:
        read = BoundedBody(body, uri, end - start).read
        for offset, data in byte_ranges(read, [(offset - start, size) for offset, size in run]):
            yield start + offset, data


def byte_ranges(read: Callable[[int], bytes], ranges: Sequence[tuple[int, int]]) -> Iterator[tuple[int, bytes]]:
    """(start, bytes) of each (start, length) of `ranges` (sorted, not overlapping) from a stream read once
    by `read(n)`, in READ_CHUNK reads (a range's bytes and at most one chunk held at a time); stops where
    the stream ends."""
    buffer, base, passed = b"", 0, 0  # the stream's bytes from offset `base` on; the end of the last range
    for start, length in ranges:
        end = start + length
        if start < passed:
            continue  # overlapping a range before it: not a tar's members
        passed = end
        if base + len(buffer) < end:
            if base + len(buffer) <= start:  # nothing read so far is needed: skip to the range
                base, buffer = base + len(buffer), b""
                while base < start:
                    skipped = len(read(min(READ_CHUNK, start - base)))
                    if not skipped:
                        return
                    base += skipped
            else:
                buffer, base = buffer[start - base :], start
            while base + len(buffer) < end:
                chunk = read(max(READ_CHUNK, end - base - len(buffer)))
                if not chunk:
                    return
                buffer += chunk
        yield start, buffer[start - base : end - base]


def write_atomically(path: Path, read: Callable[[int], bytes]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".part")
    try:
        with os.fdopen(fd, "wb") as out:
            while chunk := read(1024 * 1024):
                out.write(chunk)
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)
