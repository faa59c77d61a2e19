"""Remote names never leave their folder: S3 keys and COCO file_names as a bucket's writer crafts them.

The helper (`localpaths.local_path`) on many crafted names, then every place a remote name becomes a
local path, against moto: dataset images (ImageFolder, paged or not, and COCO), checkpoint files and the
cached base weights. The console-script runs are in test_remote_names_e2e.py.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from types import SimpleNamespace

import pytest

from kubetune_trainer import data
from kubetune_trainer.cache import cached_object
from kubetune_trainer.checkpoint import download_checkpoint
from kubetune_trainer.config import AnnotationsSpec, DataSpec
from kubetune_trainer.data import build_index, check_corrupt, datasets, prepare_images
from kubetune_trainer.detection_data import DetectionFiles, build_detection_index
from kubetune_trainer.errors import DataError, UnsafeNameError
from kubetune_trainer.localpaths import local_path, unsafe_reason
from kubetune_trainer.storage import ObjectInfo, S3Store, S3Uri
from tests.support.digits_world import DATA_BUCKET, REGION, DigitsWorld, digit_png
from tests.support.shapes_world import make_shapes

UNSAFE = {
    "": "is empty",
    ".": "'.' path segment",
    "..": "'..' path segment",
    "../x.png": "'..' path segment",
    "a/../../../../x.png": "'..' path segment",
    "a/b/..": "'..' path segment",
    "./a.png": "'.' path segment",
    "a/./b.png": "'.' path segment",
    "a//b.png": "empty path segment",
    "a/": "empty path segment",
    "/etc/passwd": "absolute path",
    "/": "absolute path",
    "//server/share/x.png": "absolute path",
    "a\\..\\..\\x.png": "backslash",
    "..\\x.png": "backslash",
    "C:\\Windows\\x.png": "backslash",
    "a/b\x00.png": "control character",
    "a/\x00/../x": "control character",
    "a/line\nbreak.png": "control character",
    "a/tab\t.png": "control character",
    "a/del\x7f.png": "control character",
    "a/" + "x" * 256: "segment longer than 255 bytes",
    "a/" + "é" * 128: "segment longer than 255 bytes",  # 256 bytes in UTF-8
    "x/" * 512 + "y": "longer than 1024 bytes",
}
SAFE = [
    "a.png",
    "train/cat/0001.png",
    "a/..b/c.png",
    "a/b../c.png",
    "a/.../c.png",
    "a/.hidden.png",
    "a/ ../c.png",  # a space makes it an ordinary name
    "%2e%2e/%2e%2e/x.png",  # percent-escapes are literal characters in a key
    "..%2f..%2fx.png",
    "日本/猫.png",
    "a/" + "x" * 255,
    "a/:colon|pipe*star?.png",
]


@pytest.mark.parametrize(("name", "why"), UNSAFE.items(), ids=[repr(n)[:40] for n in UNSAFE])
def test_names_that_would_leave_their_folder_are_refused_with_the_reason(name: str, why: str, tmp_path: Path) -> None:
    assert why in (unsafe_reason(name) or "")
    with pytest.raises(UnsafeNameError, match="refused s3://bkt/") as error:
        local_path(tmp_path, name, f"s3://bkt/{name}")
    assert repr(name) in str(error.value)
    assert list(tmp_path.iterdir()) == []


@pytest.mark.parametrize("name", SAFE, ids=[repr(n)[:40] for n in SAFE])
def test_ordinary_names_stay_below_their_folder_unchanged(name: str, tmp_path: Path) -> None:
    path = local_path(tmp_path, name, "s3://bkt/key")

    assert path == tmp_path / name
    assert Path(os.path.normpath(path)).is_relative_to(tmp_path)
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_bytes(b"x")  # the OS takes it as one file below the folder
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == [path]


# -- dataset images ---------------------------------------------------------------------------------


def crafted_keys(prefix_key: str) -> dict[str, str]:
    """Image keys under an ImageFolder prefix that a plain join would write outside the cache (key → why)."""
    return {
        f"{prefix_key}/5/../../../../../../escape-up.png": "'..' path segment",
        f"{prefix_key}/6//escape-empty.png": "empty path segment",
        f"{prefix_key}/7/./escape-dot.png": "'.' path segment",
        f"{prefix_key}/../escape-class.png": "'..' path segment",  # a class folder named ".."
    }


def test_image_keys_that_would_leave_the_cache_are_refused_and_counted(
    world: DigitsWorld, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"s3://{DATA_BUCKET}/crafted/train"
    world.upload_folder(prefix, per_class=4)
    crafted = crafted_keys("crafted/train")
    png = digit_png(world.digits(range(5, 6))[0][0])
    world.put_many({f"s3://{DATA_BUCKET}/{key}": png for key in crafted})
    assert set(crafted) <= {k for k in world.keys(f"s3://{DATA_BUCKET}/crafted")}  # moto kept them verbatim
    store = S3Store(world.endpoint, REGION)

    index = build_index(store, DataSpec(train=prefix), None, seed=0)
    monkeypatch.setattr(data, "FIRST_PAGE_KEYS", 10)  # listed per class folder, ".." one included
    assert build_index(store, DataSpec(train=prefix), None, seed=0).wire() == index.wire()

    assert index.class_names == ["5", "6", "7", "8", "9"]  # ".." is no class
    assert len(index.samples) == 20 and not set(crafted) & {s.key for s in index.samples}
    assert set(index.corrupt) == set(crafted)
    for key, why in crafted.items():
        assert index.corrupt[key].startswith("refused: the key has a") and why in index.corrupt[key]
    folder, corrupt = prepare_images(store, index, root=tmp_path / "cache")
    assert set(corrupt) == set(crafted)
    assert not any("escape" in p.name for p in tmp_path.rglob("*"))
    preprocessing = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
    train, validation = datasets(folder, index.without_corrupt(corrupt), preprocessing, "none")
    assert len(train) + len(validation) == 20


def test_a_refused_key_counts_towards_the_unreadable_limit_and_is_named(world: DigitsWorld, tmp_path: Path) -> None:
    prefix = f"s3://{DATA_BUCKET}/crafted-many/train"
    world.upload_folder(prefix, per_class=10)
    crafted = crafted_keys("crafted-many/train")
    world.put_many({f"s3://{DATA_BUCKET}/{key}": b"whatever" for key in crafted})
    store = S3Store(world.endpoint, REGION)
    index = build_index(store, DataSpec(train=prefix), None, seed=0)
    _, corrupt = prepare_images(store, index, root=tmp_path)

    with pytest.raises(DataError, match=r"4 of 54 images \(7.4%\) are corrupt or unreadable") as error:
        check_corrupt(index, corrupt)
    for key in crafted:
        assert f"s3://{DATA_BUCKET}/{key} (refused: the key has" in str(error.value)


def test_a_key_that_is_also_the_folder_of_another_is_refused_and_counted(world: DigitsWorld, tmp_path: Path) -> None:
    # S3 holds x/a.png and x/a.png/b.png side by side; a disk cannot: the first is refused, named and
    # counted like an unreadable image, never an OS error (NotADirectoryError, IsADirectoryError).
    prefix = f"s3://{DATA_BUCKET}/clash/train"
    world.upload_folder(prefix, per_class=10)
    png = digit_png(world.digits(range(5, 6))[0][0])
    clash = {"clash/train/5/a.png": png, "clash/train/5/a.png/b.png": png, "clash/train/6/c.png/d/e.png": png}
    clash["clash/train/6/c.png"] = png
    world.put_many({f"s3://{DATA_BUCKET}/{key}": body for key, body in clash.items()})
    store = S3Store(world.endpoint, REGION)
    index = build_index(store, DataSpec(train=prefix), None, seed=0)
    folder, corrupt = prepare_images(store, index, root=tmp_path / "cache")

    assert corrupt == dict.fromkeys(["clash/train/5/a.png", "clash/train/6/c.png"], data.FOLDER_CLASH)
    assert (folder / "clash/train/5/a.png/b.png").is_file() and (folder / "clash/train/6/c.png/d/e.png").is_file()
    with pytest.raises(DataError, match=r"2 of 54 images \(3.7%\) are corrupt or unreadable") as error:
        check_corrupt(index, corrupt)
    assert f"s3://{DATA_BUCKET}/clash/train/5/a.png (refused: the key is also the folder of another" in str(error.value)
    # The other images are cached and read as usual.
    preprocessing = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3}
    train, validation = datasets(folder, index.without_corrupt(corrupt), preprocessing, "none")
    assert len(train) + len(validation) == 52 and all(image is not None for image, _ in train)


def test_an_index_that_names_an_unsafe_key_never_writes_it(world: DigitsWorld, tmp_path: Path) -> None:
    # An index made elsewhere (it crosses Ray as plain data): the node cache refuses the key itself.
    world.put(f"s3://{DATA_BUCKET}/elsewhere/a/../../x.png", b"x")
    index = data.DatasetIndex(DATA_BUCKET, ["a"], [data.Sample("elsewhere/a/../../x.png", 0, 1, "e")], [])
    _, corrupt = prepare_images(S3Store(world.endpoint, REGION), index, root=tmp_path / "deep" / "cache")

    assert corrupt == {"elsewhere/a/../../x.png": "refused: the key has a '..' path segment"}
    assert [p for p in tmp_path.rglob("*") if p.is_file() and p.suffix == ".png"] == []


def test_coco_file_names_that_would_leave_the_cache_are_refused_and_counted(world: DigitsWorld, tmp_path: Path) -> None:
    shapes = make_shapes(["red", "green"], count=4, seed=1, size=64)
    base = f"s3://{DATA_BUCKET}/crafted-coco"
    pngs = shapes.pngs("t/")
    world.put_many({f"{base}/images/{k}": v for k, v in pngs.items()})
    coco = shapes.coco("t/")
    bad_names = ["../../../../../escape-coco.png", "t//escape-empty.png", "t/./escape-dot.png"]
    for n, name in enumerate(bad_names):
        world.put(f"{base}/images/{name}", next(iter(pngs.values())))
        coco["images"].append({"id": 100 + n, "file_name": name, "width": 64, "height": 64})
    coco["images"].append({"id": 200, "file_name": "/etc/escape-absolute.png", "width": 64, "height": 64})
    world.put(f"{base}/train.json", json.dumps(coco).encode())
    assert {f"crafted-coco/images/{n}" for n in bad_names} <= set(world.keys(f"{base}/images"))
    spec = DataSpec(
        train=f"{base}/images/",
        annotations=AnnotationsSpec(train=f"{base}/train.json", validation=f"{base}/train.json"),
    )
    store = S3Store(world.endpoint, REGION)

    index, images = build_detection_index(store, spec, None)
    folder, corrupt = prepare_images(store, images, root=tmp_path / "cache")
    kept = index.without_corrupt(corrupt)

    assert sorted(corrupt) == sorted(f"crafted-coco/images/{n}" for n in bad_names)
    assert all(why.startswith("refused: the file_name") for why in corrupt.values())
    assert (kept.counts["train"]["imagesCorrupt"], kept.counts["train"]["imagesMissing"]) == (3, 1)
    assert len(kept.train) == 4 and len(DetectionFiles(folder, kept.train)) == 4
    assert not any("escape" in p.name for p in tmp_path.rglob("*"))
    with pytest.raises(UnsafeNameError, match="escape-coco"):
        DetectionFiles(folder, index.train)  # the loader refuses them too


# -- checkpoints and base weights -------------------------------------------------------------------


def test_a_checkpoint_file_that_would_leave_its_folder_fails_naming_the_key(world: DigitsWorld, tmp_path: Path) -> None:
    checkpoint = "results/crafted-run/checkpoints/run/epoch-0001"
    world.put(f"s3://{checkpoint}/model.safetensors", b"weights")
    world.put(f"s3://{checkpoint}/../../../../../escape-checkpoint.txt", b"planted")
    into = tmp_path / "deep" / "er" / "restore"
    store = S3Store(world.endpoint, REGION)

    with pytest.raises(UnsafeNameError) as error:
        download_checkpoint(store, SimpleNamespace(path=checkpoint), into)

    assert f"s3://{checkpoint}/../../../../../escape-checkpoint.txt" in str(error.value)
    assert "'..' path segment" in str(error.value)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []  # refused before anything was written


def test_a_checkpoint_downloads_whole_with_folder_markers_skipped(world: DigitsWorld, tmp_path: Path) -> None:
    checkpoint = "results/marker-run/checkpoints/run/epoch-0001"
    world.put(f"s3://{checkpoint}/", b"")  # a "folder" object, as some tools create
    world.put(f"s3://{checkpoint}/model.safetensors", b"weights")
    world.put(f"s3://{checkpoint}/nested/rng-rank0.pt", b"rng")

    local = download_checkpoint(S3Store(world.endpoint, REGION), SimpleNamespace(path=checkpoint), tmp_path)

    assert sorted(p.relative_to(local).as_posix() for p in local.rglob("*") if p.is_file()) == [
        "model.safetensors",
        "nested/rng-rank0.pt",
    ]


def test_cached_base_weights_keep_their_name_inside_the_cache(world: DigitsWorld, tmp_path: Path) -> None:
    store = S3Store(world.endpoint, REGION)
    world.put("s3://models/crafted/..", b"weights")
    info = ObjectInfo("crafted/..", 7, "etag")

    with pytest.raises(
        UnsafeNameError, match=r"refused s3://models/crafted/\.\.: the name '\.\.' has a '\.\.' path segment"
    ):
        cached_object(store, S3Uri("models", "crafted/.."), info, root=tmp_path)
    assert [p for p in tmp_path.rglob("*") if p.is_file()] == []
