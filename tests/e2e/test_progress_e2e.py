"""Progress, end to end: the trainer's updates reach `status.progress` while training runs, and end where
history.json ends.

The job is the busy world's `steady` one (busy_world.py, scenarios.py): real Ray Train on the KubeRay
stand-in, pushing to the operator's progress endpoint with its projected ServiceAccount token. It also
lives through an operator crash; what it shows must not care. Run alone, this starts only that job.
"""

from __future__ import annotations

from datetime import datetime

import pytest

from tests.support.busy_world import World
from tests.support.scenarios import steady

pytestmark = pytest.mark.slow


def timestamp(value: str) -> datetime:
    return datetime.fromisoformat(value.replace("Z", "+00:00"))


def test_status_progress_moves_while_training_runs(busy_world: World) -> None:
    facts = busy_world.outcome(steady)
    running = [s.progress for s in facts["samples"] if s.phase == "Running" and s.progress]
    assert len(running) >= 3, running

    first, last = running[0], running[-1]
    assert last["epoch"] > first["epoch"] and last["percent"] > first["percent"] and last["step"] > first["step"]
    for key in ("epoch", "step", "percent"):
        values = [p[key] for p in running]
        assert values == sorted(values), key
    updated = [timestamp(p["updatedAt"]) for p in running]
    assert updated == sorted(updated) and len(set(updated)) >= 3

    for progress in running:
        assert progress["totalEpochs"] == facts["epochs"] and progress["totalSteps"] > 0
        assert 0 <= progress["percent"] <= 100
        metrics = progress["metrics"]
        assert metrics["trainLoss"] > 0 and metrics["learningRate"] >= 0 and metrics["imagesPerSecond"] > 0
    # Validation figures appear once an epoch has been evaluated, and with them a checkpoint.
    evaluated = [p for p in running if "valAccuracy" in p["metrics"]]
    assert evaluated and all(0 <= p["metrics"]["valAccuracy"] <= 1 for p in evaluated)
    assert any(p.get("latestCheckpoint", "").startswith(busy_world.output("steady")) for p in running)
    assert any(p.get("etaSeconds") is not None for p in running)


def test_final_status_progress_matches_history_json(busy_world: World) -> None:
    facts = busy_world.outcome(steady)
    status = facts["final"]["status"]
    assert status["phase"] == "Succeeded", status
    last = facts["history"][-1]
    progress = status["progress"]

    assert progress["epoch"] == last["epoch"] == facts["epochs"] == len(facts["history"])
    assert progress["percent"] == 100 and progress["step"] == progress["totalSteps"]
    for key in ("trainLoss", "valLoss", "valAccuracy"):
        assert progress["metrics"][key] == pytest.approx(last[key], rel=1e-9, abs=1e-12), key
    assert status["latestCheckpoint"] == progress["latestCheckpoint"]
    assert progress["latestCheckpoint"].rstrip("/").endswith(f"/epoch-{facts['epochs']:04d}")
    # The status said progress was arriving (and never that it was not).
    (reporting,) = [c for c in status["conditions"] if c["type"] == "ProgressReporting"]
    assert (reporting["status"], reporting["reason"]) == ("True", "ProgressReceived")
