"""The learning-rate range test (L. Smith, "Cyclical Learning Rates for Training Neural Networks", 2017).

Train for a few steps on the job's own data while the learning rate grows exponentially from START_LR
to END_LR, and record the loss at each step. The loss falls faster as the rate grows, then stops
falling and climbs once the rate is too high; the rate at the bottom of the (smoothed) curve is the
highest rate that still makes progress. That rate becomes the peak of the run's schedule, reached
after the warm-up and decayed by the cosine: measured on the fine-tuning quality benchmark, it lands
within the best of a grid of fixed rates on every task (bench/results.md, docs/trainer.md), where the
usual "a tenth of it" falls short on short runs.

On a small dataset the test's 100 steps go over the same images many times (50 images at batch 16:
33 times), and the curve then says how fast the model memorises those images rather than how fast it
learns the task: the loss keeps falling almost up to the rate where it diverges, and a run at that rate
generalises poorly (the benchmark's few-shot task; bench/results.md, docs/trainer.md). So when the
bottom of the curve came after more than TRUSTED_PASSES passes over the training data, the chosen rate
is the bottom's divided by passes / TRUSTED_PASSES: the bottom itself on the benchmark's other tasks
(192 to 1,200 images, whose bottoms come after 1.7 to 5.6 passes), about a quarter of it on 50 images
at batch 16 (bottoms after 23 to 26 passes). A pure function of the curve and the data's size, so every
worker, and every run with the same seed, chooses the same rate.

The smoothing is a centred mean over ±SMOOTHING of the steps: an exponential average (the usual
choice) lags behind the rate and moves the minimum to higher rates. The test stops early once the
smoothed loss exceeds DIVERGENCE times its minimum, or a loss is not finite. The weights, the optimizer
and the normalisation statistics are put back as they were before the run proper starts.
"""

from __future__ import annotations

import copy
import io
import math
from collections.abc import Callable, Iterable, Iterator
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    import torch
    from torch import nn

    from kubetune_trainer.config import TrainerConfig
    from kubetune_trainer.model import TrainablePlan
    from kubetune_trainer.tasks.base import Task

START_LR = 1e-6
END_LR = 1.0
STEPS = 100
DIVERGENCE = 4.0
SMOOTHING = 0.05
# Fewer steps than this leave too few points between START_LR and END_LR to find a minimum.
MIN_STEPS = 20
# Passes over the training data up to the curve's bottom beyond which the rate is scaled down (the
# module's docstring): above the 1.7-5.6 of the benchmark's tasks of 192 to 1,200 images.
TRUSTED_PASSES = 6.0


def sweep_factor(steps: int) -> Callable[[int], float]:
    """The learning rate at each step of the sweep (a LambdaLR factor over a base rate of 1)."""

    def factor(step: int) -> float:
        return float(START_LR * (END_LR / START_LR) ** (min(step, steps - 1) / max(1, steps - 1)))

    return factor


def smooth(losses: list[float]) -> list[float]:
    """Centred mean over ±SMOOTHING of the points (at least ±1): no lag behind the rate."""
    half = max(1, round(len(losses) * SMOOTHING))
    out = []
    for i in range(len(losses)):
        window = losses[max(0, i - half) : i + half + 1]
        out.append(sum(window) / len(window))
    return out


@dataclass
class RangeTest:
    """The sweep's rates and losses, and the rate it chose."""

    learning_rates: list[float] = field(default_factory=list)
    losses: list[float] = field(default_factory=list)
    stopped_early: bool = False
    # Batches in one pass over the training data (all workers together); None: not known, never scaled.
    steps_per_epoch: int | None = None

    @property
    def smoothed(self) -> list[float]:
        return smooth(self.losses)

    @property
    def bottom_step(self) -> int:
        """The step at the bottom of the smoothed loss curve."""
        if not self.losses:
            raise ValueError("the range test recorded no steps")
        curve = self.smoothed
        return min(range(len(curve)), key=curve.__getitem__)

    @property
    def bottom(self) -> float:
        """The rate at the bottom of the smoothed loss curve."""
        return self.learning_rates[self.bottom_step]

    @property
    def passes(self) -> float | None:
        """Passes over the training data up to the bottom of the curve (None: the data's size is not known)."""
        if not self.steps_per_epoch:
            return None
        return (self.bottom_step + 1) / self.steps_per_epoch

    @property
    def chosen(self) -> float:
        """The bottom's rate, divided by the passes beyond TRUSTED_PASSES it took (small data)."""
        passes = self.passes
        return self.bottom / max(1.0, (passes or 0.0) / TRUSTED_PASSES)

    def wire(self) -> dict[str, Any]:
        passes = self.passes
        return {
            "chosen": self.chosen,
            "bottom": self.bottom,
            "steps": len(self.losses),
            "from": START_LR,
            "to": self.learning_rates[-1] if self.learning_rates else START_LR,
            "stoppedEarly": self.stopped_early,
        } | ({"passes": round(passes, 2)} if passes is not None else {})


def run_range_test(
    train_step: Callable[[Any, Any], Any],
    batches: Iterator[tuple[Any, Any]],
    steps: int = STEPS,
    mean_across_workers: Callable[[float], float] = lambda loss: loss,
    steps_per_epoch: int | None = None,
) -> RangeTest:
    """Run `train_step` (whose schedule follows `sweep_factor(steps)`) on `steps` batches; the loss of
    each step, averaged over the workers so that every worker records and chooses the same.
    `steps_per_epoch`: batches in one pass over the training data, for the small-data scaling."""
    factor = sweep_factor(steps)
    test = RangeTest(steps_per_epoch=steps_per_epoch)
    lowest = math.inf
    for step in range(steps):
        inputs, targets = next(batches)
        loss = mean_across_workers(float(train_step(inputs, targets)))
        if not math.isfinite(loss):
            test.stopped_early = True
            break
        test.learning_rates.append(factor(step))
        test.losses.append(loss)
        recent = smooth(test.losses[-3:])[-1]
        lowest = min(lowest, recent)
        if step >= MIN_STEPS // 2 and recent > DIVERGENCE * lowest:
            test.stopped_early = True
            break
    return test


def cycle(loader: Iterable[Any], set_epoch: Callable[[int], None] = lambda epoch: None) -> Iterator[Any]:
    """The loader's batches, epoch after epoch, for as long as the sweep needs them."""
    epoch = 0
    while True:
        set_epoch(epoch)
        yield from loader
        epoch += 1


def find_learning_rate(
    task: Task,
    config: TrainerConfig,
    model: nn.Module,
    trainable: TrainablePlan,
    batches: Iterator[tuple[Any, Any]],
    device: torch.device,
    steps_per_epoch: int,
    mean_across_workers: Callable[[float], float] = lambda loss: loss,
    steps: int = STEPS,
) -> RangeTest:
    """The range test on `model` with the run's own optimizer, parameter groups (their ratios to the
    head's rate), precision and training step, on `batches` of a training set of `steps_per_epoch`
    batches; the model is as it was afterwards (weights and buffers)."""
    import torch

    from kubetune_trainer.checkpoint import unwrap
    from kubetune_trainer.model import param_groups, set_train_mode
    from kubetune_trainer.optim import make_optimizer, make_schedule
    from kubetune_trainer.steps import autocast_for

    training = config.training
    saved = copy.deepcopy(model.state_dict())
    groups = param_groups(
        unwrap(model),
        trainable,
        1.0,
        training.weight_decay,
        training.backbone_scale(config.task),
        training.layer_decay,
    )
    optimizer = make_optimizer(groups, training)
    schedule = make_schedule(optimizer, training, 1, factor=sweep_factor(steps))
    scaler = torch.amp.GradScaler("cuda", enabled=device.type == "cuda" and training.precision == "fp16")
    stepper = task.stepper(model, optimizer, schedule, scaler, autocast_for(device, training.precision), device)
    set_train_mode(model, trainable)
    try:
        return run_range_test(stepper.train_step, batches, steps, mean_across_workers, steps_per_epoch)
    finally:
        model.load_state_dict(saved)
        optimizer.zero_grad(set_to_none=True)


def plot_range_test(test: RangeTest, title: str) -> bytes:
    """PNG: the loss against the learning rate (log scale), smoothed, with the chosen rate marked."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    figure, axes = plt.subplots(figsize=(8, 4.5), dpi=110)
    axes.plot(test.learning_rates, test.losses, color="#bbbbbb", linewidth=1, label="loss per step")
    axes.plot(test.learning_rates, test.smoothed, color="#1f77b4", linewidth=2, label="smoothed")
    if test.chosen != test.bottom:
        label = f"bottom: {test.bottom:.2g} ({test.passes or 0:.0f} passes over the data)"
        axes.axvline(test.bottom, color="#999999", linestyle=":", label=label)
    axes.axvline(test.chosen, color="#d62728", linestyle="--", label=f"chosen: {test.chosen:.2g}")
    axes.set_xscale("log")
    axes.set_xlabel("learning rate (peak of the schedule)")
    axes.set_ylabel("training loss")
    axes.set_title(title)
    axes.legend(loc="upper left")
    top = max(test.smoothed[: max(1, len(test.smoothed) // 2)] or [1.0])
    axes.set_ylim(bottom=0, top=top * 1.6)
    figure.tight_layout()
    buffer = io.BytesIO()
    figure.savefig(buffer, format="png")
    plt.close(figure)
    return buffer.getvalue()
