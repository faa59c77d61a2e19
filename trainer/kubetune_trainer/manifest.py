"""Manifest files: a .csv of `uri,label` rows, or a .jsonl of one image a line (a label, or boxes).

    uri,label                                         # .csv: an optional header, then one image a row
    s3://bucket/photos/2024/a.jpg,cat
    {"uri": "s3://bucket/photos/a.jpg", "label": "cat"}                      # .jsonl, classification
    {"uri": "photos/b.jpg", "width": 640, "height": 480,
     "annotations": [{"bbox": [10, 20, 100, 50], "category": "cat"}]}       # .jsonl, detection (one line)

A URI is an s3:// URI in the manifest's own bucket, or a key relative to the manifest's folder; images
may lie anywhere in that bucket. Whoever writes the manifest chooses them, so each is checked: another
bucket or another scheme fails the run naming the line; a key that would leave the node cache
(`localpaths`) is refused and counted like an unreadable image. The file (MAX_MANIFEST_BYTES), its lines
(`storage.MAX_LISTED_OBJECTS`, MAX_LINE_BYTES each) and labels (`detection_data.MAX_NAME_LENGTH`) are
bounded; a malformed line fails the run naming the file and line, and so does an image named twice.

The images' sizes and ETags (which name the node cache) come from listing the folders they are in, not
from one request per image: at most MAX_LISTINGS prefixes, folders merged into their parents until they
fit.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from typing import Any

from kubetune_trainer.data import list_prefixes
from kubetune_trainer.detection_data import MAX_NAME_LENGTH
from kubetune_trainer.errors import DataError
from kubetune_trainer.storage import MAX_LISTED_OBJECTS, ObjectInfo, S3Store, S3Uri

MAX_MANIFEST_BYTES = 512 * 1024 * 1024
MAX_LINE_BYTES = 1024 * 1024
MAX_LISTINGS = 256
CSV_HEADER = ["uri", "label"]


@dataclass(frozen=True)
class Record:
    """One line: the image's key in the bucket, and its label (a class name) or its boxes (a JSON object
    with width, height and annotations)."""

    line: int
    key: str
    label: str | None = None
    boxes: Mapping[str, Any] | None = None


def check_label(value: Any, where: str) -> str:
    """A class name: a string of 1 to MAX_NAME_LENGTH printable characters, or a non-negative integer."""
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    if not isinstance(value, str) or not 0 < len(value) <= MAX_NAME_LENGTH or not value.isprintable():
        raise DataError(
            f"{where}: a label is a class name of 1 to {MAX_NAME_LENGTH} printable characters or an integer "
            f"(got {str(value)[:80]!r})"
        )
    return value


def image_key(uri: Any, manifest: S3Uri, where: str) -> str:
    """The key an image URI names: an s3:// URI in the manifest's bucket, or a key relative to its folder."""
    if not isinstance(uri, str) or not uri:
        raise DataError(f"{where}: every line needs an image 'uri'")
    if "://" not in uri:
        return manifest.key.rpartition("/")[0] + "/" + uri if "/" in manifest.key else uri
    if not uri.startswith("s3://"):
        raise DataError(f"{where}: {uri[:200]!r} is not an s3:// URI or a key")
    parsed = S3Uri(*uri.removeprefix("s3://").partition("/")[::2])
    if parsed.bucket != manifest.bucket:
        raise DataError(f"{where}: {uri[:200]} is not in the manifest's bucket {manifest.bucket!r}")
    return parsed.key


def _lines(raw: bytes, source: S3Uri) -> Iterator[tuple[int, str]]:
    """Numbered non-empty lines, each within MAX_LINE_BYTES, at most MAX_LISTED_OBJECTS of them."""
    try:
        text = raw.decode("utf-8-sig")
    except UnicodeDecodeError as error:
        raise DataError(f"{source} is not UTF-8 text: {error}") from None
    count = 0
    for number, line in enumerate(text.splitlines(), start=1):
        if len(line) > MAX_LINE_BYTES:
            raise DataError(f"{source} line {number}: longer than {MAX_LINE_BYTES:,} characters")
        if line.strip():
            count += 1
            if count > MAX_LISTED_OBJECTS:
                raise DataError(f"{source}: more than {MAX_LISTED_OBJECTS:,} images")
            yield number, line


def parse_csv(raw: bytes, source: S3Uri) -> list[Record]:
    """`uri,label` rows (a first row `uri,label` is a header)."""
    records = []
    for number, line in _lines(raw, source):
        where = f"{source} line {number}"
        try:
            row = next(csv.reader([line], strict=True))
        except csv.Error as error:
            raise DataError(f"{where}: not a CSV row: {error}") from None
        if number == 1 and [c.strip().lower() for c in row] == CSV_HEADER:
            continue
        if len(row) != 2:
            raise DataError(f"{where}: expected 2 columns uri,label (got {len(row)})")
        records.append(
            Record(number, image_key(row[0].strip(), source, where), label=check_label(row[1].strip(), where))
        )
    return records


def parse_jsonl(raw: bytes, source: S3Uri, boxes: bool) -> list[Record]:
    """One JSON object a line: `uri` and `label`, or (`boxes`) `uri`, `width`, `height`, `annotations`."""
    records = []
    for number, line in _lines(raw, source):
        where = f"{source} line {number}"
        try:
            item = json.loads(line)
        except (json.JSONDecodeError, RecursionError) as error:
            raise DataError(f"{where}: not a JSON object: {str(error)[:200]}") from None
        if not isinstance(item, dict):
            raise DataError(f"{where}: not a JSON object")
        key = image_key(item.get("uri"), source, where)
        if boxes:
            records.append(Record(number, key, boxes=item))
        else:
            records.append(Record(number, key, label=check_label(item.get("label"), where)))
    return records


def read_manifest(store: S3Store, uri: str, boxes: bool, field_name: str) -> tuple[S3Uri, list[Record]]:
    """The manifest's records; DataError naming the file and line for a malformed line or a repeated image."""
    source = S3Uri.parse(uri)
    raw = store.get_bytes(source, MAX_MANIFEST_BYTES, f"data.{field_name}")
    if source.key.endswith(".csv"):
        if boxes:
            raise DataError(f"data.{field_name}: a detection manifest is JSON lines (.jsonl) with boxes, not CSV")
        records = parse_csv(raw, source)
    else:
        records = parse_jsonl(raw, source, boxes)
    first: dict[str, int] = {}
    for record in records:
        if (line := first.setdefault(record.key, record.line)) != record.line:
            raise DataError(
                f"{source} line {record.line}: the image s3://{source.bucket}/{record.key} is on line {line} too"
            )
    if not records:
        raise DataError(f"data.{field_name}: {source} names no images")
    return source, records


def covering_prefixes(keys: Sequence[str]) -> list[str]:
    """At most MAX_LISTINGS folders whose listings hold every key: the keys' folders, merged into their
    parents while there are too many, without a folder inside another."""
    folders = {key.rpartition("/")[0] for key in keys}
    while len(folders) > MAX_LISTINGS:  # the deepest folders merge first
        deepest = max(_depth(f) for f in folders)
        folders = {f.rpartition("/")[0] if _depth(f) == deepest else f for f in folders}
    ordered = sorted(folders, key=lambda f: (f.count("/"), f))
    kept: list[str] = []
    for folder in ordered:
        if not any(folder == k or not k or folder.startswith(k + "/") for k in kept):
            kept.append(folder)
    return kept


def _depth(folder: str) -> int:
    return folder.count("/") + 1 if folder else 0


def find_objects(store: S3Store, manifest: S3Uri, keys: Sequence[str]) -> dict[str, ObjectInfo]:
    """The listed size and ETag of each key that exists (those missing are left out)."""
    prefixes = [S3Uri(manifest.bucket, folder) for folder in covering_prefixes(keys)]
    wanted = set(keys)
    return {o.key: o for listed in list_prefixes(store, prefixes, manifest) for o in listed if o.key in wanted}
