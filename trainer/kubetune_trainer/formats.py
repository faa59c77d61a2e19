"""The data formats (`data.format`), each turned into the one index the rest of the run reads.

imagefolder and coco are read by `data.build_index` and `detection_data.build_detection_index`. A
webdataset (`shards`) or a manifest (`manifest`) is first read into a list of images, each with its
label or its boxes, and then indexed here the way the other two are, through their own rules and
messages: classes are the distinct labels of train (sorted, numerically when all are integers), a
validation label train lacks fails the run (`data.check_known_classes`), model.numClasses must match
(`data.check_class_count`), validation is a seeded per-class split of train when omitted
(`data.split_per_class`), and validation and test are read in the format of train, in its bucket. Boxes go through `detection_data.sanitize_coco` in COCO's shape, so they are
clipped, dropped and counted exactly as COCO's are (a validation category train lacks: dropped,
`boxesDroppedUnknownCategory`). Refused images (a key or member name that would leave the cache, a
link in a shard, a manifest URI with no object) are counted like unreadable ones (`data.check_corrupt`).
"""

from __future__ import annotations

import json
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from kubetune_trainer.config import DataSpec, TrainerConfig, data_format
from kubetune_trainer.data import (
    DatasetIndex,
    Sample,
    build_index,
    check_class_count,
    check_known_classes,
    check_validation,
    refusal,
    split_per_class,
)
from kubetune_trainer.detection_data import MAX_ANNOTATION_BYTES, DetectionIndex, build_detection_index, sanitize_coco
from kubetune_trainer.errors import ConfigError, DataError
from kubetune_trainer.manifest import check_label, find_objects, read_manifest
from kubetune_trainer.shards import MAX_PART_IMAGES, PartBudget, ShardSample, list_shards, scan_shards
from kubetune_trainer.storage import S3Store


@dataclass(frozen=True)
class Image:
    """One image of a webdataset or manifest: where it is (`data.Sample`'s fields) and its label or boxes."""

    key: str
    size: int
    etag: str
    source: str = ""
    label: str = ""
    boxes: Mapping[str, Any] | None = None
    offset: int = -1  # a shard member's: where its bytes start in the shard


@dataclass
class Images:
    """One part's images as read: the bucket, what `where` to name in messages, what was refused (key →
    why), ignored, or named but missing, and the shards they come from."""

    bucket: str
    where: str
    images: list[Image] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    ignored: int = 0
    missing: int = 0
    shards: dict[str, int] = field(default_factory=dict)


def class_order(names: set[str]) -> list[str]:
    """Class names sorted, integers by value ("2" before "10") and before other names."""
    return sorted(names, key=lambda n: (0, int(n), "") if n.isascii() and n.isdigit() else (1, 0, n))


# -- reading a part -------------------------------------------------------------------------------


def read_part(store: S3Store, data: DataSpec, part: str, boxes: bool) -> Images:
    """data.train, data.validation or data.test (`part`) of a webdataset or manifest, as images with labels
    or boxes."""
    uri = str({"train": data.train, "validation": data.validation, "test": data.test}[part])
    if data.format == "manifest":
        return manifest_images(store, uri, part, boxes)
    return shard_images(store, uri, part, boxes)


def manifest_images(store: S3Store, uri: str, part: str, boxes: bool) -> Images:
    source, records = read_manifest(store, uri, boxes, part)
    found = find_objects(store, source, [r.key for r in records])
    out = Images(source.bucket, str(source))
    for record in records:
        why = refusal(record.key)
        info = found.get(record.key)
        if why is None and info is None:
            if boxes:
                out.missing += 1
                continue
            why = f"refused: no such object (line {record.line})"
        if why is not None:
            out.refused[record.key] = why
            continue
        assert info is not None
        out.images.append(Image(record.key, info.size, info.etag, label=record.label or "", boxes=record.boxes))
    return out


def shard_label(sample: ShardSample, where: str, boxes: bool) -> tuple[str, Mapping[str, Any] | None]:
    """A sample's class name (.cls text, or .json {"label": ...}) or its boxes (.json)."""
    if sample.label_kind == "cls" and not boxes:
        return check_label(sample.label_text(where), where), None
    try:
        item = json.loads(sample.label or b"")
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as error:
        raise DataError(f"{where}: not a JSON object: {str(error)[:200]}") from None
    if not isinstance(item, dict):
        raise DataError(f"{where}: not a JSON object")
    return ("", item) if boxes else (check_label(item.get("label"), where), None)


def shard_images(store: S3Store, pattern: str, part: str, boxes: bool) -> Images:
    bucket, shards = list_shards(store, pattern, part)
    out = Images(bucket, pattern, shards={s.key: s.size for s in shards})
    # The part as a whole: at most stream mode's scale of images, and the label bytes (boxes) a COCO file may hold.
    for scan in scan_shards(store, bucket, shards, PartBudget(MAX_PART_IMAGES, MAX_ANNOTATION_BYTES)):
        out.ignored += scan.ignored
        out.refused.update((f"{scan.shard.key}/{name}", why) for name, why in scan.refused.items())
        for key, sample in scan.samples.items():
            if sample.label is None or (boxes and sample.label_kind != "json"):
                out.ignored += 1  # an image with nothing to learn from it
                continue
            label, item = shard_label(sample, f"s3://{bucket}/{scan.shard.key}: {key}.{sample.label_kind}", boxes)
            member_key = f"{scan.shard.key}/{sample.image}"
            out.images.append(
                Image(member_key, sample.size, scan.shard.etag, scan.shard.key, label, item, sample.offset)
            )
    return out


def same_bucket(train: Images, other: Images, part: str) -> None:
    """data.validation or data.test (`part`) in train's bucket, and none of its images trained on."""
    if other.bucket != train.bucket:
        raise ConfigError(f"data.{part}: must be in the bucket of data.train ({train.bucket})")
    both = {i.key for i in train.images} & {i.key for i in other.images}
    if both:
        raise DataError(
            f"{len(both)} image(s) are in both data.train and data.{part}, e.g. s3://{train.bucket}/"
            f"{min(both)}: {part} images would also be trained on"
        )


def held_out(store: S3Store, data: DataSpec, part: str, train: Images, boxes: bool) -> Images | None:
    """data.validation or data.test (`part`) read in the format of train, when the job gives it."""
    if getattr(data, part) is None:
        return None
    images = read_part(store, data, part, boxes)
    same_bucket(train, images, part)
    return images


def by_label(images: Sequence[Image]) -> dict[str, list[Image]]:
    out: dict[str, list[Image]] = {}
    for image in images:
        out.setdefault(image.label, []).append(image)
    return out


# -- classification -------------------------------------------------------------------------------


def classification_index(store: S3Store, config: TrainerConfig) -> DatasetIndex:
    """The run's classification index, whatever the format."""
    data = config.data
    if data_format(config.task, data) == "imagefolder":
        return build_index(store, data, config.model.num_classes, config.training.seed)
    train = read_part(store, data, "train", boxes=False)
    if not train.images:
        raise DataError(
            f"data.train: {train.where} holds no readable image with a label ({len(train.refused)} refused)"
        )
    class_names = class_order({i.label for i in train.images})
    check_class_count(config.model.num_classes, class_names, f"labels of {train.where}")
    label = {name: n for n, name in enumerate(class_names)}
    validation, test = (held_out(store, data, part, train, boxes=False) for part in ("validation", "test"))
    for part in (validation, test):
        if part is not None:
            labels = {i.label for i in part.images}
            check_known_classes(labels, class_names, f"label(s) {{}} of {part.where}", train.where)
    if validation is not None:
        train_split, val_by_class = by_label(train.images), by_label(validation.images)
    else:
        train_split, val_by_class = split_per_class(by_label(train.images), data.validation_split, config.training.seed)

    def samples(split: Mapping[str, Sequence[Image]]) -> list[Sample]:
        return [
            Sample(i.key, label[c], i.size, i.etag, i.source, i.offset) for c in class_names for i in split.get(c, [])
        ]

    parts = [p for p in (train, validation, test) if p is not None]
    index = DatasetIndex(
        train.bucket,
        class_names,
        samples(train_split),
        samples(val_by_class),
        sum(p.ignored for p in parts),
        {k: why for p in parts for k, why in p.refused.items()},
        shards={k: size for p in parts for k, size in p.shards.items()},
        test=samples(by_label(test.images)) if test else [],
    )
    check_validation(index, train.where)
    return index


# -- detection ------------------------------------------------------------------------------------


def as_coco(images: Sequence[Image], category_ids: Mapping[str, int]) -> dict[str, Any]:
    """Images with boxes in COCO's shape, for `sanitize_coco` (a category train lacks gets id -1)."""
    coco_images, annotations = [], []
    for n, image in enumerate(images):
        item = image.boxes or {}
        coco_images.append({"id": n, "file_name": image.key, "width": item.get("width"), "height": item.get("height")})
        for box in item.get("annotations") or []:
            if isinstance(box, dict):
                name = category_name(box.get("category"))
                category = category_ids.get(name, -1) if name is not None else None
                annotations.append({"image_id": n, "category_id": category, "bbox": box.get("bbox")})
            else:
                annotations.append(box)  # sanitize_coco counts it as malformed
    categories = [{"id": cid, "name": name} for name, cid in category_ids.items()]
    return {"images": coco_images, "annotations": annotations, "categories": categories}


def category_name(value: Any) -> str | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return str(value)
    return value if isinstance(value, str) and 0 < len(value) <= 256 else None


def categories_of(images: Sequence[Image]) -> list[str]:
    names: set[str] = set()
    for image in images:
        for box in (image.boxes or {}).get("annotations") or []:
            if isinstance(box, dict) and (name := category_name(box.get("category"))) is not None:
                names.add(name)
    return class_order(names)


def split_images(images: Sequence[Image], fraction: float, seed: int) -> tuple[list[Image], list[Image]]:
    """A seeded split of detection images (at least one on each side when there are two or more)."""
    ordered = sorted(images, key=lambda i: i.key)
    random.Random(f"{seed}/detection").shuffle(ordered)
    n_val = max(1, min(round(len(ordered) * fraction), len(ordered) - 1)) if len(ordered) >= 2 else 0
    return sorted(ordered[n_val:], key=lambda i: i.key), sorted(ordered[:n_val], key=lambda i: i.key)


@dataclass
class Part:
    """One part of a detection run: its images, the `Images` they were read from, how many it names but S3
    lacks (a seeded validation split of train has none of its own)."""

    images: list[Image]
    read: Images
    missing: int


def detection_parts(store: S3Store, config: TrainerConfig, train: Images) -> dict[str, Part]:
    """train, validation (read, or a seeded split of train) and test when the job gives it."""
    data = config.data
    validation, test = (held_out(store, data, part, train, boxes=True) for part in ("validation", "test"))
    if validation is not None:
        parts = {"train": Part(train.images, train, train.missing)}
        parts["validation"] = Part(validation.images, validation, validation.missing)
    else:
        split = split_images(train.images, data.validation_split, config.training.seed)
        parts = {"train": Part(split[0], train, train.missing), "validation": Part(split[1], train, 0)}
    if test is not None:
        parts["test"] = Part(test.images, test, test.missing)
    return parts


def detection_index(store: S3Store, config: TrainerConfig) -> tuple[DetectionIndex, DatasetIndex]:
    """The run's boxes and images to cache, whatever the format."""
    if data_format(config.task, config.data) == "coco":
        return build_detection_index(store, config.data, config.model.num_classes)
    train = read_part(store, config.data, "train", boxes=True)
    parts = detection_parts(store, config, train)
    names = categories_of(parts["train"].images)
    if not names:
        raise DataError(f"{train.where} has no boxes with a category: a detection job needs at least one object class")
    check_class_count(config.model.num_classes, names, f"categories of {train.where}")
    ids = {name: n + 1 for n, name in enumerate(names)}
    found, counts, cached = {}, {}, {}
    for name, part in parts.items():
        samples, _, _, part_counts = sanitize_coco(as_coco(part.images, ids), part.read.where, list(ids.values()))
        if not samples:
            raise DataError(f"no {name} images with boxes in {part.read.where}")
        found[name], counts[name] = samples, {**part_counts.wire(), "imagesMissing": part.missing}
        cached[name] = [Sample(i.key, 0, i.size, i.etag, i.source, i.offset) for i in part.images]
    refused = {k: why for part in parts.values() for k, why in part.read.refused.items()}
    shards = {k: size for part in parts.values() for k, size in part.read.shards.items()}
    boxes = DetectionIndex(names, found["train"], found["validation"], counts, found.get("test", []))
    test = cached.get("test", [])
    images = DatasetIndex(
        train.bucket, names, cached["train"], cached["validation"], 0, refused, shards=shards, test=test
    )
    return boxes, images
