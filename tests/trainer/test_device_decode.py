"""JPEGs decoded and augmented by the training process (`device_decode`), run here on the CPU: the same images
as the PIL path within libjpeg's and resampling's differences, the same random draws, a corrupt image left
out and counted, and the rule that picks the path."""

from __future__ import annotations

import threading
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from kubetune_trainer.augment import AUGMENT_POLICIES, build_transforms
from kubetune_trainer.data import ImageFiles
from kubetune_trainer.device_decode import (
    DeviceDecoder,
    JpegFiles,
    JpegItem,
    collate_jpegs,
    decodes_on_device,
    device_batches,
    on_device_files,
)
from kubetune_trainer.errors import DataError
from kubetune_trainer.loaders import SeededSamples

CFG = {
    "input_size": [3, 64, 64],
    "mean": [0.485, 0.456, 0.406],
    "std": [0.229, 0.224, 0.225],
    "interpolation": "bilinear",
    "crop_pct": 0.875,
    "crop_mode": "center",
}
CUDA, CPU = torch.device("cuda"), torch.device("cpu")
SEED = 7


def photo(path: Path, width: int, height: int, seed: int, fmt: str = "JPEG") -> Path:
    """A smooth random picture (as a photo compresses), saved at quality 90."""
    rng = np.random.default_rng(seed)
    small = Image.fromarray(rng.integers(0, 256, (height // 8 + 1, width // 8 + 1, 3), dtype=np.uint8))
    small.resize((width, height), Image.Resampling.BICUBIC).save(
        path, fmt, **({"quality": 90} if fmt == "JPEG" else {})
    )
    return path


@pytest.fixture
def pictures(tmp_path: Path) -> list[Path]:
    sizes = [(120, 90), (80, 130), (200, 150), (96, 96)]
    return [photo(tmp_path / f"{i}.jpg", w, h, i) for i, (w, h) in enumerate(sizes)]


def both_paths(paths: list[Path], transform: object) -> tuple[torch.Tensor, torch.Tensor]:
    """The batch of the PIL path and of the bytes → decode → transform path, each image seeded alike."""
    labels = list(range(len(paths)))
    cpu = SeededSamples(ImageFiles(paths, labels, transform), SEED)  # type: ignore[arg-type]
    jpegs = SeededSamples(JpegFiles(paths, labels, transform), SEED)  # type: ignore[arg-type]
    expected = torch.stack([cpu[(0, i)][0] for i in labels])
    images, got_labels = DeviceDecoder(jpegs.dataset.steps, CPU)(collate_jpegs([jpegs[(0, i)] for i in labels]))  # type: ignore[arg-type]
    assert got_labels.tolist() == labels
    return expected, images


def test_the_evaluation_transform_gives_the_pil_paths_images(pictures: list[Path]) -> None:
    _, evaluation = build_transforms(CFG, "none")
    expected, images = both_paths(pictures, evaluation)
    assert images.shape == expected.shape == (4, 3, 64, 64)
    # libjpeg-turbo's decode and PIL's resampling against torch's: under a level of 255 on average (0.003
    # here, normalised by std ~0.22), a few levels at most.
    assert (images - expected).abs().mean() < 0.01 and (images - expected).abs().max() < 0.1


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
def test_each_policy_draws_the_crops_flips_and_jitter_of_the_pil_path(pictures: list[Path], policy: str) -> None:
    train, _ = build_transforms(CFG, policy)
    expected, images = both_paths(pictures, train)
    # The same draws: another crop, flip or shift of these pictures differs thirty times more (~1.0). Within
    # that, strong's jitter differs most: PIL rounds to 8 bits after each adjustment, the GPU path does not
    # (0.022 here, about one level of 255).
    assert (images - expected).abs().mean() < 0.03
    if policy != "none":
        other = SeededSamples(ImageFiles(pictures, [0] * 4, train), SEED + 1)  # type: ignore[arg-type]
        drawn_otherwise = torch.stack([other[(0, i)][0] for i in range(4)])
        assert (drawn_otherwise - expected).abs().mean() > 0.3


def test_the_training_process_draws_nothing_from_its_generator(pictures: list[Path]) -> None:
    train, _ = build_transforms(CFG, "strong")
    batch = collate_jpegs([SeededSamples(JpegFiles(pictures, [0] * 4, train), SEED)[(0, i)] for i in range(4)])  # type: ignore[arg-type]
    torch.manual_seed(123)
    before = torch.get_rng_state()
    DeviceDecoder(JpegFiles(pictures, [0] * 4, train).steps, CPU)(batch)
    assert torch.equal(torch.get_rng_state(), before)


def test_a_corrupt_jpeg_is_left_out_of_its_batch_and_the_rest_trains(pictures: list[Path]) -> None:
    # Its header reads (so the loader hands its bytes over), its data does not decode, by nvJPEG or PIL.
    data = pictures[1].read_bytes()
    pictures[1].write_bytes(data[: len(data) // 2])
    _, evaluation = build_transforms(CFG, "none")
    files = JpegFiles(pictures, [10, 11, 12, 13], evaluation)
    images, labels = DeviceDecoder(files.steps, CPU)(collate_jpegs([files[i] for i in range(4)]))
    # Three images trained: the loop counts the fourth unreadable (images handed minus images trained).
    assert images.shape[0] == 3 and labels.tolist() == [10, 12, 13]
    with pytest.raises(DataError, match="none of the 1 images"):
        DeviceDecoder(files.steps, CPU)(collate_jpegs([files[1]]))


def test_a_png_is_decoded_by_the_loader_process_and_keeps_its_place(pictures: list[Path], tmp_path: Path) -> None:
    pictures[2] = photo(tmp_path / "2.jpg", 150, 110, 2, fmt="PNG")  # a PNG named .jpg
    _, evaluation = build_transforms(CFG, "none")
    files = JpegFiles(pictures, [0, 1, 2, 3], evaluation)
    items = [files[i] for i in range(4)]
    assert [item.image is not None for item in items] == [False, False, True, False]
    loader = [collate_jpegs(items)]
    ((images, labels),) = list(device_batches(loader, files, CPU))
    assert labels.tolist() == [0, 1, 2, 3]
    assert torch.equal(images[2], ImageFiles(pictures, [0] * 4, evaluation)[2][0])  # the PIL path's, exactly


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
def test_jpegs_are_decoded_on_the_gpu_on_cuda_unless_a_step_is_pil_only(policy: str, pictures: list[Path]) -> None:
    train, evaluation = build_transforms(CFG, policy)
    assert decodes_on_device(CUDA, train) and decodes_on_device(CUDA, evaluation)
    assert not decodes_on_device(CPU, train) and not decodes_on_device(None, train)
    # timm's RandAugment works on PIL images only: such a run decodes on the CPU.
    with_rand_augment, _ = build_transforms(CFG, policy, "rand-m9-mstd0.5")
    assert not decodes_on_device(CUDA, with_rand_augment)
    files = ImageFiles(pictures, [0] * 4, train)
    assert isinstance(on_device_files(files, CUDA), JpegFiles)
    assert on_device_files(files, CPU) is files
    assert on_device_files(ImageFiles(pictures, [0] * 4, with_rand_augment), CUDA).__class__ is ImageFiles


def test_a_thread_decoding_ahead_gives_the_same_batches_and_stops_with_the_loop(pictures: list[Path]) -> None:
    train, _ = build_transforms(CFG, "standard")
    files = JpegFiles(pictures, [0, 1, 2, 3], train)
    seeded = SeededSamples(files, SEED)  # type: ignore[arg-type]
    loader = [collate_jpegs([seeded[(epoch, i)] for i in (0, 1)]) for epoch in range(3)]
    inline = list(device_batches(loader, files, CPU, ahead=0))
    ahead = list(device_batches(loader, files, CPU, ahead=1))
    assert len(ahead) == 3 and all(
        torch.equal(a[0], b[0]) and torch.equal(a[1], b[1]) for a, b in zip(inline, ahead, strict=True)
    )
    # The loop leaving mid-epoch (a preemption, early stopping) ends the thread; an error in it reaches the loop.
    batches = iter(device_batches(loader, files, CPU, ahead=1))
    next(batches)
    batches.close()  # type: ignore[attr-defined]
    assert not [t for t in threading.enumerate() if t.name == "device-decode"]
    with pytest.raises(DataError, match="none of the 1 images"):
        list(device_batches([collate_jpegs([JpegItem(0, b"not a jpeg", [])])], files, CPU, ahead=1))
