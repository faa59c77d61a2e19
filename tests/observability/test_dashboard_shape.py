"""The Grafana dashboard is complete and self-explaining (its queries are run in test_prometheus_dashboard)."""

from __future__ import annotations

import json
import re
from typing import Any

from tests.support.paths import REPO

DASHBOARD = REPO / "charts" / "kubetune" / "dashboards" / "kubetune.json"


def load() -> dict[str, Any]:
    return json.loads(DASHBOARD.read_text())


def panels() -> list[dict[str, Any]]:
    return [panel for panel in load()["panels"] if panel["type"] != "row"]


def test_variables_pick_datasource_namespace_and_job() -> None:
    variables = {var["name"]: var for var in load()["templating"]["list"]}
    assert variables["datasource"]["type"] == "datasource"
    assert variables["datasource"]["query"] == "prometheus"
    assert "namespace" in variables["namespace"]["query"]["query"]
    assert "$namespace" in variables["job"]["query"]["query"]
    for name in ("namespace", "job"):
        assert variables[name]["datasource"]["uid"] == "${datasource}"


def test_every_panel_has_a_unit_a_description_and_the_datasource_variable() -> None:
    for panel in panels():
        assert panel["description"].strip(), panel["title"]
        assert panel["fieldConfig"]["defaults"]["unit"], panel["title"]
        assert panel["datasource"]["uid"] == "${datasource}", panel["title"]
        assert panel["targets"], panel["title"]


def test_rates_use_the_rate_interval_and_nothing_is_hard_coded() -> None:
    for panel in panels():
        for target in panel["targets"]:
            expr = target["expr"]
            for window in re.findall(r"(?:rate|irate)\([^\[]*\[([^\]]+)\]", expr):
                assert window == "$__rate_interval", (panel["title"], expr)
            assert not re.search(r"\[\d+[smhd]\]", expr), (panel["title"], expr)


def test_the_story_of_a_job_is_all_there() -> None:
    exprs = " ".join(target["expr"] for panel in panels() for target in panel["targets"])
    for metric in (
        "kubetune_jobs{",
        "kubetune_job_progress_ratio",
        "kubetune_job_train_loss",
        "kubetune_job_validation_loss",
        "kubetune_job_validation_accuracy_ratio",
        "kubetune_job_validation_map_ratio",
        "kubetune_job_images_per_second",
        "kubetune_job_eta_seconds",
        "kubetune_job_queue_duration_seconds_bucket",
        "kubetune_job_run_duration_seconds_bucket",
        "kubetune_jobs_completed_total",
        "DCGM_FI_DEV_GPU_UTIL",
        "kubetune_build_info",
        "kubetune_reconcile_errors_total",
        "kubetune_job_sweep_trials",
        "kubetune_job_sweep_best_value",
    ):
        assert metric in exprs, metric


def test_panels_do_not_overlap() -> None:
    taken: set[tuple[int, int]] = set()
    for panel in load()["panels"]:
        pos = panel["gridPos"]
        assert pos["x"] + pos["w"] <= 24, panel["title"]
        cells = {(x, y) for x in range(pos["x"], pos["x"] + pos["w"]) for y in range(pos["y"], pos["y"] + pos["h"])}
        assert not cells & taken, panel["title"]
        taken |= cells
