"""The dataset: listing an ImageFolder in S3, the seeded split, the node cache and unreadable images."""

from __future__ import annotations

import io
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from kubetune_trainer import data
from kubetune_trainer.config import DataSpec
from kubetune_trainer.data import build_index, check_corrupt, datasets, prepare_images, split_per_class
from kubetune_trainer.errors import ConfigError, DataError
from kubetune_trainer.storage import ObjectInfo, S3Store
from tests.support.digits_world import REGION, DigitsWorld


@pytest.fixture
def store(world: DigitsWorld) -> S3Store:
    return S3Store(world.endpoint, REGION)


def objects(classes: str, per_class: int) -> dict[str, list[ObjectInfo]]:
    return {c: [ObjectInfo(f"data/{c}/{i:03d}.png", 10, "etag") for i in range(per_class)] for c in classes}


def keys(split: dict[str, list[ObjectInfo]]) -> set[str]:
    return {o.key for objs in split.values() for o in objs}


def test_split_is_seeded_per_class_and_independent_of_listing_order() -> None:
    listed = objects("abc", 20)
    train, val = split_per_class(listed, 0.2, seed=42)
    again_train, again_val = split_per_class({c: o[::-1] for c, o in listed.items()}, 0.2, seed=42)

    assert keys(val) == keys(again_val) and keys(train) == keys(again_train)
    assert {c: len(v) for c, v in val.items()} == {"a": 4, "b": 4, "c": 4}
    assert keys(train) | keys(val) == keys(listed) and not keys(train) & keys(val)
    _, other_val = split_per_class(listed, 0.2, seed=43)
    assert keys(other_val) != keys(val)


def test_split_keeps_small_classes_trainable() -> None:
    train, val = split_per_class({"one": objects("x", 1)["x"], "two": objects("y", 2)["y"]}, 0.5, seed=1)
    assert (len(train["one"]), len(val["one"])) == (1, 0)
    assert (len(train["two"]), len(val["two"])) == (1, 1)


def test_index_names_classes_in_folder_order(world: DigitsWorld, store: S3Store) -> None:
    world.upload_folder("s3://datasets/index/train", per_class=5)
    world.put("s3://datasets/index/train/5/README.txt", b"not an image")

    index = build_index(store, DataSpec(train="s3://datasets/index/train", validation_split=0.2), None, seed=42)

    assert index.class_names == ["5", "6", "7", "8", "9"]
    assert (len(index.train), len(index.validation), index.ignored_objects) == (20, 5, 1)
    assert {s.label for s in index.validation} == {0, 1, 2, 3, 4}
    assert all(s.key.startswith(f"index/train/{index.class_names[s.label]}/") for s in index.samples)


def test_index_errors_name_the_field_or_uri(world: DigitsWorld, store: S3Store) -> None:
    world.upload_folder("s3://datasets/errors/train", per_class=2)
    world.upload_folder("s3://datasets/errors/val", per_class=1, labels=range(3, 6))
    with pytest.raises(
        ConfigError, match=r"model.numClasses: 3 does not match the 5 class folders under s3://datasets/errors/train/"
    ):
        build_index(store, DataSpec(train="s3://datasets/errors/train"), 3, seed=0)
    with pytest.raises(DataError, match=r"'3', '4' under s3://datasets/errors/val/ are not classes of"):
        build_index(store, DataSpec(train="s3://datasets/errors/train", validation="s3://datasets/errors/val"), None, 0)
    with pytest.raises(DataError, match=r"no class folders under s3://datasets/nothing-here/"):
        build_index(store, DataSpec(train="s3://datasets/nothing-here"), None, seed=0)


def test_unreadable_images_are_skipped_and_counted(world: DigitsWorld, store: S3Store, tmp_path: Path) -> None:
    world.upload_folder("s3://datasets/few-bad", per_class=30)  # 150 images
    world.put("s3://datasets/few-bad/7/broken.png", b"\x89PNG\r\n\x1a\n truncated")
    index = build_index(store, DataSpec(train="s3://datasets/few-bad"), None, seed=0)

    folder, corrupt = prepare_images(store, index, root=tmp_path)
    check_corrupt(index, corrupt)  # 1 of 151: below 1%, training goes on without it
    clean = index.without_corrupt(corrupt)

    assert list(corrupt) == ["few-bad/7/broken.png"]
    assert len(clean.samples) == 150 and len(clean.corrupt) == 1
    train, val = datasets(folder, clean, {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}, "light")
    image, label = train[0]
    assert tuple(image.shape) == (3, 32, 32) and 0 <= label < 5
    assert len(train) + len(val) == 150


def test_too_many_unreadable_images_fail_the_run(world: DigitsWorld, store: S3Store, tmp_path: Path) -> None:
    world.upload_folder("s3://datasets/many-bad", per_class=20)  # 100 images
    for n in range(3):
        world.put(f"s3://datasets/many-bad/5/bad-{n}.jpg", b"this is not a jpeg")
    index = build_index(store, DataSpec(train="s3://datasets/many-bad"), None, seed=0)
    _, corrupt = prepare_images(store, index, root=tmp_path)

    with pytest.raises(
        DataError,
        match=r"3 of 103 images \(2.9%\) are corrupt or unreadable, more than the 1% allowed; e\.g\. s3://datasets/many-bad/5/bad-0.jpg",
    ):
        check_corrupt(index, corrupt)


def test_node_cache_downloads_once(world: DigitsWorld, store: S3Store, tmp_path: Path) -> None:
    world.upload_folder("s3://datasets/cached", per_class=2)
    index = build_index(store, DataSpec(train="s3://datasets/cached"), None, seed=0)
    folder, _ = prepare_images(store, index, root=tmp_path)
    image = folder / index.train[0].key
    stamp = image.stat().st_mtime_ns

    again, _ = prepare_images(store, index, root=tmp_path)

    assert again == folder and image.stat().st_mtime_ns == stamp


def test_a_dataset_beyond_one_listing_page_gives_the_same_index(
    world: DigitsWorld, store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.upload_folder("s3://datasets/pages/train", per_class=4)
    world.put("s3://datasets/pages/train/7/notes.txt", b"not an image")
    world.put("s3://datasets/pages/train/loose.png", b"belongs to no class")
    spec = DataSpec(train="s3://datasets/pages/train", validation_split=0.25)

    one_page = build_index(store, spec, None, seed=3)
    monkeypatch.setattr(data, "FIRST_PAGE_KEYS", 5)  # the dataset now spans several pages
    paged = build_index(store, spec, None, seed=3)

    assert one_page.wire() == paged.wire()
    assert one_page.class_names == ["5", "6", "7", "8", "9"]
    assert (len(one_page.samples), one_page.ignored_objects) == (20, 1)


def test_a_truncated_or_garbled_jpeg_is_unreadable_and_a_whole_one_is_not(tmp_path: Path) -> None:
    # The node cache checks JPEGs with a reduced-scale decode; it must still catch broken files.
    pixels = (np.random.default_rng(0).random((96, 128, 3)) * 255).astype("uint8")
    buffer = io.BytesIO()
    Image.fromarray(pixels).save(buffer, "JPEG", quality=90)
    whole = buffer.getvalue()
    garbled = bytearray(whole)
    garbled[len(whole) // 2 : len(whole) // 2 + 64] = b"\xff" * 64
    files = {"whole.jpg": whole, "truncated.jpg": whole[: len(whole) // 2], "garbled.jpg": bytes(garbled)}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content)

    assert data.verify_image(tmp_path / "whole.jpg") is None
    assert "truncated" in (data.verify_image(tmp_path / "truncated.jpg") or "")
    assert data.verify_image(tmp_path / "garbled.jpg") is not None
