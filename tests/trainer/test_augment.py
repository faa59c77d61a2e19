"""Training augmentation (`data.augment`): what each policy does to an image, scaled to its size."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from PIL import Image

from kubetune_trainer.augment import AUGMENT_POLICIES, augment_plan, build_transforms, detection_augment

CFG = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 1.0}


def square_image(size: int = 32, side: int = 12) -> Image.Image:
    """A white square in the middle of a black image."""
    pixels = np.zeros((size, size, 3), dtype=np.uint8)
    start = (size - side) // 2
    pixels[start : start + side, start : start + side] = 255
    return Image.fromarray(pixels)


def white_pixels(tensor: torch.Tensor) -> int:
    return int((tensor[0] > 0.5).sum())  # normalised to [-1, 1]: white is 1, black -1


def test_none_is_the_evaluation_transform() -> None:
    train, evaluation = build_transforms(CFG, "none")
    image = square_image()
    assert torch.equal(train(image), evaluation(image))


def test_light_shifts_the_object_but_keeps_it_whole() -> None:
    train, _ = build_transforms(CFG, "light")
    torch.manual_seed(0)
    image = square_image()
    shifted = [train(image) for _ in range(20)]
    assert all(t.shape == (3, 32, 32) for t in shifted)
    # Shifts of at most 4 px (1/8 of 32) move a 12 px square in the middle but never cut it.
    assert all(white_pixels(t) == 144 for t in shifted)
    assert len({tuple(t[0].argmax(0).tolist()) for t in shifted}) > 1
    assert augment_plan("light", 32).shift_pixels == 4


@pytest.mark.parametrize(("size", "area"), [(224, 0.08), (448, 0.08), (64, 0.486), (32, 0.697)])
def test_strong_crops_shrink_with_the_image(size: int, area: float) -> None:
    plan = augment_plan("strong", size)
    assert plan.min_crop_area == pytest.approx(area, abs=0.001)
    assert plan.flip and plan.colour_jitter == 0.4


def test_standard_crops_less_than_strong_and_never_jitters_colours() -> None:
    for size in (32, 64, 224):
        standard, strong = augment_plan("standard", size), augment_plan("strong", size)
        assert standard.min_crop_area is not None and strong.min_crop_area is not None
        assert standard.min_crop_area > strong.min_crop_area
        assert standard.colour_jitter == 0 and standard.flip
    assert augment_plan("standard", 224).min_crop_area == 0.25


@pytest.mark.parametrize("policy", AUGMENT_POLICIES)
def test_every_policy_gives_the_input_size_and_says_what_it_does(policy: str) -> None:
    train, _ = build_transforms(CFG, policy)
    assert train(square_image()).shape == (3, 32, 32)
    wire = augment_plan(policy, 32).wire()
    assert wire["policy"] == policy and wire["description"].startswith(f"{policy}: ")
    assert wire["description"].endswith("at 32 px")


def test_detection_flips_with_every_policy_but_none() -> None:
    assert [detection_augment(p)["flip"] for p in AUGMENT_POLICIES] == [False, True, True, True]
