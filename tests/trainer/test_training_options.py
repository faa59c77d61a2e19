"""The training options (`training.*`, `kubetune_trainer.options`): each one's effect, its refusal where it
does not apply, and that a checkpoint taken with all of them on resumes exactly."""

from __future__ import annotations

import contextlib
import math
import random
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image
from pydantic import ValidationError
from torch import nn

from kubetune_trainer.augment import augment_plan, build_transforms
from kubetune_trainer.checkpoint import EMA_FILE, exported_file, restore_checkpoint, write_checkpoint
from kubetune_trainer.config import TrainerConfig, TrainingSpec
from kubetune_trainer.loaders import SeededSamples
from kubetune_trainer.options import (
    batch_mixer,
    classification_loss,
    grouped,
    optimizer_steps,
    stopped_early,
    weight_average,
)
from kubetune_trainer.steps import Stepper

CLASSES = 4
CFG = {"input_size": [3, 32, 32], "mean": [0.5] * 3, "std": [0.5] * 3, "interpolation": "bilinear", "crop_pct": 1.0}


def tiny_net(seed: int = 0) -> nn.Module:
    """A convolutional classifier without BatchNorm (whose batch statistics depend on the batch split)."""
    torch.manual_seed(seed)
    return nn.Sequential(
        nn.Conv2d(3, 6, 3), nn.ReLU(), nn.AdaptiveAvgPool2d(2), nn.Flatten(), nn.Dropout(0.2), nn.Linear(24, CLASSES)
    )


def stepper(model: nn.Module, training: TrainingSpec, lr: float = 0.01) -> Stepper:
    """The classification step as the loop builds it (`ClassificationTask.stepper`), on the CPU."""
    optimizer = torch.optim.AdamW(model.parameters(), lr=lr)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    return Stepper(
        model,
        optimizer,
        scheduler,
        torch.amp.GradScaler("cuda", enabled=False),
        contextlib.nullcontext,
        channels_last=False,
        clip_norm=training.gradient_clip_norm,
        loss=classification_loss(training),
        mix=batch_mixer(training, CLASSES),
    )


def data(n: int, seed: int = 1) -> tuple[torch.Tensor, torch.Tensor]:
    generator = torch.Generator().manual_seed(seed)
    return torch.randn(n, 3, 16, 16, generator=generator), torch.randint(0, CLASSES, (n,), generator=generator)


def eval_mode(model: nn.Module) -> nn.Module:
    return model.eval()  # no dropout: the comparisons below are of the gradients' arithmetic alone


# -- accumulateSteps ---------------------------------------------------------------------------------------


def test_accumulating_4_batches_of_8_steps_like_one_batch_of_32() -> None:
    images, labels = data(32)
    accumulated, whole, small = (eval_mode(tiny_net()) for _ in range(3))
    four, one, eight = (stepper(m, TrainingSpec()) for m in (accumulated, whole, small))
    for _ in range(3):
        batches = [(images[i : i + 8], labels[i : i + 8]) for i in range(0, 32, 8)]
        loss_four = four.train_steps(batches)
        loss_one = one.train_step(images, labels)
        eight.train_step(images[:8], labels[:8])
        assert float(loss_four) == pytest.approx(float(loss_one), rel=1e-5)
    for (name, got), want, other in zip(
        accumulated.named_parameters(), whole.parameters(), small.parameters(), strict=True
    ):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6, msg=name)
        assert not torch.allclose(got, other, atol=1e-4), f"{name}: a batch of 8 alone should train differently"


def test_an_epoch_has_one_optimizer_step_per_group_of_batches() -> None:
    assert [len(group) for group in grouped(range(10), 4)] == [4, 4, 2]
    assert optimizer_steps(10, 4) == 3 and optimizer_steps(8, 4) == 2 and optimizer_steps(10, 1) == 10
    assert list(grouped(range(3), 1)) == [[0], [1], [2]]


# -- gradientClipNorm --------------------------------------------------------------------------------------


def total_grad_norm(model: nn.Module) -> float:
    return float(torch.linalg.vector_norm(torch.stack([p.grad.norm() for p in model.parameters()])))


def test_gradient_clipping_bounds_the_gradient_norm_of_each_step() -> None:
    images, labels = data(16)
    clipped, free = eval_mode(tiny_net()), eval_mode(tiny_net())
    stepper(clipped, TrainingSpec(gradient_clip_norm=0.01)).train_step(images, labels)
    stepper(free, TrainingSpec()).train_step(images, labels)
    # The gradients stay on the parameters until the next step: the clipped ones are what AdamW stepped on.
    assert total_grad_norm(clipped) == pytest.approx(0.01, rel=1e-4)
    assert total_grad_norm(free) > 0.05


# -- labelSmoothing ----------------------------------------------------------------------------------------


def test_label_smoothing_is_timms_loss_and_keeps_confident_predictions_from_zero_loss() -> None:
    from timm.loss import LabelSmoothingCrossEntropy

    loss = classification_loss(TrainingSpec(label_smoothing=0.1))
    assert isinstance(loss, LabelSmoothingCrossEntropy)
    logits, labels = torch.tensor([[20.0, 0.0, 0.0, 0.0]]), torch.tensor([0])
    assert float(nn.functional.cross_entropy(logits, labels)) < 1e-6
    assert float(loss(logits, labels)) > 1.0  # 0.1 of the target spread over classes the logits rule out
    torch.testing.assert_close(loss(logits, labels), nn.functional.cross_entropy(logits, labels, label_smoothing=0.1))
    assert classification_loss(TrainingSpec()) is nn.functional.cross_entropy


# -- mixupAlpha, cutmixAlpha -------------------------------------------------------------------------------


def test_mixup_mixes_image_pairs_and_their_labels_with_timms_mixup() -> None:
    from timm.data import Mixup
    from timm.loss import SoftTargetCrossEntropy

    training = TrainingSpec(batch_size=8, mixup_alpha=0.4)
    mixer = batch_mixer(training, CLASSES)
    assert isinstance(mixer, Mixup) and isinstance(classification_loss(training), SoftTargetCrossEntropy)
    images, _ = data(8)
    labels = torch.tensor([0, 1, 2, 3, 0, 1, 2, 3])
    np.random.seed(3)
    mixed, targets = mixer(images.clone(), labels)
    # Image 0 is mixed with image 7 (the batch reversed) and its target with image 7's label, by one weight.
    lam = float(targets[0, 0])
    assert 0.0 < lam < 1.0 and float(targets[0, 3]) == pytest.approx(1 - lam)
    torch.testing.assert_close(mixed[0], lam * images[0] + (1 - lam) * images[7], rtol=1e-5, atol=1e-5)
    smoothed = batch_mixer(TrainingSpec(batch_size=8, mixup_alpha=0.4, label_smoothing=0.1), CLASSES)
    assert smoothed is not None and float(smoothed(images.clone(), labels)[1].min()) > 0  # smoothing rides along
    assert batch_mixer(TrainingSpec(), CLASSES) is None


def test_cutmix_pastes_a_patch_of_the_paired_image() -> None:
    mixer = batch_mixer(TrainingSpec(batch_size=4, cutmix_alpha=1.0), CLASSES)
    assert mixer is not None
    images = torch.stack([torch.full((3, 16, 16), float(i)) for i in range(4)])
    np.random.seed(0)
    mixed, _ = mixer(images.clone(), torch.arange(4))
    values = set(mixed[0].unique().tolist())
    assert values == {0.0, 3.0}, "image 0 keeps its pixels outside the box and takes image 3's inside"


def test_the_step_trains_on_mixed_batches() -> None:
    images, labels = data(8)
    mixed_model, plain_model = eval_mode(tiny_net()), eval_mode(tiny_net())
    np.random.seed(0)
    stepper(mixed_model, TrainingSpec(batch_size=8, mixup_alpha=1.0, cutmix_alpha=1.0)).train_step(images, labels)
    stepper(plain_model, TrainingSpec()).train_step(images, labels)
    assert any(not torch.equal(a, b) for a, b in zip(mixed_model.parameters(), plain_model.parameters(), strict=True))


# -- randAugment -------------------------------------------------------------------------------------------


def striped_image() -> Image.Image:
    pixels = np.zeros((32, 32, 3), dtype=np.uint8)
    pixels[:, ::4] = (250, 120, 30)
    return Image.fromarray(pixels)


class Augmented:
    """A dataset of one image, transformed by `transform` each time it is read."""

    def __init__(self, transform: Any) -> None:
        self.transform = transform

    def __len__(self) -> int:
        return 6

    def __getitem__(self, index: int) -> torch.Tensor:
        return self.transform(striped_image())  # type: ignore[no-any-return]


def test_rand_augment_is_timms_and_each_image_gets_its_seeded_ops() -> None:
    train, evaluation = build_transforms(CFG, "none", "rand-m9-n2-mstd0.5")
    assert any(type(step).__name__ == "RandAugment" for step in train.transforms)
    samples = SeededSamples(Augmented(train), seed=7)
    first = [samples[(0, index)] for index in range(6)]
    assert all(torch.equal(a, b) for a, b in zip(first, [samples[(0, index)] for index in range(6)], strict=True))
    assert any(not torch.equal(t, evaluation(striped_image())) for t in first)
    plan = augment_plan("light", 32, "rand-m9-n2-mstd0.5")
    assert "RandAugment rand-m9-n2-mstd0.5" in plan.describe() and plan.wire()["randAugment"] == "rand-m9-n2-mstd0.5"


def test_a_rand_augment_string_timm_would_not_read_is_refused_naming_the_field() -> None:
    with pytest.raises(ValidationError, match=r"randAugment|rand_augment"):
        TrainingSpec.model_validate({"randAugment": "rand-m9;rm -rf"})
    TrainingSpec.model_validate({"randAugment": "rand-m7-n3-p0.5-mstd0.5-mmax10-inc1"})


# -- classification only; cross-field rules ---------------------------------------------------------------

DETECTION = {
    "jobName": "d",
    "runName": "d.d.0",
    "task": "detection",
    "model": {"architecture": "ssdlite320_mobilenet_v3_large", "checkpoint": "s3://bkt/ssd.safetensors"},
    "data": {
        "train": "s3://bkt/images/",
        "annotations": {"train": "s3://bkt/a/train.json", "validation": "s3://bkt/a/val.json"},
    },
    "output": {"path": "s3://bkt/out/"},
}


@pytest.mark.parametrize(
    ("option", "field"),
    [
        ({"labelSmoothing": 0.1}, "labelSmoothing"),
        ({"mixupAlpha": 0.2}, "mixupAlpha"),
        ({"cutmixAlpha": 1.0}, "cutmixAlpha"),
        ({"randAugment": "rand-m9"}, "randAugment"),
    ],
)
def test_classification_only_options_are_refused_for_detection(option: dict[str, Any], field: str) -> None:
    with pytest.raises(ValidationError, match=f"training.{field}: only with task 'classification'"):
        TrainerConfig.model_validate({**DETECTION, "training": option})


def test_detection_takes_the_options_that_apply_to_it() -> None:
    options = {"accumulateSteps": 2, "gradientClipNorm": 10.0, "emaDecay": 0.99, "earlyStopping": {"metric": "valMap"}}
    TrainerConfig.model_validate({**DETECTION, "training": options})


@pytest.mark.parametrize(
    ("training", "message"),
    [
        ({"batchSize": 7, "mixupAlpha": 0.2}, "batchSize: must be even with mixupAlpha or cutmixAlpha"),
        ({"epochs": 3, "earlyStopping": {"patience": 3}}, "earlyStopping.patience: must be less than epochs"),
        ({"accumulateSteps": 0}, "greater than or equal to 1"),
        ({"emaDecay": 1.0}, "less than 1"),
        ({"labelSmoothing": 0.6}, "less than or equal to 0.5"),
    ],
)
def test_bad_option_values_are_refused_saying_what_is_allowed(training: dict[str, Any], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TrainingSpec.model_validate(training)


# -- emaDecay ----------------------------------------------------------------------------------------------


def test_ema_follows_the_weights_behind_them_with_timms_warm_up() -> None:
    from timm.utils import ModelEmaV3

    assert weight_average(tiny_net(), TrainingSpec()) is None
    model = eval_mode(tiny_net())
    ema = weight_average(model, TrainingSpec(ema_decay=0.9))
    assert isinstance(ema, ModelEmaV3)
    start = [p.detach().clone() for p in model.parameters()]
    step = stepper(model, TrainingSpec(), lr=0.05)
    images, labels = data(8)
    for n in range(1, 6):
        step.train_step(images, labels)
        ema.update(model, step=n)
    for before, now, average in zip(start, model.parameters(), ema.module.parameters(), strict=True):
        assert not torch.equal(average, now) and not torch.equal(average, before)
    # The warm-up's first step copies the weights: decay 0 at step 1.
    assert ema.get_decay(1) == 0.0 and 0.0 < ema.get_decay(5) <= 0.9
    assert exported_file(True) == EMA_FILE and exported_file(False) == "model.safetensors"


# -- every option on: a checkpoint resumes exactly ----------------------------------------------------------

ALL_ON = TrainingSpec(
    batch_size=8,
    accumulate_steps=2,
    gradient_clip_norm=0.5,
    label_smoothing=0.1,
    mixup_alpha=0.4,
    cutmix_alpha=1.0,
    ema_decay=0.95,
)


def run_steps(step: Stepper, ema: Any, first: int, count: int) -> None:
    for n in range(first, first + count):
        images, labels = data(16, seed=n)
        (batches,) = grouped(zip(images.split(8), labels.split(8), strict=True), ALL_ON.accumulate_steps)
        step.train_steps(batches)
        ema.update(step.model, step=n + 1)


def fresh(seed: int) -> tuple[Stepper, Any]:
    model = tiny_net(seed)
    model.train()  # dropout on: its randomness must resume too
    return stepper(model, ALL_ON), weight_average(model, ALL_ON)


def test_with_every_option_on_a_checkpoint_resumes_exactly(tmp_path: Path) -> None:
    random.seed(1)
    np.random.seed(1)
    torch.manual_seed(1)
    step, ema = fresh(0)
    run_steps(step, ema, 0, 3)
    state = {"model": step.model, "optimizer": step.optimizer, "scheduler": step.scheduler, "scaler": None}
    write_checkpoint(tmp_path, rank=0, progress={"step": 3}, ema=ema.module, **state)
    assert (tmp_path / EMA_FILE).is_file()
    run_steps(step, ema, 3, 3)  # the uninterrupted run

    resumed, resumed_ema = fresh(99)  # other weights and generators, until the checkpoint is restored
    np.random.seed(99)
    restore_checkpoint(
        tmp_path,
        rank=0,
        model=resumed.model,
        optimizer=resumed.optimizer,
        scheduler=resumed.scheduler,
        scaler=None,
        ema=resumed_ema.module,
    )
    run_steps(resumed, resumed_ema, 3, 3)
    for got, want in zip(resumed.model.state_dict().values(), step.model.state_dict().values(), strict=True):
        assert torch.equal(got, want)
    for got, want in zip(resumed_ema.module.state_dict().values(), ema.module.state_dict().values(), strict=True):
        assert torch.equal(got, want)


# -- earlyStopping -----------------------------------------------------------------------------------------


def history(values: list[float], key: str = "valAccuracy") -> list[dict[str, Any]]:
    return [{"epoch": i + 1, key: v} for i, v in enumerate(values)]


def stopping(epochs: int = 10, **rule: Any) -> TrainingSpec:
    return TrainingSpec.model_validate({"epochs": epochs, "earlyStopping": rule})


def test_early_stopping_waits_patience_epochs_without_an_improvement_of_min_delta() -> None:
    rule = stopping(patience=2, minDelta=0.01)
    assert not stopped_early(history([0.5, 0.6, 0.605]), rule, "valAccuracy")  # one epoch without enough gain
    assert stopped_early(history([0.5, 0.6, 0.605, 0.6]), rule, "valAccuracy")
    assert not stopped_early(history([0.5, 0.6, 0.605, 0.62]), rule, "valAccuracy")
    assert stopped_early(history([0.5, math.nan, math.nan]), rule, "valAccuracy")
    assert not stopped_early(history([0.5, 0.4, 0.3]), TrainingSpec(epochs=10), "valAccuracy")  # not asked for


def test_early_stopping_watches_its_metric_in_its_direction_and_never_on_the_last_epoch() -> None:
    losses = history([1.0, 0.8, 0.9, 0.85], key="valLoss")
    assert stopped_early(losses, stopping(patience=2, metric="valLoss"), "valAccuracy")
    assert stopped_early(losses, stopping(patience=2), "valLoss")  # selectBy's metric when it names none
    assert not stopped_early(losses, stopping(patience=3, metric="valLoss"), "valAccuracy")
    assert not stopped_early(losses, stopping(epochs=4, patience=2, metric="valLoss"), "valAccuracy")


def test_early_stopping_refuses_another_tasks_metric() -> None:
    with pytest.raises(ValidationError, match=r"training\.earlyStopping\.metric: with task 'detection' one of valMap"):
        TrainerConfig.model_validate({**DETECTION, "training": {"earlyStopping": {"metric": "valLoss"}}})
