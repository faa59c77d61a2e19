"""Detection data: COCO annotations in S3, images under an S3 prefix.

The annotations are read once on the driver and turned into a plain index (image key, size, boxes,
labels), which travels to the workers like the classification index; images go through the same
per-node cache (`data.prepare_images`). What users' COCO files really hold is handled, not crashed on:
images without boxes stay as negatives, boxes are clipped to their image, and boxes with no area left
(zero or negative size, wholly outside the image) or of an unknown category are dropped. Each of these
is counted and reported (`model.json`: `data.annotations`).

Classes are the COCO categories sorted by id (their names in that order in `model.json`); the model's
label of a category is its position + 1, 0 being the background torchvision detectors reserve.
"""

from __future__ import annotations

import json
import math
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import torch
from PIL import Image

from kubetune_trainer.config import DataSpec
from kubetune_trainer.data import DatasetIndex, Sample
from kubetune_trainer.errors import ConfigError, DataError
from kubetune_trainer.storage import S3Store, S3Uri


@dataclass
class DetectionSample:
    """One image: its key in the bucket, its size in pixels and its boxes (x1, y1, x2, y2) with labels 1..N."""

    key: str
    width: int
    height: int
    boxes: list[list[float]] = field(default_factory=list)
    labels: list[int] = field(default_factory=list)


@dataclass
class AnnotationCounts:
    """What sanitising one annotation file found."""

    images: int = 0
    images_without_boxes: int = 0
    boxes: int = 0
    boxes_clipped: int = 0
    boxes_dropped_empty: int = 0
    boxes_dropped_outside: int = 0
    boxes_dropped_unknown_category: int = 0
    boxes_dropped_unknown_image: int = 0

    def wire(self) -> dict[str, int]:
        return {_camel(k): v for k, v in asdict(self).items()}


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(p.title() for p in rest)


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value)


def parse_coco(
    raw: bytes | str, source: str, class_ids: Sequence[int] | None = None
) -> tuple[list[DetectionSample], list[str], list[int], AnnotationCounts]:
    """Samples, class names and COCO category ids (in label order), and what was cleaned up.

    `class_ids` fixes the label order (the validation file uses the training file's categories); when
    omitted it is the file's categories sorted by id.
    """
    try:
        coco = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{source} is not valid JSON: {error}") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise DataError(f"{source} is not a COCO annotation file: it has no 'images' list")
    categories = {
        c["id"]: str(c.get("name", c["id"]))
        for c in coco.get("categories") or []
        if isinstance(c, dict) and isinstance(c.get("id"), int)
    }
    ids = list(class_ids) if class_ids is not None else sorted(categories)
    if not ids:
        raise DataError(f"{source} has no categories: a detection job needs at least one object class")
    names = [categories.get(i, str(i)) for i in ids]
    label_of = {cid: position + 1 for position, cid in enumerate(ids)}

    counts = AnnotationCounts()
    samples: dict[Any, DetectionSample] = {}
    for image in coco["images"]:
        if not isinstance(image, dict) or "id" not in image or not isinstance(image.get("file_name"), str):
            raise DataError(f"{source}: every image needs an 'id' and a 'file_name' (got {str(image)[:120]})")
        width, height = _number(image.get("width")), _number(image.get("height"))
        if not width or not height or width <= 0 or height <= 0:
            raise DataError(f"{source}: image {image['file_name']!r} needs a positive width and height")
        samples[image["id"]] = DetectionSample(key=image["file_name"], width=int(width), height=int(height))
    counts.images = len(samples)

    for annotation in coco.get("annotations") or []:
        if not isinstance(annotation, dict):
            counts.boxes_dropped_empty += 1
            continue
        sample = samples.get(annotation.get("image_id"))
        if sample is None:
            counts.boxes_dropped_unknown_image += 1
            continue
        label = label_of.get(annotation.get("category_id"))
        if label is None:
            counts.boxes_dropped_unknown_category += 1
            continue
        bbox = annotation.get("bbox")
        values = [_number(v) for v in bbox] if isinstance(bbox, list) and len(bbox) == 4 else []
        if len(values) != 4 or any(v is None for v in values):
            counts.boxes_dropped_empty += 1
            continue
        x, y, w, h = (float(v) for v in values)  # type: ignore[arg-type]
        if w <= 0 or h <= 0:
            counts.boxes_dropped_empty += 1
            continue
        x1, y1, x2, y2 = max(x, 0.0), max(y, 0.0), min(x + w, sample.width), min(y + h, sample.height)
        if x2 - x1 < 1 or y2 - y1 < 1:
            # Less than a pixel of the box lies inside the image.
            counts.boxes_dropped_outside += 1
            continue
        if (x1, y1, x2, y2) != (x, y, x + w, y + h):
            counts.boxes_clipped += 1
        sample.boxes.append([x1, y1, x2, y2])
        sample.labels.append(label)
        counts.boxes += 1
    counts.images_without_boxes = sum(1 for s in samples.values() if not s.boxes)
    return list(samples.values()), names, ids, counts


@dataclass
class DetectionIndex:
    """What a detection run trains and validates on (image keys in full), and what cleaning found."""

    class_names: list[str]
    train: list[DetectionSample]
    validation: list[DetectionSample]
    counts: dict[str, dict[str, int]]

    def wire(self) -> dict[str, Any]:
        return {
            "classNames": self.class_names,
            "train": index_wire(self.train),
            "validation": index_wire(self.validation),
            "counts": self.counts,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> DetectionIndex:
        return cls(
            class_names=list(data["classNames"]),
            train=index_from_wire(data["train"]),
            validation=index_from_wire(data["validation"]),
            counts={part: dict(values) for part, values in data["counts"].items()},
        )

    def without_corrupt(self, corrupt: Mapping[str, str]) -> DetectionIndex:
        """Unreadable images dropped (their boxes with them), and counted per part (`imagesCorrupt`)."""
        train = [s for s in self.train if s.key not in corrupt]
        validation = [s for s in self.validation if s.key not in corrupt]
        counts = {part: dict(values) for part, values in self.counts.items()}
        for part, before, after in (("train", self.train, train), ("validation", self.validation, validation)):
            counts.setdefault(part, {})["imagesCorrupt"] = len(before) - len(after)
        return DetectionIndex(self.class_names, train, validation, counts)


def _resolve(
    samples: list[DetectionSample], prefix: S3Uri, listing: Mapping[str, tuple[int, str]], counts: AnnotationCounts
) -> tuple[list[DetectionSample], list[Sample], int]:
    """Samples with full keys, their cache entries, and how many images the annotations name but S3 lacks."""
    base = f"{prefix.key}/" if prefix.key else ""
    found: list[DetectionSample] = []
    cached: list[Sample] = []
    missing = 0
    for sample in samples:
        key = base + sample.key.lstrip("/")
        if key not in listing:
            missing += 1
            continue
        size, etag = listing[key]
        found.append(DetectionSample(key, sample.width, sample.height, sample.boxes, sample.labels))
        cached.append(Sample(key, 0, size, etag))
    return found, cached, missing


def build_detection_index(
    store: S3Store, data: DataSpec, num_classes: int | None
) -> tuple[DetectionIndex, DatasetIndex]:
    """Read both COCO files, match their images to the S3 listing; the detection index and the images'
    cache index (for `data.prepare_images`). Images the annotations name but S3 lacks are dropped and
    counted (`imagesMissing`); none left is an error naming the file."""
    if data.annotations is None:
        raise ConfigError("data.annotations: required with task 'detection'")
    train_prefix = S3Uri.parse(data.train)
    val_prefix = S3Uri.parse(data.validation) if data.validation else train_prefix
    if val_prefix.bucket != train_prefix.bucket:
        raise ConfigError(
            f"data.validation: must be in the bucket of data.train ({train_prefix.bucket}) for detection "
            f"(got {data.validation})"
        )
    sources = (data.annotations.train, data.annotations.validation)
    raw_train, raw_val = (store.get_bytes(S3Uri.parse(uri)) for uri in sources)
    train, names, ids, train_counts = parse_coco(raw_train, sources[0])
    validation, _, _, val_counts = parse_coco(raw_val, sources[1], class_ids=ids)
    if num_classes is not None and num_classes != len(names):
        raise ConfigError(f"model.numClasses: {num_classes} does not match the {len(names)} categories of {sources[0]}")
    listing: dict[str, tuple[int, str]] = {}
    for prefix in {train_prefix, val_prefix}:
        listing.update({o.key: (o.size, o.etag) for o in store.list_objects(prefix)})
    train, train_cache, train_missing = _resolve(train, train_prefix, listing, train_counts)
    validation, val_cache, val_missing = _resolve(validation, val_prefix, listing, val_counts)
    for part, kept, prefix, source in (
        ("train", train, train_prefix, sources[0]),
        ("validation", validation, val_prefix, sources[1]),
    ):
        if not kept:
            raise DataError(f"none of the images {source} names is under {prefix} ({part})")
    counts = {
        "train": {**train_counts.wire(), "imagesMissing": train_missing},
        "validation": {**val_counts.wire(), "imagesMissing": val_missing},
    }
    index = DetectionIndex(class_names=names, train=train, validation=validation, counts=counts)
    images = DatasetIndex(bucket=train_prefix.bucket, class_names=names, train=train_cache, validation=val_cache)
    return index, images


# -- torch side (workers) -------------------------------------------------------------------------


class DetectionFiles(torch.utils.data.Dataset[tuple[torch.Tensor, dict[str, torch.Tensor]]]):
    """Local images and their targets, as torchvision detectors take them: a float image in [0, 1] (the
    model's own transform resizes and normalises) and {"boxes": (K, 4) float, "labels": (K,) int64}."""

    def __init__(self, folder: Path, samples: Sequence[DetectionSample], flip: bool = False) -> None:
        self.folder = folder
        self.samples = list(samples)
        self.flip = flip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        import torchvision.transforms.functional as tf

        sample = self.samples[i]
        with Image.open(self.folder / sample.key) as image:
            tensor = tf.to_tensor(image.convert("RGB"))
        boxes = torch.tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4)
        labels = torch.tensor(sample.labels, dtype=torch.int64)
        if self.flip and torch.rand(()) < 0.5:
            # The one augmentation that keeps boxes exact without resampling: a horizontal flip.
            width = tensor.shape[-1]
            tensor = tensor.flip(-1)
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        return tensor, {"boxes": boxes, "labels": labels}


def collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Images and targets as lists: sizes and box counts differ from image to image."""
    return [image for image, _ in batch], [target for _, target in batch]


def index_wire(samples: Sequence[DetectionSample]) -> list[dict[str, Any]]:
    return [asdict(s) for s in samples]


def index_from_wire(raw: Sequence[Mapping[str, Any]]) -> list[DetectionSample]:
    return [DetectionSample(**dict(item)) for item in raw]
