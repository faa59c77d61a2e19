"""The model: a timm architecture, base weights loaded without running code, a new head, and what trains.

Base weights are data, never code: safetensors, or a torch file opened with `weights_only=True`, which
refuses any pickle that would import or call something. The classifier of the base weights is always
dropped (the new task has other classes, even when it has as many), and so is any tensor whose shape
does not fit; what was dropped, missing or unexpected is reported.

Strategies decide which parameters train:
- head: only the classifier;
- partial: the last `trainableLayers` stages of the backbone and the head (stages as timm groups them
  for layer-wise learning rates: `group_matcher(coarse=True)`; the stem is the first stage);
- full: everything.
The backbone's stages learn at `param_groups`' rates: the top one at `training.backboneLearningRateScale`
times the head's rate, each one below it `training.layerDecay` times slower.
Normalisation layers with running statistics inside frozen parts are kept in eval mode, so frozen
layers stay bit-identical (their statistics would otherwise drift with the new data).
"""

from __future__ import annotations

import logging
import pickle
import zipfile
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn

from kubetune_trainer import architectures
from kubetune_trainer.errors import CheckpointError, ConfigError

# timm is imported where a model is built, not here: with it come torchvision and torch._dynamo (~2 s of
# a cold start, more under load), and the driver, which imports this module's names, builds no model.

log = logging.getLogger(__name__)

# Below this share of the backbone's tensors loaded, the base weights are for another architecture.
MIN_LOADED_FRACTION = 0.5
WRAPPER_KEYS = ("state_dict", "model", "model_state_dict", "module", "net")


@dataclass
class WeightsReport:
    """How the base weights fitted the architecture."""

    loaded: int = 0
    missing_keys: list[str] = field(default_factory=list)
    unexpected_keys: list[str] = field(default_factory=list)
    dropped_keys: list[str] = field(default_factory=list)

    def wire(self) -> dict[str, Any]:
        return {
            "loadedTensors": self.loaded,
            "missingKeys": self.missing_keys,
            "unexpectedKeys": self.unexpected_keys,
            "droppedKeys": self.dropped_keys,
        }

    @classmethod
    def from_wire(cls, data: Mapping[str, Any]) -> WeightsReport:
        return cls(
            loaded=int(data.get("loadedTensors", 0)),
            missing_keys=list(data.get("missingKeys", [])),
            unexpected_keys=list(data.get("unexpectedKeys", [])),
            dropped_keys=list(data.get("droppedKeys", [])),
        )

    def log_lines(self) -> list[str]:
        lines = [f"base weights: {self.loaded} tensors loaded"]
        for label, keys in (
            ("dropped (new head or shape mismatch)", self.dropped_keys),
            ("missing (kept at random initialisation)", self.missing_keys),
            ("unexpected (ignored)", self.unexpected_keys),
        ):
            if keys:
                shown = ", ".join(keys[:8]) + (f" … (+{len(keys) - 8})" if len(keys) > 8 else "")
                lines.append(f"  {len(keys)} {label}: {shown}")
        return lines


# -- architecture and weights ---------------------------------------------------------------------


def check_architecture(name: str) -> None:
    # architectures.txt lists the installed timm's models (a test keeps them equal): no timm import here.
    known = architectures.timm_models()
    if name not in known:
        close = architectures.close_matches(name, known)
        hint = f" (similar: {', '.join(close)})" if close else ""
        raise ConfigError(f"model.architecture: '{name}' is not a timm architecture{hint}")


def create_model(architecture: str, num_classes: int) -> nn.Module:
    """The architecture with a fresh head for `num_classes`; never downloads anything."""
    import timm

    check_architecture(architecture)
    model: nn.Module = timm.create_model(architecture, pretrained=False, num_classes=num_classes)
    return model


def read_state_dict(path: Path, source: str) -> dict[str, torch.Tensor]:
    """Tensors from a .safetensors file or a weights-only torch file; code in a pickle is refused."""
    if path.suffix == ".safetensors":
        from safetensors import SafetensorError
        from safetensors.torch import load_file

        try:
            return dict(load_file(str(path)))
        except (SafetensorError, OSError, ValueError) as error:
            raise CheckpointError(f"{source} is not a valid safetensors file: {error}") from None
    try:
        obj = torch.load(path, map_location="cpu", weights_only=True)
    except pickle.UnpicklingError as error:
        reason = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
        raise CheckpointError(
            f"refused to load {source}: it is a pickle that needs code to be loaded, which is never run "
            f"({reason}); save the weights as .safetensors or as a plain state dict"
        ) from None
    except (RuntimeError, EOFError, OSError, zipfile.BadZipFile, ValueError) as error:
        raise CheckpointError(f"cannot read {source} as a torch weights file: {error}") from None
    return unwrap_state_dict(obj, source)


def unwrap_state_dict(obj: object, source: str) -> dict[str, torch.Tensor]:
    """The tensor dict inside a training checkpoint ({"state_dict": …}, {"model": …}) or the dict itself."""
    for _ in range(3):
        if isinstance(obj, Mapping) and obj and all(isinstance(v, torch.Tensor) for v in obj.values()):
            tensors = {str(k): v for k, v in obj.items()}
            return _strip_prefix(tensors, "module.")
        if isinstance(obj, Mapping):
            inner = next((obj[k] for k in WRAPPER_KEYS if isinstance(obj.get(k), Mapping)), None)
            if inner is not None:
                obj = inner
                continue
        break
    raise CheckpointError(
        f"{source} holds no state dict of tensors (expected a dict of tensors, or one under {'/'.join(WRAPPER_KEYS)})"
    )


def _strip_prefix(tensors: dict[str, torch.Tensor], prefix: str) -> dict[str, torch.Tensor]:
    # Weights saved from a DistributedDataParallel wrapper carry "module." on every key.
    if tensors and all(k.startswith(prefix) for k in tensors):
        return {k[len(prefix) :]: v for k, v in tensors.items()}
    return tensors


def classifier_names(model: nn.Module) -> list[str]:
    """Module names of the classifier(s), e.g. ["fc"] or ["head.fc"] or ["head", "head_dist"]."""
    names: list[str] = []
    cfg = getattr(model, "pretrained_cfg", None) or {}
    declared = cfg.get("classifier")
    for name in [declared] if isinstance(declared, str) else list(declared or []):
        if name and isinstance(_find_module(model, name), nn.Module):
            names.append(name)
    get_classifier = getattr(model, "get_classifier", None)
    if callable(get_classifier):
        classifier = get_classifier()
        names += [n for n, m in model.named_modules() if m is classifier and n and n not in names]
    if not names:
        raise ConfigError(f"cannot find the classifier of {type(model).__name__} to replace it")
    return names


def _find_module(model: nn.Module, name: str) -> nn.Module | None:
    try:
        return model.get_submodule(name)
    except AttributeError:
        return None


def _under(key: str, prefixes: Iterable[str]) -> bool:
    return any(key == p or key.startswith(p + ".") for p in prefixes)


def load_base_weights(
    model: nn.Module, state_dict: Mapping[str, torch.Tensor], source: str, heads: list[str] | None = None
) -> WeightsReport:
    """Load what fits; the base classifier (`heads`, found when omitted) and shape mismatches are dropped,
    the rest reported."""
    heads = heads if heads is not None else classifier_names(model)
    own = model.state_dict()
    keep: dict[str, torch.Tensor] = {}
    dropped: list[str] = []
    for key, tensor in state_dict.items():
        if _under(key, heads):
            dropped.append(key)
        elif key in own and tuple(own[key].shape) != tuple(tensor.shape):
            dropped.append(f"{key} {tuple(tensor.shape)}≠{tuple(own[key].shape)}")
        else:
            keep[key] = tensor
    result = model.load_state_dict(keep, strict=False)
    missing = [k for k in result.missing_keys if not _under(k, heads)]
    report = WeightsReport(
        loaded=len(keep) - len(result.unexpected_keys),
        missing_keys=missing,
        unexpected_keys=list(result.unexpected_keys),
        dropped_keys=dropped,
    )
    backbone = [k for k in own if not _under(k, heads)]
    if backbone and report.loaded < MIN_LOADED_FRACTION * len(backbone):
        raise CheckpointError(
            f"{source} does not fit architecture '{_architecture(model)}': "
            f"only {report.loaded} of its {len(backbone)} backbone tensors matched "
            f"(e.g. missing {', '.join(missing[:3]) or '-'}; unexpected {', '.join(report.unexpected_keys[:3]) or '-'})"
        )
    return report


def _architecture(model: nn.Module) -> str:
    cfg = getattr(model, "pretrained_cfg", None) or {}
    return str(cfg.get("architecture") or type(model).__name__)


def build_model(
    architecture: str, num_classes: int, weights: Path | None, source: str
) -> tuple[nn.Module, WeightsReport]:
    """The architecture with base weights from `weights` (a local file downloaded from `source`)."""
    model = create_model(architecture, num_classes)
    if weights is None:
        return model, WeightsReport()
    return model, load_base_weights(model, read_state_dict(weights, source), source)


def data_config(model: nn.Module, image_size: int | None) -> dict[str, Any]:
    """timm's preprocessing for the model (input size, mean/std, interpolation, crop), JSON-ready."""
    import timm.data

    cfg = dict(timm.data.resolve_model_data_config(model))
    if image_size:
        cfg["input_size"] = (3, image_size, image_size)
    return {k: list(v) if isinstance(v, tuple) else v for k, v in cfg.items()}


# -- what trains ------------------------------------------------------------------------------------


@dataclass
class TrainablePlan:
    """The outcome of a strategy: which parameters train, grouped by stage for their learning rates."""

    strategy: str
    head: list[str]
    backbone: list[str]
    stages_trained: int
    stages_total: int
    frozen_modules: list[nn.Module] = field(repr=False)
    # The backbone parameters that train, by stage, input side first (`param_groups` slows the lower ones).
    backbone_stages: list[list[str]] = field(default_factory=list)

    @property
    def trainable(self) -> list[str]:
        return self.head + self.backbone


def stages(model: nn.Module) -> list[list[str]]:
    """Parameter names grouped into stages, input side first (stem, stages…); the head group last.

    timm models describe their stages with group_matcher(coarse=True) for layer-wise learning rates;
    models without it fall back to their top-level children.
    """
    from timm.models import group_parameters

    groups: list[list[str]]
    try:
        grouped = group_parameters(model, model.group_matcher(coarse=True))  # type: ignore[operator]
        groups = [list(names) for _, names in sorted(grouped.items())]
    except (AttributeError, NotImplementedError, TypeError):
        groups = []
        for child_name, child in model.named_children():
            names = [f"{child_name}.{n}" for n, _ in child.named_parameters()]
            if names:
                groups.append(names)
    return [g for g in groups if g]


def apply_strategy(model: nn.Module, strategy: str, trainable_layers: int | None = None) -> TrainablePlan:
    """Freeze what the strategy keeps fixed; returns which parameters train."""
    heads = classifier_names(model)
    names = [n for n, _ in model.named_parameters()]
    head = [n for n in names if _under(n, heads)]
    groups = stages(model)
    # The group that holds the classifier may hold its neighbours too (conv_head, head.norm): in timm's
    # grouping they belong with the head, so they train whenever anything beyond the classifier does.
    head_group = next((g for g in groups if set(g) & set(head)), [])
    backbone_stages = [[n for n in g if n not in head] for g in groups if g is not head_group]
    backbone_stages = [g for g in backbone_stages if g]
    head_extras = [n for n in head_group if n not in head]

    trained = stages_to_train(model, strategy, trainable_layers, len(backbone_stages))
    chosen: list[list[str]] = []
    if strategy == "full":
        grouped = {n for g in backbone_stages for n in g} | set(head_extras)
        # Anything timm's grouping left out trains with the top stage.
        rest = [n for n in names if n not in grouped and n not in head]
        chosen = [*backbone_stages, head_extras + rest]
    elif strategy == "partial":
        chosen = [*backbone_stages[len(backbone_stages) - trained :], head_extras]
    return train_only(model, strategy, head, [g for g in chosen if g], trained, len(backbone_stages))


def stages_to_train(model: nn.Module, strategy: str, trainable_layers: int | None, total: int) -> int:
    """How many of the backbone's `total` stages, top first, the strategy trains (a partial strategy asking
    for more than there are trains them all, with a warning)."""
    if strategy == "head":
        return 0
    if strategy == "full":
        return total
    if strategy != "partial":
        raise ConfigError(f"model.strategy: unknown strategy '{strategy}'")
    wanted = trainable_layers or 1
    if wanted > total:
        log.warning(
            "model.trainableLayers is %d but %s has %d stages: training all of them",
            wanted,
            type(model).__name__,
            total,
        )
    return min(wanted, total)


def train_only(
    model: nn.Module, strategy: str, head: list[str], chosen: list[list[str]], trained: int, total: int
) -> TrainablePlan:
    """Freeze every parameter but the head's and those of the `chosen` backbone stages; the plan of it."""
    backbone = {n for g in chosen for n in g}
    trainable = set(head) | backbone
    for name, param in model.named_parameters():
        param.requires_grad_(name in trainable)
    return TrainablePlan(
        strategy=strategy,
        head=head,
        backbone=[n for n, _ in model.named_parameters() if n in backbone],
        stages_trained=trained,
        stages_total=total,
        frozen_modules=frozen_norm_modules(model),
        backbone_stages=chosen,
    )


def frozen_norm_modules(model: nn.Module) -> list[nn.Module]:
    """Modules with running statistics (BatchNorm…) inside frozen parts: they must stay in eval mode."""
    parents: dict[str, nn.Module] = dict(model.named_modules())
    frozen: list[nn.Module] = []
    for name, module in model.named_modules():
        if getattr(module, "running_mean", None) is None and getattr(module, "running_var", None) is None:
            continue
        own = list(module.parameters(recurse=False))
        if own:
            is_frozen = not any(p.requires_grad for p in own)
        else:
            parent = parents.get(name.rpartition(".")[0], model)
            around = list(parent.parameters())
            is_frozen = bool(around) and not any(p.requires_grad for p in around)
        if is_frozen:
            frozen.append(module)
    return frozen


def set_train_mode(model: nn.Module, plan: TrainablePlan) -> None:
    model.train()
    for module in plan.frozen_modules:
        module.eval()


def stage_scales(stages_trained: int, backbone_scale: float, layer_decay: float) -> list[float]:
    """Each trained backbone stage's learning rate as a fraction of the head's, input side first: the top
    stage at `backbone_scale`, each one below it `layer_decay` times the one above."""
    return [backbone_scale * layer_decay ** (stages_trained - 1 - i) for i in range(stages_trained)]


def param_groups(
    model: nn.Module,
    plan: TrainablePlan,
    lr: float,
    weight_decay: float,
    backbone_scale: float = 1.0,
    layer_decay: float = 1.0,
) -> list[dict[str, Any]]:
    """Optimizer groups: the head at `lr`, each trained backbone stage at its `stage_scales` share of it,
    each with and without weight decay.

    Biases and normalisation weights (1-D tensors) get no weight decay, as in timm's recipes.
    """
    params = dict(model.named_parameters())
    scales = stage_scales(len(plan.backbone_stages), backbone_scale, layer_decay)
    parts = [("head", plan.head, lr)] + [
        (f"backbone-{i}", names, lr * scale)
        for i, (names, scale) in enumerate(zip(plan.backbone_stages, scales, strict=True))
    ]
    groups: list[dict[str, Any]] = []
    for part, names, part_lr in parts:
        decay = [params[n] for n in names if params[n].ndim > 1]
        no_decay = [params[n] for n in names if params[n].ndim <= 1]
        if decay:
            groups.append({"name": part, "params": decay, "lr": part_lr, "weight_decay": weight_decay})
        if no_decay:
            groups.append({"name": f"{part}-no-decay", "params": no_decay, "lr": part_lr, "weight_decay": 0.0})
    return groups
