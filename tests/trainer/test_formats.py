"""data.format webdataset and manifest: indexing, the node cache, and what a hostile bucket cannot do.

Real shards and manifests in the session's moto S3; the same index, cache and corrupt-image accounting
the ImageFolder and COCO formats have (tests/trainer/test_data.py, test_detection_parts.py).
"""

from __future__ import annotations

import io
import json
import re
import tarfile
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer import shards
from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import check_corrupt, prepare_images
from kubetune_trainer.errors import ConfigError, DataError, StorageError
from kubetune_trainer.formats import class_order, classification_index, detection_index
from kubetune_trainer.manifest import covering_prefixes
from kubetune_trainer.storage import S3Store, S3Uri
from tests.support.digits_world import REGION, DigitsWorld, digit_png, tar_bytes


@pytest.fixture
def store(world: DigitsWorld) -> S3Store:
    return S3Store(world.endpoint, REGION)


@pytest.fixture(scope="module")
def png(world: DigitsWorld) -> bytes:
    return digit_png(world.digits(range(0, 1))[0][0])


def config(
    world: DigitsWorld, task: str = "classification", num_classes: int | None = None, **data: Any
) -> TrainerConfig:
    model: dict[str, Any] = {"architecture": "resnet18", "checkpoint": "s3://models/base/resnet18.safetensors"}
    if num_classes is not None:
        model["numClasses"] = num_classes
    if task == "detection":
        model["architecture"] = "fasterrcnn_mobilenet_v3_large_320_fpn"
    return TrainerConfig.model_validate(
        {
            "task": task,
            "model": model,
            "data": data,
            "training": {"seed": 3},
            "output": {"path": "s3://results/formats/"},
            "storage": {"endpoint": world.endpoint, "region": REGION},
            "runName": "formats",
            "jobName": "formats",
        }
    )


def hostile_tar(png: bytes) -> bytes:
    """Members a safe reader must not follow: links, a device, names leaving the folder."""
    buffer = io.BytesIO()
    with tarfile.open(fileobj=buffer, mode="w") as tar:

        def add(name: str, body: bytes = b"", kind: bytes = tarfile.REGTYPE, link: str = "") -> None:
            info = tarfile.TarInfo(name)
            info.type, info.linkname, info.size = kind, link, len(body) if kind == tarfile.REGTYPE else 0
            tar.addfile(info, io.BytesIO(body) if kind == tarfile.REGTYPE else None)

        for name in ("./ok/0001", "ok/0002"):
            add(f"{name}.png", png)
            add(f"{name}.cls", b"7")
        for name in ("../escape", "/etc/absolute", "a//double"):
            add(f"{name}.png", png)
            add(f"{name}.cls", b"7")
        add("symlink.png", kind=tarfile.SYMTYPE, link="/etc/passwd")
        add("symlink.cls", b"7")
        add("hardlink.png", kind=tarfile.LNKTYPE, link="ok/0002.png")
        add("hardlink.cls", b"7")
        add("device.png", kind=tarfile.CHRTYPE)
        add("nolabel.png", png)
        add("broken.png", b"not a png")
        add("broken.cls", b"8")
    return buffer.getvalue()


def test_webdataset_classification_reads_labels_and_refuses_what_would_leave_the_cache(
    world: DigitsWorld, store: S3Store, png: bytes, tmp_path: Path
) -> None:
    good = [(f"{n:03d}.png", png) for n in range(20)]
    labels = [(f"{n:03d}.cls" if n % 2 else f"{n:03d}.json", b"7" if n % 2 else b'{"label": 8}') for n in range(20)]
    world.put("s3://datasets/wds/a-000.tar", tar_bytes([m for pair in zip(good, labels, strict=True) for m in pair]))
    world.put("s3://datasets/wds/a-001.tar", hostile_tar(png))

    index = classification_index(store, config(world, format="webdataset", train="s3://datasets/wds/a-{000..001}.tar"))

    assert index.class_names == ["7", "8"]
    assert sorted(index.shards) == ["wds/a-000.tar", "wds/a-001.tar"]
    keys = {s.key for s in index.samples}
    assert {"wds/a-001.tar/ok/0001.png", "wds/a-001.tar/ok/0002.png", "wds/a-001.tar/broken.png"} <= keys
    assert len(keys) == 23 and index.ignored_objects >= 1  # nolabel.png has nothing to learn from
    refused = {k.removeprefix("wds/a-001.tar/"): why for k, why in index.corrupt.items()}
    assert set(refused) == {
        "../escape.png",
        "/etc/absolute.png",
        "a//double.png",
        "symlink.png",
        "hardlink.png",
        "device.png",
    }
    assert "symbolic link" in refused["symlink.png"] and "hard link" in refused["hardlink.png"]

    folder, corrupt = prepare_images(store, index, tmp_path / "cache")
    written = sorted(str(p.relative_to(tmp_path)) for p in tmp_path.rglob("*") if p.is_file() or p.is_symlink())
    assert not any(p.is_symlink() for p in tmp_path.rglob("*"))
    assert all(p.startswith("cache/") for p in written)
    assert (folder / "wds/a-001.tar/ok/0001.png").read_bytes() == png
    assert "wds/a-001.tar/broken.png" in corrupt and "wds/a-001.tar/../escape.png" in corrupt
    # 7 of 29 images unreadable or refused: far over the 1% a run tolerates, with the usual message.
    with pytest.raises(DataError, match=r"7 of 29 images \(24.1%\) are corrupt or unreadable"):
        check_corrupt(index, corrupt)


def test_a_missing_shard_is_named(world: DigitsWorld, store: S3Store, png: bytes) -> None:
    world.put("s3://datasets/wds-gap/s-0.tar", tar_bytes([("a.png", png), ("a.cls", b"1")]))
    with pytest.raises(
        DataError, match=r"data.train: 2 of the 3 shards .* are missing, e.g. s3://datasets/wds-gap/s-1.tar"
    ):
        classification_index(store, config(world, format="webdataset", train="s3://datasets/wds-gap/s-{0..2}.tar"))


@pytest.mark.parametrize(
    ("body", "limits", "message"),
    [
        (b"certainly not a tar file" * 40, {}, "is not a readable tar shard"),
        ("many", {"MAX_SHARD_MEMBERS": 3}, "holds more than 3 tar members"),
        ("label", {"MAX_LABEL_BYTES": 1}, "the label member 'a.cls' is over 1 bytes"),
        ("pax", {"MAX_HEADER_BYTES": 100}, "is not a readable tar shard: a .*-byte extended header"),
    ],
)
def test_shards_are_bounded(
    world: DigitsWorld,
    store: S3Store,
    png: bytes,
    monkeypatch: pytest.MonkeyPatch,
    body: Any,
    limits: dict[str, int],
    message: str,
) -> None:
    for name, value in limits.items():
        monkeypatch.setattr(shards, name, value)
    members = [("a.png", png), ("a.cls", b"12"), ("b.png", png), ("b.cls", b"1")]
    if body == "pax":
        buffer = io.BytesIO()
        with tarfile.open(fileobj=buffer, mode="w", format=tarfile.PAX_FORMAT) as tar:
            info = tarfile.TarInfo("a.png")
            info.size, info.pax_headers = len(png), {"comment": "x" * 500}
            tar.addfile(info, io.BytesIO(png))
        body = buffer.getvalue()
    elif isinstance(body, str):
        body = tar_bytes(members)
    world.put(f"s3://datasets/wds-bounds/{len(limits)}-{len(body)}.tar", body)
    with pytest.raises(DataError, match=message):
        classification_index(
            store, config(world, format="webdataset", train=f"s3://datasets/wds-bounds/{len(limits)}-{len(body)}.tar")
        )


@pytest.mark.parametrize(
    ("limit", "message"),
    [
        ({"MAX_PART_IMAGES": 5}, "the shards of this part hold more than 5 images, the most a part may have"),
        ({"MAX_ANNOTATION_BYTES": 8}, "the shards of this part hold label members of more than 8 bytes in all"),
    ],
)
def test_the_shards_of_a_part_are_bounded_together(
    world: DigitsWorld, store: S3Store, png: bytes, monkeypatch: pytest.MonkeyPatch, limit: dict[str, int], message: str
) -> None:
    """Each shard within its own bounds, but together more images than stream mode's scale, or more label
    bytes than a COCO file may hold."""
    for name, value in limit.items():
        monkeypatch.setattr(f"kubetune_trainer.formats.{name}", value)
    for n in range(3):
        world.put(
            f"s3://datasets/wds-part/s-{n}.tar",
            tar_bytes([(f"{k}.png", png) for k in range(3)] + [(f"{k}.cls", b"1") for k in range(3)]),
        )
    with pytest.raises(DataError, match=re.escape(message)):
        classification_index(store, config(world, format="webdataset", train="s3://datasets/wds-part/s-{0..2}.tar"))


@pytest.mark.parametrize(
    ("module", "limit", "value", "message"),
    [
        ("manifest", "MAX_MANIFEST_BYTES", 16, r"data.train: s3://datasets/mb/m.csv is .* more than the 16 bytes"),
        ("manifest", "MAX_LINE_BYTES", 10, r"s3://datasets/mb/m.csv line 3: longer than 10 characters"),
        ("manifest", "MAX_LISTED_OBJECTS", 2, r"s3://datasets/mb/m.csv: more than 2 images"),
        (
            "shards",
            "MAX_SHARD_BYTES",
            1024,
            r"s3://datasets/mb/s.tar is .* bytes, more than the 1,024 a shard may have",
        ),
    ],
)
def test_manifests_and_shards_are_bounded_by_size(
    world: DigitsWorld,
    store: S3Store,
    png: bytes,
    monkeypatch: pytest.MonkeyPatch,
    module: str,
    limit: str,
    value: int,
    message: str,
) -> None:
    monkeypatch.setattr(f"kubetune_trainer.{module}.{limit}", value)
    if module == "manifest":
        world.put_many({f"s3://datasets/mb/{n}.png": png for n in range(3)})
        world.put("s3://datasets/mb/m.csv", b"uri,label\n0.png,a\n1.png,birds\n2.png,a\n")
        spec = {"format": "manifest", "train": "s3://datasets/mb/m.csv"}
    else:
        world.put("s3://datasets/mb/s.tar", tar_bytes([("a.png", png), ("a.cls", b"1")]))
        spec = {"format": "webdataset", "train": "s3://datasets/mb/s.tar"}
    with pytest.raises((DataError, StorageError), match=message):
        classification_index(store, config(world, **spec))


def test_manifest_csv_names_images_anywhere_in_its_bucket(world: DigitsWorld, store: S3Store, png: bytes) -> None:
    images = {f"s3://datasets/far/{d}/{n}.png": png for d in ("x", "y/z") for n in range(6)}
    world.put_many(images)
    rows = ["URI,Label"] + [f"{uri},{'cat' if n % 2 else 'dog'}" for n, uri in enumerate(sorted(images))]
    rows += ["relative/none.png,cat", "s3://datasets/far/../up.png,dog"]
    world.put("s3://datasets/manifests/pets.csv", "\n".join(rows).encode())

    index = classification_index(store, config(world, format="manifest", train="s3://datasets/manifests/pets.csv"))

    assert index.class_names == ["cat", "dog"] and len(index.samples) == 12
    assert index.corrupt == {
        "manifests/relative/none.png": "refused: no such object (line 14)",
        "far/../up.png": "refused: the key has a '..' path segment",
    }


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("s3://datasets/a.png", "line 1: expected 2 columns uri,label"),
        ("s3://other-bucket/a.png,cat", "line 1: s3://other-bucket/a.png is not in the manifest's bucket 'datasets'"),
        ("https://example.com/a.png,cat", "line 1: 'https://example.com/a.png' is not an s3:// URI or a key"),
        ("a.png,cat\na.png,dog", "line 2: the image s3://datasets/bad/a.png is on line 1 too"),
        ("a.png,\x1b[31mred", "line 1: a label is a class name of 1 to 256 printable characters"),
        ('"a.png,cat', "line 1: not a CSV row"),
        ("../a.png,cat", "data.train: s3://datasets/bad/m.csv holds no readable image with a label (1 refused)"),
    ],
)
def test_bad_manifest_lines_fail_naming_the_line(world: DigitsWorld, store: S3Store, text: str, message: str) -> None:
    world.put("s3://datasets/bad/m.csv", text.encode())
    with pytest.raises(DataError, match=re.escape(message)):
        classification_index(store, config(world, format="manifest", train="s3://datasets/bad/m.csv"))


def test_manifest_validation_must_know_its_classes_and_the_class_count_must_match(
    world: DigitsWorld, store: S3Store, png: bytes
) -> None:
    world.put_many({f"s3://datasets/mv/{n}.png": png for n in range(4)})
    world.put("s3://datasets/mv/train.jsonl", b'{"uri": "0.png", "label": 1}\n{"uri": "1.png", "label": 10}\n')
    world.put("s3://datasets/mv/val.jsonl", b'{"uri": "2.png", "label": 1}\n{"uri": "3.png", "label": "bird"}\n')
    spec = {"format": "manifest", "train": "s3://datasets/mv/train.jsonl", "validation": "s3://datasets/mv/val.jsonl"}
    with pytest.raises(DataError, match=r"label\(s\) 'bird' of s3://datasets/mv/val.jsonl are not classes of"):
        classification_index(store, config(world, **spec))
    world.put("s3://datasets/mv/val.jsonl", b'{"uri": "2.png", "label": 10}\n')
    index = classification_index(store, config(world, **spec))
    assert (index.class_names, [s.label for s in index.validation]) == (["1", "10"], [1])
    with pytest.raises(
        ConfigError, match=r"model.numClasses: 3 does not match the 2 labels of s3://datasets/mv/train.jsonl"
    ):
        classification_index(store, config(world, num_classes=3, **spec))


def test_detection_boxes_from_a_manifest_are_cleaned_like_coco(world: DigitsWorld, store: S3Store, png: bytes) -> None:
    world.put_many({f"s3://datasets/md/{n}.png": png for n in range(3)})

    def line(n: int, *boxes: tuple[list[float], Any]) -> str:
        item = {
            "uri": f"{n}.png",
            "width": 32,
            "height": 32,
            "annotations": [{"bbox": b, "category": c} for b, c in boxes],
        }
        return json.dumps(item)

    train = [
        line(0, ([1, 1, 10, 10], "square"), ([30, 30, 10, 10], "square"), ([5, 5, 0, 3], "dot")),
        line(1, ([40, 40, 5, 5], "square")),
        line(9, ([1, 1, 5, 5], "square")),  # no such image
    ]
    world.put("s3://datasets/md/train.jsonl", "\n".join(train).encode())
    world.put("s3://datasets/md/val.jsonl", line(2, ([2, 2, 8, 8], "square"), ([2, 2, 8, 8], "circle")).encode())

    boxes, images = detection_index(
        store,
        config(
            world,
            "detection",
            format="manifest",
            train="s3://datasets/md/train.jsonl",
            validation="s3://datasets/md/val.jsonl",
        ),
    )

    assert boxes.class_names == ["dot", "square"]  # "dot"'s only box had no area, but it names a class
    train_counts, val_counts = boxes.counts["train"], boxes.counts["validation"]
    assert (train_counts["boxes"], train_counts["boxesClipped"], train_counts["boxesDroppedEmpty"]) == (2, 1, 1)
    assert (train_counts["boxesDroppedOutside"], train_counts["imagesMissing"]) == (1, 1)
    assert (val_counts["boxes"], val_counts["boxesDroppedUnknownCategory"]) == (1, 1)
    assert [s.key for s in images.train] == ["md/0.png", "md/1.png"]


def test_a_detection_test_split_is_read_in_the_format_of_train(
    world: DigitsWorld, store: S3Store, png: bytes, tmp_path: Path
) -> None:
    world.put_many({f"s3://datasets/mt/{n}.png": png for n in range(6)})

    def lines(*numbers: int) -> bytes:
        box = {"bbox": [2, 2, 8, 8], "category": "square"}
        return "\n".join(
            json.dumps({"uri": f"{n}.png", "width": 32, "height": 32, "annotations": [box]}) for n in numbers
        ).encode()

    for part, numbers in (("train", (0, 1, 2)), ("val", (3,)), ("test", (4, 5, 9))):  # 9.png: no such image
        world.put(f"s3://datasets/mt/{part}.jsonl", lines(*numbers))
    parts = {part: f"s3://datasets/mt/{part}.jsonl" for part in ("train", "validation", "test")}
    parts["validation"] = "s3://datasets/mt/val.jsonl"

    boxes, images = detection_index(store, config(world, "detection", format="manifest", **parts))

    assert [s.key for s in boxes.test] == [s.key for s in images.test] == ["mt/4.png", "mt/5.png"]
    assert (boxes.counts["test"]["boxes"], boxes.counts["test"]["imagesMissing"]) == (2, 1)
    folder, corrupt = prepare_images(store, images, tmp_path)  # the full cache holds the test images too
    assert not corrupt and (folder / "mt/5.png").read_bytes() == png
    with pytest.raises(ValueError, match=r"test: with format manifest, the s3:// URI of a .csv or .jsonl file"):
        config(world, "detection", format="manifest", **(parts | {"test": "s3://datasets/mt/test-{0..1}.tar"}))


def test_detection_boxes_from_shards(world: DigitsWorld, store: S3Store, png: bytes, tmp_path: Path) -> None:
    def sample(n: int) -> list[tuple[str, bytes]]:
        item = {"width": 32, "height": 32, "annotations": [{"bbox": [2, 2, 10, 10], "category": n % 2}]}
        return [(f"{n:03d}.png", png), (f"{n:03d}.json", json.dumps(item).encode())]

    world.put("s3://datasets/wdsd/s-0.tar", tar_bytes([m for n in range(10) for m in sample(n)]))
    boxes, images = detection_index(
        store, config(world, "detection", format="webdataset", train="s3://datasets/wdsd/s-0.tar")
    )
    assert boxes.class_names == ["0", "1"]
    assert (len(boxes.train), len(boxes.validation)) == (8, 2)
    folder, corrupt = prepare_images(store, images, tmp_path)
    assert not corrupt and all((folder / s.key).read_bytes() == png for s in boxes.train)


@pytest.mark.parametrize("data_format", ["manifest", "webdataset"])
def test_boxes_from_manifests_and_shards_have_the_bounds_of_coco_boxes(
    world: DigitsWorld, store: S3Store, png: bytes, monkeypatch: pytest.MonkeyPatch, data_format: str
) -> None:
    """Box coordinates finite and within ±100,000, boxes per image bounded (dropped and counted as COCO's
    are), image sides bounded (the run fails naming the image), as for a COCO file."""
    monkeypatch.setattr("kubetune_trainer.detection_data.MAX_BOXES_PER_IMAGE", 3)
    good = [[1, 1, 8, 8], "square"]
    absurd = [[[float("nan"), 1, 5, 5], "square"], [[1, 1, float("inf"), 5], "square"], [[1, 1, 1e9, 5], "square"]]
    items = [
        {"width": 32, "height": 32, "annotations": [{"bbox": b, "category": c} for b, c in [good, *absurd]]},
        {"width": 32, "height": 32, "annotations": [{"bbox": good[0], "category": "square"}] * 5},
    ]
    folder = f"s3://datasets/bounds-{data_format}"
    world.put_many({f"{folder}/{n}.png": png for n in range(3)})

    def put(items: list[dict[str, Any]], part: str, first: int = 0) -> str:
        if data_format == "manifest":  # json.dumps writes NaN and Infinity, and json.loads reads them
            lines = [json.dumps({"uri": f"{n}.png", **item}) for n, item in enumerate(items, first)]
            world.put(f"{folder}/{part}.jsonl", "\n".join(lines).encode())
            return f"{folder}/{part}.jsonl"
        members = [
            (f"{n}.{kind}", png if kind == "png" else json.dumps(item).encode())
            for n, item in enumerate(items, first)
            for kind in ("png", "json")
        ]
        world.put(f"{folder}/{part}.tar", tar_bytes(members))
        return f"{folder}/{part}.tar"

    spec = {"format": data_format, "train": put(items, "train"), "validation": put(items[1:], "val", 2)}
    boxes, _ = detection_index(store, config(world, "detection", **spec))
    counts = boxes.counts["train"]
    assert (counts["boxes"], counts["boxesDroppedEmpty"], counts["boxesDroppedOverLimit"]) == (4, 3, 2)
    assert all(abs(v) <= 100_000 for s in boxes.train for box in s.boxes for v in box)

    items[0]["width"] = 1_000_000
    spec = {"format": data_format, "train": put(items, "train"), "validation": put(items[1:], "val", 2)}
    with pytest.raises(DataError, match="needs a positive width and height of at most 100,000 pixels"):
        detection_index(store, config(world, "detection", **spec))


def test_classes_sort_as_numbers_when_they_are_numbers() -> None:
    assert class_order({"10", "2", "1"}) == ["1", "2", "10"]
    assert class_order({"b", "10", "a", "2"}) == ["2", "10", "a", "b"]


def test_covering_prefixes_stay_few_and_do_not_nest(monkeypatch: pytest.MonkeyPatch) -> None:
    keys = [f"a/{n}/x.png" for n in range(5)] + ["a/0/deeper/y.png", "b/z.png"]
    assert covering_prefixes(keys) == ["b", "a/0", "a/1", "a/2", "a/3", "a/4"]
    monkeypatch.setattr("kubetune_trainer.manifest.MAX_LISTINGS", 3)
    assert covering_prefixes(keys) == ["a", "b"]


def test_a_shard_read_stops_at_its_listed_size(world: DigitsWorld, store: S3Store, png: bytes) -> None:
    """A shard that grew since it was listed is not read past the listed size (whoever wrote it meanwhile)."""
    body = tar_bytes([("a.png", png), ("a.cls", b"1")])
    world.put("s3://datasets/wds-grown/s.tar", body)
    listed = store.list_objects(S3Uri("datasets", "wds-grown"))[0]
    world.put("s3://datasets/wds-grown/s.tar", tar_bytes([(f"{n}.png", png) for n in range(50)]))
    with pytest.raises(
        StorageError, match=r"s3://datasets/wds-grown/s.tar is more than the .* bytes it was listed with"
    ):
        shards.scan_shard(store, listed, "datasets", shards.PartBudget(10, 10_000))
