"""The operator's settings from the environment the chart sets, and its hooks' safety."""

from __future__ import annotations

import logging

import pytest

from kubetune_operator.hooks import Hooks
from kubetune_operator.settings import OperatorSettings, parse_list


def test_defaults_work_without_any_environment() -> None:
    settings = OperatorSettings.from_env({})
    assert settings.trainer_image.startswith("ghcr.io/kubetune/kubetune-trainer:")
    assert settings.namespaces == ()
    assert settings.progress_url("vision", "flowers") == (
        "http://kubetune.kubetune-system.svc:8081/v1/progress/vision/flowers"
    )


def test_the_charts_variables_override_the_defaults() -> None:
    settings = OperatorSettings.from_env(
        {
            "KUBETUNE_TRAINER_IMAGE": "registry.example/trainer@sha256:abc",
            "KUBETUNE_PROGRESS_URL": "http://kt.ops.svc:8081/",
            "KUBETUNE_NAMESPACES": "team-a, team-b team-a",
            "KUBETUNE_TOKEN_EXPIRATION_SECONDS": "7200",
            "KUBETUNE_PREFLIGHT_BACKOFF_SECONDS": "0.5",
            "KUBETUNE_HEAD_MEMORY": "",  # empty: the default stays
            "KUBETUNE_TRAINER_SERVICE_ACCOUNT": "ml-pods",
        }
    )
    assert settings.trainer_service_account == "ml-pods"
    assert settings.trainer_image == "registry.example/trainer@sha256:abc"
    assert settings.progress_url("a", "b") == "http://kt.ops.svc:8081/v1/progress/a/b"
    assert settings.namespaces == ("team-a", "team-b")
    assert settings.token_expiration_seconds == 7200
    assert isinstance(settings.token_expiration_seconds, int)
    assert settings.preflight_backoff_seconds == 0.5
    assert settings.head_memory == "4Gi"


@pytest.mark.parametrize("value", ["soon", "-1"])
def test_a_bad_number_names_its_variable(value: str) -> None:
    with pytest.raises(ValueError, match="KUBETUNE_KUBERAY_RETRY_SECONDS"):
        OperatorSettings.from_env({"KUBETUNE_KUBERAY_RETRY_SECONDS": value})


def test_the_network_policy_settings() -> None:
    defaults = OperatorSettings.from_env({})
    assert defaults.network_policy is True and defaults.kuberay_namespace is None
    assert defaults.kuberay_pod_labels == (("app.kubernetes.io/name", "kuberay-operator"),)
    settings = OperatorSettings.from_env(
        {
            "KUBETUNE_NETWORK_POLICY": "False",
            "KUBETUNE_KUBERAY_NAMESPACE": "ray-system",
            "KUBETUNE_KUBERAY_POD_LABELS": "app=kuberay, tier=control",
        }
    )
    assert settings.network_policy is False and settings.kuberay_namespace == "ray-system"
    assert settings.kuberay_pod_labels == (("app", "kuberay"), ("tier", "control"))


def test_failed_heads_are_kept_unless_the_operator_is_told_not_to() -> None:
    assert OperatorSettings.from_env({}).keep_failed_heads is True
    assert OperatorSettings.from_env({"KUBETUNE_KEEP_FAILED_HEADS": "false"}).keep_failed_heads is False


@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("KUBETUNE_NETWORK_POLICY", "maybe"),
        ("KUBETUNE_KUBERAY_POD_LABELS", "app"),
        ("KUBETUNE_KEEP_FAILED_HEADS", "sometimes"),
    ],
)
def test_a_bad_network_policy_setting_names_its_variable(variable: str, value: str) -> None:
    with pytest.raises(ValueError, match=variable):
        OperatorSettings.from_env({variable: value})


def test_namespace_lists() -> None:
    assert parse_list("a,b,,c  a") == ("a", "b", "c")
    assert parse_list(" ") == ()


def test_a_failing_hook_never_stops_the_others(caplog: pytest.LogCaptureFixture) -> None:
    seen: list[str] = []

    def broken(metadata: object, status: object) -> None:
        raise RuntimeError("metrics are down")

    hooks = Hooks(job_observed=[broken, lambda metadata, status: seen.append(metadata["name"])])
    with caplog.at_level(logging.ERROR):
        hooks.observed({"name": "flowers"}, {})
    assert seen == ["flowers"]
    assert "metrics are down" in caplog.text
