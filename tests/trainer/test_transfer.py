"""Transfer learning end to end with `kubetune run --local`: digits 0-4 weights fine-tuned on digits 5-9.

Both runs (pretrained and random base weights, same budget) go through the console script on a local
Ray instance against moto S3, side by side. The exported model is then reloaded with timm, safetensors
and model.json alone, and must reproduce the reported validation accuracy. Both run on the defaults of
what comes after training (no data.test, safetensors only, no output.mlflow): the random one also shows
its report judged the validation set and says so, and (a probe in each of its processes) that nothing
imported MLflow or ONNX. tests/trainer/test_evaluation_e2e.py has the run that asks for all of them.
"""

from __future__ import annotations

import io
import json
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
from PIL import Image

from tests.support.browser import open_page
from tests.support.digits_world import PRETRAINED, RANDOM_INIT, DigitsWorld
from tests.support.import_probe import imported, probe_env

EPOCHS = 2
OUTPUTS = {"pretrained": "s3://results/transfer/pretrained", "random": "s3://results/transfer/random"}


@pytest.fixture(scope="module")
def transfer(pretrained: DigitsWorld, tmp_path_factory: pytest.TempPathFactory) -> Iterator[dict[str, dict[str, Any]]]:
    """Both runs at once (most of a run is waiting on Ray, so two share the two cores well)."""
    checkpoints = {"pretrained": PRETRAINED, "random": RANDOM_INIT}
    probe = tmp_path_factory.mktemp("probe")
    envs = {"pretrained": {}, "random": probe_env(probe)}
    procs: dict[str, subprocess.Popen[str]] = {}
    for name, output in OUTPUTS.items():
        manifest = pretrained.job(
            f"transfer-{name}", checkpoint=checkpoints[name], output=output, epochs=EPOCHS, strategy="partial"
        )
        procs[name] = pretrained.kubetune_popen(manifest, **envs[name])
    results: dict[str, dict[str, Any]] = {}
    for name, proc in procs.items():
        out, _ = proc.communicate(timeout=400)
        assert proc.returncode == 0, f"{name} run failed:\n{out}"
        results[name] = {
            "console": out,
            "card": json.loads(pretrained.get(f"{OUTPUTS[name]}/model.json")),
            "history": json.loads(pretrained.get(f"{OUTPUTS[name]}/history.json")),
            "evaluation": json.loads(pretrained.get(f"{OUTPUTS[name]}/evaluation.json")),
        }
    results["random"]["modules"] = imported(probe)
    yield results


@pytest.mark.slow
def test_pretrained_weights_beat_random_ones_on_new_classes(transfer: dict[str, dict[str, Any]]) -> None:
    pretrained, random = transfer["pretrained"], transfer["random"]
    accuracy = pretrained["card"]["metrics"]["valAccuracy"]
    baseline = random["card"]["metrics"]["valAccuracy"]
    print(f"validation accuracy after {EPOCHS} epochs: pretrained {accuracy:.3f}, random {baseline:.3f}")
    assert accuracy >= 0.90, f"pretrained {accuracy:.3f} vs random {baseline:.3f}"
    assert accuracy > baseline + 0.02, f"pretrained {accuracy:.3f} vs random {baseline:.3f}"
    assert sorted(pretrained["card"]["weightLoading"]["droppedKeys"]) == ["fc.bias", "fc.weight"]
    assert pretrained["card"]["weightLoading"]["missingKeys"] == []


@pytest.mark.slow
def test_run_shows_progress_and_exports_every_file(
    pretrained: DigitsWorld, transfer: dict[str, dict[str, Any]]
) -> None:
    run = transfer["pretrained"]
    console = run["console"]
    assert f"epoch {EPOCHS}/{EPOCHS} [########################] 100%" in console
    assert "loss " in console and "acc " in console and "ETA " in console
    assert "kubetune: model at s3://results/transfer/pretrained/model.safetensors" in console

    history = run["history"]
    assert [e["epoch"] for e in history] == list(range(1, EPOCHS + 1))
    assert set(history[0]) >= {"trainLoss", "valLoss", "valAccuracy", "imagesPerSecond", "learningRate"}
    # The exported epoch is the best by valAccuracy (training.selectBy's default), not always the last.
    assert history[run["card"]["epoch"] - 1]["valAccuracy"] == run["card"]["metrics"]["valAccuracy"]

    card = run["card"]
    assert card["architecture"] == "test_resnet" and card["numClasses"] == 5
    assert card["classNames"] == ["5", "6", "7", "8", "9"]
    assert card["imageSize"] == 32 and card["epochs"] == EPOCHS
    assert card["baseCheckpoint"] == PRETRAINED and card["finishedAt"].endswith("Z")
    assert card["data"]["trainImages"] > 600 and card["data"]["validationImages"] > 100

    curves = Image.open(io.BytesIO(pretrained.get(f"{OUTPUTS['pretrained']}/training-curves.png")))
    assert curves.format == "PNG" and curves.size[0] >= 800


@pytest.mark.slow
def test_exported_model_reloads_outside_the_trainer(
    pretrained: DigitsWorld, transfer: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    accuracy, total, card = pretrained.accuracy_outside_kubetune(OUTPUTS["pretrained"], tmp_path)

    assert total == card["data"]["validationImages"]
    assert abs(accuracy - card["metrics"]["valAccuracy"]) <= 0.005


@pytest.mark.slow
def test_without_a_test_split_the_report_says_it_judged_validation(
    pretrained: DigitsWorld, transfer: dict[str, dict[str, Any]], tmp_path: Path
) -> None:
    run = transfer["random"]
    assert run["evaluation"]["split"] == "validation" and run["card"]["evaluation"]["split"] == "validation"
    assert run["card"]["exports"] == {}
    page_file = tmp_path / "report.html"
    page_file.write_bytes(pretrained.get(f"{OUTPUTS['random']}/report.html"))
    page = open_page(page_file)
    assert "no test set (data.test)" in page.text and "Results on the validation set" in page.text
    assert page.console == [] and page.errors == [] and all(i["naturalWidth"] > 0 for i in page.images)
    assert not [k for k in pretrained.keys(OUTPUTS["random"]) if k.endswith((".onnx", ".torchscript.pt"))]


@pytest.mark.slow
def test_no_mlflow_or_onnx_import_when_not_asked_for(transfer: dict[str, dict[str, Any]]) -> None:
    listed = transfer["random"]["modules"]
    assert len(listed) >= 2, "the probe saw the driver and its Ray processes"
    assert any("kubetune_trainer.run" in modules for modules in listed.values())
    for name, modules in listed.items():
        assert not {m for m in modules if m == "mlflow" or m.startswith("mlflow.")}, name
        assert "onnxruntime" not in modules and "onnx" not in modules, name
