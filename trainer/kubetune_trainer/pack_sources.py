"""What `kubetune data pack` reads: an ImageFolder or a COCO dataset, in a local folder or under an s3:// prefix.

Each source becomes a list of `Item`s (an image's name relative to the folder, its size, and its class
name or its boxes) by the trainer's own rules, so that the packed dataset trains as the source would:
images are the `data.IMAGE_SUFFIXES` files of a class folder (`<folder>/<class>/<any/path>`), a name
that would leave a folder (`localpaths`) or an image over `data.MAX_IMAGE_BYTES` is refused and counted,
class names are labels `manifest.check_label` accepts, and a COCO file is read and bounded as the
trainer reads it (`detection_data.load_coco`). Boxes are carried over as they are (bbox in COCO's
[x, y, w, h], category by name), not cleaned: the trainer cleans the packed boxes with the code that
cleans COCO files, so a run reports the same counts from either.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Protocol

from kubetune_trainer.data import IMAGE_SUFFIXES, MAX_IMAGE_BYTES, is_image, refusal
from kubetune_trainer.detection_data import MAX_ANNOTATION_BYTES, coco_categories, coco_image, load_coco
from kubetune_trainer.errors import DataError
from kubetune_trainer.localpaths import local_path, unsafe_reason
from kubetune_trainer.manifest import check_label
from kubetune_trainer.storage import MAX_LISTED_OBJECTS, S3Store, S3Uri


@dataclass(frozen=True)
class Listed:
    """A file below a folder: its name relative to the folder ("/"-separated) and its size."""

    name: str
    size: int


class Folder(Protocol):
    """A local folder or an s3:// prefix, read the same way."""

    @property
    def where(self) -> str:
        """The folder as the user named it, for messages."""
        ...

    def files(self) -> list[Listed]: ...

    def read(self, name: str, size: int) -> bytes: ...

    def uri(self, name: str) -> str: ...


@dataclass(frozen=True)
class LocalFolder:
    root: Path
    where: str

    def files(self) -> list[Listed]:
        """Every file below the folder (links to folders are not followed), sorted by name."""
        if not self.root.is_dir():
            raise DataError(f"{self.where}: no such folder")
        found: list[Listed] = []
        for folder, dirs, names in os.walk(self.root):
            dirs.sort()
            base = Path(folder).relative_to(self.root).as_posix()
            for name in sorted(names):
                path = Path(folder, name)
                if path.is_file():
                    found.append(Listed(name if base == "." else f"{base}/{name}", path.stat().st_size))
            if len(found) > MAX_LISTED_OBJECTS:
                raise DataError(f"{self.where}: more than {MAX_LISTED_OBJECTS:,} files, the most a listing reads")
        return sorted(found, key=lambda f: f.name)

    def read(self, name: str, size: int) -> bytes:
        path = local_path(self.root, name, f"{self.where}/{name}")
        with open(path, "rb") as file:
            body = file.read(size + 1)
        if len(body) != size:
            raise DataError(f"{path} changed while it was packed ({size:,} bytes when listed, {len(body):,} now)")
        return body

    def uri(self, name: str) -> str:
        return str(self.root / name)


@dataclass(frozen=True)
class S3Folder:
    store: S3Store
    prefix: S3Uri
    where: str

    def files(self) -> list[Listed]:
        base = self.prefix.folder
        listed = self.store.list_objects(self.prefix)
        return sorted((Listed(o.key[len(base) :], o.size) for o in listed if not o.key.endswith("/")), key=_name)

    def read(self, name: str, size: int) -> bytes:
        uri = self.object(name)
        body = self.store.get_bytes(uri, size)
        if len(body) != size:
            raise DataError(f"{uri} changed while it was packed ({size:,} bytes when listed, {len(body):,} now)")
        return body

    def uri(self, name: str) -> str:
        return str(self.object(name))

    def object(self, name: str) -> S3Uri:
        # Not S3Uri.join: that would drop the empty segments of a key the listing returned as it is.
        return S3Uri(self.prefix.bucket, self.prefix.folder + name)


def _name(listed: Listed) -> str:
    return listed.name


@dataclass(frozen=True)
class Item:
    """One image to pack: its name in its folder, its size, and its class name or its boxes (COCO's
    image `width` and `height`, and `annotations`: [{"bbox": [x, y, w, h], "category": name}])."""

    name: str
    size: int
    label: str = ""
    boxes: Mapping[str, Any] | None = None


@dataclass
class Gathered:
    """A source's images, and what was left out: refused (name → why), ignored (no image, or no class
    folder), missing (named by the annotations, not in the folder), boxes of images the file lacks."""

    folder: Folder
    items: list[Item] = field(default_factory=list)
    refused: dict[str, str] = field(default_factory=dict)
    ignored: int = 0
    missing: int = 0
    orphan_boxes: int = 0

    @property
    def classes(self) -> list[str]:
        """The class names (classification) or the named box categories (detection), sorted."""
        if self.items and self.items[0].boxes is not None:
            return sorted(
                {
                    box["category"]
                    for item in self.items
                    for box in (item.boxes or {}).get("annotations", [])
                    if isinstance(box.get("category"), str)
                }
            )
        return sorted({item.label for item in self.items})


def refused_image(name: str, size: int) -> str | None:
    """Why an image is not packed (counted like an unreadable one by the trainer), or None."""
    if why := refusal(name):
        return why
    if size > MAX_IMAGE_BYTES:
        return f"refused: {size:,} bytes, more than the {MAX_IMAGE_BYTES:,} an image may have"
    return None


def image_folder(folder: Folder, argument: str) -> Gathered:
    """The images of `<folder>/<class>/<any/path>`, labelled by their class folder."""
    out = Gathered(folder)
    for listed in folder.files():
        name, slash, _ = listed.name.partition("/")
        if not slash or not is_image(listed.name):
            out.ignored += 1  # not an image, or outside every class folder
        elif why := refused_image(listed.name, listed.size):
            out.refused[folder.uri(listed.name)] = why
        else:
            label = check_label(name, f"{argument}: the class folder {folder.uri(name)}")
            out.items.append(Item(listed.name, listed.size, label=label))
    if not out.items:
        raise DataError(
            f"{argument}: no images at {folder.where}/<class>/<image>{'/'.join(IMAGE_SUFFIXES)} "
            f"({out.ignored} other files, {len(out.refused)} refused)"
        )
    return out


def read_annotations(location: str, store: S3Store | None, argument: str) -> dict[str, Any]:
    """A COCO file, local or s3://, bounded and checked as the trainer reads one."""
    if location.startswith("s3://"):
        assert store is not None
        raw = store.get_bytes(S3Uri.parse(location), MAX_ANNOTATION_BYTES, argument)
    else:
        path = Path(location)
        if not path.is_file():
            raise DataError(f"{argument}: no such file: {location}")
        if path.stat().st_size > MAX_ANNOTATION_BYTES:
            raise DataError(f"{argument}: {location} is more than the {MAX_ANNOTATION_BYTES:,} bytes allowed")
        raw = path.read_bytes()
    return load_coco(raw, location)


def coco_dataset(folder: Folder, coco: Mapping[str, Any], source: str) -> Gathered:
    """The images a COCO file names (file names relative to `folder`), each with its boxes; images the
    folder lacks are left out and counted, and so are boxes of no image the file lists."""
    names = category_names(coco, source)
    images = sorted((coco_image(image, source) for image in coco["images"]), key=lambda i: i[1].key)
    out = Gathered(folder)
    boxes = boxes_by_image(coco, {image_id for image_id, _ in images}, names, out)
    files = {listed.name: listed.size for listed in folder.files()}
    for image_id, image in images:
        name = image.key
        if (why := unsafe_reason(name)) is not None:
            out.refused[folder.uri(name)] = f"refused: the file_name {why}"
        elif name not in files:
            out.missing += 1
        elif why := refused_image(name, files[name]):
            out.refused[folder.uri(name)] = why
        else:
            item = {"width": image.width, "height": image.height, "annotations": boxes.get(image_id, [])}
            out.items.append(Item(name, files[name], boxes=item))
    if not out.items:
        raise DataError(f"none of the images {source} names is in {folder.where} ({out.missing} missing)")
    return out


def boxes_by_image(
    coco: Mapping[str, Any], ids: set[int | str], names: Mapping[int, str], out: Gathered
) -> dict[int | str, list[dict[str, Any]]]:
    """The file's annotations as packed boxes, by image id; those of no image it lists are counted."""
    boxes: dict[int | str, list[dict[str, Any]]] = {}
    for annotation in coco.get("annotations") or []:
        image_id = annotation.get("image_id") if isinstance(annotation, dict) else None
        if not isinstance(image_id, int | str) or isinstance(image_id, bool) or image_id not in ids:
            out.orphan_boxes += 1
            continue
        boxes.setdefault(image_id, []).append(box_of(annotation, names))
    return boxes


def category_names(coco: Mapping[str, Any], source: str) -> dict[int, str]:
    """COCO category id → name; two categories of one name would become one class, so they are refused."""
    names = coco_categories(coco, source)
    seen: dict[str, int] = {}
    for cid, name in sorted(names.items()):
        if name in seen:
            raise DataError(
                f"{source}: categories {seen[name]} and {cid} are both named {name!r}; packed boxes name it"
            )
        seen[name] = cid
    return names


def box_of(annotation: Mapping[str, Any], names: Mapping[int, str]) -> dict[str, Any]:
    """An annotation as a packed box: its bbox as it is, its category by name (None when the file has no
    such category: the trainer drops and counts it, as it does from the COCO file)."""
    category = annotation.get("category_id")
    if not isinstance(category, int) or isinstance(category, bool):
        return {"bbox": annotation.get("bbox"), "category": None}
    return {"bbox": annotation.get("bbox"), "category": names.get(category)}
