"""Scratch: candidate fine-tuning defaults measured on the quality worlds (Phase A research; not `make bench`).

    python -m bench.quality_research OUT.jsonl EXPERIMENT...   # appends one JSON line per run

Each run fine-tunes a base model on one task with one recipe and one seed and records the validation
accuracy. Recipes: `plain` (AdamW over every parameter at one LR, constant, no augmentation: the loop a
user writes) or `kt` (kubetune's loop as of main: param groups, cosine, timm transforms) with candidate
changes (augment policy, backbone LR scale, layer-wise decay, head-then-full).
"""

from __future__ import annotations

import json
import math
import sys
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field, replace
from functools import cache
from pathlib import Path
from typing import Any

import torch
from PIL import Image
from torch import nn
from torchvision import transforms

from bench import worlds
from bench.quality import Task

ARCH = "test_resnet"
TEXTURES = worlds.TEXTURES_LIGHT_BASE
DIGITS04 = worlds.DIGITS_0_4_BASE


TEXTURES2 = worlds.TEXTURES_BASE
PROBE: dict[str, Any] = {
    "far": {"min_size": 0.4, "max_size": 0.7, "rotation": 25.0, "noise": 12.0},
    "small": ((18, 26), 1200, 8.0),
    "small-few": ((18, 26), 300, 8.0),
    "far-few": {"min_size": 0.4, "max_size": 0.7, "rotation": 25.0, "noise": 12.0},
    "far-big2": {"min_size": 0.35, "max_size": 0.65},
    "far-e": {"min_size": 0.4, "max_size": 0.7, "rotation": 25.0, "noise": 12.0},
    "far-e2": {"min_size": 0.3, "max_size": 0.6, "rotation": 180.0, "noise": 8.0},
    "small-e": ((16, 24), 1200, 8.0),
    "small-e10": ((16, 24), 1200, 8.0),
    "small-f": ((18, 26), 1200, 8.0),
    "small-big2": ((14, 20), 1200, 15.0),
    "far-big": {"min_size": 0.35, "max_size": 0.65},
    "small-big": ((14, 20), 1200, 15.0),
    "small-big600": ((14, 20), 600, 15.0),
}
TASKS = {
    "far-few": Task("far-few", "far-few", 64, 20, 32, TEXTURES2),
    "small-few": Task("small-few", "small-few", 32, 15, 32, TEXTURES2),
    "small-e10": Task("small-e10", "small-e10", 32, 10, 32, TEXTURES2),
    "small-f": Task("small-f", "small-f", 32, 6, 32, TEXTURES2),
    "far-e": Task("far-e", "far-e", 64, 5, 32, TEXTURES2),
    "far-e2": Task("far-e2", "far-e2", 64, 5, 32, TEXTURES2),
    "small-e": Task("small-e", "small-e", 32, 6, 32, TEXTURES2),
    "far-big2": Task("far-big2", "far-big2", 64, 5, 32, TEXTURES2),
    "small-big2": Task("small-big2", "small-big2", 32, 8, 32, TEXTURES2),
    "far-big": Task("far-big", "far-big", 64, 5, 32, TEXTURES),
    "far-10": Task("far-10", "far-10", 64, 10, 32, TEXTURES),
    "small-big": Task("small-big", "small-big", 32, 8, 32, TEXTURES),
    "small-big600": Task("small-big600", "small-big600", 32, 8, 32, TEXTURES),
    "near": Task("near", "near", 32, 3, 32, DIGITS04),
    "far": Task("far", "far", 64, 5, 32, TEXTURES2),
    "small": Task("small", "small", 32, 6, 32, TEXTURES2),
}


@cache
def task_data(name: str) -> tuple[worlds.LabelledImages, worlds.LabelledImages]:
    if name == "near":
        return worlds.split(worlds.digits(range(5, 10)), 0.2, 7)
    if name.startswith("far"):
        kw = PROBE.get(name, {})
        n = 160 if name.endswith("-few") else 600
        return worlds.shapes(n, 1, **kw), worlds.shapes(300, 2, **kw)
    if name.startswith("small"):
        px, n, noise = PROBE.get(name, ((10, 16), 600, 15.0))
        train, val = worlds.split(worlds.small_digits(3, digit_px=px, noise=noise), 0.3, 7)
        return (
            worlds.LabelledImages(train.class_names, train.images[:n], train.labels[:n]),
            worlds.LabelledImages(val.class_names, val.images[:400], val.labels[:400]),
        )
    raise KeyError(name)


@dataclass(frozen=True)
class Recipe:
    kind: str = "kt"  # kt | plain
    lr: float = 1e-3
    strategy: str = "full"  # head | full | lpft
    backbone_scale: float = 0.1
    llrd: float = 1.0  # per-stage decay of the backbone LR, top stage at backbone_scale
    augment: str = "timm"  # timm | none | rrc:<min scale>[:flip][:cj] | shift:<frac>[:flip]
    head_epochs: float = 0.0  # lpft: share of epochs spent on the head only
    head_lr_mult: float = 1.0  # lpft: head-phase LR multiplier
    weight_decay: float = 0.05
    scheduler: str = "cosine"
    warmup: float = 0.0  # share of steps
    random_init: bool = False
    auto_div: float = 0.0  # > 0: lr from a range test: lag-free min / auto_div
    rt_steps: int = 100
    eval_crop: bool = True  # kt: timm's eval transform (center crop crop_pct); else plain resize
    extra: dict[str, Any] = field(default_factory=dict, hash=False)


class Images(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    def __init__(self, data: worlds.LabelledImages, transform: Callable[[Any], torch.Tensor]) -> None:
        self.pil = [Image.fromarray(p) for p in data.images]
        self.labels = data.labels
        self.transform = transform

    def __len__(self) -> int:
        return len(self.pil)

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.transform(self.pil[i]), self.labels[i]


def plain_transform(size: int, mean: Any, std: Any) -> Callable[[Any], torch.Tensor]:
    return transforms.Compose([transforms.Resize((size, size)), transforms.ToTensor(), transforms.Normalize(mean, std)])


def train_transform(policy: str, size: int, dc: dict[str, Any], eval_tf: Any) -> Any:
    import timm.data

    mean, std = dc["mean"], dc["std"]
    if policy == "timm":
        return timm.data.create_transform(
            input_size=(3, size, size), is_training=True, mean=mean, std=std, interpolation=dc["interpolation"]
        )
    if policy in ("none", "light", "standard", "strong"):
        from kubetune_trainer.augment import build_transforms as product_transforms

        return product_transforms(dc, policy)[0]
    if policy == "plain":
        return plain_transform(size, mean, std)
    parts = policy.split(":")
    ops: list[Any] = []
    if parts[0] in ("tshift", "tflip"):  # after the eval transform: same scale as evaluation
        ops = [eval_tf]
        if parts[0] == "tshift":
            ops.append(
                transforms.RandomCrop(size, padding=max(1, round(float(parts[1]) * size)), padding_mode="reflect")
            )
        if "flip" in parts:
            ops.append(transforms.RandomHorizontalFlip())
        return transforms.Compose(ops)
    if parts[0] == "rrc":
        ops.append(transforms.RandomResizedCrop(size, scale=(float(parts[1]), 1.0), ratio=(3 / 4, 4 / 3)))
    elif parts[0] == "shift":
        pad = max(1, round(float(parts[1]) * size))
        ops += [transforms.Resize((size, size)), transforms.RandomCrop(size, padding=pad, padding_mode="reflect")]
    elif parts[0] == "flip":
        ops.append(transforms.Resize((size, size)))
    if "flip" in parts:
        ops.append(transforms.RandomHorizontalFlip())
    if "cj" in parts:
        ops.append(transforms.ColorJitter(0.4, 0.4, 0.4))
    if "cj2" in parts:
        ops.append(transforms.ColorJitter(0.2, 0.2, 0.2))
    ops += [transforms.ToTensor(), transforms.Normalize(mean, std)]
    return transforms.Compose(ops)


def build(task: Task, recipe: Recipe, seed: int) -> tuple[nn.Module, Any]:
    from kubetune_trainer.model import create_model, load_base_weights, read_state_dict

    n = len(task_data(task.name)[0].class_names)
    torch.manual_seed(seed)
    model = create_model(ARCH, n)
    if not recipe.random_init and task.base is not None:
        path = worlds.pretrained_classifier(task.base)
        load_base_weights(model, read_state_dict(path, "base"), "base")
    return model, n


def lr_groups(model: nn.Module, recipe: Recipe, plan: Any) -> list[dict[str, Any]]:
    """Head at lr; backbone stages at lr * backbone_scale * llrd^(depth from top)."""
    from kubetune_trainer.model import stages

    params = dict(model.named_parameters())
    head = set(plan.head)
    groups: list[dict[str, Any]] = []

    def add(names: list[str], lr: float, label: str) -> None:
        decay = [params[n] for n in names if params[n].ndim > 1]
        nodecay = [params[n] for n in names if params[n].ndim <= 1]
        if decay:
            groups.append({"params": decay, "lr": lr, "weight_decay": recipe.weight_decay, "name": label})
        if nodecay:
            groups.append({"params": nodecay, "lr": lr, "weight_decay": 0.0, "name": label})

    add(sorted(head), recipe.lr, "head")
    backbone_stages = [[n for n in g if n not in head] for g in stages(model)]
    backbone_stages = [g for g in backbone_stages if g]
    depth = len(backbone_stages)
    for i, g in enumerate(backbone_stages):
        scale = recipe.backbone_scale * recipe.llrd ** (depth - 1 - i)
        add(g, recipe.lr * scale, f"stage{i}")
    return groups


def range_test(
    task_name: str, recipe: Recipe, seed: int, steps: int = 100, lo: float = 1e-6, hi: float = 1.0
) -> dict[str, Any]:
    """Smith's LR range test: the LR grows exponentially from lo to hi over `steps` steps (all groups
    keeping their ratios); returns the (lr, smoothed loss) curve until the loss diverges."""
    from kubetune_trainer.augment import build_transforms
    from kubetune_trainer.model import apply_strategy, data_config

    task = TASKS[task_name]
    train_data, _ = task_data(task_name)
    model, _ = build(task, recipe, seed)
    dc = data_config(model, task.size)
    _, eval_tf = build_transforms(dc, "none")
    eval_tf2 = eval_tf if recipe.eval_crop else plain_transform(task.size, dc["mean"], dc["std"])
    train_tf = train_transform(recipe.augment, task.size, dc, eval_tf2)
    plan = apply_strategy(model, "full")
    groups = lr_groups(model, recipe, plan)
    rel = [g["lr"] / recipe.lr for g in groups]
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr)
    train_set = Images(train_data, train_tf)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=task.batch,
        sampler=torch.utils.data.RandomSampler(train_set, generator=generator),
        drop_last=True,
    )
    model.train()
    lrs, losses, smooth = [], [], []
    avg, best = 0.0, math.inf
    step = 0
    while step < steps:
        for images, labels in loader:
            lr = lo * (hi / lo) ** (step / max(1, steps - 1))
            for g, r in zip(optimizer.param_groups, rel, strict=True):
                g["lr"] = lr * r
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            value = float(loss)
            avg = 0.9 * avg + 0.1 * value if step else value
            lrs.append(lr)
            losses.append(value)
            smooth.append(avg)
            best = min(best, avg)
            step += 1
            if step >= steps or (step > 10 and avg > 4 * best) or not math.isfinite(value):
                step = steps if (step > 10 and avg > 4 * best) or not math.isfinite(value) else step
                break
    return {"lrs": lrs, "losses": losses, "smooth": smooth}


def run(task_name: str, recipe: Recipe, seed: int) -> dict[str, Any]:
    from kubetune_trainer.augment import build_transforms
    from kubetune_trainer.model import apply_strategy, data_config

    task = TASKS[task_name]
    train_data, val_data = task_data(task_name)
    picked = None
    if recipe.auto_div > 0:
        curve = range_test(task_name, recipe, seed, steps=recipe.rt_steps)
        picked = pick(curve["lrs"], curve["losses"]) / recipe.auto_div
        recipe = replace(recipe, lr=picked)
    model, _ = build(task, recipe, seed)
    dc = data_config(model, task.size)
    _, eval_tf = build_transforms(dc, "none")
    if recipe.kind == "plain":
        tf = plain_transform(task.size, dc["mean"], dc["std"])
        train_tf = eval_tf2 = tf
        params = [{"params": list(model.parameters()), "lr": recipe.lr, "weight_decay": 0.01}]
        plan = None
    else:
        eval_tf2 = eval_tf if recipe.eval_crop else plain_transform(task.size, dc["mean"], dc["std"])
        train_tf = train_transform(recipe.augment, task.size, dc, eval_tf2)
        plan = apply_strategy(model, "full")
        params = lr_groups(model, recipe, plan)
    train_set, val_set = Images(train_data, train_tf), Images(val_data, eval_tf2)
    generator = torch.Generator().manual_seed(seed)
    loader = torch.utils.data.DataLoader(
        train_set,
        batch_size=task.batch,
        sampler=torch.utils.data.RandomSampler(train_set, generator=generator),
        drop_last=len(train_set) > task.batch,
    )
    val_loader = torch.utils.data.DataLoader(val_set, batch_size=128)
    steps_per_epoch = len(loader)
    total = task.epochs * steps_per_epoch
    optimizer = torch.optim.AdamW(params, lr=recipe.lr)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    is_head = [g.get("name") == "head" for g in optimizer.param_groups]
    head_steps = round(recipe.head_epochs * total) if recipe.strategy == "lpft" else 0
    if recipe.strategy == "head":
        head_steps = total

    def factor(step: int, phase_start: int, phase_len: int) -> float:
        s = step - phase_start
        warm = round(recipe.warmup * phase_len)
        if s < warm:
            return (s + 1) / warm
        if recipe.scheduler == "constant":
            return 1.0
        return 0.5 * (1 + math.cos(math.pi * min(1.0, (s - warm) / max(1, phase_len - warm))))

    step = 0
    torch.manual_seed(seed)
    accuracies: list[float] = []
    for _ in range(task.epochs):
        model.train()
        for images, labels in loader:
            in_head = step < head_steps
            for g, base, head in zip(optimizer.param_groups, base_lrs, is_head, strict=True):
                if recipe.kind == "plain":
                    g["lr"] = base if recipe.scheduler == "constant" else base * factor(step, 0, total)
                elif in_head:
                    g["lr"] = base * recipe.head_lr_mult * factor(step, 0, head_steps) if head else 0.0
                else:
                    g["lr"] = base * factor(step, head_steps, total - head_steps)
            if recipe.kind != "plain" and recipe.strategy in ("lpft", "head"):
                # frozen backbone: BN in eval mode during the head phase
                _bn_eval(model, in_head)
            loss = nn.functional.cross_entropy(model(images), labels)
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            step += 1
        accuracies.append(evaluate(model, val_loader))
    return {"accuracy": accuracies[-1], "curve": accuracies, "picked": picked}


def pick(lrs: list[float], losses: list[float]) -> float:
    """The LR at the minimum of the loss smoothed by a centred window (no lag)."""
    n = len(losses)
    k = max(1, n // 20)
    smooth = [sum(losses[max(0, i - k) : i + k + 1]) / len(losses[max(0, i - k) : i + k + 1]) for i in range(n)]
    return lrs[min(range(n), key=smooth.__getitem__)]


def _bn_eval(model: nn.Module, frozen: bool) -> None:
    from kubetune_trainer.model import classifier_names

    heads = classifier_names(model)
    for name, module in model.named_modules():
        if isinstance(module, nn.modules.batchnorm._BatchNorm) and not any(name.startswith(h) for h in heads):
            module.train(not frozen)


def evaluate(model: nn.Module, loader: Any) -> float:
    model.eval()
    correct = count = 0
    with torch.no_grad():
        for images, labels in loader:
            correct += int((model(images).argmax(1) == labels).sum())
            count += len(labels)
    return correct / count


def main(argv: list[str]) -> None:
    torch.set_num_threads(1)
    if argv[0] == "--range":
        out = Path(argv[1])
        for spec in argv[2:]:
            label, tasks, seeds, fields = parse(spec)
            steps = int(fields.pop("steps", 100)) if "steps" in fields else 100
            recipe = Recipe(**fields)
            for task in tasks:
                for seed in seeds:
                    started = time.monotonic()
                    result = range_test(task, recipe, seed, steps=steps)
                    row = {"task": task, "label": label, "seed": seed, **result, "seconds": time.monotonic() - started}
                    with out.open("a") as f:
                        f.write(json.dumps(row) + "\n")
                    print(task, label, seed, f"{row['seconds']:.0f}s", len(result["lrs"]), flush=True)
        return
    out = Path(argv[0])
    done = set()
    if out.is_file():
        for line in out.read_text().splitlines():
            r = json.loads(line)
            done.add((r["task"], r["label"], r["seed"]))
    for spec in argv[1:]:
        label, tasks, seeds, fields = parse(spec)
        recipe = Recipe(**fields)
        for task in tasks:
            for seed in seeds:
                if (task, label, seed) in done:
                    continue
                started = time.monotonic()
                result = run_detection(recipe, seed) if task == "det" else run(task, recipe, seed)
                row = {"task": task, "label": label, "seed": seed, **result, "seconds": time.monotonic() - started}
                row["recipe"] = {k: v for k, v in asdict(recipe).items() if k != "extra"}
                with out.open("a") as f:
                    f.write(json.dumps(row) + "\n")
                print(
                    f"{task:6s} {label:40s} seed {seed}: {result['accuracy']:.3f} lr {result.get('picked')} {[round(c, 3) for c in result['curve']]} ({row['seconds']:.0f}s)",
                    flush=True,
                )


def parse(spec: str) -> tuple[str, list[str], list[int], dict[str, Any]]:
    """label|tasks,comma|seeds,comma|key=value;key=value"""
    label, tasks, seeds, rest = spec.split("|")
    fields: dict[str, Any] = {}
    types = {f: type(v) for f, v in asdict(Recipe()).items()} | {"steps": int}
    for item in filter(None, rest.split(";")):
        key, value = item.split("=", 1)
        kind = types[key]
        fields[key] = (value == "1") if kind is bool else kind(value)
    return label, tasks.split(","), [int(s) for s in seeds.split(",")], fields


# -- detection ---------------------------------------------------------------------------------------


@cache
def det_data(n_train: int = 192, n_val: int = 64) -> tuple[Any, Any]:
    from tests.support.shapes_world import DETECTOR_SIZE, FINETUNE_CLASSES, as_tensors, make_shapes

    train = as_tensors(make_shapes(FINETUNE_CLASSES, n_train, seed=20, size=DETECTOR_SIZE))
    val = as_tensors(make_shapes(FINETUNE_CLASSES, n_val, seed=21, size=DETECTOR_SIZE))
    return train, val


def run_detection(recipe: Recipe, seed: int, epochs: int = 8, batch: int = 16) -> dict[str, Any]:
    picked = None
    if recipe.auto_div > 0:
        sweep = _run_detection(replace(recipe, auto_div=0.0, lr=1.0), seed, epochs, batch, sweep=recipe.rt_steps)
        picked = pick(sweep["lrs"], sweep["losses"]) / recipe.auto_div
        recipe = replace(recipe, lr=picked, auto_div=0.0)
    out = _run_detection(recipe, seed, epochs, batch)
    out["picked"] = picked
    if picked is not None:
        out["sweep"] = sweep
    return out


def _run_detection(recipe: Recipe, seed: int, epochs: int, batch: int, sweep: int = 0) -> dict[str, Any]:
    (train_x, train_y), (val_x, val_y) = det_data()
    from kubetune_trainer.detection_eval import mean_average_precision, predict
    from kubetune_trainer.detection_model import apply_detection_strategy, build_detector, create_detector
    from tests.support.shapes_world import DETECTOR, DETECTOR_SIZE, FINETUNE_CLASSES, pretrained_detector

    torch.manual_seed(seed)
    if recipe.random_init:
        model = create_detector(DETECTOR, len(FINETUNE_CLASSES), DETECTOR_SIZE)
    else:
        model, _ = build_detector(DETECTOR, len(FINETUNE_CLASSES), pretrained_detector(), "base", DETECTOR_SIZE)
    strategy = recipe.extra.get("strategy", "full") if recipe.kind != "plain" else "full"
    plan = apply_detection_strategy(model, "head" if recipe.strategy == "head" else "full")
    params = dict(model.named_parameters())
    if recipe.kind == "plain":
        groups = [{"params": list(model.parameters()), "lr": recipe.lr, "weight_decay": 0.01}]
    else:
        from kubetune_trainer.detection_model import detector_stages

        det_stages = [[n for n in g if n in set(plan.backbone)] for g in detector_stages(model)]
        det_stages = [g for g in det_stages if g]
        parts = [(plan.head, 1.0)] + [
            (g, recipe.backbone_scale * recipe.llrd ** (len(det_stages) - 1 - i)) for i, g in enumerate(det_stages)
        ]
        groups = []
        for names, scale in parts:
            for decay in (True, False):
                chosen = [params[n] for n in names if (params[n].ndim > 1) == decay]
                if chosen:
                    groups.append(
                        {
                            "params": chosen,
                            "lr": recipe.lr * scale,
                            "weight_decay": recipe.weight_decay if decay else 0.0,
                        }
                    )
    del strategy
    optimizer = torch.optim.AdamW(groups, lr=recipe.lr)
    base_lrs = [g["lr"] for g in optimizer.param_groups]
    steps_per_epoch = len(train_x) // batch
    total = epochs * steps_per_epoch
    warm = round(recipe.warmup * total)
    generator = torch.Generator().manual_seed(seed)
    flip = recipe.kind != "plain" and recipe.augment != "none"
    lrs: list[float] = []
    raw: list[float] = []
    if sweep:
        epochs = 10**6
    step = 0
    curve = []
    for _ in range(epochs):
        model.train()
        for module in plan.frozen_modules:
            module.eval()
        order = torch.randperm(len(train_x), generator=generator).tolist()
        for i in range(0, steps_per_epoch * batch, batch):
            images, targets = [], []
            for j in order[i : i + batch]:
                image, target = train_x[j], dict(train_y[j])
                if flip and torch.rand((), generator=generator) < 0.5:
                    width = image.shape[-1]
                    image = image.flip(-1)
                    b = target["boxes"]
                    target["boxes"] = torch.stack([width - b[:, 2], b[:, 1], width - b[:, 0], b[:, 3]], dim=1)
                images.append(image)
                targets.append(target)
            if sweep:
                f = 1e-6 * (1e6) ** (step / (sweep - 1))
            elif recipe.kind == "plain" and recipe.scheduler == "constant":
                f = 1.0
            elif step < warm:
                f = (step + 1) / warm
            else:
                f = 0.5 * (1 + math.cos(math.pi * min(1.0, (step - warm) / max(1, total - warm))))
            for g, base in zip(optimizer.param_groups, base_lrs, strict=True):
                g["lr"] = base * f
            losses = model(images, targets)
            loss = torch.stack(list(losses.values())).sum()
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            optimizer.step()
            if sweep:
                lrs.append(f)
                raw.append(float(loss.detach()))
                if step + 1 >= sweep or not math.isfinite(raw[-1]):
                    return {"lrs": lrs, "losses": raw}
            step += 1
        if sweep:
            continue
        predictions, truths = predict(model, [(val_x, val_y)], torch.device("cpu"))
        curve.append(mean_average_precision(predictions, truths)["valMap"])
    return {"accuracy": curve[-1], "curve": curve, "picked": None}


if __name__ == "__main__":
    main(sys.argv[1:])
