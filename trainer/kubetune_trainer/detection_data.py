"""Detection data: COCO annotations in S3, images under an S3 prefix.

The annotations are read once on the driver and turned into a plain index (image key, size, boxes,
labels), which travels to the workers like the classification index; images go through the same
per-node cache (`data.prepare_images`), or stream mode's windows (`stream.py`: each image's bytes from its
group file, its boxes from this index). What users' COCO files really hold is handled, not crashed on:
images without boxes stay as negatives, boxes are clipped to their image, and boxes with no area left
(zero or negative size, wholly outside the image) or of an unknown category are dropped. Each of these
is counted and reported (`model.json`: `data.annotations`).

Whoever can write to the bucket writes these files, so everything in them is bounded: the file's size
(refused from the object's size, before it is read), the counts of images, annotations and categories,
image sides and box coordinates (finite, within MAX_IMAGE_SIDE), boxes per image (the rest dropped and
counted), and `file_name`s, which must stay inside the cache folder (`localpaths`; an image whose name
would not is refused and counted like an unreadable one).

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

from kubetune_trainer.config import MAX_CLASSES, DataSpec
from kubetune_trainer.data import DatasetIndex, Sample, open_image
from kubetune_trainer.errors import ConfigError, DataError
from kubetune_trainer.localpaths import local_path, unsafe_reason
from kubetune_trainer.storage import S3Store, S3Uri

# Bounds on an annotation file. COCO 2017's instances_train2017.json is 448 MB with 118,287 images and
# 860,001 annotations (at most 93 per image); Objects365's 1.7 million images fit too.
MAX_ANNOTATION_BYTES = 512 * 1024 * 1024
MAX_IMAGES = 2_000_000
MAX_ANNOTATIONS = 20_000_000
MAX_BOXES_PER_IMAGE = 1000
MAX_IMAGE_SIDE = 100_000  # pixels; also the bound on a box coordinate's magnitude
MAX_NAME_LENGTH = 256  # of a category name


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
    boxes_dropped_over_limit: int = 0

    def wire(self) -> dict[str, int]:
        return {_camel(k): v for k, v in asdict(self).items()}


def _camel(name: str) -> str:
    first, *rest = name.split("_")
    return first + "".join(p.title() for p in rest)


def _number(value: Any) -> float | None:
    """A finite number within ±MAX_IMAGE_SIDE, else None."""
    if isinstance(value, bool) or not isinstance(value, int | float) or not math.isfinite(value):
        return None
    return float(value) if abs(value) <= MAX_IMAGE_SIDE else None


def _id(value: Any) -> int | str | None:
    """A COCO id (a number or a string), else None: a list or an object cannot name anything."""
    return value if isinstance(value, int | str) and not isinstance(value, bool) else None


def load_coco(raw: bytes | str, source: str) -> dict[str, Any]:
    """The file's JSON object, with its lists within MAX_IMAGES and MAX_ANNOTATIONS."""
    try:
        coco = json.loads(raw)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise DataError(f"{source} is not valid JSON: {error}") from None
    except RecursionError:
        raise DataError(f"{source} is not a COCO annotation file: it is nested too deeply") from None
    if not isinstance(coco, dict) or not isinstance(coco.get("images"), list):
        raise DataError(f"{source} is not a COCO annotation file: it has no 'images' list")
    for key, limit in (("images", MAX_IMAGES), ("annotations", MAX_ANNOTATIONS), ("categories", MAX_CLASSES)):
        if isinstance(coco.get(key), list) and len(coco[key]) > limit:
            raise DataError(f"{source}: {len(coco[key]):,} {key}, more than the {limit:,} allowed")
    return coco


def coco_categories(coco: Mapping[str, Any], source: str) -> dict[int, str]:
    categories: dict[int, str] = {}
    for c in coco.get("categories") or []:
        if isinstance(c, dict) and isinstance(c.get("id"), int) and not isinstance(c["id"], bool):
            name = str(c.get("name", c["id"]))
            if len(name) > MAX_NAME_LENGTH:
                raise DataError(f"{source}: category {c['id']}'s name is longer than {MAX_NAME_LENGTH} characters")
            categories[c["id"]] = name
    return categories


def coco_image(image: Any, source: str) -> tuple[int | str, DetectionSample]:
    if not isinstance(image, dict) or _id(image.get("id")) is None or not isinstance(image.get("file_name"), str):
        raise DataError(f"{source}: every image needs an 'id' and a 'file_name' (got {str(image)[:120]})")
    width, height = _number(image.get("width")), _number(image.get("height"))
    if not width or not height or width <= 0 or height <= 0:
        raise DataError(
            f"{source}: image {image['file_name'][:200]!r} needs a positive width and height "
            f"of at most {MAX_IMAGE_SIDE:,} pixels"
        )
    return image["id"], DetectionSample(key=image["file_name"], width=int(width), height=int(height))


def parse_coco(
    raw: bytes | str, source: str, class_ids: Sequence[int] | None = None
) -> tuple[list[DetectionSample], list[str], list[int], AnnotationCounts]:
    """Samples, class names and COCO category ids (in label order), and what was cleaned up.

    `class_ids` fixes the label order (the validation file uses the training file's categories); when
    omitted it is the file's categories sorted by id.
    """
    return sanitize_coco(load_coco(raw, source), source, class_ids)


def sanitize_coco(
    coco: Mapping[str, Any], source: str, class_ids: Sequence[int] | None = None
) -> tuple[list[DetectionSample], list[str], list[int], AnnotationCounts]:
    """`parse_coco` of a COCO object already read (the other formats' boxes, put in COCO's shape)."""
    categories = coco_categories(coco, source)
    ids = list(class_ids) if class_ids is not None else sorted(categories)
    if not ids:
        raise DataError(f"{source} has no categories: a detection job needs at least one object class")
    names = [categories.get(i, str(i)) for i in ids]
    label_of = {cid: position + 1 for position, cid in enumerate(ids)}

    counts = AnnotationCounts()
    samples = dict(coco_image(image, source) for image in coco["images"])
    counts.images = len(samples)

    for annotation in coco.get("annotations") or []:
        if not isinstance(annotation, dict):
            counts.boxes_dropped_empty += 1
            continue
        image_id, category_id = _id(annotation.get("image_id")), _id(annotation.get("category_id"))
        sample = samples.get(image_id) if image_id is not None else None
        if sample is None:
            counts.boxes_dropped_unknown_image += 1
            continue
        label = label_of.get(category_id) if isinstance(category_id, int) else None
        if label is None:
            counts.boxes_dropped_unknown_category += 1
            continue
        if len(sample.boxes) >= MAX_BOXES_PER_IMAGE:
            counts.boxes_dropped_over_limit += 1
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
    # data.annotations.test's images: judged once after training with the exported model.
    test: list[DetectionSample] = field(default_factory=list)

    def wire(self) -> dict[str, Any]:
        return {
            "classNames": self.class_names,
            "train": index_wire(self.train),
            "validation": index_wire(self.validation),
            "test": index_wire(self.test),
            "counts": self.counts,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> DetectionIndex:
        return cls(
            class_names=list(data["classNames"]),
            train=index_from_wire(data["train"]),
            validation=index_from_wire(data["validation"]),
            counts={part: dict(values) for part, values in data["counts"].items()},
            test=index_from_wire(data.get("test", [])),
        )

    def without_corrupt(self, corrupt: Mapping[str, str]) -> DetectionIndex:
        """Unreadable images dropped (their boxes with them), and counted per part (`imagesCorrupt`)."""
        parts = {name: getattr(self, name) for name in ("train", "validation", "test")}
        kept = {name: [s for s in samples if s.key not in corrupt] for name, samples in parts.items()}
        counts = {part: dict(values) for part, values in self.counts.items()}
        for name, samples in parts.items():
            if name in counts or samples:
                counts.setdefault(name, {})["imagesCorrupt"] = len(samples) - len(kept[name])
        return DetectionIndex(self.class_names, kept["train"], kept["validation"], counts, kept["test"])


@dataclass
class Resolved:
    """One annotation file's images matched to the listing: samples with full keys, their cache entries,
    how many the file names but S3 lacks, and those refused for a name that would leave the cache
    (kept in `samples`, so that dropping them as unreadable counts them; key → why)."""

    samples: list[DetectionSample]
    cached: list[Sample]
    missing: int
    refused: dict[str, str]


def _resolve(samples: list[DetectionSample], prefix: S3Uri, listing: Mapping[str, tuple[int, str]]) -> Resolved:
    base = prefix.folder
    out = Resolved([], [], 0, {})
    for sample in samples:
        key = base + sample.key
        if key not in listing:
            out.missing += 1
            continue
        out.samples.append(DetectionSample(key, sample.width, sample.height, sample.boxes, sample.labels))
        why = unsafe_reason(sample.key) or unsafe_reason(key)
        if why is not None:
            out.refused[key] = f"refused: the file_name {why}"
            continue
        size, etag = listing[key]
        out.cached.append(Sample(key, 0, size, etag))
    return out


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
    test_prefix = S3Uri.parse(data.test) if data.test else val_prefix
    for field_name, prefix in (("data.validation", val_prefix), ("data.test", test_prefix)):
        if prefix.bucket != train_prefix.bucket:
            raise ConfigError(
                f"{field_name}: must be in the bucket of data.train ({train_prefix.bucket}) for detection "
                f"(got {prefix})"
            )
    parts = {"train": (data.annotations.train, train_prefix), "validation": (data.annotations.validation, val_prefix)}
    if data.annotations.test:
        parts["test"] = (data.annotations.test, test_prefix)
    raw = {
        part: store.get_bytes(S3Uri.parse(uri), MAX_ANNOTATION_BYTES, f"data.annotations.{part}")
        for part, (uri, _) in parts.items()
    }
    train, names, ids, train_counts = parse_coco(raw["train"], parts["train"][0])
    parsed = {"train": (train, train_counts)}
    for part in parts.keys() - {"train"}:
        samples, _, _, part_counts = parse_coco(raw[part], parts[part][0], class_ids=ids)
        parsed[part] = (samples, part_counts)
    if num_classes is not None and num_classes != len(names):
        raise ConfigError(
            f"model.numClasses: {num_classes} does not match the {len(names)} categories of {parts['train'][0]}"
        )
    listing: dict[str, tuple[int, str]] = {}
    for prefix in {prefix for _, prefix in parts.values()}:
        listing.update({o.key: (o.size, o.etag) for o in store.list_objects(prefix)})
    found = {part: _resolve(parsed[part][0], prefix, listing) for part, (_, prefix) in parts.items()}
    for part, (source, prefix) in parts.items():
        if not found[part].samples:
            raise DataError(f"none of the images {source} names is under {prefix} ({part})")
    counts = {part: {**parsed[part][1].wire(), "imagesMissing": found[part].missing} for part in parts}
    empty = Resolved([], [], 0, {})
    test = found.get("test", empty)
    index = DetectionIndex(names, found["train"].samples, found["validation"].samples, counts, test.samples)
    images = DatasetIndex(
        bucket=train_prefix.bucket,
        class_names=names,
        train=found["train"].cached,
        validation=found["validation"].cached,
        corrupt={key: why for resolved in found.values() for key, why in resolved.refused.items()},
        test=test.cached,
    )
    return index, images


# -- torch side (workers) -------------------------------------------------------------------------


class DetectionFiles(torch.utils.data.Dataset[tuple[torch.Tensor, dict[str, torch.Tensor]]]):
    """Local images and their targets, as torchvision detectors take them: a float image in [0, 1] (the
    model's own transform resizes and normalises) and {"boxes": (K, 4) float, "labels": (K,) int64}."""

    def __init__(self, folder: Path, samples: Sequence[DetectionSample], flip: bool = False) -> None:
        self.folder = folder
        self.samples = list(samples)
        self.paths = [local_path(folder, s.key, s.key) for s in self.samples]
        self.flip = flip

    def __len__(self) -> int:
        return len(self.samples)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        with open_image(self.paths[i]) as image:
            rgb = image.convert("RGB")
        return self.item(i, rgb)

    def item(self, i: int, rgb: Image.Image) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Image `i`'s item from its decoded pixels and its indexed boxes (stream mode decodes the pixels
        from its group file: `stream.GroupImages`)."""
        import torchvision.transforms.functional as tf

        tensor = tf.to_tensor(rgb)
        flipped = self.draws_flip()
        return (tensor.flip(-1) if flipped else tensor), self.target(i, tensor.shape[-1], flipped)

    def draws_flip(self) -> bool:
        """Whether this image is flipped: with `flip`, one draw on the generator `loaders.SeededSamples`
        seeded for it (the GPU path draws it in the loader process too: `detection_decode`)."""
        # The one augmentation that keeps boxes exact without resampling: a horizontal flip.
        return self.flip and bool(torch.rand(()) < 0.5)

    def target(self, i: int, width: int, flipped: bool) -> dict[str, torch.Tensor]:
        """Image `i`'s boxes and labels, the boxes mirrored when the image of this `width` is `flipped`."""
        sample = self.samples[i]
        boxes = torch.tensor(sample.boxes, dtype=torch.float32).reshape(-1, 4)
        if flipped:
            boxes = torch.stack([width - boxes[:, 2], boxes[:, 1], width - boxes[:, 0], boxes[:, 3]], dim=1)
        return {"boxes": boxes, "labels": torch.tensor(sample.labels, dtype=torch.int64)}


def collate(
    batch: Sequence[tuple[torch.Tensor, dict[str, torch.Tensor]]],
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Images and targets as lists: sizes and box counts differ from image to image."""
    return [image for image, _ in batch], [target for _, target in batch]


def index_wire(samples: Sequence[DetectionSample]) -> list[dict[str, Any]]:
    return [asdict(s) for s in samples]


def index_from_wire(raw: Sequence[Mapping[str, Any]]) -> list[DetectionSample]:
    return [DetectionSample(**dict(item)) for item in raw]
