"""`kubetune data pack`: ImageFolder and COCO sets as WebDataset shards or manifests, read back by the trainer.

Through the command's own entry (`kubetune_operator.cli.main`, in this process: the console script is
run by test_pack_e2e.py and test_cli_documented.py) against local folders and the session's moto S3.
What the packer writes is read back with the trainer's indexers (formats.py), the same ones a run uses,
and compared with what the source gives a run directly.
"""

from __future__ import annotations

import io
import json
import os
import tarfile
from collections import Counter
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator.cli import main
from kubetune_trainer import pack as pack_module
from kubetune_trainer.config import TrainerConfig, expand_braces
from kubetune_trainer.data import build_index
from kubetune_trainer.detection_data import build_detection_index
from kubetune_trainer.formats import classification_index, detection_index
from kubetune_trainer.pack_sources import LocalFolder
from kubetune_trainer.pack_writers import Published
from kubetune_trainer.storage import S3Store
from tests.support.digits_world import DATA_BUCKET, REGION, DigitsWorld, digit_png
from tests.support.shapes_world import FINETUNE_CLASSES, make_shapes

PER_CLASS = 8
DIGITS = range(5, 10)


@pytest.fixture
def store(world: DigitsWorld) -> S3Store:
    return S3Store(world.endpoint, REGION)


@pytest.fixture(scope="module")
def digits_folder(world: DigitsWorld, tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A local ImageFolder of 8 digits of each class 5-9, a README beside the classes, a note in one."""
    root = world.write_folder(tmp_path_factory.mktemp("digits-folder"), per_class=PER_CLASS)
    (root / "README.md").write_text("not a class")
    (root / "7" / "notes.txt").write_text("not an image")
    return root


def job_config(world: DigitsWorld, task: str = "classification", **data: Any) -> TrainerConfig:
    arch = "fasterrcnn_mobilenet_v3_large_320_fpn" if task == "detection" else "resnet18"
    return TrainerConfig.model_validate(
        {
            "task": task,
            "model": {"architecture": arch, "checkpoint": "s3://models/base/x.safetensors"},
            "data": data,
            "training": {"seed": 3},
            "output": {"path": "s3://results/pack/"},
            "storage": {"endpoint": world.endpoint, "region": REGION},
            "runName": "pack",
            "jobName": "pack",
        }
    )


def data_pack(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, dict[str, Any], str]:
    """`kubetune data pack ARGS`: its exit code, the data: values it printed, and its stderr."""
    code = main(["data", "pack", *args])
    captured = capsys.readouterr()
    values = yaml.safe_load(captured.out) if code == 0 else {}
    return code, (values or {}).get("data", {}), captured.err


def members(tar: bytes) -> list[tarfile.TarInfo]:
    with tarfile.open(fileobj=io.BytesIO(tar), mode="r") as archive:
        return archive.getmembers()


# -- ImageFolder → shards ---------------------------------------------------------------------------


def test_an_image_folder_packs_into_bounded_shards_that_train_like_the_folder(
    world: DigitsWorld, store: S3Store, digits_folder: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    dest = f"s3://{DATA_BUCKET}/packed/digits"
    code, data, err = data_pack(capsys, str(digits_folder), dest, "--shard-size", "15", "--s3-endpoint", world.endpoint)
    assert code == 0, err
    assert data == {"format": "webdataset", "train": f"{dest}/train-{{000000..000002}}.tar"}
    assert "train: 40 images, 5 classes" in err and "left out 2 file(s)" in err

    index = classification_index(store, job_config(world, format="webdataset", train=data["train"]))
    assert index.class_names == [str(d) for d in DIGITS]
    assert len(index.train) + len(index.validation) == len(DIGITS) * PER_CLASS
    assert not index.corrupt and not index.ignored_objects
    shards = [world.get(uri) for uri in expand_braces(data["train"])]
    for shard in shards:
        infos = members(shard)
        assert len(infos) <= 2 * 15
        assert {(i.mtime, i.uid, i.gid, i.uname, i.gname, i.mode) for i in infos} == {(0, 0, 0, "", "", 0o644)}
        assert [i.name.split(".")[1] for i in infos] == ["png", "cls"] * (len(infos) // 2)
    # Classes are dealt across shards, not one class a shard.
    first = [s.label for s in sorted(index.train + index.validation, key=lambda s: s.key) if "000000.tar" in s.key]
    assert len(set(first)) == len(DIGITS)


def test_the_same_folder_packs_into_the_same_bytes(
    world: DigitsWorld, digits_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    for copy in ("a", "b"):
        code, _, err = data_pack(capsys, str(digits_folder), str(tmp_path / copy), "--shard-size", "15")
        assert code == 0, err
    names = sorted(p.name for p in (tmp_path / "a").iterdir())
    assert names == ["train-000000.tar", "train-000001.tar", "train-000002.tar"]
    assert all((tmp_path / "a" / n).read_bytes() == (tmp_path / "b" / n).read_bytes() for n in names)
    uploaded = f"s3://{DATA_BUCKET}/packed/digits/train-000001.tar"
    assert world.get(uploaded) == (tmp_path / "a" / "train-000001.tar").read_bytes()
    assert (tmp_path / "a" / names[0]).stat().st_mode & 0o777 == 0o644


def test_max_shard_bytes_bounds_every_shard(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    src = tmp_path / "src"
    for n in range(9):
        path = src / f"class-{n % 3}" / f"{n}.jpg"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_bytes(os.urandom(300_000))
    code, data, err = data_pack(capsys, str(src), str(tmp_path / "out"), "--max-shard-bytes", "1MiB")
    assert code == 0, err
    shards = sorted((tmp_path / "out").iterdir())
    assert data["train"].endswith(f"train-{{000000..{len(shards) - 1:06d}}}.tar") and len(shards) == 3
    assert all(shard.stat().st_size <= 1024 * 1024 for shard in shards)
    assert sum(len(members(shard.read_bytes())) for shard in shards) == 2 * 9


# -- COCO → shards, and manifests ----------------------------------------------------------------


@pytest.fixture(scope="module")
def coco_set(world: DigitsWorld) -> dict[str, str]:
    """A small COCO detection set in S3 (train and validation) with what real files hold: a box of no
    area, one of an unknown category, one of no image, and an image the folder lacks."""
    base = f"s3://{DATA_BUCKET}/pack-coco"
    parts = {
        "train": make_shapes(FINETUNE_CLASSES, 10, seed=30, size=64),
        "val": make_shapes(FINETUNE_CLASSES, 4, 31, 64),
    }
    objects: dict[str, bytes] = {}
    for part, shapes in parts.items():
        objects |= {f"{base}/images/{part}/{k}": v for k, v in shapes.pngs().items()}
        coco = shapes.coco()
        if part == "train":
            coco["images"].append({"id": 500, "file_name": "gone.png", "width": 64, "height": 64})
            coco["annotations"] += [
                {"id": 9001, "image_id": 1, "category_id": 1, "bbox": [5, 5, 0, 9]},
                {"id": 9002, "image_id": 1, "category_id": 77, "bbox": [5, 5, 9, 9]},
                {"id": 9003, "image_id": 404, "category_id": 1, "bbox": [5, 5, 9, 9]},
            ]
        objects[f"{base}/annotations/{part}.json"] = json.dumps(coco).encode()
    world.put_many(objects)
    return {
        "train": f"{base}/images/train",
        "validation": f"{base}/images/val",
        "annotations": f"{base}/annotations/train.json",
        "validationAnnotations": f"{base}/annotations/val.json",
    }


def comparable(samples: list[Any], names: list[str]) -> Counter[str]:
    """Detection samples as what training sees: size and named boxes, whatever their keys."""
    return Counter(
        json.dumps([s.width, s.height, sorted(zip(s.boxes, [names[label - 1] for label in s.labels], strict=True))])
        for s in samples
    )


def coco_run(world: DigitsWorld, store: S3Store, coco_set: dict[str, str]) -> Any:
    config = job_config(
        world,
        "detection",
        train=coco_set["train"],
        validation=coco_set["validation"],
        annotations={"train": coco_set["annotations"], "validation": coco_set["validationAnnotations"]},
    )
    return build_detection_index(store, config.data, None)[0]


def coco_args(coco_set: dict[str, str], world: DigitsWorld) -> list[str]:
    return [
        "--annotations",
        coco_set["annotations"],
        "--validation",
        coco_set["validation"],
        "--validation-annotations",
        coco_set["validationAnnotations"],
        "--s3-endpoint",
        world.endpoint,
    ]


@pytest.mark.parametrize("to", ["webdataset", "manifest"])
def test_a_coco_set_packs_into_the_boxes_and_counts_the_coco_run_has(
    to: str, world: DigitsWorld, store: S3Store, coco_set: dict[str, str], capsys: pytest.CaptureFixture[str]
) -> None:
    dest = f"s3://{DATA_BUCKET}/packed/coco-{to}"
    code, data, err = data_pack(capsys, coco_set["train"], dest, "--to", to, *coco_args(coco_set, world))
    assert code == 0, err
    assert "train: 10 images, 3 categories" in err and "left out 1 image(s)" in err and "left out 1 annotation" in err
    suffix = "-000000.tar" if to == "webdataset" else ".jsonl"
    assert data == {"format": to, "train": f"{dest}/train{suffix}", "validation": f"{dest}/validation{suffix}"}

    packed, _ = detection_index(
        store, job_config(world, "detection", format=to, train=data["train"], validation=data["validation"])
    )
    source = coco_run(world, store, coco_set)
    assert packed.class_names == sorted(source.class_names)  # webdataset and manifest classes sort by name
    for part in ("train", "validation"):
        assert comparable(getattr(packed, part), packed.class_names) == comparable(
            getattr(source, part), source.class_names
        )
        # The packer leaves out (and names) the image the folder lacks and the box of no image.
        counts = dict(source.counts[part])
        missing, orphans = counts.pop("imagesMissing"), counts.pop("boxesDroppedUnknownImage")
        assert (missing, orphans) == ((1, 1) if part == "train" else (0, 0))
        counts["images"] -= missing
        counts["imagesWithoutBoxes"] -= missing
        assert {k: packed.counts[part][k] for k in counts} == counts
    if to == "manifest":  # a manifest names the images where they are
        assert {s.key for s in packed.train} == {s.key for s in source.train}


def test_an_image_folder_in_s3_becomes_a_manifest_that_indexes_as_the_folder(
    world: DigitsWorld, store: S3Store, capsys: pytest.CaptureFixture[str]
) -> None:
    prefix = f"s3://{DATA_BUCKET}/pack-folder"
    world.upload_folder(prefix, per_class=6)
    world.put(f"{prefix}/5/../sneaky.png", digit_png(world.digits(range(5, 6))[0][0]))
    code, data, err = data_pack(
        capsys, prefix, f"s3://{DATA_BUCKET}/manifests", "--to", "manifest", "--s3-endpoint", world.endpoint
    )
    assert code == 0, err
    assert data == {"format": "manifest", "train": f"s3://{DATA_BUCKET}/manifests/train.csv"}
    assert (
        "refused 1 image(s): s3://datasets/pack-folder/5/../sneaky.png (refused: the key has a '..' path segment)"
        in err
    )

    from_manifest = classification_index(store, job_config(world, format="manifest", train=data["train"]))
    from_folder = build_index(store, job_config(world, train=prefix).data, None, seed=3)
    for index in (from_manifest, from_folder):
        assert index.class_names == [str(d) for d in DIGITS]
    pairs = [
        {(s.key, index.class_names[s.label]) for s in index.train + index.validation}
        for index in (from_manifest, from_folder)
    ]
    assert pairs[0] == pairs[1] and len(pairs[0]) == 5 * 6


# -- refusals and failures ----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--shard-size", "0"], "--shard-size: 1 to 500,000 samples (got 0)"),
        (["--max-shard-bytes", "lots"], "--max-shard-bytes: a size like 256MiB, 1GB or 500000 (got 'lots')"),
        (["--max-shard-bytes", "100TiB"], "--max-shard-bytes: a size like 256MiB"),
        (["--max-shard-bytes", "1000"], "--max-shard-bytes: 1,048,576 to"),
        (["--validation-annotations", "v.json"], "--validation-annotations: only with --annotations and --validation"),
        (["--annotations", "a.json", "--validation", "v"], "--validation: a COCO dataset's validation images need"),
    ],
)
def test_bad_arguments_are_named(
    args: list[str], message: str, digits_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = data_pack(capsys, str(digits_folder), str(tmp_path / "out"), *args)
    assert code == 2 and message in err, err
    assert not (tmp_path / "out").exists()


def test_bad_locations_are_named(
    world: DigitsWorld, digits_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    code, _, err = data_pack(
        capsys, str(digits_folder), str(tmp_path / "out"), "--validation", str(digits_folder / "5")
    )
    assert code == 2 and f"--validation: {digits_folder / '5'} overlaps SRC {digits_folder}" in err
    code, _, err = data_pack(capsys, str(tmp_path / "nowhere"), str(tmp_path / "out"))
    assert code == 2 and f"SRC: no such folder: {tmp_path / 'nowhere'}" in err
    code, _, err = data_pack(capsys, "https://example.com/data", str(tmp_path / "out"))
    assert code == 2 and "SRC: a local folder or an s3:// prefix (got https://example.com/data)" in err
    code, _, err = data_pack(capsys, str(tmp_path), "s3://no-such-bucket/x", "--s3-endpoint", world.endpoint)
    assert code == 2 and "DEST: bucket 'no-such-bucket' does not exist" in err
    code, _, err = data_pack(
        capsys, f"s3://{DATA_BUCKET}/pack-folder", "s3://results/m", "--to", "manifest", "--s3-endpoint", world.endpoint
    )
    assert code == 2 and "a manifest names images in its own bucket; SRC s3://datasets/pack-folder is not" in err
    code, _, err = data_pack(capsys, str(tmp_path), str(tmp_path / "inner"), "--to", "manifest")
    assert code == 2 and "must lie inside DEST" in err


def test_existing_shards_are_replaced_only_with_overwrite(
    digits_folder: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    out = tmp_path / "out"
    assert data_pack(capsys, str(digits_folder), str(out), "--shard-size", "5")[0] == 0
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    assert len(before) == 8
    code, _, err = data_pack(capsys, str(digits_folder), str(out))
    assert code == 1 and f"DEST: {out} already holds train-000000.tar and 7 more; pass --overwrite" in err
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before
    code, data, err = data_pack(capsys, str(digits_folder), str(out), "--overwrite", "--quiet")
    assert code == 0 and not err
    assert [p.name for p in out.iterdir()] == ["train-000000.tar"] and data["train"].endswith("/train-000000.tar")


@pytest.mark.parametrize("where", ["local", "s3"])
def test_a_failed_pack_leaves_nothing_behind(
    where: str,
    world: DigitsWorld,
    digits_folder: Path,
    tmp_path: Path,
    monkeypatch: pytest.MonkeyPatch,
    capsys: pytest.CaptureFixture[str],
) -> None:
    """The 30th image fails to read after two shards went out: both are removed, no temporary file stays."""
    reads = [0]
    read = LocalFolder.read

    def failing(self: LocalFolder, name: str, size: int) -> bytes:
        reads[0] += 1
        if reads[0] == 30:
            raise OSError(f"{name}: disk gone")
        return read(self, name, size)

    undone: list[str] = []
    undo = Published.undo

    def recorded(self: Published) -> None:
        undone.extend(self.names)
        undo(self)

    monkeypatch.setattr(LocalFolder, "read", failing)
    monkeypatch.setattr(Published, "undo", recorded)
    monkeypatch.setattr("kubetune_trainer.pack_writers.READ_AHEAD", 1)
    dest = str(tmp_path / "out") if where == "local" else f"s3://{DATA_BUCKET}/packed/failing"
    code, _, err = data_pack(capsys, str(digits_folder), dest, "--shard-size", "12", "--s3-endpoint", world.endpoint)
    assert code == 1 and "disk gone" in err
    left = list((tmp_path / "out").iterdir()) if where == "local" else world.keys(dest)
    assert undone == ["train-000000.tar", "train-000001.tar"] and left == []


def test_the_progress_bar_is_drawn_on_a_terminal_only(digits_folder: Path, tmp_path: Path) -> None:
    class Terminal(io.StringIO):
        def isatty(self) -> bool:
            return True

    options = pack_module.PackOptions(src=str(digits_folder), dest=str(tmp_path / "a"))
    terminal, pipe = Terminal(), io.StringIO()
    assert pack_module.pack(options, out=io.StringIO(), err=terminal) == 0
    assert "\rtrain [########################] 100%  40/40 images  shard 1/1" in terminal.getvalue()
    assert (
        pack_module.pack(options.__class__(**{**options.__dict__, "dest": str(tmp_path / "b")}), io.StringIO(), pipe)
        == 0
    )
    assert "\r" not in pipe.getvalue() and "train: 40 images" in pipe.getvalue()
    quiet = pack_module.PackOptions(src=str(digits_folder), dest=str(tmp_path / "c"), quiet=True)
    assert pack_module.pack(quiet, io.StringIO(), terminal := Terminal()) == 0 and terminal.getvalue() == ""
