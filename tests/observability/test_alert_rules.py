"""The shipped alert rules load in Prometheus and every alert fires (and stays quiet) when it should."""

from __future__ import annotations

import subprocess
from pathlib import Path

import yaml

from tests.support.observability_stands import tool
from tests.support.paths import REPO

RULES = REPO / "charts" / "kubetune" / "alerts" / "kubetune-rules.yaml"
RULE_TESTS = Path(__file__).with_name("rules_test.yaml")


def promtool(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([str(tool("promtool")), *args], capture_output=True, text=True, timeout=120, check=False)


def test_the_rule_file_is_valid_for_prometheus() -> None:
    result = promtool("check", "rules", str(RULES))
    assert result.returncode == 0, result.stdout + result.stderr


def test_promtool_rule_tests_pass() -> None:
    result = promtool("test", "rules", str(RULE_TESTS))
    assert result.returncode == 0, result.stdout + result.stderr


def test_every_alert_has_a_test_where_it_fires_and_one_where_it_does_not() -> None:
    alerts = {rule["alert"] for group in yaml.safe_load(RULES.read_text())["groups"] for rule in group["rules"]}
    cases = [case for test in yaml.safe_load(RULE_TESTS.read_text())["tests"] for case in test["alert_rule_test"]]
    fires = {case["alertname"] for case in cases if case["exp_alerts"]}
    quiet = {case["alertname"] for case in cases if not case["exp_alerts"]}
    assert alerts == {"KubetuneJobFailed", "KubetuneJobStalled", "KubetuneJobPendingTooLong", "KubetuneOperatorDown"}
    assert alerts <= fires, f"no firing case for {alerts - fires}"
    assert alerts <= quiet, f"no quiet case for {alerts - quiet}"


def test_every_alert_says_what_happened_and_what_to_do() -> None:
    for group in yaml.safe_load(RULES.read_text())["groups"]:
        for rule in group["rules"]:
            assert rule["labels"]["severity"] in ("warning", "critical"), rule["alert"]
            assert rule["annotations"]["summary"], rule["alert"]
            assert len(rule["annotations"]["description"]) > 80, rule["alert"]
