"""The learning-rate range test: where it puts the rate, that it leaves the model as it found it, and
the warm-up and settings that go with it."""

from __future__ import annotations

import io
import math
from collections.abc import Iterator
from typing import Any

import pytest
import torch
from PIL import Image

from kubetune_trainer.config import TrainerConfig, TrainingSpec
from kubetune_trainer.data import DatasetIndex
from kubetune_trainer.lr_range import (
    END_LR,
    START_LR,
    TRUSTED_PASSES,
    RangeTest,
    find_learning_rate,
    plot_range_test,
    run_range_test,
    smooth,
    sweep_factor,
)
from kubetune_trainer.model import apply_strategy, create_model
from kubetune_trainer.optim import effective_training, warmup_steps
from kubetune_trainer.progress_model import TrainingSettings
from kubetune_trainer.reporting import settings_line
from kubetune_trainer.tasks import ClassificationTask


def u_curve(rate: float, bottom: float = 3e-3) -> float:
    """A loss that falls as the rate grows to `bottom`, then climbs steeply."""
    distance = math.log10(rate / bottom)
    return 1.0 + (0.2 * distance**2 if distance < 0 else 2.0 * distance**2)


def test_the_sweep_goes_from_start_to_end_exponentially() -> None:
    factor = sweep_factor(61)
    assert factor(0) == pytest.approx(START_LR)
    assert factor(60) == pytest.approx(END_LR)
    assert factor(30) == pytest.approx(math.sqrt(START_LR * END_LR))


def test_smoothing_is_centred_so_the_minimum_does_not_move() -> None:
    losses = [abs(i - 40) / 40 for i in range(100)]
    curve = smooth(losses)
    assert min(range(100), key=curve.__getitem__) == 40


def test_the_chosen_rate_is_the_bottom_of_a_noisy_curve() -> None:
    generator = torch.Generator().manual_seed(0)
    factor = sweep_factor(100)
    steps = iter(range(100))

    def step(_inputs: Any, _targets: Any) -> torch.Tensor:
        rate = factor(next(steps))
        return torch.tensor(u_curve(rate) + 0.05 * float(torch.randn((), generator=generator)))

    test = run_range_test(step, iter([(None, None)] * 100), steps=100)
    assert 1.5e-3 <= test.chosen <= 6e-3
    # The loss climbed past DIVERGENCE times its lowest: the sweep stopped well before END_LR.
    assert test.stopped_early and test.learning_rates[-1] < 1e-1


def u_sweep(steps_per_epoch: int | None) -> RangeTest:
    """The u-curve's sweep (bottom at 3e-3) on a training set of `steps_per_epoch` batches."""
    factor = sweep_factor(100)
    steps = iter(range(100))
    return run_range_test(
        lambda *_: torch.tensor(u_curve(factor(next(steps)))),
        iter([(None, None)] * 100),
        steps=100,
        steps_per_epoch=steps_per_epoch,
    )


def test_on_a_dataset_of_many_batches_the_chosen_rate_is_the_bottom_of_the_curve() -> None:
    # From 12 batches an epoch (192 images at batch 16, the benchmark's detection task) up.
    for steps_per_epoch in (None, 12, 22, 1000):
        test = u_sweep(steps_per_epoch)
        assert test.chosen == test.bottom and 1.5e-3 <= test.bottom <= 4e-3
        assert test.passes is None or test.passes <= TRUSTED_PASSES


def test_on_a_few_dozen_images_the_rate_is_scaled_down_by_the_passes_over_them() -> None:
    # 50 images at batch 16: 3 batches an epoch, so the bottom comes after ~19 passes over the same images,
    # where the loss says how fast they are memorised: the rate is scaled down by the passes beyond trusted.
    test, larger = u_sweep(3), u_sweep(22)
    assert test.bottom == larger.bottom and test.passes == pytest.approx((test.bottom_step + 1) / 3)
    assert test.passes > 3 * TRUSTED_PASSES
    assert test.chosen == pytest.approx(test.bottom * TRUSTED_PASSES / test.passes)
    assert test.chosen < test.bottom / 3
    wire = test.wire()
    assert (wire["chosen"], wire["bottom"], wire["passes"]) == (test.chosen, test.bottom, round(test.passes, 2))
    # The same curve and data size give the same rate (a run's workers and a resumed run agree).
    assert u_sweep(3).chosen == test.chosen


def test_a_non_finite_loss_ends_the_sweep() -> None:
    losses = iter([1.0] * 30 + [math.nan] + [0.1] * 69)
    test = run_range_test(lambda *_: torch.tensor(next(losses)), iter([(None, None)] * 100), steps=100)
    assert len(test.losses) == 30 and test.stopped_early


def test_the_picture_is_a_png_with_the_curve() -> None:
    test = RangeTest([sweep_factor(50)(i) for i in range(50)], [u_curve(sweep_factor(50)(i)) for i in range(50)])
    for drawn in (test, u_sweep(3)):  # the second with the curve's bottom marked beside the scaled rate
        picture = Image.open(io.BytesIO(plot_range_test(drawn, "job: learning-rate range test")))
        assert picture.format == "PNG" and picture.size[0] >= 800


class _Images(torch.utils.data.Dataset[tuple[torch.Tensor, int]]):
    def __init__(self) -> None:
        generator = torch.Generator().manual_seed(0)
        self.x = torch.randn(64, 3, 32, 32, generator=generator)
        self.y = torch.randint(0, 4, (64,), generator=generator)

    def __len__(self) -> int:
        return 64

    def __getitem__(self, i: int) -> tuple[torch.Tensor, int]:
        return self.x[i] + self.y[i], int(self.y[i])


def batches() -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
    while True:
        yield from torch.utils.data.DataLoader(_Images(), batch_size=16, shuffle=True)


def config() -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "jobName": "lr",
            "runName": "lr",
            "model": {"architecture": "test_resnet", "checkpoint": "s3://models/base.safetensors"},
            "data": {"train": "s3://data/train/", "imageSize": 32},
            "training": {"epochs": 2, "batchSize": 16, "precision": "fp32"},
            "output": {"path": "s3://out/lr/"},
        }
    )


def test_the_test_leaves_the_model_as_it_found_it() -> None:
    torch.manual_seed(0)
    model = create_model("test_resnet", 4)
    plan = apply_strategy(model, "full")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    task = ClassificationTask(config(), DatasetIndex("data", ["a", "b", "c", "d"], [], []))
    test = find_learning_rate(task, config(), model, plan, batches(), torch.device("cpu"), 4, steps=40)
    assert len(test.losses) >= 20 and START_LR <= test.chosen <= END_LR
    after = model.state_dict()
    assert all(torch.equal(before[k], after[k]) for k in before), "weights or BatchNorm statistics changed"
    assert all(p.grad is None for p in model.parameters())


def test_on_64_images_the_run_is_told_a_rate_scaled_for_their_few_batches() -> None:
    """The whole test on a tiny problem (64 images, batch 16: 4 batches an epoch, 100 steps): the bottom
    comes after well over TRUSTED_PASSES passes, and the rate chosen is scaled down into a sane band."""
    torch.manual_seed(0)
    model = create_model("test_resnet", 4)
    task = ClassificationTask(config(), DatasetIndex("data", ["a", "b", "c", "d"], [], []))
    plan = apply_strategy(model, "full")
    test = find_learning_rate(task, config(), model, plan, batches(), torch.device("cpu"), 4)
    assert test.passes is not None and test.passes > 2 * TRUSTED_PASSES
    assert test.chosen == pytest.approx(test.bottom * TRUSTED_PASSES / test.passes)
    assert 5e-4 <= test.chosen <= 1e-2


def test_warm_up_is_the_first_fifth_unless_set() -> None:
    assert warmup_steps(TrainingSpec(epochs=5), steps_per_epoch=20) == 20
    assert warmup_steps(TrainingSpec(epochs=1), steps_per_epoch=9) == 2
    assert warmup_steps(TrainingSpec(epochs=5, warmupEpochs=2), steps_per_epoch=20) == 40
    assert warmup_steps(TrainingSpec(epochs=5, warmupEpochs=0), steps_per_epoch=20) == 0


def test_the_effective_settings_name_every_rate_and_where_it_came_from() -> None:
    model = create_model("test_resnet", 4)
    plan = apply_strategy(model, "partial", 2)
    training = TrainingSpec(epochs=5, layerDecay=0.5)
    augment = {"policy": "light", "description": "light: shifts up to 4 px at 32 px"}
    effective = effective_training(training, plan, (0.004, 1.0), 10, augment, {"chosen": 0.004, "steps": 100})
    assert effective["learningRateSource"] == "rangeTest"
    assert effective["backboneLearningRates"] == pytest.approx([0.002, 0.004])
    assert (effective["warmupSteps"], effective["totalSteps"]) == (10, 50)
    settings = TrainingSettings.from_effective(effective)
    assert settings is not None
    assert settings_line(settings) == (
        "learning rate 0.004 (range test), backbone 0.002-0.004, 10 warm-up steps; "
        "augment light: shifts up to 4 px at 32 px"
    )
