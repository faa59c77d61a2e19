"""A sweep through `kubetune run --local`, as a user runs it: four learning rates of test_resnet on digits,
one of them far too high.

The first driver is killed once two trials have finished; the second finishes the sweep without running
them again (their records unchanged, never started), ASHA stops the bad learning rate after its grace
period, the best trial's model is exported as a single run's, and it reloads outside kubetune with the
accuracy sweep.json reports.
"""

from __future__ import annotations

import io
import json
import os
import signal
import time
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from tests.support.digits_world import DigitsWorld

OUT = "s3://results/sweep"
BAD_RATE = 5.0
# Seed 1 draws the learning rates in the order 0.03, 0.01, 5.0, 0.003: the bad one third, after two trials
# that fill ASHA's first rung.
SWEEP = {
    "parameters": [{"field": "training.learningRate", "values": [0.01, 0.003, BAD_RATE, 0.03]}],
    "trials": 4,
    "maxConcurrentTrials": 1,
    "scheduler": {"type": "asha", "gracePeriod": 1, "reductionFactor": 2},
    "seed": 1,
}


def records(world: DigitsWorld) -> dict[str, dict[str, Any]]:
    keys = [k for k in world.keys(f"{OUT}/trials") if k.endswith("/trial.json")]
    return {k.split("/")[-2]: json.loads(world.get(f"s3://results/{k}")) for k in keys}


def kill_after_two_trials(world: DigitsWorld, manifest: Path) -> str:
    """The first driver, killed (with its whole local Ray) once two trials have their records."""
    proc = world.kubetune_popen(manifest)
    try:
        deadline = time.monotonic() + 480
        while len(records(world)) < 2 and proc.poll() is None and time.monotonic() < deadline:
            time.sleep(0.5)
        assert proc.poll() is None, f"the first driver ended before it was killed:\n{proc.communicate()[0]}"
        assert len(records(world)) >= 2
    finally:
        if proc.poll() is None:
            os.killpg(proc.pid, signal.SIGKILL)
        output, _ = proc.communicate(timeout=30)
    return output


@pytest.mark.slow
def test_a_sweep_resumes_stops_the_bad_rate_and_exports_the_best(pretrained: DigitsWorld, tmp_path: Path) -> None:
    body = pretrained.manifest("sweep", output=OUT, epochs=3, cpus_per_worker=1)
    body["spec"]["sweep"] = SWEEP
    manifest = tmp_path / "sweep.yaml"
    manifest.write_text(yaml.safe_dump(body, sort_keys=False))

    first = kill_after_two_trials(pretrained, manifest)
    before = records(pretrained)
    assert "trial-000: epoch" in first  # one progress line per running trial, prefixed with its id

    second = pretrained.kubetune_run(manifest, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    log = second.stdout + second.stderr
    assert f"{len(before)} finished before, {4 - len(before)} to run" in log
    for trial_id, record in before.items():  # not run again: not started, record untouched
        assert f"sweep: {trial_id} started" not in log
        assert records(pretrained)[trial_id] == record

    sweep = json.loads(pretrained.get(f"{OUT}/sweep.json"))
    by_rate = {t["parameters"]["training.learningRate"]: t for t in sweep["trials"]}
    assert len(by_rate) == 4
    bad = by_rate[BAD_RATE]
    assert bad["state"] == "stopped" and bad["stoppedEarly"] and bad["epochs"] < 3, bad
    best = sweep["best"]
    assert best["parameters"]["training.learningRate"] != BAD_RATE
    assert by_rate[best["parameters"]["training.learningRate"]]["state"] == "done"

    accuracy, _, card = pretrained.accuracy_outside_kubetune(OUT, tmp_path)
    assert card["sweep"]["trial"] == best["trial"] and card["sweep"]["parameters"] == best["parameters"]
    assert card["metrics"]["valAccuracy"] == pytest.approx(best["value"])
    assert abs(accuracy - best["value"]) <= 0.005
    assert best["value"] > 0.8
    png = Image.open(io.BytesIO(pretrained.get(f"{OUT}/sweep.png")))
    assert png.format == "PNG"
    assert "model at s3://results/sweep/model.safetensors" in second.stdout
