"""A sweep through `kubetune run --local`, as a user runs it: three learning rates of test_resnet on digits,
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
# Three trials, not more: each is a Ray Train start-up and three epochs, and a fourth proves nothing new.
TRIALS = 3
SWEEP: dict[str, Any] = {
    "parameters": [{"field": "training.learningRate", "values": [0.01, 0.03, BAD_RATE]}],
    "trials": TRIALS,
    "maxConcurrentTrials": 1,
    "scheduler": {"type": "asha", "gracePeriod": 1, "reductionFactor": 2},
}


def seed_drawing_the_bad_rate_last(job: dict[str, Any]) -> int:
    """A sweep seed whose plan (the trainer's own plan_sweep) runs the bad rate last: after two good trials
    that fill ASHA's first rung (so it is stopped there), and alone in the second driver's share (so the
    resumed driver runs it). Drawn first, ASHA would have nothing to stop it against."""
    from kubetune_operator.spec import FineTuneJob
    from kubetune_operator.trainer_config import trainer_config
    from kubetune_trainer.sweep_plan import plan_sweep

    for seed in range(100):
        job["spec"]["sweep"] = {**SWEEP, "seed": seed}
        trials = plan_sweep(trainer_config(FineTuneJob.model_validate(job))).trials
        if [t.values["training.learningRate"] for t in trials].index(BAD_RATE) == TRIALS - 1:
            return seed
    raise AssertionError("no seed below 100 draws the bad rate last")


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
    body["spec"]["sweep"] = {**SWEEP, "seed": seed_drawing_the_bad_rate_last(body)}
    manifest = tmp_path / "sweep.yaml"
    manifest.write_text(yaml.safe_dump(body, sort_keys=False))

    first = kill_after_two_trials(pretrained, manifest)
    before = records(pretrained)
    assert "trial-000: epoch" in first  # one progress line per running trial, prefixed with its id

    second = pretrained.kubetune_run(manifest, timeout=600)
    assert second.returncode == 0, second.stdout + second.stderr
    log = second.stdout + second.stderr
    assert f"{len(before)} finished before, {TRIALS - len(before)} to run" in log
    for trial_id, record in before.items():  # not run again: not started, record untouched
        assert f"sweep: {trial_id} started" not in log
        assert records(pretrained)[trial_id] == record

    sweep = json.loads(pretrained.get(f"{OUT}/sweep.json"))
    by_rate = {t["parameters"]["training.learningRate"]: t for t in sweep["trials"]}
    assert len(by_rate) == TRIALS
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
