"""Fine-tuning quality end to end, as a user runs it: a far-domain task with every default through
`kubetune run --local`, against a plain PyTorch loop with the same base weights, data, epochs and batch,
in the same test (bench/quality.py measures the same over more tasks and seeds).

The base model is pretrained on textures (gratings, checkers, dots, noise; `bench/worlds.py`, cached under
`.cache/kubetune-bench/`), the task is shapes (circle, square, triangle, plus) at 64 px. The job names
only the architecture, the base weights, the data, the image size and the budget: no learning rate (the
range test chooses it), the default augmentation, strategy, layer decay and warm-up. Budget (2 shared
cores): 400 training images, 4 epochs of 32.
"""

from __future__ import annotations

import io
import json
import subprocess
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from bench import plain_loop, worlds
from tests.support.digits_world import DATA_BUCKET, KUBETUNE, MODEL_BUCKET, DigitsWorld
from tests.support.pretraining import torch_threads

pytestmark = pytest.mark.slow

TRAIN = f"s3://{DATA_BUCKET}/shapes/train"
VALIDATION = f"s3://{DATA_BUCKET}/shapes/val"
BASE = f"s3://{MODEL_BUCKET}/textures/test_resnet.safetensors"
OUTPUT = "s3://results/quality/far"
EPOCHS, BATCH, SEED = 4, 32, 42


class FarDomain:
    """The shapes task in S3 and the textures base weights, locally and in S3."""

    def __init__(self, world: DigitsWorld) -> None:
        self.world = world
        # Two threads for the 64 px convolutions (tests/conftest.py leaves one): faster even beside some load.
        with torch_threads(2):
            self.weights = worlds.pretrained_classifier(worlds.TEXTURES_LIGHT_BASE)
        self.train = worlds.shapes(400, 1, min_size=0.4, max_size=0.7, rotation=25.0, noise=12.0)
        self.validation = worlds.shapes(200, 2, min_size=0.4, max_size=0.7, rotation=25.0, noise=12.0)
        world.put_many(self.train.pngs(TRAIN) | self.validation.pngs(VALIDATION))
        world.put(BASE, self.weights.read_bytes())

    def manifest(self, name: str) -> Path:
        """A job with every fine-tuning field at its default."""
        job: dict[str, Any] = {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name},
            "spec": {
                "model": {"architecture": "test_resnet", "checkpoint": BASE},
                "data": {"train": f"{TRAIN}/", "validation": f"{VALIDATION}/", "imageSize": 64},
                "training": {"epochs": EPOCHS, "batchSize": BATCH, "seed": SEED},
                "output": {"path": OUTPUT},
                "resources": {"workers": 1, "gpusPerWorker": 0, "cpusPerWorker": 2},
            },
        }
        path = self.world.workdir / f"{name}.yaml"
        path.write_text(yaml.safe_dump(job, sort_keys=False))
        return path


@pytest.fixture(scope="module")
def far(world: DigitsWorld) -> FarDomain:
    return FarDomain(world)


@pytest.fixture(scope="module")
def defaults_run(far: FarDomain) -> dict[str, Any]:
    done = far.world.kubetune_run(far.manifest("far-defaults"), timeout=400)
    assert done.returncode == 0, done.stdout + done.stderr
    return {"console": done.stdout + done.stderr, "card": json.loads(far.world.get(f"{OUTPUT}/model.json"))}


def test_defaults_beat_a_plain_loop_at_the_same_budget(far: FarDomain, defaults_run: dict[str, Any]) -> None:
    accuracy = defaults_run["card"]["metrics"]["valAccuracy"]
    budget = plain_loop.Budget(size=64, epochs=EPOCHS, batch=BATCH, lr=1e-3, seed=SEED)
    with torch_threads(2):  # the cores the job's worker gets (cpusPerWorker 2), as bench/quality.py gives it
        plain = plain_loop.classification("test_resnet", far.weights, far.train, far.validation, budget)
    print(f"far domain, {EPOCHS} epochs: kubetune defaults {accuracy:.3f}, plain loop at lr 1e-3 {plain:.3f}")
    assert accuracy >= plain + 0.03, f"kubetune {accuracy:.3f} vs plain loop {plain:.3f}"


def test_the_run_says_which_rates_and_augmentation_it_used(far: FarDomain, defaults_run: dict[str, Any]) -> None:
    effective = defaults_run["card"]["effectiveTraining"]
    assert effective["learningRateSource"] == "rangeTest"
    chosen = effective["learningRate"]
    assert effective["rangeTest"]["chosen"] == chosen and 1e-5 < chosen < 0.1
    # Layer-wise decay 0.8 over test_resnet's five stages, the top one at the head's rate.
    assert effective["backboneLearningRates"] == pytest.approx([chosen * 0.8**k for k in (4, 3, 2, 1, 0)])
    assert effective["warmupSteps"] == round(0.2 * effective["totalSteps"])
    assert effective["augment"]["policy"] == "light" and effective["augment"]["shiftPixels"] == 8
    assert defaults_run["card"]["files"]["rangeTest"] == "lr-range-test.png"
    curve = Image.open(io.BytesIO(far.world.get(f"{OUTPUT}/lr-range-test.png")))
    assert curve.format == "PNG"
    assert f"learning rate {chosen:.2g} (range test)" in defaults_run["console"]


def test_tune_lr_prints_a_rate_and_draws_the_curve(far: FarDomain, tmp_path: Path) -> None:
    """`kubetune tune-lr job.yaml --local --s3-endpoint URL` as documented, from the job's folder, on defaults."""
    (tmp_path / "job.yaml").write_text(far.manifest("far-tune").read_text())
    done = subprocess.run(
        [str(KUBETUNE), "tune-lr", "job.yaml", "--local", "--s3-endpoint", far.world.endpoint],
        cwd=tmp_path,
        env=far.world.env(),
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert done.returncode == 0, done.stdout + done.stderr
    lines = done.stdout.splitlines()
    assert lines[0].startswith("kubetune: ") and " steps from 1e-06 to " in lines[0], done.stdout
    chosen = float(lines[1].split("training.learningRate: ")[1].rstrip(")"))
    assert 1e-5 < chosen < 0.1 and lines[1].startswith("kubetune: learning rate ")
    # The curve, under the documented default name, in the folder it ran in.
    assert lines[2] == "kubetune: curve in far-tune-lr-range-test.png"
    assert Image.open(tmp_path / "far-tune-lr-range-test.png").format == "PNG"
