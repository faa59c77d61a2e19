"""A real Prometheus scrapes the operator's metrics while jobs move and trainers push progress; then every
dashboard panel's query, with its variables filled in, must return data, and the alert rules evaluate.

Metrics come only through the operator's own code paths: status changes through `observe_job` (what the
handlers call), progress through OperatorReporter → HTTP → ProgressServer (TokenReview by kmock) →
status patch in kmock → metrics.
"""

from __future__ import annotations

import asyncio
import json
import math
import socket
import subprocess
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import aiohttp
import pytest
import pytest_asyncio
import yaml
from kubernetes import client

from kubetune_operator.auth import TokenReviewer
from kubetune_operator.kube import Kube
from kubetune_operator.metrics import OperatorMetrics, serve_metrics
from kubetune_operator.progress import ProgressServer
from kubetune_trainer.operator_reporter import OperatorReporter
from kubetune_trainer.progress_model import ProgressUpdate
from tests.support.observability_stands import Cluster, tool
from tests.support.paths import REPO

pytestmark = [pytest.mark.asyncio, pytest.mark.slow, pytest.mark.timeout(120)]

NS = "vision"
DASHBOARD = REPO / "charts" / "kubetune" / "dashboards" / "kubetune.json"
RULES = REPO / "charts" / "kubetune" / "alerts" / "kubetune-rules.yaml"
# What Grafana would put in for the variables: two of the jobs picked (a multi-value regex).
VARIABLES = {"$namespace": NS, "$job": "(birds|cats)", "$__rate_interval": "1m", "$__range": "5m"}
# Panels fed by NVIDIA's dcgm-exporter, which needs a GPU node; this machine has none.
GPU_PANELS = {"GPU utilisation", "GPU memory used"}


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def stamp(at: datetime) -> str:
    return at.strftime("%Y-%m-%dT%H:%M:%SZ")


class Prometheus:
    def __init__(self, base: str) -> None:
        self.base = base

    async def get(self, path: str, **params: str) -> Any:
        async with aiohttp.ClientSession() as session, session.get(f"{self.base}{path}", params=params) as response:
            body = await response.json()
        assert body["status"] == "success", body
        return body["data"]

    async def query(self, expr: str) -> list[dict[str, Any]]:
        data = await self.get("/api/v1/query", query=expr)
        return list(data["result"])

    async def wait_for(self, expr: str, timeout: float = 30) -> list[dict[str, Any]]:
        """Poll until `expr` has a result (the scrape that carries it has landed)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            result = await self.query(expr)
            if result:
                return result
            assert loop.time() < deadline, f"Prometheus never had data for {expr}"
            await asyncio.sleep(0.5)


@pytest.fixture
def operator_metrics() -> Iterator[tuple[OperatorMetrics, int]]:
    metrics = OperatorMetrics(process_collectors=True)
    server, _ = serve_metrics(metrics.registry, 0, "127.0.0.1")
    yield metrics, server.server_port
    server.shutdown()
    server.server_close()


@pytest_asyncio.fixture
async def prometheus(tmp_path: Path, operator_metrics: tuple[OperatorMetrics, int]) -> AsyncIterator[Prometheus]:
    _, metrics_port = operator_metrics
    config = {
        "global": {"scrape_interval": "1s", "evaluation_interval": "1s"},
        "rule_files": [str(RULES)],
        "scrape_configs": [
            {
                "job_name": "kubetune-operator",
                # The per-job series' `namespace` is the FineTuneJob's; keep it (the chart's ServiceMonitor too).
                "honor_labels": True,
                "static_configs": [{"targets": [f"127.0.0.1:{metrics_port}"]}],
            }
        ],
    }
    config_path = tmp_path / "prometheus.yml"
    config_path.write_text(yaml.safe_dump(config))
    port = free_port()
    log = (tmp_path / "prometheus.log").open("w")
    process = subprocess.Popen(
        [
            str(tool("prometheus")),
            f"--config.file={config_path}",
            f"--storage.tsdb.path={tmp_path / 'data'}",
            f"--web.listen-address=127.0.0.1:{port}",
            "--log.level=warn",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
    )
    base = f"http://127.0.0.1:{port}"
    try:
        for _ in range(120):
            assert process.poll() is None, (tmp_path / "prometheus.log").read_text()
            try:
                async with aiohttp.ClientSession() as session, session.get(f"{base}/-/ready") as response:
                    if response.status == 200:
                        break
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.25)
        else:
            pytest.fail("Prometheus did not become ready:\n" + (tmp_path / "prometheus.log").read_text())
        yield Prometheus(base)
    finally:
        process.terminate()
        try:
            process.wait(15)
        except subprocess.TimeoutExpired:
            process.kill()
        log.close()


def dashboard_queries() -> list[tuple[str, str, str]]:
    """(panel title, refId, expression with the variables filled in) for every panel target."""
    out = []
    for panel in json.loads(DASHBOARD.read_text())["panels"]:
        for target in panel.get("targets", []):
            expr = target["expr"]
            for variable, value in VARIABLES.items():
                expr = expr.replace(variable, value)
            assert "$" not in expr, f"unknown variable in {panel['title']}: {expr}"
            out.append((panel["title"], target["refId"], expr))
    return out


def update(epoch: int, step: int, sweep: dict[str, Any] | None = None, **metrics: float) -> ProgressUpdate:
    return ProgressUpdate.model_validate(
        {
            "epoch": epoch,
            "totalEpochs": 3,
            "step": step,
            "totalSteps": 30,
            "percent": 100 * step / 30,
            "etaSeconds": 3.0 * (30 - step),
            "metrics": metrics,
            "sweep": sweep,
        }
    )


# birds is a sweep: its updates carry the trials by state and the best so far (the Sweeps row).
BIRDS_SWEEP = {"trials": 6, "pending": 2, "running": 2, "done": 1, "stopped": 1, "metric": "valAccuracy"}


async def test_every_dashboard_panel_returns_data_from_a_real_prometheus(
    kmock: Cluster,
    api_client: client.ApiClient,
    operator_metrics: tuple[OperatorMetrics, int],
    prometheus: Prometheus,
    tmp_path: Path,
) -> None:
    metrics, _ = operator_metrics
    progress = ProgressServer(TokenReviewer(api_client), Kube(api_client), metrics)
    port = await progress.start("127.0.0.1", 0)
    reporters: dict[str, OperatorReporter] = {}
    try:
        now = datetime.now(UTC)
        created = stamp(now - timedelta(seconds=90))
        jobs = ("cats", "dogs", "birds")

        # 1. Three jobs are created and wait for their Ray clusters.
        for name in jobs:
            kmock.add_job(NS, name, {"phase": "Pending"})
            metrics.observe_job({"namespace": NS, "name": name, "creationTimestamp": created}, {"phase": "Pending"})
            token_file = tmp_path / f"{name}.token"
            token_file.write_text(kmock.issue_token(NS, name))
            reporters[name] = OperatorReporter(f"http://127.0.0.1:{port}/v1/progress/{NS}/{name}", token_file)
        metrics.count_reconcile_error("create_job")
        await prometheus.wait_for('count(kubetune_job_phase{phase="Pending"}) == 3')

        # 2. They run; two trainers push progress through the real endpoint.
        started = stamp(datetime.now(UTC))
        for name in jobs:
            status = {"phase": "Running", "startTime": started, "restarts": 0}
            kmock.add_job(NS, name, status)
            metrics.observe_job({"namespace": NS, "name": name, "creationTimestamp": created}, status)
        reporters["cats"].report(update(1, 10, trainLoss=1.9, imagesPerSecond=310.0, learningRate=0.001))
        reporters["birds"].report(update(1, 8, BIRDS_SWEEP, trainLoss=2.2, imagesPerSecond=290.0))
        await asyncio.sleep(1.2)
        reporters["cats"].report(update(1, 10, valLoss=1.5, valAccuracy=0.61))
        # birds stands in for a detection job too: its mAP feeds the dashboard's accuracy/mAP panel.
        best = {**BIRDS_SWEEP, "bestTrial": "trial-002", "bestValue": 0.55}
        reporters["birds"].report(update(1, 10, best, valLoss=1.7, valAccuracy=0.55, valMap=0.41, valMap50=0.72))
        metrics.count_reconcile_error("create_job")
        await prometheus.wait_for('kubetune_job_validation_accuracy_ratio{name="birds"}')
        await prometheus.wait_for('kubetune_job_validation_accuracy_ratio{name="cats"}')
        await prometheus.wait_for('kubetune_job_validation_map_ratio{name="birds"}')
        await prometheus.wait_for('kubetune_job_sweep_best_value{name="birds"}')

        # 3. cats succeeds, dogs fails, birds restarts once and keeps training; a forged token is refused.
        reporters["cats"].report(update(3, 30, trainLoss=0.4, valLoss=0.5, valAccuracy=0.93))
        await asyncio.to_thread(reporters["cats"].close)
        finished = stamp(datetime.now(UTC))
        for name, phase in (("cats", "Succeeded"), ("dogs", "Failed")):
            status = {"phase": phase, "startTime": started, "completionTime": finished, "restarts": 0}
            metrics.observe_job({"namespace": NS, "name": name, "creationTimestamp": created}, status)
        metrics.observe_job(
            {"namespace": NS, "name": "birds", "creationTimestamp": created},
            {"phase": "Running", "startTime": started, "restarts": 1},
        )
        reporters["birds"].report(update(2, 14, trainLoss=1.1, imagesPerSecond=305.0))
        async with aiohttp.ClientSession() as session:
            forged = {"Authorization": "Bearer forged"}
            url = f"http://127.0.0.1:{port}/v1/progress/{NS}/birds"
            async with session.post(url, json={"epoch": 9, "totalEpochs": 9}, headers=forged) as response:
                assert response.status == 401
        metrics.count_reconcile_error("create_job")
        await prometheus.wait_for('kubetune_jobs_completed_total{outcome="Succeeded"} == 1')
        await prometheus.wait_for('kubetune_job_epoch{name="birds"} == 2')
        await asyncio.sleep(2.5)  # a couple more scrapes, so every rate() has points on both sides

        # The status the users see carries what the trainer sent.
        assert kmock.job(NS, "cats")["status"]["progress"]["metrics"]["valAccuracy"] == 0.93

        # Every panel's query returns data (a number, not NaN), except where the data needs a GPU.
        empty = []
        for title, ref, expr in dashboard_queries():
            result = await prometheus.query(expr)
            values = [float(series["value"][1]) for series in result]
            if title in GPU_PANELS:
                assert result == [], f"{title}: no dcgm-exporter here, yet data came back"
                continue
            if not values or not any(math.isfinite(v) for v in values):
                empty.append(f"{title} [{ref}]: {expr} -> {result}")
        assert not empty, "panels without data:\n" + "\n".join(empty)

        # The alert rules load in this Prometheus and evaluate against these series: dogs failed.
        groups = (await prometheus.get("/api/v1/rules"))["groups"]
        rules = [rule for group in groups for rule in group["rules"]]
        assert {rule["name"] for rule in rules} >= {"KubetuneJobFailed", "KubetuneJobStalled"}
        assert all(rule["health"] == "ok" for rule in rules), rules
        for _ in range(40):
            alerts = (await prometheus.get("/api/v1/alerts"))["alerts"]
            failed = [a["labels"] for a in alerts if a["labels"]["alertname"] == "KubetuneJobFailed"]
            if failed:
                break
            await asyncio.sleep(0.5)
        assert failed == [{"alertname": "KubetuneJobFailed", "namespace": NS, "name": "dogs", "severity": "warning"}]
    finally:
        for reporter in reporters.values():
            await asyncio.to_thread(reporter.close)
        await progress.stop()
