"""What `kubetune data pack` writes: WebDataset tar shards or a manifest, into a local folder or an s3:// prefix.

Shards are deterministic: the same items in the same order give byte-identical tars (USTAR headers,
mtime 0, owner 0/0 with no names, mode 0644, members in sample order, JSON with sorted keys). A sample is
`<key>.<image extension>` and its label member, `<key>.cls` (the class name as text) or `<key>.json`
(`{"width", "height", "annotations"}`), as `shards.scan_shard` reads them; keys are the samples'
positions, zero-padded, so they hold no "." and never repeat.

Which samples go in which shard is planned from the listed sizes before anything is written: a shard
takes samples in order until the next would pass `samples` or `max_bytes` (its exact size as a tar;
a sample bigger than `max_bytes` alone gets a shard of its own). Each file is written to a temporary
name and then renamed (a local folder) or uploaded whole (S3, from a local temporary file), so a
file under its final name is always complete; `publish_all` removes what it published when a later
step fails.
"""

from __future__ import annotations

import csv
import io
import json
import os
import tarfile
import tempfile
from collections import deque
from collections.abc import Callable, Iterable, Iterator, Sequence
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Protocol

from kubetune_trainer.config import SHARD_SUFFIX
from kubetune_trainer.errors import DataError
from kubetune_trainer.pack_sources import Folder, Item
from kubetune_trainer.storage import S3Store, S3Uri

BLOCK = tarfile.BLOCKSIZE  # 512: a header, and the unit a member's data is padded to
RECORD = tarfile.RECORDSIZE  # 10240: the unit tarfile pads a whole archive to
KEY_DIGITS = 9
SHARD_DIGITS = 6
READ_THREADS = 16
READ_AHEAD = 64  # images read ahead of the tar being written: bounded memory


def label_member(item: Item) -> tuple[str, bytes]:
    """The sample's label member: (.cls, the class name) or (.json, its boxes)."""
    if item.boxes is not None:
        return "json", json.dumps(item.boxes, sort_keys=True, separators=(",", ":")).encode()
    return "cls", item.label.encode()


def member_bytes(size: int) -> int:
    """What a member of `size` bytes takes in a tar: its header and its data padded to whole blocks."""
    return BLOCK + -(-size // BLOCK) * BLOCK


def tar_bytes(members: int) -> int:
    """A tar's size from its members' total: two end-of-archive blocks, padded to whole records."""
    return -(-(members + 2 * BLOCK) // RECORD) * RECORD


def plan_shards(items: Sequence[Item], samples: int, max_bytes: int) -> list[list[int]]:
    """Consecutive runs of item positions, one per shard, within `samples` and `max_bytes` each."""
    shards: list[list[int]] = []
    current: list[int] = []
    size = 0
    for n, item in enumerate(items):
        sample = member_bytes(item.size) + member_bytes(len(label_member(item)[1]))
        if current and (len(current) >= samples or tar_bytes(size + sample) > max_bytes):
            shards.append(current)
            current, size = [], 0
        current.append(n)
        size += sample
    return [*shards, current] if current else shards


def shard_name(part: str, n: int) -> str:
    return f"{part}-{n:0{SHARD_DIGITS}d}{SHARD_SUFFIX}"


def shard_pattern(part: str, count: int) -> str:
    """The brace pattern naming `count` shards (`train-{000000..000012}.tar`), or the one shard's name."""
    if count == 1:
        return shard_name(part, 0)
    return f"{part}-{{{0:0{SHARD_DIGITS}d}..{count - 1:0{SHARD_DIGITS}d}}}{SHARD_SUFFIX}"


def add_member(tar: tarfile.TarFile, name: str, body: bytes) -> None:
    info = tarfile.TarInfo(name)
    info.size, info.mtime, info.mode = len(body), 0, 0o644
    info.uid, info.gid, info.uname, info.gname = 0, 0, "", ""
    tar.addfile(info, io.BytesIO(body))


def write_tar(path: Path, samples: Iterable[tuple[int, Item, bytes]]) -> None:
    """One shard at `path`: each (position, item, image bytes) as its image and label members."""
    with open(path, "wb") as file, tarfile.open(fileobj=file, mode="w", format=tarfile.USTAR_FORMAT) as tar:
        for position, item, body in samples:
            key = f"{position:0{KEY_DIGITS}d}"
            add_member(tar, f"{key}.{item.name.rsplit('.', 1)[-1].lower()}", body)
            extension, label = label_member(item)
            add_member(tar, f"{key}.{extension}", label)


def read_ahead(folder: Folder, items: Sequence[Item], order: Sequence[int]) -> Iterator[tuple[int, Item, bytes]]:
    """(position, item, bytes) for each position of `order`, in order, read by a few threads at most
    READ_AHEAD images ahead."""
    with ThreadPoolExecutor(max_workers=READ_THREADS, thread_name_prefix="pack-read") as pool:
        pending: deque[tuple[int, Future[bytes]]] = deque()
        for position in order:
            item = items[position]
            pending.append((position, pool.submit(folder.read, item.name, item.size)))
            if len(pending) >= READ_AHEAD:
                done, future = pending.popleft()
                yield done, items[done], future.result()
        while pending:
            done, future = pending.popleft()
            yield done, items[done], future.result()


def manifest_text(items: Sequence[Item], uri: Callable[[str], str]) -> tuple[str, str]:
    """(suffix, text) of the manifest naming `items`: `uri,label` CSV, or JSON lines with boxes."""
    if items and items[0].boxes is not None:
        lines = [json.dumps({"uri": uri(item.name), **(item.boxes or {})}, separators=(",", ":")) for item in items]
        return ".jsonl", "".join(f"{line}\n" for line in lines)
    out = io.StringIO()
    writer = csv.writer(out, lineterminator="\n")
    writer.writerow(["uri", "label"])
    writer.writerows([uri(item.name), item.label] for item in items)
    return ".csv", out.getvalue()


# -- where files go ---------------------------------------------------------------------------------


class Destination(Protocol):
    @property
    def where(self) -> str:
        """The folder as the user named it, for messages."""
        ...

    def names(self) -> list[str]: ...

    def scratch(self) -> Path: ...

    def publish(self, path: Path, name: str) -> None: ...

    def remove(self, name: str) -> None: ...

    def uri(self, name: str) -> str: ...


@dataclass(frozen=True)
class LocalDestination:
    root: Path
    where: str

    def names(self) -> list[str]:
        return sorted(p.name for p in self.root.iterdir() if p.is_file()) if self.root.is_dir() else []

    def scratch(self) -> Path:
        """A temporary file in the folder itself, so that publishing it is a rename."""
        self.root.mkdir(parents=True, exist_ok=True)
        fd, path = tempfile.mkstemp(dir=self.root, prefix=".kubetune-pack.", suffix=".part")
        os.close(fd)
        return Path(path)

    def publish(self, path: Path, name: str) -> None:
        path.chmod(0o644)  # mkstemp's 0600 is for the file being written, not for the dataset
        os.replace(path, self.root / name)

    def remove(self, name: str) -> None:
        (self.root / name).unlink(missing_ok=True)

    def uri(self, name: str) -> str:
        return str(self.root / name)


@dataclass(frozen=True)
class S3Destination:
    store: S3Store
    prefix: S3Uri
    where: str

    def names(self) -> list[str]:
        """The objects directly under the prefix."""
        base = self.prefix.folder
        return sorted(o.key[len(base) :] for o in self.store.list_objects(self.prefix, recursive=False))

    def scratch(self) -> Path:
        fd, path = tempfile.mkstemp(prefix="kubetune-pack.", suffix=".part")
        os.close(fd)
        return Path(path)

    def publish(self, path: Path, name: str) -> None:
        try:
            self.store.upload_file(path, self.prefix.join(name))
        finally:
            path.unlink(missing_ok=True)

    def remove(self, name: str) -> None:
        self.store.delete(self.prefix.join(name))

    def uri(self, name: str) -> str:
        return str(self.prefix.join(name))


class Published:
    """The files one pack has published, removed again if the pack fails (nothing half-written stays)."""

    def __init__(self, destination: Destination) -> None:
        self.destination = destination
        self.names: list[str] = []

    def write(self, name: str, fill: Callable[[Path], object]) -> None:
        """`fill` a temporary file, then publish it as `name`."""
        path = self.destination.scratch()
        try:
            fill(path)
            self.destination.publish(path, name)
        finally:
            path.unlink(missing_ok=True)
        self.names.append(name)

    def undo(self) -> None:
        for name in reversed(self.names):
            self.destination.remove(name)
        self.names.clear()


def check_free(destination: Destination, taken: Callable[[str], bool], overwrite: bool) -> list[str]:
    """The files of `destination` a pack would replace; DataError naming them unless `overwrite`."""
    found = [name for name in destination.names() if taken(name)]
    if found and not overwrite:
        more = f" and {len(found) - 1} more" if len(found) > 1 else ""
        raise DataError(f"DEST: {destination.where} already holds {found[0]}{more}; pass --overwrite to replace them")
    return found
