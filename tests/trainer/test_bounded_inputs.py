"""Bounded inputs from buckets: listings, object reads, image files and COCO files as a bucket's writer
makes them — too many, too big, too many pixels, another format, absurd numbers — are refused with the
field, the URI and the limit, or skipped and counted like an unreadable image; good data is unchanged."""

from __future__ import annotations

import io
import json
import warnings
from pathlib import Path

import pytest
from PIL import Image

from kubetune_trainer import checkpoint, data, detection_data
from kubetune_trainer.config import AnnotationsSpec, DataSpec
from kubetune_trainer.data import build_index, prepare_images, verify_image
from kubetune_trainer.detection_data import MAX_BOXES_PER_IMAGE, build_detection_index, parse_coco
from kubetune_trainer.errors import CheckpointError, DataError, StorageError
from kubetune_trainer.storage import S3Store, S3Uri
from tests.support.digits_world import DATA_BUCKET, REGION, DigitsWorld
from tests.support.shapes_world import make_shapes


@pytest.fixture
def store(world: DigitsWorld) -> S3Store:
    return S3Store(world.endpoint, REGION)


def png(width: int, height: int, mode: str = "RGB") -> bytes:
    buffer = io.BytesIO()
    Image.new(mode, (width, height)).save(buffer, format="PNG")
    return buffer.getvalue()


# -- listings and reads -----------------------------------------------------------------------------


def test_a_listing_stops_at_its_limit_naming_the_prefix(
    world: DigitsWorld, store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    world.upload_folder(f"s3://{DATA_BUCKET}/wide/train", per_class=4)  # 20 images in 5 class folders

    with pytest.raises(StorageError, match=r"more than 19 objects under s3://datasets/wide/train/"):
        store.list_objects(S3Uri(DATA_BUCKET, "wide/train"), limit=19)
    assert len(store.list_objects(S3Uri(DATA_BUCKET, "wide/train"), limit=20)) == 20
    with pytest.raises(StorageError, match=r"more than 4 folders under s3://datasets/wide/train/"):
        store.list_folders(S3Uri(DATA_BUCKET, "wide/train"), limit=4)

    monkeypatch.setattr(data, "FIRST_PAGE_KEYS", 5)  # listed per class folder, in parallel
    monkeypatch.setattr(data, "MAX_LISTED_OBJECTS", 15)
    with pytest.raises(StorageError, match=r"more than 15 objects under s3://datasets/wide/train/"):
        build_index(store, DataSpec(train=f"s3://{DATA_BUCKET}/wide/train"), None, seed=0)
    monkeypatch.setattr(data, "MAX_LISTED_OBJECTS", 20)
    assert len(build_index(store, DataSpec(train=f"s3://{DATA_BUCKET}/wide/train"), None, seed=0).samples) == 20


def test_an_object_read_into_memory_is_refused_from_its_size_naming_the_field(
    world: DigitsWorld, store: S3Store
) -> None:
    world.put(f"s3://{DATA_BUCKET}/big/blob.json", b"[" + b"0," * 5000 + b"0]")
    uri = S3Uri(DATA_BUCKET, "big/blob.json")

    with pytest.raises(
        StorageError,
        match=r"^data\.annotations\.train: s3://datasets/big/blob\.json is 10,003 bytes or more, "
        r"more than the 10,000 bytes allowed$",
    ):
        store.get_bytes(uri, max_bytes=10_000, field="data.annotations.train")
    assert len(store.get_bytes(uri, max_bytes=10_003)) == 10_003


def test_an_image_that_grew_since_it_was_listed_is_not_written(
    world: DigitsWorld, store: S3Store, tmp_path: Path
) -> None:
    world.put(f"s3://{DATA_BUCKET}/grown/a.png", b"x" * 5000)

    with pytest.raises(StorageError, match=r"s3://datasets/grown/a\.png is 5,000 bytes or more, more than the 100"):
        store.download_file(S3Uri(DATA_BUCKET, "grown/a.png"), tmp_path / "a.png", size=100)
    assert list(tmp_path.iterdir()) == []  # no partial file either


def test_a_checkpoint_progress_file_is_read_within_its_limit(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / checkpoint.PROGRESS_FILE).write_text(json.dumps({"epoch": 1, "history": [{"epoch": 1}] * 50}))
    assert checkpoint.read_progress(tmp_path)["epoch"] == 1

    monkeypatch.setattr(checkpoint, "MAX_PROGRESS_BYTES", 100)
    with pytest.raises(CheckpointError, match=r"progress\.json of the checkpoint is larger than the 100 bytes"):
        checkpoint.read_progress(tmp_path)
    monkeypatch.undo()
    (tmp_path / checkpoint.PROGRESS_FILE).write_text("[" * 100_000 + "]" * 100_000)
    with pytest.raises(CheckpointError, match=r"progress\.json of the checkpoint is not"):
        checkpoint.read_progress(tmp_path)


# -- image files ------------------------------------------------------------------------------------


def test_images_too_big_too_many_pixels_or_of_another_format_are_skipped_and_counted(
    world: DigitsWorld, store: S3Store, tmp_path: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    prefix = f"s3://{DATA_BUCKET}/bounded/train"
    world.upload_folder(prefix, per_class=2)
    gif = io.BytesIO()
    Image.new("RGB", (32, 32)).save(gif, format="GIF")
    eps = b"%!PS-Adobe-3.0 EPSF-3.0\n%%BoundingBox: 0 0 32 32\nshowpage\n"
    world.put_many(
        {
            f"{prefix}/5/huge-file.png": png(32, 32) + b"\0" * 30_000,  # a valid PNG, padded past the limit
            f"{prefix}/6/bomb.png": png(10_000, 10_000, "1"),  # 100 megapixels in ~12 KB
            f"{prefix}/7/gif-inside.png": gif.getvalue(),
            f"{prefix}/8/eps-inside.jpg": eps,
        }
    )
    monkeypatch.setattr(data, "MAX_IMAGE_BYTES", 20_000)
    index = build_index(store, DataSpec(train=prefix), None, seed=0)

    folder, corrupt = prepare_images(store, index, root=tmp_path)

    assert corrupt.keys() == {
        f"bounded/train/{k}" for k in ("5/huge-file.png", "6/bomb.png", "7/gif-inside.png", "8/eps-inside.jpg")
    }
    too_big = corrupt["bounded/train/5/huge-file.png"]
    assert too_big.startswith("refused: 30,") and too_big.endswith(" bytes, more than the 20,000 allowed")
    assert not (folder / "bounded/train/5/huge-file.png").exists()  # never downloaded
    assert "10000x10000 pixels, more than the 89,478,485 allowed" in corrupt["bounded/train/6/bomb.png"]
    assert corrupt["bounded/train/7/gif-inside.png"] == "UnidentifiedImageError: not a JPEG, PNG, WEBP image"
    assert corrupt["bounded/train/8/eps-inside.jpg"] == "UnidentifiedImageError: not a JPEG, PNG, WEBP image"


def test_the_pixel_limit_holds_whatever_a_library_sets_pils_to(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    (tmp_path / "bomb.png").write_bytes(png(10_000, 10_000, "1"))
    (tmp_path / "fine.png").write_bytes(png(4000, 3000))  # 12 megapixels, a phone's photo
    monkeypatch.setattr(Image, "MAX_IMAGE_PIXELS", None)  # as some libraries do at import

    with warnings.catch_warnings():
        warnings.simplefilter("error")  # and no DecompressionBombWarning for good images
        assert verify_image(tmp_path / "fine.png") is None
    assert "more than the 89,478,485 allowed" in (verify_image(tmp_path / "bomb.png") or "")


# -- COCO files -------------------------------------------------------------------------------------


def coco(images: int = 1, annotations: int = 0, **image: object) -> str:
    return json.dumps(
        {
            "images": [{"id": i, "file_name": f"{i}.png", "width": 100, "height": 80, **image} for i in range(images)],
            "annotations": [{"image_id": 0, "category_id": 1, "bbox": [1, 1, 10, 10]} for _ in range(annotations)],
            "categories": [{"id": 1, "name": "bolt"}],
        }
    )


def test_boxes_beyond_the_per_image_limit_are_dropped_and_counted() -> None:
    samples, _, _, counts = parse_coco(coco(annotations=MAX_BOXES_PER_IMAGE + 5), "s3://bkt/train.json")

    assert len(samples[0].boxes) == MAX_BOXES_PER_IMAGE == counts.boxes
    assert counts.boxes_dropped_over_limit == 5


@pytest.mark.parametrize(
    ("limit", "raw", "message"),
    [
        ("MAX_IMAGES", coco(images=4), r"s3://bkt/train\.json: 4 images, more than the 3 allowed"),
        ("MAX_ANNOTATIONS", coco(annotations=4), r"s3://bkt/train\.json: 4 annotations, more than the 3 allowed"),
    ],
)
def test_annotation_files_over_a_count_limit_are_refused(
    limit: str, raw: str, message: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(detection_data, limit, 3)
    with pytest.raises(DataError, match=message):
        parse_coco(raw, "s3://bkt/train.json")


@pytest.mark.parametrize(
    ("raw", "message"),
    [
        (coco(width=100_001), r"image '0\.png' needs a positive width and height of at most 100,000 pixels"),
        (coco(height=float("inf")), r"needs a positive width and height"),
        (coco(height=float("nan")), r"needs a positive width and height"),
        (
            '{"images": [{"id": [1], "file_name": "a.png", "width": 5, "height": 5}], "categories": [{"id": 1}]}',
            r"needs an 'id' and a 'file_name'",
        ),
        ("[" * 100_000 + "]" * 100_000, r"nested too deeply"),
        (
            json.dumps({"images": [], "categories": [{"id": 1, "name": "x" * 257}]}),
            r"category 1's name is longer than 256 characters",
        ),
        (
            json.dumps({"images": [], "categories": [{"id": i} for i in range(100_001)]}),
            r"100,001 categories, more than the 100,000 allowed",
        ),
    ],
)
def test_absurd_annotation_files_say_what_is_wrong(raw: str, message: str) -> None:
    with pytest.raises(DataError, match=message):
        parse_coco(raw, "s3://bkt/train.json")


def test_an_annotation_file_over_its_size_limit_is_refused_before_it_is_read(
    world: DigitsWorld, store: S3Store, monkeypatch: pytest.MonkeyPatch
) -> None:
    shapes = make_shapes(["red"], count=2, seed=2, size=64)
    base = f"s3://{DATA_BUCKET}/coco-size"
    world.put_many({f"{base}/images/{k}": v for k, v in shapes.pngs().items()})
    raw = json.dumps(shapes.coco()).encode()
    world.put(f"{base}/train.json", raw)
    world.put(f"{base}/val.json", raw + b" " * 100)
    spec = DataSpec(
        train=f"{base}/images", annotations=AnnotationsSpec(train=f"{base}/train.json", validation=f"{base}/val.json")
    )
    monkeypatch.setattr(detection_data, "MAX_ANNOTATION_BYTES", len(raw) + 50)

    with pytest.raises(
        StorageError,
        match=rf"^data\.annotations\.validation: {base}/val\.json is {len(raw) + 100:,} bytes or more, "
        rf"more than the {len(raw) + 50:,} bytes allowed$",
    ):
        build_detection_index(store, spec, None)
