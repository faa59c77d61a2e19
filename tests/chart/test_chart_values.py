"""`helm lint --strict` is clean, and values.schema.json turns typos and wrong types into install errors."""

from __future__ import annotations

import json
from typing import Any

import helm_python as helm
import pytest

from tests.support import k8s_schema
from tests.support.chart_support import CHART_DIR, NAMESPACE, VALUE_SETS
from tests.support.k8s_schema import KUBERNETES_VERSION

WARNING = 2  # helm lint severities: 1 info, 2 warning, 3 error


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_strict_lint_is_clean(value_set: str) -> None:
    report = helm.lint(
        CHART_DIR, VALUE_SETS[value_set], strict=True, namespace=NAMESPACE, kube_version=f"v{KUBERNETES_VERSION}"
    )
    findings = [message for message in report["messages"] if message["severity"] >= WARNING]
    assert findings == [] and report["errors"] == []


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_documented_value_sets_pass_the_schema(chart: helm.Chart, value_set: str) -> None:
    chart.validate_schema(VALUE_SETS[value_set])


BAD_VALUES: list[tuple[str, dict[str, Any], str]] = [
    ("typo at the top", {"grafanaDashbaord": {"enabled": True}}, "additional properties 'grafanaDashbaord'"),
    ("typo in a section", {"operator": {"watchNamespace": ["team-a"]}}, "additional properties 'watchNamespace'"),
    (
        "typo inside a Kubernetes type",
        {"operator": {"affinity": {"nodeAffinity": {"requiredDuringScheduling": {}}}}},
        "additional properties 'requiredDuringScheduling'",
    ),
    ("typo in a security context", {"operator": {"securityContext": {"runAsNonroot": True}}}, "'runAsNonroot'"),
    ("port as a string", {"operator": {"ports": {"metrics": "9090"}}}, "/operator/ports/metrics"),
    ("privileged port", {"operator": {"ports": {"progress": 443}}}, "/operator/ports/progress"),
    ("switch as a string", {"metrics": {"serviceMonitor": {"enabled": "yes"}}}, "/metrics/serviceMonitor/enabled"),
    ("unknown pull policy", {"trainer": {"image": {"pullPolicy": "Sometimes"}}}, "/trainer/image/pullPolicy"),
    ("unknown log level", {"operator": {"logLevel": "verbose"}}, "/operator/logLevel"),
    ("namespace that cannot exist", {"operator": {"watchNamespaces": ["Team_A"]}}, "/operator/watchNamespaces/0"),
    ("namespaces as a string", {"operator": {"watchNamespaces": "team-a,team-b"}}, "/operator/watchNamespaces"),
    ("digest without algorithm", {"operator": {"image": {"digest": "abc123"}}}, "/operator/image/digest"),
    ("no ServiceAccount to run as", {"serviceAccount": {"create": False}}, "/serviceAccount/name"),
    ("progress URL that is not one", {"operator": {"progressURL": "kubetune:8081"}}, "/operator/progressURL"),
    (
        "S3 endpoint with credentials",
        {"operator": {"allowedS3Endpoints": ["http://admin:secret@minio:9000"]}},
        "/operator/allowedS3Endpoints/0",
    ),
    ("image registry with a tag", {"operator": {"allowedImageRegistries": ["ghcr.io/x:1"]}}, "allowedImageRegistries"),
    ("secret namespaces as a string", {"rbac": {"preflightSecrets": {"namespaces": "a,b"}}}, "/rbac/preflightSecrets"),
]


@pytest.mark.parametrize(("values", "fragment"), [case[1:] for case in BAD_VALUES], ids=[c[0] for c in BAD_VALUES])
def test_bad_values_fail_before_anything_is_created(chart: helm.Chart, values: dict[str, Any], fragment: str) -> None:
    with pytest.raises(helm.HelmValuesError, match="schema") as raised:
        chart.render(values, name="kubetune", namespace=NAMESPACE)
    assert fragment in str(raised.value)


def test_every_object_in_the_schema_forbids_unknown_keys() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    open_maps = {"global", "additionalLabels", "annotations", "podAnnotations", "podLabels", "nodeSelector"}

    def walk(node: Any, path: str) -> None:
        if not isinstance(node, dict):
            if isinstance(node, list):
                for index, item in enumerate(node):
                    walk(item, f"{path}/{index}")
            return
        if "properties" in node:
            assert node.get("additionalProperties") is False, f"{path} accepts unknown keys"
        for key, value in node.items():
            if key not in {"if", "then"}:  # conditions on an object, not objects themselves
                walk(value, f"{path}/{key}")

    walk(schema, "")
    # The maps whose keys are the user's own (labels, annotations, node labels) are the only open ones.
    for name, prop in {**schema["properties"], **schema["properties"]["operator"]["properties"]}.items():
        if prop.get("$ref") == "#/$defs/stringMap" or name == "global":
            assert name in open_maps


def test_kubernetes_types_in_the_schema_are_kubernetes_own() -> None:
    schema = json.loads((CHART_DIR / "values.schema.json").read_text())
    assert schema == k8s_schema.with_kubernetes_defs(schema), (
        "values.schema.json's Kubernetes $defs are stale: run .venv/bin/python -m tests.support.k8s_schema"
    )
