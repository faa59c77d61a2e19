"""What a user reads: the exported files (model.json, history.json, curves) and the progress line."""

from __future__ import annotations

import io
import json
from datetime import UTC, datetime

import pytest
from PIL import Image

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.data import DatasetIndex, Sample
from kubetune_trainer.errors import TrainerError
from kubetune_trainer.export import CLASSIFICATION_PANELS, Panel, classification_card, export_model, plot_curves
from kubetune_trainer.model import WeightsReport
from kubetune_trainer.progress_model import ProgressMetrics, ProgressUpdate
from kubetune_trainer.reporting import ConsoleReporter, FanOut, progress_line
from kubetune_trainer.storage import S3Store, S3Uri
from kubetune_trainer.worker_progress import percent_done
from tests.support.digits_world import REGION, DigitsWorld

HISTORY = [
    {"epoch": 1, "trainLoss": 1.2, "valLoss": 0.9, "valAccuracy": 0.71, "imagesPerSecond": 900.0, "learningRate": 0.01},
    {
        "epoch": 2,
        "trainLoss": 0.5,
        "valLoss": 0.4,
        "valAccuracy": 0.88,
        "imagesPerSecond": 950.0,
        "learningRate": 0.005,
    },
    {"epoch": 3, "trainLoss": 0.2, "valLoss": 0.3, "valAccuracy": 0.93, "imagesPerSecond": 940.0, "learningRate": 0.0},
]
DATA_CONFIG = {
    "input_size": [3, 32, 32],
    "interpolation": "bilinear",
    "mean": [0.5, 0.5, 0.5],
    "std": [0.5, 0.5, 0.5],
    "crop_pct": 0.95,
    "crop_mode": "center",
}


def config(output: str = "s3://results/card", epochs: int = 3) -> TrainerConfig:
    return TrainerConfig.model_validate(
        {
            "jobName": "cats",
            "namespace": "ml",
            "runName": "uid-1",
            "model": {"architecture": "test_resnet", "checkpoint": "s3://models/base.safetensors"},
            "data": {"train": "s3://datasets/pets"},
            "training": {"epochs": epochs},
            "output": {"path": output},
        }
    )


def index() -> DatasetIndex:
    train = [Sample(f"pets/{c}/{i}.png", n, 1, "e") for n, c in enumerate(["cat", "dog"]) for i in range(4)]
    return DatasetIndex("datasets", ["cat", "dog"], train[2:], train[:2], corrupt={"pets/cat/bad.png": "broken"})


def card() -> dict[str, object]:
    report = WeightsReport(loaded=90, dropped_keys=["fc.weight", "fc.bias"])
    return classification_card(
        config(), index(), DATA_CONFIG, report, HISTORY, datetime(2026, 5, 1, 12, tzinfo=UTC), best_epoch=2
    )


def test_model_card_says_how_to_use_the_model_and_where_it_came_from() -> None:
    got = card()
    assert got["architecture"] == "test_resnet" and got["numClasses"] == 2
    assert got["classNames"] == ["cat", "dog"]
    assert (got["imageSize"], got["mean"], got["std"]) == (32, [0.5] * 3, [0.5] * 3)
    assert got["dataConfig"] == DATA_CONFIG
    # The exported epoch's figures (the best, here the second), not the last epoch's.
    assert got["metrics"] == {"trainLoss": 0.5, "valLoss": 0.4, "valAccuracy": 0.88, "imagesPerSecond": 950.0}
    assert got["epoch"] == 2 and got["selectBy"] == "valAccuracy"
    assert got["epochs"] == 3 and got["finishedAt"] == "2026-05-01T12:00:00Z"
    assert got["baseCheckpoint"] == "s3://models/base.safetensors"
    assert got["weightLoading"] == {
        "loadedTensors": 90,
        "missingKeys": [],
        "unexpectedKeys": [],
        "droppedKeys": ["fc.weight", "fc.bias"],
    }
    assert got["data"] == {
        "format": "imagefolder",
        "train": "s3://datasets/pets",
        "validation": None,
        "validationSplit": 0.2,
        "test": None,
        "trainImages": 6,
        "validationImages": 2,
        "testImages": 0,
        "corruptImages": 1,
    }


def test_curves_are_a_readable_png_for_any_panels() -> None:
    png = Image.open(io.BytesIO(plot_curves(HISTORY, CLASSIFICATION_PANELS, "cats: test_resnet")))
    assert png.format == "PNG" and png.size[0] > png.size[1] >= 400
    mixed = [{**e, "map50": 0.1 * e["epoch"]} for e in HISTORY]
    detection = (Panel("mAP", "mAP@.5", (("map50", "validation"),), percent=True),)
    assert Image.open(io.BytesIO(plot_curves(mixed, detection, "boxes"))).size[0] >= 500


def test_export_writes_the_four_files(world: DigitsWorld) -> None:
    store = S3Store(world.endpoint, REGION)
    checkpoint = S3Uri.parse("s3://results/card/checkpoints/uid-1/epoch-0003")
    world.put(f"{checkpoint}/model.safetensors", b"weights")

    export_model(store, config(), checkpoint, card(), HISTORY)

    assert world.get("s3://results/card/model.safetensors") == b"weights"
    assert json.loads(world.get("s3://results/card/history.json")) == HISTORY
    assert json.loads(world.get("s3://results/card/model.json"))["classNames"] == ["cat", "dog"]
    assert world.get("s3://results/card/training-curves.png").startswith(b"\x89PNG")


def test_export_refuses_a_short_history(world: DigitsWorld) -> None:
    store = S3Store(world.endpoint, REGION)
    with pytest.raises(TrainerError, match="history has 3 epochs, expected 5"):
        export_model(store, config(epochs=5), S3Uri.parse("s3://results/x/epoch-0003"), card(), HISTORY)


def update(**changes: object) -> ProgressUpdate:
    base: dict[str, object] = {
        "epoch": 2,
        "total_epochs": 5,
        "step": 30,
        "total_steps": 100,
        "percent": 30.0,
        "eta_seconds": 65.0,
        "metrics": ProgressMetrics(train_loss=0.4123, val_accuracy=0.931, images_per_second=812.0),
        "phase": "Training",
    }
    return ProgressUpdate.model_validate({**base, **changes})


def test_progress_update_wire_shape_is_the_agreed_one() -> None:
    wire = update(latest_checkpoint="s3://results/c/epoch-0001").wire()
    assert set(wire) == {
        "epoch",
        "totalEpochs",
        "step",
        "totalSteps",
        "percent",
        "etaSeconds",
        "metrics",
        "latestCheckpoint",
        "phase",
    }
    assert wire["metrics"] == {"trainLoss": 0.4123, "valAccuracy": 0.931, "imagesPerSecond": 812.0}
    assert ProgressUpdate.model_validate(wire) == update(latest_checkpoint="s3://results/c/epoch-0001")


def test_progress_line_shows_epoch_bar_loss_accuracy_and_eta() -> None:
    line = progress_line(update())
    assert line == "epoch 2/5 [#######-----------------]  30% loss 0.4123 acc 93.1% 812 img/s ETA 01:05"


def test_console_in_a_log_writes_a_line_per_epoch_and_throttles_the_rest() -> None:
    stream = io.StringIO()
    console = ConsoleReporter(stream, interval=60, tty=False)
    for step in range(10):
        console.report(update(step=step))
    console.report(update(phase="Checkpointing", percent=40.0))
    console.report(update(epoch=3, percent=41.0))
    lines = stream.getvalue().splitlines()
    assert [line.split(" [")[0] for line in lines] == ["epoch 2/5", "epoch 2/5", "epoch 3/5"]


def test_console_on_a_terminal_redraws_one_line() -> None:
    stream = io.StringIO()
    console = ConsoleReporter(stream, tty=True)
    console.report(update())
    console.report(update(phase="Resumed", epoch=1, latest_checkpoint="s3://runs/epoch-0001"))
    console.close()
    text = stream.getvalue()
    assert text.startswith("\r\x1b[2Kepoch 2/5")
    assert "resumed from s3://runs/epoch-0001 after epoch 1\n" in text


def test_a_failing_reporter_never_stops_the_others() -> None:
    class Broken:
        def report(self, update: ProgressUpdate) -> None:
            raise RuntimeError("down")

        def close(self) -> None:
            raise RuntimeError("down")

    stream = io.StringIO()
    fan = FanOut([Broken(), ConsoleReporter(stream, tty=False)])
    fan.report(update())
    fan.close()
    assert stream.getvalue().startswith("epoch 2/5")


@pytest.mark.parametrize(
    ("step", "total", "shown"), [(0, 12, 0.0), (5, 12, 41.6), (1, 3, 33.3), (2999, 3000, 99.9), (12, 12, 100.0)]
)
def test_percent_done_is_what_kubectl_get_shows_one_decimal_and_100_only_at_the_end(
    step: int, total: int, shown: float
) -> None:
    assert percent_done(step, total) == shown
    assert str(percent_done(step, total)) == str(shown)  # no 41.66666666666667 in the PROGRESS column
