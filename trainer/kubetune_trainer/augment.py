"""Training augmentation: four policies (`data.augment`), scaled to the image size.

Measured on the fine-tuning quality benchmark (bench/quality.py; numbers in docs/trainer.md): on short
fine-tunes every augmentation costs a little and only translation pays back once the model sees each
image many times; flips break classes whose meaning has a side (digits, text), and random resized
crops on small images cut the object out (timm's ImageNet recipe crops down to 8% of the area: 9 px of
a 32 px image). Hence:

- `none`: the evaluation transform (resize, centre crop), nothing random;
- `light` (the default): the evaluation transform, then a random shift of up to 1/8 of the side with
  reflected borders: the object keeps its size and shape and stays in the frame;
- `standard`: random resized crops (aspect 3/4 to 4/3) and horizontal flips;
- `strong`: `standard` with smaller crops and colour jitter (0.4): timm's ImageNet recipe at 224 px.

The crops of `standard` and `strong` shrink with the image: the smallest crop's area is
`base ** min(1, size / 224)` of the image (base 0.25 and 0.08), so at 224 px and above it is timm's
range, and on small images it keeps most of the frame (strong: 49% at 64 px, 70% at 32 px) rather
than a few pixels that no longer hold the object.

Detection uses flips only (the one augmentation that keeps boxes exact without resampling): every
policy but `none` flips.

On top of any policy, a classification run may add timm's RandAugment (`training.randAugment`, timm's
config string): after the policy's crops, flips and jitter (on the original image for `none` and
`light`), as timm's own ImageNet transform places it.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

AUGMENT_POLICIES = ("none", "light", "standard", "strong")
# The side fraction `light` shifts by at most (reflect-padded, then cropped back to size).
SHIFT_FRACTION = 0.125
# The image size at which `standard` and `strong` crop with their full range; smaller images crop less.
FULL_CROP_SIZE = 224
MIN_CROP_AREA = {"standard": 0.25, "strong": 0.08}
CROP_ASPECT = (3 / 4, 4 / 3)
COLOUR_JITTER = 0.4


@dataclass(frozen=True)
class AugmentPlan:
    """What a policy does at one image size: the figures model.json and the status report."""

    policy: str
    image_size: int
    shift_pixels: int = 0
    min_crop_area: float | None = None
    flip: bool = False
    colour_jitter: float = 0.0
    rand_augment: str | None = None  # timm's RandAugment config string (training.randAugment)

    def describe(self) -> str:
        parts = []
        if self.shift_pixels:
            parts.append(f"shifts up to {self.shift_pixels} px")
        if self.min_crop_area is not None:
            parts.append(f"crops of {self.min_crop_area:.0%} to 100% of the area")
        if self.flip:
            parts.append("horizontal flips")
        if self.colour_jitter:
            parts.append(f"colour jitter {self.colour_jitter:g}")
        if self.rand_augment:
            parts.append(f"RandAugment {self.rand_augment}")
        return f"{self.policy}: " + (", ".join(parts) if parts else "no augmentation") + f" at {self.image_size} px"

    def wire(self) -> dict[str, Any]:
        return {
            "policy": self.policy,
            "imageSize": self.image_size,
            "shiftPixels": self.shift_pixels,
            "minCropArea": self.min_crop_area,
            "flip": self.flip,
            "colourJitter": self.colour_jitter,
            "randAugment": self.rand_augment,
            "description": self.describe(),
        }


def min_crop_area(base: float, image_size: int) -> float:
    """The smallest crop's share of the image area: `base` at FULL_CROP_SIZE and above, more below."""
    return round(base ** min(1.0, image_size / FULL_CROP_SIZE), 3)


def augment_plan(policy: str, image_size: int, rand_augment: str | None = None) -> AugmentPlan:
    if policy not in AUGMENT_POLICIES:
        raise ValueError(f"data.augment: unknown policy '{policy}' (one of {', '.join(AUGMENT_POLICIES)})")
    if policy == "none":
        return AugmentPlan(policy, image_size, rand_augment=rand_augment)
    if policy == "light":
        shift = max(1, round(image_size * SHIFT_FRACTION))
        return AugmentPlan(policy, image_size, shift_pixels=shift, rand_augment=rand_augment)
    return AugmentPlan(
        policy,
        image_size,
        min_crop_area=min_crop_area(MIN_CROP_AREA[policy], image_size),
        flip=True,
        colour_jitter=COLOUR_JITTER if policy == "strong" else 0.0,
        rand_augment=rand_augment,
    )


def rand_augment(config: str, data_cfg: Mapping[str, Any]) -> Callable[[Any], Any]:
    """timm's RandAugment of a PIL image by its config string, with the hyper-parameters timm's own training
    transform gives it: translations up to 45% of the side, fills in the dataset's mean colour."""
    from timm.data.auto_augment import rand_augment_transform
    from timm.data.transforms import str_to_pil_interp

    size = min(int(side) for side in data_cfg["input_size"][-2:])
    hparams = {
        "translate_const": int(size * 0.45),
        "img_mean": tuple(min(255, round(255 * x)) for x in data_cfg["mean"]),
        "interpolation": str_to_pil_interp(data_cfg.get("interpolation", "bilinear")),
    }
    return rand_augment_transform(config, hparams)


def detection_flips(policy: str) -> bool:
    """Whether a detection run flips its training images (every policy but `none`)."""
    return policy != "none"


def detection_augment(policy: str) -> dict[str, Any]:
    """What a detection run's policy does, in the shape of `AugmentPlan.wire`."""
    flip = detection_flips(policy)
    return {
        "policy": policy,
        "flip": flip,
        "description": f"{policy}: {'horizontal flips' if flip else 'no augmentation'}",
    }


def build_transforms(
    data_cfg: Mapping[str, Any], policy: str, rand_augment_config: str | None = None
) -> tuple[Callable[[Any], Any], Callable[[Any], Any]]:
    """(train, eval) transforms for timm's data config (input size, interpolation, mean/std, crop), with timm's
    RandAugment in training when `rand_augment_config` (training.randAugment) asks for it."""
    import timm.data
    from torchvision import transforms as tv

    size = int(data_cfg["input_size"][-1])
    mean, std = tuple(data_cfg["mean"]), tuple(data_cfg["std"])
    interpolation = data_cfg.get("interpolation", "bilinear")
    eval_tf = timm.data.create_transform(
        input_size=tuple(data_cfg["input_size"]),
        interpolation=interpolation,
        mean=mean,
        std=std,
        is_training=False,
        crop_pct=data_cfg.get("crop_pct"),
        crop_mode=data_cfg.get("crop_mode"),
    )
    plan = augment_plan(policy, size)
    extra = [rand_augment(rand_augment_config, data_cfg)] if rand_augment_config else []
    if plan.policy == "none":
        return (tv.Compose([*extra, eval_tf]) if extra else eval_tf), eval_tf
    if plan.policy == "light":
        shift = tv.RandomCrop(size, padding=plan.shift_pixels, padding_mode="reflect")
        return tv.Compose([*extra, eval_tf, shift]), eval_tf
    mode = tv.InterpolationMode.BICUBIC if interpolation == "bicubic" else tv.InterpolationMode.BILINEAR
    area = plan.min_crop_area if plan.min_crop_area is not None else 1.0
    steps: list[Any] = [tv.RandomResizedCrop(size, scale=(area, 1.0), ratio=CROP_ASPECT, interpolation=mode)]
    steps.append(tv.RandomHorizontalFlip())
    if plan.colour_jitter:
        steps.append(tv.ColorJitter(plan.colour_jitter, plan.colour_jitter, plan.colour_jitter))
    steps += [*extra, tv.ToTensor(), tv.Normalize(mean, std)]
    return tv.Compose(steps), eval_tf
