"""The chart tests' shared pieces: where things are, the value sets, and offline rendering with Helm's
Go SDK (helm-python-sdk). A module of its own, not conftest.py, so test modules can import it by a name
no other test directory uses."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

import helm_python as helm
import yaml

from tests.support.paths import REPO

CHART_DIR = REPO / "charts" / "kubetune"
RELEASE = "kubetune"
NAMESPACE = "kubetune-system"

# The value sets the chart is tested with, as a user would pass them with -f / --set.
VALUE_SETS: dict[str, dict[str, Any]] = {
    "defaults": {},
    "monitoring": {
        "metrics": {"serviceMonitor": {"enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}}},
        "prometheusRule": {"enabled": True, "additionalLabels": {"release": "kube-prometheus-stack"}},
        "grafanaDashboard": {
            "enabled": True,
            "namespace": "monitoring",
            "annotations": {"grafana_folder": "Kubetune"},
        },
    },
    "namespaced": {
        "operator": {"watchNamespaces": ["team-a", "team-b"], "logLevel": "DEBUG"},
        "serviceAccount": {"create": False, "name": "kubetune-operator"},
        "trainer": {"networkPolicy": {"kuberayNamespace": "kuberay-system"}, "keepFailedHeads": False},
    },
    "locked-down": {
        "operator": {
            "allowedS3Endpoints": ["http://minio.minio.svc.cluster.local:9000", "*.storage.example.com"],
            "allowedImageRegistries": ["registry.example.com:5000/ml"],
        },
        "rbac": {"preflightSecrets": {"namespaces": ["vision", "default"]}},
    },
    "secrets-cluster-wide": {"rbac": {"preflightSecrets": {"clusterWide": True}}},
    "custom-images": {
        "operator": {
            "image": {
                "repository": "registry.example.com:5000/ml/kubetune-operator",
                "digest": "sha256:" + "a" * 64,
                "pullPolicy": "Always",
            },
            "priorityClassName": "system-cluster-critical",
            "nodeSelector": {"kubernetes.io/os": "linux"},
            "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ops", "effect": "NoSchedule"}],
            "affinity": {
                "nodeAffinity": {
                    "requiredDuringSchedulingIgnoredDuringExecution": {
                        "nodeSelectorTerms": [
                            {"matchExpressions": [{"key": "node-role", "operator": "In", "values": ["ops"]}]}
                        ]
                    }
                }
            },
            "resources": {"requests": {"cpu": "250m", "memory": "300Mi"}, "limits": {"memory": "1Gi"}},
            "progressURL": "https://progress.kubetune.example.com/",
        },
        "trainer": {
            "image": {"repository": "registry.example.com:5000/ml/kubetune-trainer", "tag": "0.1.0-cu128"},
            "rayVersion": "2.61.0",
            "head": {"cpu": 2, "memory": "8Gi"},
        },
        "imagePullSecrets": [{"name": "registry-credentials"}],
    },
}


@dataclass
class Rendered:
    """One rendering of the chart: its objects (by kind and name) and its NOTES.txt."""

    objects: list[dict[str, Any]]
    notes: str
    _by_key: dict[tuple[str, str, str | None], dict[str, Any]] = field(default_factory=dict, init=False)

    def __post_init__(self) -> None:
        for obj in self.objects:
            meta = obj["metadata"]
            self._by_key[(obj["kind"], meta["name"], meta.get("namespace"))] = obj

    def kinds(self) -> list[str]:
        return sorted(obj["kind"] for obj in self.objects)

    def one(self, kind: str) -> dict[str, Any]:
        found = [obj for obj in self.objects if obj["kind"] == kind]
        assert len(found) == 1, f"expected one {kind}, got {len(found)}"
        return found[0]

    def all(self, kind: str) -> list[dict[str, Any]]:
        return [obj for obj in self.objects if obj["kind"] == kind]


def render(chart: helm.Chart, values: dict[str, Any], *, namespace: str = NAMESPACE) -> Rendered:
    manifests = chart.render(values, name=RELEASE, namespace=namespace, is_install=True)
    objects: list[dict[str, Any]] = []
    notes = ""
    for path, text in sorted(manifests.items()):
        if path.endswith("NOTES.txt"):
            notes = text
            continue
        objects.extend(doc for doc in yaml.safe_load_all(text) if doc)
    return Rendered(objects=objects, notes=notes)


Grant = tuple[str, str, str]  # (apiGroup, resource[/subresource], verb)


def grants(roles: list[dict[str, Any]]) -> set[Grant]:
    """Every (apiGroup, resource, verb) the rules of `roles` allow."""
    return {
        (group, resource, verb)
        for role in roles
        for rule in role["rules"]
        for group in rule["apiGroups"]
        for resource in rule["resources"]
        for verb in rule["verbs"]
    }
