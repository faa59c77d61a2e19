"""The operator's Prometheus metrics, driven by the status and progress dicts the operator writes."""

from __future__ import annotations

import re
import subprocess
import time
import urllib.request
from datetime import UTC, datetime, timedelta

import pytest
from prometheus_client import generate_latest

from kubetune_operator.metrics import OperatorMetrics, serve_metrics
from tests.support.observability_stands import tool

NS = "vision"
SWEEP = {"trials": 8, "pending": 3, "running": 2, "done": 1, "stopped": 2, "failed": 0, "metric": "valAccuracy"}
T0 = datetime(2030, 5, 1, 12, 0, tzinfo=UTC)  # after the test's "process start": these are live events


def ts(minutes: float) -> str:
    return (T0 + timedelta(minutes=minutes)).strftime("%Y-%m-%dT%H:%M:%SZ")


def meta(name: str, created_min: float = 0) -> dict[str, str]:
    return {"namespace": NS, "name": name, "creationTimestamp": ts(created_min)}


def value(m: OperatorMetrics, metric: str, /, **labels: str) -> float | None:
    return m.registry.get_sample_value(metric, labels)


def exposition(m: OperatorMetrics) -> str:
    return generate_latest(m.registry).decode()


def run_job(m: OperatorMetrics, name: str, outcome: str, *, queued_min: float = 3, ran_min: float = 60) -> None:
    for status in (
        {"phase": "Pending"},
        {"phase": "Launching"},
        {"phase": "Running", "startTime": ts(queued_min), "restarts": 0},
        {"phase": outcome, "startTime": ts(queued_min), "completionTime": ts(queued_min + ran_min), "restarts": 0},
    ):
        m.observe_job(meta(name), status)


def test_a_job_lifecycle_fills_queue_time_duration_and_outcome(metrics: OperatorMetrics) -> None:
    run_job(metrics, "cats", "Succeeded", queued_min=3, ran_min=60)
    run_job(metrics, "dogs", "Failed", queued_min=1, ran_min=10)

    assert value(metrics, "kubetune_job_queue_duration_seconds_count") == 2
    assert value(metrics, "kubetune_job_queue_duration_seconds_sum") == 3 * 60 + 1 * 60
    assert value(metrics, "kubetune_job_run_duration_seconds_sum", outcome="Succeeded") == 3600
    assert value(metrics, "kubetune_job_run_duration_seconds_sum", outcome="Failed") == 600
    assert value(metrics, "kubetune_jobs_completed_total", namespace=NS, outcome="Succeeded") == 1
    assert value(metrics, "kubetune_jobs_completed_total", namespace=NS, outcome="Failed") == 1
    assert value(metrics, "kubetune_jobs", namespace=NS, phase="Succeeded") == 1
    assert value(metrics, "kubetune_jobs", namespace=NS, phase="Running") == 0
    assert value(metrics, "kubetune_job_phase", namespace=NS, name="cats", phase="Succeeded") == 1
    # Only the current phase has a series: no "Running" left behind for the stalled alert to see.
    assert value(metrics, "kubetune_job_phase", namespace=NS, name="cats", phase="Running") is None
    # A succeeded job is done: 100 %, nothing left to wait for.
    assert value(metrics, "kubetune_job_progress_ratio", namespace=NS, name="cats") == 1.0
    assert value(metrics, "kubetune_job_eta_seconds", namespace=NS, name="cats") == 0.0


def test_the_same_status_seen_again_is_counted_once(metrics: OperatorMetrics) -> None:
    """Handlers re-run (retries, resume, periodic timers): a transition still counts once."""
    run_job(metrics, "cats", "Succeeded")
    done = {"phase": "Succeeded", "startTime": ts(3), "completionTime": ts(63)}
    metrics.observe_job(meta("cats"), done)
    metrics.observe_job(meta("cats"), done)

    assert value(metrics, "kubetune_jobs_completed_total", namespace=NS, outcome="Succeeded") == 1
    assert value(metrics, "kubetune_job_run_duration_seconds_count", outcome="Succeeded") == 1
    assert value(metrics, "kubetune_job_queue_duration_seconds_count") == 1


def test_jobs_that_finished_before_the_operator_started_are_not_recounted() -> None:
    """After an operator restart the counters start at 0; old completions must not reappear as new ones."""
    metrics = OperatorMetrics(process_collectors=False)
    long_ago = datetime.now(UTC) - timedelta(days=1)
    stamp = long_ago.strftime("%Y-%m-%dT%H:%M:%SZ")
    metrics.observe_job(
        {"namespace": NS, "name": "old", "creationTimestamp": stamp},
        {"phase": "Succeeded", "startTime": stamp, "completionTime": stamp},
    )

    assert value(metrics, "kubetune_jobs_completed_total", namespace=NS, outcome="Succeeded") == 0
    assert value(metrics, "kubetune_job_queue_duration_seconds_count") == 0
    assert value(metrics, "kubetune_jobs", namespace=NS, phase="Succeeded") == 1


def test_a_job_that_completes_while_the_operator_is_away_is_counted_when_seen() -> None:
    metrics = OperatorMetrics(process_collectors=False)
    later = (datetime.now(UTC) + timedelta(seconds=5)).strftime("%Y-%m-%dT%H:%M:%SZ")
    metrics.observe_job(
        {"namespace": NS, "name": "late", "creationTimestamp": ts(-600)},
        {"phase": "Failed", "startTime": later, "completionTime": later},
    )
    assert value(metrics, "kubetune_jobs_completed_total", namespace=NS, outcome="Failed") == 1


def test_restarts_are_counted_by_how_much_the_status_count_grew(metrics: OperatorMetrics) -> None:
    metrics.observe_job(meta("cats"), {"phase": "Running", "startTime": ts(1), "restarts": 0})
    metrics.observe_job(meta("cats"), {"phase": "Running", "startTime": ts(1), "restarts": 2})
    metrics.observe_job(meta("cats"), {"phase": "Running", "startTime": ts(1), "restarts": 2})
    metrics.observe_job(meta("cats"), {"phase": "Running", "startTime": ts(1), "restarts": 3})
    assert value(metrics, "kubetune_job_restarts_total", namespace=NS) == 3


def test_progress_sets_the_per_job_gauges(metrics: OperatorMetrics) -> None:
    metrics.observe_job(meta("cats"), {"phase": "Running", "startTime": ts(1)})
    metrics.observe_progress(
        NS,
        "cats",
        {
            "epoch": 3,
            "totalEpochs": 10,
            "percent": 25.0,
            "etaSeconds": 900.0,
            "metrics": {"trainLoss": 0.42, "valLoss": 0.5, "valAccuracy": 0.87, "imagesPerSecond": 812.5},
        },
    )

    assert value(metrics, "kubetune_job_progress_ratio", namespace=NS, name="cats") == 0.25
    assert value(metrics, "kubetune_job_epoch", namespace=NS, name="cats") == 3
    assert value(metrics, "kubetune_job_eta_seconds", namespace=NS, name="cats") == 900
    assert value(metrics, "kubetune_job_train_loss", namespace=NS, name="cats") == 0.42
    assert value(metrics, "kubetune_job_validation_loss", namespace=NS, name="cats") == 0.5
    assert value(metrics, "kubetune_job_validation_accuracy_ratio", namespace=NS, name="cats") == 0.87
    assert value(metrics, "kubetune_job_images_per_second", namespace=NS, name="cats") == 812.5
    alive = value(metrics, "kubetune_job_last_progress_timestamp_seconds", namespace=NS, name="cats")
    assert alive is not None and abs(alive - time.time()) < 60


def test_a_detection_run_sets_its_map_gauges(metrics: OperatorMetrics) -> None:
    metrics.observe_job(meta("parts"), {"phase": "Running", "startTime": ts(1)})
    metrics.observe_progress(
        NS, "parts", {"epoch": 2, "totalEpochs": 4, "percent": 50.0, "metrics": {"valMap": 0.41, "valMap50": 0.73}}
    )
    assert value(metrics, "kubetune_job_validation_map_ratio", namespace=NS, name="parts") == 0.41
    assert value(metrics, "kubetune_job_validation_map50_ratio", namespace=NS, name="parts") == 0.73
    assert value(metrics, "kubetune_job_validation_accuracy_ratio", namespace=NS, name="parts") is None


def test_a_running_job_counts_as_alive_from_the_start_of_its_run(metrics: OperatorMetrics) -> None:
    """So the stalled alert also catches a run that never reports at all."""
    metrics.observe_job(meta("mute"), {"phase": "Running", "startTime": ts(2)})
    started = (T0 + timedelta(minutes=2)).timestamp()
    assert value(metrics, "kubetune_job_last_progress_timestamp_seconds", namespace=NS, name="mute") == started


def test_deleting_a_job_removes_its_series(metrics: OperatorMetrics) -> None:
    for name in ("cats", "dogs"):
        metrics.observe_job(meta(name), {"phase": "Running", "startTime": ts(1)})
        metrics.observe_progress(NS, name, {"epoch": 1, "percent": 10, "etaSeconds": 60, "metrics": {"trainLoss": 1}})
        metrics.observe_sweep(NS, name, {**SWEEP, "bestValue": 0.75})

    metrics.forget_job(NS, "cats")

    text = exposition(metrics)
    assert 'name="cats"' not in text
    assert 'kubetune_job_train_loss{name="dogs",namespace="vision"} 1.0' in text
    assert 'kubetune_job_sweep_trials{name="dogs",namespace="vision",state="running"} 2.0' in text
    assert value(metrics, "kubetune_jobs", namespace=NS, phase="Running") == 1
    metrics.forget_job(NS, "dogs")
    text = exposition(metrics)
    assert 'name="dogs"' not in text
    assert 'kubetune_jobs{namespace="vision"' not in text  # no jobs left there: no namespace series either


def test_labels_stay_bounded(metrics: OperatorMetrics) -> None:
    """Never a loss, a timestamp or any other value in a label: only names from fixed sets."""
    run_job(metrics, "cats", "Succeeded")
    metrics.observe_progress(NS, "cats", {"epoch": 2, "percent": 50, "metrics": {"trainLoss": 0.3}})
    metrics.count_reconcile_error("create")
    metrics.count_progress_update("throttled", 429)
    # A sweep of many trials: no label names a trial, its parameters or its metric.
    sweep = {**SWEEP, "trials": 1000, "pending": 990, "bestTrial": "trial-042", "bestValue": 0.9}
    metrics.observe_sweep(NS, "cats", {**sweep, "bestParameters": {"training.learningRate": "0.003"}})
    allowed = {
        *("namespace", "name", "phase", "outcome", "handler", "result", "code", "le", "version", "python_version"),
        "state",
    }
    for family in metrics.registry.collect():
        if not family.name.startswith("kubetune_"):
            continue
        for sample in family.samples:
            assert set(sample.labels) <= allowed, sample
            for key, label_value in sample.labels.items():
                if key not in ("le", "code", "version", "python_version"):
                    assert not re.fullmatch(r"[0-9.e+-]+", label_value), sample
                assert "trial" not in label_value and "learningRate" not in label_value, sample
    (trials,) = [family for family in metrics.registry.collect() if family.name == "kubetune_job_sweep_trials"]
    assert [sample.labels["state"] for sample in trials.samples] == ["pending", "running", "done", "stopped", "failed"]


def test_unknown_progress_results_are_refused(metrics: OperatorMetrics) -> None:
    with pytest.raises(ValueError, match="unknown progress result"):
        metrics.count_progress_update("whatever", 200)


def test_the_served_exposition_passes_promtool_check_metrics(metrics: OperatorMetrics) -> None:
    """What Prometheus scrapes from the operator's metrics port, linted by Prometheus' own tool."""
    full = OperatorMetrics(process_collectors=True)
    run_job(full, "cats", "Succeeded")
    run_job(full, "dogs", "Failed")
    full.observe_job(meta("birds"), {"phase": "Running", "startTime": ts(2), "restarts": 1})
    full.observe_progress(
        NS,
        "birds",
        {"epoch": 1, "percent": 5, "etaSeconds": 100, "metrics": {"trainLoss": 2.0, "valAccuracy": 0.1}},
    )
    full.observe_sweep(NS, "birds", {**SWEEP, "bestValue": 0.5})
    full.count_reconcile_error("create_job")
    full.count_progress_update("rejected", 403)
    server, _thread = serve_metrics(full.registry, 0, "127.0.0.1")
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response:
            scraped = response.read()
    finally:
        server.shutdown()
        server.server_close()

    assert b"kubetune_build_info{" in scraped
    check = subprocess.run(
        [str(tool("promtool")), "check", "metrics"], input=scraped, capture_output=True, timeout=60, check=False
    )
    assert check.returncode == 0, check.stdout.decode() + check.stderr.decode()
    assert check.stdout.decode().strip() == "" and check.stderr.decode().strip() == ""


def test_after_an_operator_restart_the_gauges_start_from_the_status(metrics: OperatorMetrics) -> None:
    """The status keeps the last progress; a fresh operator shows it, and the stalled clock keeps running."""
    status = {
        "phase": "Running",
        "startTime": ts(1),
        "progress": {
            "epoch": 4,
            "percent": 40.0,
            "etaSeconds": 600.0,
            "metrics": {"trainLoss": 0.7, "valAccuracy": 0.8},
            "updatedAt": ts(30),
        },
    }
    metrics.observe_job(meta("cats"), status)

    assert value(metrics, "kubetune_job_epoch", namespace=NS, name="cats") == 4
    assert value(metrics, "kubetune_job_validation_accuracy_ratio", namespace=NS, name="cats") == 0.8
    last = value(metrics, "kubetune_job_last_progress_timestamp_seconds", namespace=NS, name="cats")
    assert last == (T0 + timedelta(minutes=30)).timestamp()


def test_a_sweep_s_gauges_start_from_its_status_too(metrics: OperatorMetrics) -> None:
    """status.sweep, as the operator wrote it from the trainer's updates, fills the sweep's gauges."""
    metrics.observe_job(meta("tune"), {"phase": "Running", "startTime": ts(1), "sweep": {**SWEEP, "bestValue": 0.8}})

    assert value(metrics, "kubetune_job_sweep_trials", namespace=NS, name="tune", state="pending") == 3
    assert value(metrics, "kubetune_job_sweep_trials", namespace=NS, name="tune", state="stopped") == 2
    assert value(metrics, "kubetune_job_sweep_trials", namespace=NS, name="tune", state="failed") == 0
    assert value(metrics, "kubetune_job_sweep_best_value", namespace=NS, name="tune") == 0.8
    # A job that sweeps nothing has no sweep series at all.
    metrics.observe_job(meta("single"), {"phase": "Running", "startTime": ts(1)})
    assert 'name="single"' not in "".join(
        line for line in exposition(metrics).splitlines() if line.startswith("kubetune_job_sweep")
    )
