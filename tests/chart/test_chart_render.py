"""What `helm install` would create, for the defaults and the value sets users reach for first."""

from __future__ import annotations

import json
import re
from typing import Any

import helm_python as helm
import kubernetes_validate
import pytest
import yaml

from kubetune_operator import allowlist
from kubetune_operator.settings import OperatorSettings
from tests.support.chart_support import CHART_DIR, NAMESPACE, VALUE_SETS, Rendered, render
from tests.support.k8s_schema import KUBERNETES_VERSION
from tests.support.paths import REPO

PROMETHEUS_OPERATOR_KINDS = {"ServiceMonitor", "PrometheusRule"}


def _container(rendered: Rendered) -> dict[str, Any]:
    (container,) = rendered.one("Deployment")["spec"]["template"]["spec"]["containers"]
    return container


def _env(rendered: Rendered) -> dict[str, str]:
    return {item["name"]: item["value"] for item in _container(rendered)["env"]}


def _ports(rendered: Rendered) -> dict[str, int]:
    return {port["name"]: port["containerPort"] for port in _container(rendered)["ports"]}


def _check_prometheus_operator_object(obj: dict[str, Any]) -> None:
    """prometheus-operator's kinds are CRDs kubernetes-validate has no schema for: check their shape."""
    assert obj["apiVersion"] == "monitoring.coreos.com/v1"
    assert obj["metadata"]["name"] and obj["metadata"]["namespace"]
    spec = obj["spec"]
    if obj["kind"] == "ServiceMonitor":
        assert set(spec) <= {"jobLabel", "namespaceSelector", "selector", "endpoints"}
        assert spec["selector"]["matchLabels"]
        for endpoint in spec["endpoints"]:
            assert set(endpoint) <= {"port", "path", "scheme", "interval", "scrapeTimeout", "honorLabels"}
    else:
        assert spec["groups"]
        for group in spec["groups"]:
            assert group["name"] and group["rules"]
            for rule in group["rules"]:
                assert isinstance(rule["expr"], str | int)
                assert ("alert" in rule) != ("record" in rule)


@pytest.mark.parametrize("value_set", VALUE_SETS)
def test_every_rendered_object_is_valid_for_kubernetes(rendered: dict[str, Rendered], value_set: str) -> None:
    for obj in rendered[value_set].objects:
        if obj["kind"] in PROMETHEUS_OPERATOR_KINDS:
            _check_prometheus_operator_object(obj)
            continue
        # strict: unknown fields fail too, like a typo in a template.
        kubernetes_validate.validate(obj, KUBERNETES_VERSION, strict=True)


def test_default_install_is_the_operator_and_its_cluster_wide_permissions(rendered: dict[str, Rendered]) -> None:
    defaults = rendered["defaults"]
    assert defaults.kinds() == ["ClusterRole", "ClusterRoleBinding", "Deployment", "Service", "ServiceAccount"]
    for obj in defaults.objects:
        if obj["kind"] not in {"ClusterRole", "ClusterRoleBinding"}:
            assert obj["metadata"]["namespace"] == NAMESPACE


def test_operator_runs_once_with_probes_and_a_locked_down_container(rendered: dict[str, Rendered]) -> None:
    deployment = rendered["defaults"].one("Deployment")
    assert deployment["spec"]["replicas"] == 1
    assert deployment["spec"]["strategy"] == {"type": "Recreate"}
    pod = deployment["spec"]["template"]["spec"]
    container = _container(rendered["defaults"])
    ports = _ports(rendered["defaults"])

    assert container["command"] == ["python", "-m", "kubetune_operator"]
    assert "--standalone" in container["args"]
    assert f"--liveness=http://0.0.0.0:{ports['health']}/healthz" in container["args"]
    for probe in ("startupProbe", "livenessProbe", "readinessProbe"):
        assert container[probe]["httpGet"] == {"path": "/healthz", "port": "health"}

    pod_security = pod["securityContext"]
    security = container["securityContext"]
    assert pod_security["runAsNonRoot"] is True and pod_security["runAsUser"] > 0
    assert pod_security["seccompProfile"] == {"type": "RuntimeDefault"}
    assert security["runAsNonRoot"] is True and security["runAsUser"] > 0
    assert security["readOnlyRootFilesystem"] is True
    assert security["allowPrivilegeEscalation"] is False
    assert security["capabilities"] == {"drop": ["ALL"]}
    assert security["seccompProfile"] == {"type": "RuntimeDefault"}
    # A read-only root still leaves Python a writable /tmp.
    assert {"name": "tmp", "mountPath": "/tmp"} in container["volumeMounts"]
    assert {"name": "tmp", "emptyDir": {"sizeLimit": "64Mi"}} in pod["volumes"]
    assert container["resources"]["limits"]["memory"]


def test_operator_is_told_its_ports_images_and_progress_url(rendered: dict[str, Rendered]) -> None:
    env = _env(rendered["defaults"])
    ports = _ports(rendered["defaults"])
    service = rendered["defaults"].one("Service")
    service_ports = {port["name"]: port["port"] for port in service["spec"]["ports"]}

    assert env["KUBETUNE_METRICS_PORT"] == str(ports["metrics"])
    assert env["KUBETUNE_PROGRESS_PORT"] == str(ports["progress"])
    assert env["KUBETUNE_PROGRESS_URL"] == f"http://kubetune.{NAMESPACE}.svc:{service_ports['progress']}"
    assert env["KUBETUNE_TRAINER_IMAGE"] == "ghcr.io/kubetune/kubetune-trainer:0.1.0"
    assert env["KUBETUNE_TRAINER_IMAGE_PULL_POLICY"] == "IfNotPresent"
    assert env["KUBETUNE_LOG_LEVEL"] == "INFO"
    assert "KUBETUNE_NAMESPACES" not in env  # every namespace
    assert _container(rendered["defaults"])["image"] == "ghcr.io/kubetune/kubetune-operator:0.1.0"


def test_every_variable_the_chart_sets_is_one_the_operator_reads(rendered: dict[str, Rendered]) -> None:
    sources = "\n".join(path.read_text() for path in (REPO / "operator" / "kubetune_operator").rglob("*.py"))
    set_by_chart = {name for one in rendered.values() for name in _env(one)}
    unread = sorted(name for name in set_by_chart if f'"{name}"' not in sources)
    assert unread == [], f"the chart sets variables no operator code reads: {unread}"


def test_allow_lists_reach_the_operator_as_it_reads_them(rendered: dict[str, Rendered]) -> None:
    assert "KUBETUNE_ALLOWED_S3_ENDPOINTS" not in _env(rendered["defaults"])  # AWS S3 only
    settings = OperatorSettings.from_env(_env(rendered["locked-down"]))
    entries = settings.s3_endpoint_entries()
    assert allowlist.endpoint_refusal("http://minio.minio.svc.cluster.local:9000", entries) is None
    assert allowlist.endpoint_refusal("https://eu.storage.example.com", entries) is None
    assert allowlist.endpoint_refusal("http://169.254.169.254", entries) is not None
    registries = settings.allowed_image_registries
    assert allowlist.image_refusal("registry.example.com:5000/ml/trainer:2", settings.trainer_image, registries) is None
    assert allowlist.image_refusal("docker.io/someone/miner", settings.trainer_image, registries) is not None


def test_service_reaches_the_operator_pod_on_metrics_and_progress_only(rendered: dict[str, Rendered]) -> None:
    defaults = rendered["defaults"]
    service = defaults.one("Service")
    pod_labels = defaults.one("Deployment")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= pod_labels.items()
    assert defaults.one("Deployment")["spec"]["selector"]["matchLabels"] == service["spec"]["selector"]
    ports = _ports(defaults)
    assert {port["targetPort"] for port in service["spec"]["ports"]} == {"metrics", "progress"}
    for port in service["spec"]["ports"]:
        assert port["port"] == ports[port["targetPort"]]


def test_monitoring_objects_point_at_the_operator_and_ship_the_repo_files(rendered: dict[str, Rendered]) -> None:
    monitoring = rendered["monitoring"]
    service = monitoring.one("Service")

    monitor = monitoring.one("ServiceMonitor")
    assert monitor["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    assert monitor["spec"]["selector"]["matchLabels"].items() <= service["metadata"]["labels"].items()
    assert monitor["spec"]["namespaceSelector"] == {"matchNames": [NAMESPACE]}
    assert [endpoint["port"] for endpoint in monitor["spec"]["endpoints"]] == ["metrics"]
    # Per-job series keep the job's namespace label (the alerts and dashboard group by it).
    assert monitor["spec"]["endpoints"][0]["honorLabels"] is True
    # Prometheus' job label is the chart name, whatever the release is called: alerts can rely on it.
    assert service["metadata"]["labels"][monitor["spec"]["jobLabel"]] == "kubetune"

    rule = monitoring.one("PrometheusRule")
    assert rule["metadata"]["labels"]["release"] == "kube-prometheus-stack"
    shipped_rules = yaml.safe_load((CHART_DIR / "alerts" / "kubetune-rules.yaml").read_text())
    assert rule["spec"]["groups"] == shipped_rules["groups"]

    dashboard = monitoring.one("ConfigMap")
    assert dashboard["metadata"]["labels"]["grafana_dashboard"] == "1"
    assert dashboard["metadata"]["namespace"] == "monitoring"
    assert dashboard["metadata"]["annotations"] == {"grafana_folder": "Kubetune"}
    shipped_dashboard = json.loads((CHART_DIR / "dashboards" / "kubetune.json").read_text())
    assert json.loads(dashboard["data"]["kubetune.json"]) == shipped_dashboard

    assert "ServiceMonitor" in monitoring.notes and "dashboard" in monitoring.notes
    for kind in PROMETHEUS_OPERATOR_KINDS | {"ConfigMap"}:
        assert not rendered["defaults"].all(kind), f"{kind} is opt-in"


def test_namespaced_install_grants_only_the_listed_namespaces(rendered: dict[str, Rendered]) -> None:
    namespaced = rendered["namespaced"]
    assert not namespaced.all("ServiceAccount"), "serviceAccount.create=false uses the named one"
    assert namespaced.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "kubetune-operator"

    for name in ("kubetune", "kubetune-preflight-secrets"):  # the operator's rules, and its Secret reads
        roles = {r["metadata"]["namespace"]: r for r in namespaced.all("Role") if r["metadata"]["name"] == name}
        bindings = {
            b["metadata"]["namespace"]: b for b in namespaced.all("RoleBinding") if b["metadata"]["name"] == name
        }
        assert set(roles) == set(bindings) == {"team-a", "team-b"}
        for binding in bindings.values():
            subject = {"kind": "ServiceAccount", "name": "kubetune-operator", "namespace": NAMESPACE}
            assert binding["subjects"] == [subject]
            assert binding["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": name}
    assert len(namespaced.all("Role")) == 4

    cluster_rules = namespaced.one("ClusterRole")["rules"]
    cluster_resources = {resource for rule in cluster_rules for resource in rule["resources"]}
    assert cluster_resources == {"customresourcedefinitions", "tokenreviews", "namespaces"}
    env = _env(namespaced)
    assert env["KUBETUNE_NAMESPACES"] == "team-a,team-b"
    assert env["KUBETUNE_LOG_LEVEL"] == "DEBUG"
    # trainer.keepFailedHeads false (KubeRay 1.5 without its RayJobDeletionPolicy gate): no deletion rules.
    assert OperatorSettings.from_env(env).keep_failed_heads is False
    assert OperatorSettings.from_env(_env(rendered["defaults"])).keep_failed_heads is True
    assert "team-a, team-b" in namespaced.notes


def test_custom_images_and_scheduling_reach_the_pod_and_the_operator(rendered: dict[str, Rendered]) -> None:
    custom = rendered["custom-images"]
    values = VALUE_SETS["custom-images"]
    container = _container(custom)
    pod = custom.one("Deployment")["spec"]["template"]["spec"]
    assert container["image"] == "registry.example.com:5000/ml/kubetune-operator@sha256:" + "a" * 64
    assert container["imagePullPolicy"] == "Always"
    env = _env(custom)
    assert env["KUBETUNE_TRAINER_IMAGE"] == "registry.example.com:5000/ml/kubetune-trainer:0.1.0-cu128"
    assert env["KUBETUNE_PROGRESS_URL"] == "https://progress.kubetune.example.com"
    assert (env["KUBETUNE_RAY_VERSION"], env["KUBETUNE_HEAD_CPU"], env["KUBETUNE_HEAD_MEMORY"]) == (
        "2.61.0",
        "2",
        "8Gi",
    )
    assert pod["priorityClassName"] == "system-cluster-critical"
    assert pod["nodeSelector"] == values["operator"]["nodeSelector"]
    assert pod["tolerations"] == values["operator"]["tolerations"]
    assert pod["affinity"] == values["operator"]["affinity"]
    assert pod["imagePullSecrets"] == [{"name": "registry-credentials"}]
    assert container["resources"] == values["operator"]["resources"]


def test_notes_tell_the_next_commands(rendered: dict[str, Rendered]) -> None:
    notes = rendered["defaults"].notes
    assert "kubectl get crd rayjobs.ray.io" in notes
    assert f"kubectl -n {NAMESPACE} rollout status deployment/kubetune" in notes
    assert "get ftj -w" in notes
    (example,) = re.findall(r"kubectl apply -f (examples/[\w.-]+\.yaml)", notes)
    assert (REPO / example).exists(), example
    assert "docs/security.md" in notes and (REPO / "docs" / "security.md").exists()
    assert "reads no Secret" in notes and "operator.allowedS3Endpoints" in notes
    assert "may read Secrets, by name and for preflight, in: vision, default" in rendered["locked-down"].notes


def test_clashing_ports_are_refused_at_render_time(chart: helm.Chart) -> None:
    with pytest.raises(helm.HelmRenderError, match="must differ"):
        render(chart, {"operator": {"ports": {"health": 9090, "metrics": 9090, "progress": 8081}}})


def test_release_name_containing_the_chart_name_is_not_repeated(chart: helm.Chart) -> None:
    manifests = chart.render({}, name="team-kubetune", namespace="ops")
    deployment = yaml.safe_load(manifests["kubetune/templates/deployment.yaml"])
    assert deployment["metadata"]["name"] == "team-kubetune"


def test_rbac_can_be_left_to_the_cluster_admin(chart: helm.Chart) -> None:
    without = render(chart, {"rbac": {"create": False}})
    assert not {"ClusterRole", "ClusterRoleBinding", "Role", "RoleBinding"} & set(without.kinds())
    assert without.one("Deployment")["spec"]["template"]["spec"]["serviceAccountName"] == "kubetune"
