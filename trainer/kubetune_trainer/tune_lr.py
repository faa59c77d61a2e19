"""`kubetune tune-lr FILE --local`: the learning-rate range test of a job, alone, on this machine.

The same test a run does when `training.learningRate` is left out (`lr_range.find_learning_rate` on the
job's model, data, strategy, optimizer and parameter groups), without Ray and without training: the
driver's checks and node preparation (`run.check_inputs`, `run.prepare`), then one process, one
worker's batch, on CUDA when there is one. It prints the rate it chose and writes the curve as a PNG.
"""

from __future__ import annotations

import math
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.local import guarded, setup_logging, with_endpoint
from kubetune_trainer.lr_range import TRUSTED_PASSES, RangeTest, cycle, find_learning_rate, plot_range_test
from kubetune_trainer.reporting import format_duration


def on_device(batches: Iterator[tuple[Any, Any]], device: Any) -> Iterator[tuple[Any, Any]]:
    """Batches with their tensors on `device` (Ray's data loader does this for the workers)."""
    import torch

    for inputs, targets in batches:
        yield (
            inputs.to(device) if isinstance(inputs, torch.Tensor) else inputs,
            targets.to(device) if isinstance(targets, torch.Tensor) else targets,
        )


def range_test_here(config: TrainerConfig, steps: int) -> RangeTest:
    """Check the inputs, fill this node's cache and run the range test in this process."""
    import torch
    from torch.utils.data import DataLoader, RandomSampler

    from kubetune_trainer.cache import cached_object
    from kubetune_trainer.data import prepare_images
    from kubetune_trainer.run import check_inputs, prepare, store_for
    from kubetune_trainer.storage import S3Uri

    store = store_for(config)
    prepared = prepare(config, check_inputs(config, store), here=True)
    task = prepared.task
    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    torch.manual_seed(config.training.seed)
    weights = cached_object(store, S3Uri.parse(config.model.checkpoint), prepared.weights)
    model, _, trainable = task.build_model(weights, device)
    model.to(device)
    folder, _ = prepare_images(store, task.images)
    train_set, _ = task.datasets(folder, prepared.data_config)
    batch = config.training.batch_size
    loader = DataLoader(
        train_set,
        batch_size=batch,
        sampler=RandomSampler(train_set, generator=torch.Generator().manual_seed(config.training.seed)),
        collate_fn=task.collate,
        drop_last=len(train_set) > batch,  # as the workers: no last batch of one image for BatchNorm
    )
    batches = on_device(cycle(loader), device)
    return find_learning_rate(task, config, model, trainable, batches, device, len(loader), steps=steps)


def tune_lr_local(config: TrainerConfig, *, s3_endpoint: str | None, steps: int, picture: Path) -> int:
    """Run the range test for `config`, write its curve to `picture`; the exit code for the CLI."""
    setup_logging()
    config = with_endpoint(config, s3_endpoint)
    started = time.monotonic()

    def run() -> int:
        test = range_test_here(config, steps)
        picture.write_bytes(plot_range_test(test, f"{config.job_name}: learning-rate range test"))
        lowest = min(test.smoothed)
        print(
            f"kubetune: {len(test.losses)} steps from {test.learning_rates[0]:.0e} to {test.learning_rates[-1]:.2g}"
            f"{' (stopped: the loss diverged)' if test.stopped_early else ''} in "
            f"{format_duration(time.monotonic() - started)}; lowest smoothed loss {lowest:.4g}{_scaled(test)}"
        )
        print(f"kubetune: learning rate {test.chosen:.2g} (training.learningRate: {_yaml_number(test.chosen)})")
        print(f"kubetune: curve in {picture}")
        print("kubetune: a job without training.learningRate runs this test itself before training")
        return 0

    return guarded(run)


def _scaled(test: RangeTest) -> str:
    """Why the rate is below the curve's bottom, if it is (a small dataset: `lr_range`)."""
    if test.chosen == test.bottom:
        return ""
    return (
        f" at {test.bottom:.2g}, after {test.passes or 0:.0f} passes over the training data"
        f" (more than {TRUSTED_PASSES:g}: a small dataset, so the rate is scaled down)"
    )


def _yaml_number(value: float) -> str:
    """`4.3e-3` as a YAML 1.1 float (with a dot, so that every YAML reader takes it as a number)."""
    exponent = math.floor(math.log10(value))
    return f"{value / 10**exponent:.1f}e{exponent}"
