"""A detection run's JPEGs decoded by the training process (`detection_decode`), run here on the CPU: the same
images and boxes as the PIL path (`DetectionFiles`), flipped by the same draws, a corrupt image left out with
its boxes, a PNG decoded by the loader process, and the rule that picks the path for a detection run."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import DatasetIndex
from kubetune_trainer.detection_data import DetectionFiles, DetectionIndex, DetectionSample, collate
from kubetune_trainer.detection_decode import DetectionJpegs, on_device_detection
from kubetune_trainer.device_decode import JpegItem, device_batches, device_collate
from kubetune_trainer.errors import DataError
from kubetune_trainer.loaders import SeededSamples
from kubetune_trainer.tasks import DetectionTask
from tests.trainer.test_device_decode import CPU, CUDA, SEED, photo

SIZES = [(120, 90), (80, 130), (200, 150), (96, 96), (64, 100), (150, 70)]  # width, height


def sample(key: str, width: int, height: int) -> DetectionSample:
    """Two boxes placed unevenly, so that a mirrored box is another box."""
    boxes = [[4.0, 6.0, 40.0, 50.0], [width - 30.0, 2.0, width - 1.0, height / 2]]
    return DetectionSample(key, width, height, boxes, [1, 2])


@pytest.fixture
def folder(tmp_path: Path) -> Path:
    for i, (width, height) in enumerate(SIZES):
        photo(tmp_path / f"{i}.jpg", width, height, i)
    return tmp_path


def samples() -> list[DetectionSample]:
    return [sample(f"{i}.jpg", width, height) for i, (width, height) in enumerate(SIZES)]


def both_paths(folder: Path, seed: int = SEED) -> tuple[tuple[list, list], tuple[list, list]]:  # type: ignore[type-arg]
    """(images, targets) of the PIL path and of the bytes → decode → flip path, each image seeded alike."""
    indexes = range(len(SIZES))
    cpu = SeededSamples(DetectionFiles(folder, samples(), flip=True), seed)
    jpegs = DetectionJpegs(folder, samples(), flip=True)
    seeded = SeededSamples(jpegs, seed)
    expected = collate([cpu[(0, i)] for i in indexes])
    return expected, jpegs.decoder(CPU)(jpegs.collate_batch([seeded[(0, i)] for i in indexes]))


def flips(targets: list[dict[str, torch.Tensor]]) -> list[bool]:
    return [not torch.equal(t["boxes"], torch.tensor(s.boxes)) for t, s in zip(targets, samples(), strict=True)]


def test_the_same_images_flip_with_their_boxes_as_on_the_pil_path(folder: Path) -> None:
    (expected, expected_targets), (images, targets) = both_paths(folder)
    assert [tuple(i.shape) for i in images] == [tuple(i.shape) for i in expected] == [(3, h, w) for w, h in SIZES]
    # Floats in [0, 1] at each image's own size (the detector resizes and normalises): libjpeg's decode
    # against PIL's, under a level of 255.
    assert all((got - want).abs().max() < 2 / 255 for got, want in zip(images, expected, strict=True))
    for got, want in zip(targets, expected_targets, strict=True):
        assert torch.equal(got["boxes"], want["boxes"]) and torch.equal(got["labels"], want["labels"])
    # The same draws: some images flipped, some not, and another seed flips others.
    assert flips(targets) == flips(expected_targets) and len(set(flips(targets))) == 2
    _, (_, other) = both_paths(folder, SEED + 1)
    assert flips(other) != flips(targets)


def test_the_training_process_draws_nothing_from_its_generator(folder: Path) -> None:
    jpegs = DetectionJpegs(folder, samples(), flip=True)
    batch = jpegs.collate_batch([SeededSamples(jpegs, SEED)[(0, i)] for i in range(len(SIZES))])
    torch.manual_seed(123)
    before = torch.get_rng_state()
    jpegs.decoder(CPU)(batch)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_corrupt_jpeg_is_left_out_with_its_boxes_and_the_rest_trains(folder: Path) -> None:
    data = (folder / "1.jpg").read_bytes()
    (folder / "1.jpg").write_bytes(data[: len(data) // 2])  # its header reads, its data does not decode
    jpegs = DetectionJpegs(folder, samples())
    images, targets = jpegs.decoder(CPU)(jpegs.collate_batch([jpegs[i] for i in range(4)]))
    # Three images trained, each with its own boxes: the loop counts the fourth unreadable.
    assert [tuple(i.shape[1:]) for i in images] == [(h, w) for w, h in (SIZES[0], SIZES[2], SIZES[3])]
    assert [t["boxes"][1, 2].item() for t in targets] == [w - 1.0 for w, _ in (SIZES[0], SIZES[2], SIZES[3])]
    with pytest.raises(DataError, match="none of the 1 images"):
        jpegs.decoder(CPU)(jpegs.collate_batch([jpegs[1]]))


def test_a_png_is_decoded_and_flipped_by_the_loader_process_and_keeps_its_place(folder: Path) -> None:
    photo(folder / "2.jpg", *SIZES[2], 2, fmt="PNG")  # a PNG named .jpg
    jpegs = DetectionJpegs(folder, samples(), flip=True)
    seeded = SeededSamples(jpegs, SEED)
    items = [seeded[(0, i)] for i in range(4)]
    assert [item.image is not None for item in items] == [False, False, True, False]
    ((images, targets),) = list(device_batches([jpegs.collate_batch(items)], jpegs, CPU))
    cpu_image, cpu_target = SeededSamples(DetectionFiles(folder, samples(), flip=True), SEED)[(0, 2)]
    assert torch.equal(images[2], cpu_image) and torch.equal(targets[2]["boxes"], cpu_target["boxes"])
    assert [tuple(i.shape[1:]) for i in images] == [(h, w) for w, h in SIZES[:4]]


def test_a_thread_decoding_ahead_gives_the_same_detection_batches(folder: Path) -> None:
    jpegs = DetectionJpegs(folder, samples(), flip=True)
    seeded = SeededSamples(jpegs, SEED)
    loader = [jpegs.collate_batch([seeded[(epoch, i)] for i in (0, 1, 2)]) for epoch in range(2)]
    inline, ahead = list(device_batches(loader, jpegs, CPU, ahead=0)), list(device_batches(loader, jpegs, CPU, ahead=1))
    assert len(ahead) == 2
    for (images, targets), (images_ahead, targets_ahead) in zip(inline, ahead, strict=True):
        assert all(torch.equal(a, b) for a, b in zip(images, images_ahead, strict=True))
        assert all(torch.equal(a["boxes"], b["boxes"]) for a, b in zip(targets, targets_ahead, strict=True))
    with pytest.raises(DataError, match="none of the 1 images"):
        list(device_batches([jpegs.collate_batch([JpegItem({}, b"not a jpeg", [False])])], jpegs, CPU, ahead=1))


def test_a_detection_run_decodes_its_jpegs_on_the_gpu_on_cuda_only(folder: Path) -> None:
    config = TrainerConfig.model_validate(
        {
            "jobName": "decode",
            "runName": "decode",
            "task": "detection",
            "model": {
                "architecture": "fasterrcnn_mobilenet_v3_large_320_fpn",
                "checkpoint": "s3://bkt/base.safetensors",
            },
            "data": {
                "train": "s3://bkt/images/",
                "augment": "standard",
                "annotations": {"train": "s3://bkt/ann/train.json", "validation": "s3://bkt/ann/val.json"},
            },
            "output": {"path": "s3://bkt/runs/decode/"},
        }
    )
    boxes = DetectionIndex(["a", "b"], samples(), samples()[:2], {})
    task = DetectionTask(config, boxes, DatasetIndex(bucket="bkt", class_names=["a", "b"], train=[], validation=[]))
    train, validation = task.datasets(folder, {}, CUDA)
    assert isinstance(train, DetectionJpegs) and isinstance(validation, DetectionJpegs)
    assert train.flip and not validation.flip
    assert device_collate(train, collate) == DetectionJpegs.collate_batch
    on_cpu, _ = task.datasets(folder, {}, CPU)
    assert type(on_cpu) is DetectionFiles and device_collate(on_cpu, collate) is collate
    assert on_device_detection(on_cpu, None) is on_cpu
