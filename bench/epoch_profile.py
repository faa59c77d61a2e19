"""Where one trainer epoch's time goes on CPU (issue #22, item 5): `python -m bench.epoch_profile`.

Not a `make bench` row (it has no baseline): the findings quote it. One epoch over the trainer's own data
path and step, in this process: JPEGs in moto S3, listed and cached as a worker does (`data.build_index`,
`data.prepare_images`), read through `data.datasets` (the default `light` augmentation) and the trainer's
CPU loader settings, stepped by `steps.Stepper.train_step` on the model as `loop.train_loop` sets it up
(`bench/gpu.py`'s `kubetune_step`). The epoch is timed in two parts, waiting for the next batch (decode
and augmentation, on the training thread: the trainer runs no loader processes on CPU) and the step, and
profiled with torch.profiler (`--table`: the operators by their own CPU time). Ray is left out: the
trainer overhead benchmark shows it adds nothing measurable to an epoch.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import os
import sys
import tempfile
import time
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import boto3_client, moto_server, s3_environment
from bench.input_pipeline import BUCKET, PREFIX, VAL_PREFIX, data_cfg, loader_for, make_dataset
from bench.input_pipeline import Config as ImagesConfig


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench.epoch_profile", description=__doc__.split("\n")[0])
    parser.add_argument("--image-size", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--per-class", type=int, default=64, help="training images per class (4 classes)")
    parser.add_argument("--epochs", type=int, default=3, help="epochs timed (after one warm-up)")
    parser.add_argument("--augment", default="light")
    parser.add_argument("--table", type=int, default=15, help="rows of torch.profiler's table of the last epoch")
    parser.add_argument(
        "--adamw",
        choices=("trainer", "torch-default"),
        default="trainer",
        help="the trainer's AdamW (fused on CPU), or torch's default one, as the trainer had it before",
    )
    return parser.parse_args(argv)


def dataset(args: argparse.Namespace, workdir: Path, endpoint: str) -> Any:
    """The training images as a worker reads them: listed, cached on the node, with the trainer's transforms."""
    from bench.common import REGION
    from kubetune_trainer.config import DataSpec
    from kubetune_trainer.data import build_index, datasets, prepare_images
    from kubetune_trainer.storage import S3Store

    client = boto3_client(endpoint)
    client.create_bucket(Bucket=BUCKET)
    make_dataset(ImagesConfig(classes=4, per_class=args.per_class), workdir / "local", client)
    spec = DataSpec.model_validate(
        {
            "train": f"s3://{BUCKET}/{PREFIX}/",
            "validation": f"s3://{BUCKET}/{VAL_PREFIX}/",
            "imageSize": args.image_size,
            "augment": args.augment,
        }
    )
    store = S3Store(endpoint, REGION)
    folder, _corrupt = prepare_images(store, build_index(store, spec, None, seed=42), root=workdir / "cache")
    return datasets(folder, build_index(store, spec, None, seed=42), data_cfg(args.image_size), args.augment)[0]


@dataclasses.dataclass
class Epoch:
    load_s: float = 0.0  # waiting for the next batch
    step_s: float = 0.0  # forward, loss, backward, optimizer
    images: int = 0
    cpu_s: float = 0.0  # this process's CPU time over the epoch (all threads): steadier than wall time under load

    def summary(self) -> dict[str, float]:
        total = self.load_s + self.step_s
        return {
            "images_per_s": round(self.images / total, 1),
            "load_share": round(self.load_s / total, 3),
            "load_ms_per_image": round(1000 * self.load_s / self.images, 2),
            "step_ms_per_image": round(1000 * self.step_s / self.images, 2),
            "cpu_ms_per_image": round(1000 * self.cpu_s / self.images, 2),
        }


def epoch(loader: Any, step: Any) -> Epoch:
    out = Epoch()
    batches = iter(loader)
    cpu = time.process_time()
    while True:
        started = time.perf_counter()
        batch = next(batches, None)
        loaded = time.perf_counter()
        if batch is None:
            out.cpu_s = time.process_time() - cpu
            return out
        step(*batch)
        out.load_s += loaded - started
        out.step_s += time.perf_counter() - loaded
        out.images += batch[0].shape[0]


def main(argv: Sequence[str] | None = None) -> int:
    import torch
    from torch.profiler import ProfilerActivity, profile

    from bench.gpu import kubetune_stepper

    args = parse_args(argv)
    torch.set_num_threads(os.cpu_count() or 1)
    with tempfile.TemporaryDirectory() as tmp, s3_environment(Path(tmp) / "node"), moto_server() as endpoint:
        loader = loader_for(dataset(args, Path(tmp), endpoint), args.batch)
        model_args = argparse.Namespace(model="resnet18", classes=4, precision="fp32")
        stepper = kubetune_stepper(model_args, torch.device("cpu"))
        if args.adamw == "torch-default":  # the same groups and rate; the scheduler's factor is a constant 1
            kept = [{k: v for k, v in group.items() if k != "fused"} for group in stepper.optimizer.param_groups]
            stepper.optimizer = torch.optim.AdamW(kept)
        epoch(loader, stepper.train_step)  # warm-up
        results = [epoch(loader, stepper.train_step).summary() for _ in range(args.epochs - 1)]
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            last = epoch(loader, stepper.train_step)
        results.append(last.summary())
    print(json.dumps({"adamw": args.adamw, "epochs": results, "threads": torch.get_num_threads()}, indent=1))
    print(prof.key_averages().table(sort_by="self_cpu_time_total", row_limit=args.table))
    return 0


if __name__ == "__main__":
    sys.exit(main())
