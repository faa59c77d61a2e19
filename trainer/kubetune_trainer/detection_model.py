"""Detection models: torchvision's detection zoo by name, base weights from S3, the box predictor replaced.

Every torchvision detector counts classes with a background at index 0 (COCO's 91 = 90 + background),
so a job with N classes builds the model with N + 1 and trains on labels 1..N. Nothing is downloaded:
`weights=None, weights_backbone=None` always, and the base weights come through the classification
path's safe loader (`model.read_state_dict`: safetensors or weights-only state dicts).

Strategies map onto the backbone's stages (its top-level children, input side first): `head` trains the
detection heads and the feature pyramid with the backbone frozen, `partial` also the last
`trainableLayers` backbone stages, `full` everything. torchvision's own `trainable_backbone_layers` only
applies to downloaded backbone weights, so the freezing is done here, with the same `TrainablePlan` the
classification loop uses (frozen BatchNorm stays in eval mode; the backbone's stages learn at `model.param_groups`' rates).
"""

from __future__ import annotations

from collections.abc import Mapping
from pathlib import Path
from typing import Any

from torch import nn

from kubetune_trainer.config import DETECTION_ARCHITECTURES
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.model import (
    TrainablePlan,
    WeightsReport,
    load_base_weights,
    read_state_dict,
    stages_to_train,
    train_only,
)

# The layers that map features to this task's classes: re-initialised for the job's classes, never
# loaded from the base weights (the base model's classes are other classes).
PREDICTORS: dict[str, tuple[str, ...]] = {
    "fasterrcnn": ("roi_heads.box_predictor",),
    "retinanet": ("head.classification_head.cls_logits",),
    "fcos": ("head.classification_head.cls_logits",),
    "ssd": ("head.classification_head",),
}


def family(architecture: str) -> str:
    """fasterrcnn, retinanet, fcos or ssd (ssdlite320…, ssd300…)."""
    return next((f for f in PREDICTORS if architecture.startswith(f)), architecture)


def check_detection_architecture(name: str) -> None:
    if name not in DETECTION_ARCHITECTURES:
        raise ConfigError(
            f"model.architecture: '{name}' is not a detection architecture; detection accepts: "
            + ", ".join(DETECTION_ARCHITECTURES)
        )


def create_detector(architecture: str, num_classes: int, image_size: int | None = None) -> nn.Module:
    """The detector for `num_classes` object classes (plus background); never downloads anything.

    `image_size` sets the model's own resize transform: shorter and longer side for the R-CNN, RetinaNet
    and FCOS families, the fixed square input of SSD models (whose anchors scale with the input).
    """
    import torchvision.models.detection as zoo  # here, not at the top: the driver builds no model

    check_detection_architecture(architecture)
    kwargs: dict[str, Any] = {"weights": None, "weights_backbone": None, "num_classes": num_classes + 1}
    model: nn.Module = getattr(zoo, architecture)(**kwargs)
    model.kubetune_architecture = architecture  # type: ignore[assignment]
    if image_size is not None:
        set_transform(model, transform_config(model) | resized(model, image_size))
    return model


def resized(model: nn.Module, image_size: int) -> dict[str, Any]:
    """The transform settings that make `model` take `image_size`-pixel inputs."""
    transform: Any = model.transform
    if family(str(getattr(model, "kubetune_architecture", ""))) == "ssd" or transform.fixed_size:
        return {"minSize": image_size, "maxSize": image_size, "fixedSize": [image_size, image_size]}
    return {"minSize": image_size, "maxSize": image_size}


def transform_config(model: nn.Module) -> dict[str, Any]:
    """The model's own resize and normalisation, JSON-ready (model.json `transform`): what a reloaded
    model needs set on `model.transform` to see images as it did in training."""
    transform: Any = model.transform
    return {
        "minSize": int(transform.min_size[0]),
        "maxSize": int(transform.max_size),
        "fixedSize": list(transform.fixed_size) if transform.fixed_size else None,
        "mean": [float(v) for v in transform.image_mean],
        "std": [float(v) for v in transform.image_std],
    }


def set_transform(model: nn.Module, config: Mapping[str, Any]) -> None:
    """Apply a `transform_config` to a torchvision detector (the same attributes its builder sets)."""
    transform: Any = model.transform
    transform.min_size = (int(config["minSize"]),)
    transform.max_size = int(config["maxSize"])
    fixed = config.get("fixedSize")
    transform.fixed_size = (int(fixed[0]), int(fixed[1])) if fixed else None


def predictor_names(model: nn.Module) -> list[str]:
    architecture = str(getattr(model, "kubetune_architecture", ""))
    names = PREDICTORS.get(family(architecture))
    if not names:
        raise ConfigError(f"cannot find the box predictor of {type(model).__name__} to replace it")
    return list(names)


def build_detector(
    architecture: str, num_classes: int, weights: Path | None, source: str, image_size: int | None = None
) -> tuple[nn.Module, WeightsReport]:
    """The detector with base weights from `weights` (a local file downloaded from `source`)."""
    model = create_detector(architecture, num_classes, image_size)
    if weights is None:
        return model, WeightsReport()
    report = load_base_weights(model, read_state_dict(weights, source), source, heads=predictor_names(model))
    return model, report


def backbone_body(model: nn.Module) -> tuple[str, nn.Module]:
    """The feature extractor whose stages `partial` counts: `backbone.body` (FPN models) or `backbone.features`."""
    for name in ("backbone.body", "backbone.features", "backbone"):
        try:
            return name, model.get_submodule(name)
        except AttributeError:
            continue
    raise ConfigError(f"cannot find the backbone of {type(model).__name__}")


def detector_stages(model: nn.Module) -> list[list[str]]:
    """Backbone parameter names grouped by the backbone's top-level children, input side first."""
    prefix, body = backbone_body(model)
    groups = []
    for child_name, child in body.named_children():
        names = [f"{prefix}.{child_name}.{n}" for n, _ in child.named_parameters()]
        if names:
            groups.append(names)
    return groups


def apply_detection_strategy(model: nn.Module, strategy: str, trainable_layers: int | None = None) -> TrainablePlan:
    """Freeze what the strategy keeps fixed; the plan the classification loop's helpers understand."""
    stages = detector_stages(model)
    in_backbone = {n for g in stages for n in g}
    head = [n for n, _ in model.named_parameters() if n not in in_backbone]
    trained = stages_to_train(model, strategy, trainable_layers, len(stages))
    return train_only(model, strategy, head, stages[len(stages) - trained :] if trained else [], trained, len(stages))
