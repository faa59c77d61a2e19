"""GPU training-step throughput: the trainer's step against a plain PyTorch loop, on one GPU.

    python bench/gpu.py                                   # ResNet-50, bf16 autocast, channels_last, batch 256
    python bench/gpu.py --batch-size 128 --steps 30       # smaller
    python bench/gpu.py --model test_resnet --device cpu --steps 2   # a check of this script without a GPU
    python bench/gpu.py --task detection                  # Faster R-CNN ResNet-50 FPN v2, batch 16 at 640 px
    python bench/gpu.py --input jpeg                      # the step fed from JPEG files vs the synthetic batch
    python bench/gpu.py --input jpeg --device cpu --steps 2 --model test_resnet   # its check without a GPU
    python bench/gpu.py --task detection --input jpeg     # the detector fed from JPEG files, the same way

Needs only this repository, torch and timm (`pip install timm`): it imports the trainer's torch-only
modules (`kubetune_trainer.steps`, `kubetune_trainer.model`) from `trainer/`, not the package's other
dependencies. Both sides train the same timm architecture from random initialisation on the same
synthetic batch, already on the GPU (so no input pipeline is timed), converted to channels_last inside
each step as a batch from a loader would be:

- kubetune: the model set up as `loop.train_loop` sets it up on CUDA (`model.create_model`, strategy
  `full`, channels_last, AdamW over `model.param_groups` as `optim.make_optimizer` builds it) and
  stepped by `steps.Stepper.train_step` under `steps.autocast_for(device, "bf16")`;
- plain: `timm.create_model`, AdamW over all parameters, autocast(bf16), forward, loss, backward, step.

With `--task detection` both sides train a torchvision detector (default `fasterrcnn_resnet50_fpn_v2`)
from random initialisation on the same synthetic images with three boxes each, resized by the model's
own transform to `--image-size`: kubetune's side is `detection_model.create_detector` with strategy
`full` and `steps.DetectionStepper.train_step` (what `tasks.DetectionTask` gives the loop), the plain
side the torchvision builder, autocast, the sum of the model's losses, backward and AdamW. (Needs
pydantic too: `detection_model` reads the architecture list from the trainer's config module.)

cuDNN autotuning is on for both (`steps.configure_backends`, as the trainer sets it on CUDA; a tuned
plain loop sets the same flag). Each side runs `--repeats` times, alternating, each time `--warmup`
untimed steps and then `--steps` timed ones between two CUDA synchronisations. It prints images/s per
run, the medians, the ratio kubetune/plain and the card's name, and with `--json FILE` writes them.

With `--input jpeg` it times the trainer's step fed from JPEG files instead, decoded on the GPU
(`device_decode`, `detection_decode`) and with PIL in the loader processes, at several loader worker
counts, against the same step on a batch in memory (`bench/gpu_input.py`; needs the trainer's
dependencies).
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "trainer"))
sys.path.insert(0, str(Path(__file__).resolve().parent.parent))  # bench.gpu_input

import torch

LR, WEIGHT_DECAY = 1e-3, 0.05


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description="The trainer's training step vs a plain PyTorch loop on one GPU.")
    parser.add_argument("--task", choices=("classification", "detection"), default="classification")
    parser.add_argument(
        "--model", help="timm architecture (default resnet50), or torchvision detector (fasterrcnn_resnet50_fpn_v2)"
    )
    parser.add_argument(
        "--batch-size", type=int, help="images per step (default 256 on CUDA, 8 on CPU; detection 16, 2)"
    )
    parser.add_argument(
        "--image-size", type=int, help="input size (default 224 on CUDA, 64 on CPU; detection 640, 128)"
    )
    parser.add_argument("--classes", type=int, help="classes (default 1000; detection 20)")
    parser.add_argument("--steps", type=int, default=50, help="timed steps per run (default 50)")
    parser.add_argument("--warmup", type=int, help="untimed steps before each run (default 15 on CUDA, 1 on CPU)")
    parser.add_argument("--repeats", type=int, default=3, help="runs of each side, alternating (default 3)")
    parser.add_argument("--precision", choices=("bf16", "fp16", "fp32"), default="bf16")
    parser.add_argument("--device", choices=("auto", "cuda", "cpu"), default="auto")
    parser.add_argument("--json", type=Path, help="also write the results to this file")
    jpeg = parser.add_argument_group("--input jpeg: the step fed from JPEG files")
    jpeg.add_argument("--input", choices=("memory", "jpeg"), default="memory", help="where batches come from")
    jpeg.add_argument("--images", type=int, help="JPEGs written (default 2048 on CUDA, 16 on CPU; detection 512, 8)")
    jpeg.add_argument(
        "--loader-workers",
        type=worker_counts,
        help="loader processes to try (default 2,4,8,16 on CUDA, 0,1 on CPU; detection 1,2,4 on CUDA)",
    )
    jpeg.add_argument("--augment", default="standard", help="data.augment policy (default standard)")
    jpeg.add_argument("--cache-dir", type=Path, help="where the JPEGs are written (default: the temp folder)")
    return parser.parse_args(argv)


def worker_counts(text: str) -> list[int]:
    counts = [int(part) for part in text.split(",") if part.strip()]
    if not counts or min(counts) < 0 or max(counts) > 256:
        raise argparse.ArgumentTypeError(f"comma-separated loader worker counts from 0 to 256, not {text!r}")
    return counts


def pick_device(wanted: str) -> torch.device:
    if wanted == "cpu":
        return torch.device("cpu")
    if torch.cuda.is_available():
        return torch.device("cuda")
    if wanted == "cuda":
        raise SystemExit("bench/gpu.py: no CUDA GPU is visible to torch (torch.cuda.is_available() is False)")
    print(
        "bench/gpu.py: no CUDA GPU here: running on the CPU in fp32, which says nothing about GPU speed "
        "(try --model test_resnet --steps 2 for a quick check)",
        file=sys.stderr,
    )
    return torch.device("cpu")


def kubetune_step(args: argparse.Namespace, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> Any:
    """The trainer's model set-up and `Stepper.train_step`, as `loop.train_loop` runs them."""
    stepper = kubetune_stepper(args, device)
    return lambda: stepper.train_step(x, y)


def kubetune_stepper(args: argparse.Namespace, device: torch.device) -> Any:
    """The trainer's model set-up and its `Stepper`, as `loop.train_loop` makes them."""
    from kubetune_trainer.config import TrainingSpec
    from kubetune_trainer.model import apply_strategy, create_model, param_groups, set_train_mode
    from kubetune_trainer.optim import make_optimizer
    from kubetune_trainer.steps import Stepper, autocast_for

    cuda = device.type == "cuda"
    torch.manual_seed(0)
    model = create_model(args.model, args.classes)
    plan = apply_strategy(model, "full")
    model = model.to(device).to(memory_format=torch.channels_last if cuda else torch.contiguous_format)
    optimizer = make_optimizer(param_groups(model, plan, LR, WEIGHT_DECAY), TrainingSpec())  # AdamW
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=cuda and args.precision == "fp16")
    stepper = Stepper(model, optimizer, scheduler, scaler, autocast_for(device, args.precision), channels_last=cuda)
    set_train_mode(model, plan)
    return stepper


def plain_step(args: argparse.Namespace, device: torch.device, x: torch.Tensor, y: torch.Tensor) -> Any:
    """A plain loop: what a PyTorch user writes for bf16 channels_last training."""
    import timm

    cuda = device.type == "cuda"
    layout = torch.channels_last if cuda else torch.contiguous_format
    torch.manual_seed(0)
    model = timm.create_model(args.model, pretrained=False, num_classes=args.classes)
    model = model.to(device).to(memory_format=layout).train()
    return plain_loop(
        args, device, model, lambda: torch.nn.functional.cross_entropy(model(x.contiguous(memory_format=layout)), y)
    )


def plain_loop(
    args: argparse.Namespace, device: torch.device, model: torch.nn.Module, forward: Callable[[], torch.Tensor]
) -> Callable[[], torch.Tensor]:
    """One plain AdamW step under autocast (bf16, or fp16 with a grad scaler) around `forward`'s loss."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=LR, weight_decay=WEIGHT_DECAY)
    dtype = torch.float16 if args.precision == "fp16" else torch.bfloat16
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and args.precision == "fp16")
    enabled = device.type == "cuda" and args.precision != "fp32"

    def step() -> torch.Tensor:
        with torch.autocast(device_type=device.type, dtype=dtype, enabled=enabled):
            loss = forward()
        optimizer.zero_grad(set_to_none=True)
        scaler.scale(loss).backward()
        scaler.step(optimizer)
        scaler.update()
        return loss.detach()

    return step


def detection_batch(
    args: argparse.Namespace, device: torch.device
) -> tuple[list[torch.Tensor], list[dict[str, torch.Tensor]]]:
    """Images in [0, 1] and three boxes each with labels 1..classes (0 is the background)."""
    generator = torch.Generator().manual_seed(0)
    size = args.image_size
    images, targets = [], []
    for _ in range(args.batch_size):
        images.append(torch.rand(3, size, size, generator=generator).to(device))
        xy = torch.rand(3, 2, generator=generator) * size * 0.6
        wh = torch.rand(3, 2, generator=generator) * size * 0.3 + size * 0.05
        boxes = torch.cat([xy, xy + wh], dim=1)
        labels = torch.randint(1, args.classes + 1, (3,), generator=generator)
        targets.append({"boxes": boxes.to(device), "labels": labels.to(device)})
    return images, targets


def kubetune_detection_step(args: argparse.Namespace, device: torch.device, x: Any, y: Any) -> Any:
    """The detector as `tasks.DetectionTask` builds it and `steps.DetectionStepper.train_step`."""
    stepper = kubetune_detection_stepper(args, device)
    return lambda: stepper.train_step(x, y)


def kubetune_detection_stepper(args: argparse.Namespace, device: torch.device) -> Any:
    """The detector as `tasks.DetectionTask` builds it, and its `steps.DetectionStepper`."""
    from kubetune_trainer.detection_model import apply_detection_strategy, create_detector
    from kubetune_trainer.model import param_groups, set_train_mode
    from kubetune_trainer.steps import DetectionStepper, autocast_for

    torch.manual_seed(0)
    model = create_detector(args.model, args.classes, args.image_size)
    plan = apply_detection_strategy(model, "full")
    model = model.to(device)
    optimizer = torch.optim.AdamW(param_groups(model, plan, LR, WEIGHT_DECAY), lr=LR)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda _: 1.0)
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and args.precision == "fp16")
    stepper = DetectionStepper(model, optimizer, scheduler, scaler, autocast_for(device, args.precision), device)
    set_train_mode(model, plan)
    return stepper


def plain_detection_step(args: argparse.Namespace, device: torch.device, x: Any, y: Any) -> Any:
    """A plain torchvision detection loop with autocast."""
    import torchvision.models.detection as zoo

    torch.manual_seed(0)
    size = args.image_size
    model = getattr(zoo, args.model)(weights=None, weights_backbone=None, num_classes=args.classes + 1)
    # The builders' own resize: shorter and longer side, or the fixed square input of SSD models.
    model.transform.min_size, model.transform.max_size = (size,), size
    if args.model.startswith("ssd"):
        model.transform.fixed_size = (size, size)
    model = model.to(device).train()

    def forward() -> torch.Tensor:
        losses = model(x, y)
        return torch.stack([value.float() for value in losses.values()]).sum()

    return plain_loop(args, device, model, forward)


def jpeg_workload(args: argparse.Namespace, device: torch.device) -> Callable[[list[Path]], Any]:
    """The trainer's step for `args.task`, and how the JPEGs written become what the paths read
    (`gpu_input.classification_workload`, `gpu_input.detection_workload`); the defaults of each."""
    from bench import gpu_input

    cuda = device.type == "cuda"
    if args.task == "detection":
        args.images = args.images or (512 if cuda else 8)
        args.loader_workers = args.loader_workers or ([1, 2, 4] if cuda else [0, 1])
        args.jpeg_sides = (480, 640) if cuda else (48, 96)
        stepper = kubetune_detection_stepper(args, device)
        return lambda paths: gpu_input.detection_workload(args, stepper, paths)
    from kubetune_trainer.model import data_config

    args.images = args.images or (2048 if cuda else 16)
    args.loader_workers = args.loader_workers or ([2, 4, 8, 16] if cuda else [0, 1])
    args.jpeg_sides = (224, 500) if cuda else (48, 96)
    stepper = kubetune_stepper(args, device)
    data_cfg = data_config(stepper.model, args.image_size)
    return lambda paths: gpu_input.classification_workload(args, stepper, data_cfg, paths)


def jpeg_input(args: argparse.Namespace, device: torch.device) -> int:
    """--input jpeg: the step fed from JPEG files against the step on a batch in memory (bench/gpu_input.py)."""
    from bench import gpu_input
    from kubetune_trainer.steps import configure_backends

    cuda = device.type == "cuda"
    args.torch_device = device
    configure_backends(device)
    workload = jpeg_workload(args, device)
    card = torch.cuda.get_device_name(device) if cuda else "CPU (no CUDA)"
    print(
        f"device: {card}; torch {torch.__version__}; {args.task} {args.model}, batch {args.batch_size} at {args.image_size}px, "
        f"{args.precision}; {args.images} JPEGs of {args.jpeg_sides[0]}-{args.jpeg_sides[1]} px, augment "
        f"{args.augment}; {args.warmup} warm-up + {args.steps} timed steps per figure",
        flush=True,
    )
    result = gpu_input.run(args, workload)
    result |= {"device": card, "torch": torch.__version__, "model": args.model, "batch_size": args.batch_size}
    result |= {"image_size": args.image_size, "precision": args.precision, "steps": args.steps, "warmup": args.warmup}
    if cuda:
        result["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 1024**3
    if args.json:
        args.json.write_text(json.dumps(result, indent=2))
    return 0


def images_per_second(step: Callable[[], Any], batch: int, warmup: int, steps: int, device: torch.device) -> float:
    def sync() -> None:
        if device.type == "cuda":
            torch.cuda.synchronize(device)

    for _ in range(warmup):
        step()
    sync()
    started = time.perf_counter()
    for _ in range(steps):
        step()
    sync()
    return batch * steps / (time.perf_counter() - started)


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    device = pick_device(args.device)
    cuda = device.type == "cuda"
    detection = args.task == "detection"
    args.model = args.model or ("fasterrcnn_resnet50_fpn_v2" if detection else "resnet50")
    args.classes = args.classes or (20 if detection else 1000)
    args.batch_size = args.batch_size or ((16 if cuda else 2) if detection else (256 if cuda else 8))
    args.image_size = args.image_size or ((640 if cuda else 128) if detection else (224 if cuda else 64))
    args.warmup = args.warmup if args.warmup is not None else (15 if cuda else 1)
    if not cuda:
        args.precision = "fp32"  # the trainer trains in fp32 on CPU whatever is asked
    if args.input == "jpeg":
        return jpeg_input(args, device)

    import timm

    from kubetune_trainer.steps import configure_backends

    configure_backends(device)
    card = torch.cuda.get_device_name(device) if cuda else "CPU (no CUDA)"
    print(
        f"device: {card}; torch {torch.__version__}, timm {timm.__version__}; {args.task} {args.model}, batch "
        f"{args.batch_size} at {args.image_size}px, {args.precision}, channels_last={cuda and not detection}; "
        f"{args.warmup} warm-up + {args.steps} timed steps, {args.repeats} runs per side",
        flush=True,
    )
    x: Any
    y: Any
    if detection:
        x, y = detection_batch(args, device)
    else:
        generator = torch.Generator().manual_seed(0)
        x = torch.randn(args.batch_size, 3, args.image_size, args.image_size, generator=generator).to(device)
        y = torch.randint(0, args.classes, (args.batch_size,), generator=generator).to(device)

    results: dict[str, list[float]] = {"kubetune": [], "plain": []}
    builders = (
        {"kubetune": kubetune_detection_step, "plain": plain_detection_step}
        if detection
        else {"kubetune": kubetune_step, "plain": plain_step}
    )
    for repeat in range(args.repeats):
        for side in ("kubetune", "plain") if repeat % 2 == 0 else ("plain", "kubetune"):
            step = builders[side](args, device, x, y)
            rate = images_per_second(step, args.batch_size, args.warmup, args.steps, device)
            results[side].append(rate)
            print(f"run {repeat + 1} {side:8s}: {rate:,.0f} img/s", flush=True)
            del step
            if cuda:
                torch.cuda.empty_cache()
    medians = {side: statistics.median(rates) for side, rates in results.items()}
    ratio = medians["kubetune"] / medians["plain"]
    summary = {
        "device": card,
        "torch": torch.__version__,
        "timm": timm.__version__,
        "task": args.task,
        "model": args.model,
        "batch_size": args.batch_size,
        "image_size": args.image_size,
        "precision": args.precision,
        "steps": args.steps,
        "warmup": args.warmup,
        "images_per_second": results,
        "median": medians,
        "ratio": ratio,
    }
    if cuda:
        summary["peak_memory_gib"] = torch.cuda.max_memory_allocated(device) / 1024**3
    print(
        f"{card}: kubetune {medians['kubetune']:,.0f} img/s "
        f"({min(results['kubetune']):,.0f}–{max(results['kubetune']):,.0f}), "  # noqa: RUF001
        f"plain {medians['plain']:,.0f} img/s ({min(results['plain']):,.0f}–{max(results['plain']):,.0f}), "  # noqa: RUF001
        f"ratio {ratio:.3f}",
        flush=True,
    )
    if args.json:
        args.json.write_text(json.dumps(summary, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
