"""spec.podTemplate and the job's labels in the RayJob: every field lands where a platform expects it, the
result is a RayJob KubeRay v1.7 accepts, and the operator's own fields (restricted pods, its volumes, env
and containers) stay as they were."""

from __future__ import annotations

import copy
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from pydantic import ValidationError

from kubetune_operator.builders import build_rayjob, manifests
from kubetune_operator.incoming import receive
from kubetune_operator.messages import format_validation_error
from kubetune_operator.pod_security import container_security_context, pod_security_context
from kubetune_operator.progress import reporting_account
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.spec import FineTuneJob
from tests.support.paths import REPO
from tests.support.pod_security_standards import restricted_violations
from tests.support.rayjob_schema import assert_valid_rayjob

SETTINGS = OperatorSettings(trainer_image="registry.example/kubetune-trainer:1.2.3")
UID = "3f1c2d4e-0000-4000-8000-000000000001"
GPU_TAINT = {"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}
CPU_POOL = {"pool": "cpu"}
AFFINITY = {
    "nodeAffinity": {
        "requiredDuringSchedulingIgnoredDuringExecution": {
            "nodeSelectorTerms": [{"matchExpressions": [{"key": "zone", "operator": "In", "values": ["a", "b"]}]}]
        }
    }
}
SPREAD = {"maxSkew": 1, "topologyKey": "kubernetes.io/hostname", "whenUnsatisfiable": "ScheduleAnyway"}
# Every field podTemplate accepts, in the common fragment and the head's and workers'.
FULL_TEMPLATE: dict[str, Any] = {
    "metadata": {"labels": {"team": "vision"}, "annotations": {"example.com/owner": "ml-platform"}},
    "spec": {
        "imagePullSecrets": [{"name": "registry-pull"}],
        "serviceAccountName": "vision-s3",
        "affinity": AFFINITY,
        "tolerations": [{"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}],
        "nodeSelector": {"kubernetes.io/os": "linux"},
        "topologySpreadConstraints": [SPREAD],
        "runtimeClassName": "nvidia",
        "schedulerName": "volcano",
        "priorityClassName": "ml-high",
        "volumes": [{"name": "private-ca", "configMap": {"name": "private-ca"}}],
        "securityContext": {
            "supplementalGroups": [2000],
            "fsGroupChangePolicy": "OnRootMismatch",
            "seLinuxOptions": {"type": "container_t", "level": "s0:c1,c2"},
        },
    },
    "container": {
        "env": [
            {"name": "HTTPS_PROXY", "value": "http://proxy.corp:3128"},
            {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}},
        ],
        "envFrom": [{"configMapRef": {"name": "proxy-settings"}, "prefix": "CORP_"}],
        "volumeMounts": [{"name": "private-ca", "mountPath": "/etc/ssl/private-ca", "readOnly": True}],
    },
    "head": {"spec": {"nodeSelector": CPU_POOL}, "metadata": {"labels": {"role": "driver"}}},
    "workers": {
        "spec": {
            "tolerations": [GPU_TAINT],
            "volumes": [{"name": "datasets", "persistentVolumeClaim": {"claimName": "datasets", "readOnly": True}}],
        },
        "container": {
            "env": [{"name": "HTTPS_PROXY", "value": "http://gpu-proxy.corp:3128"}],
            "volumeMounts": [{"name": "datasets", "mountPath": "/mnt/datasets", "readOnly": True}],
        },
    },
}


def manifest(pod_template: dict[str, Any], **metadata: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": "flowers", "namespace": "vision", "uid": UID, **metadata},
        "spec": {
            "model": {"architecture": "resnet18", "checkpoint": "s3://models/base/resnet18.safetensors"},
            "data": {"train": "s3://datasets/flowers/train/"},
            "output": {"path": "s3://runs/flowers/"},
            "resources": {"workers": 2, "nodeSelector": {"gpu": "h100"}},
            "podTemplate": pod_template,
        },
    }


def pods(rayjob: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]


@pytest.fixture(scope="module")
def full() -> dict[str, Any]:
    return build_rayjob(FineTuneJob.from_body(manifest(FULL_TEMPLATE)), SETTINGS)


def test_the_full_template_is_a_rayjob_kuberay_accepts(full: dict[str, Any]) -> None:
    assert_valid_rayjob(full)


def test_every_pod_field_reaches_head_and_workers(full: dict[str, Any]) -> None:
    for pod in pods(full):
        spec = pod["spec"]
        assert spec["imagePullSecrets"] == [{"name": "registry-pull"}]
        assert spec["serviceAccountName"] == "vision-s3"
        assert spec["affinity"] == AFFINITY
        assert spec["topologySpreadConstraints"] == [SPREAD]
        assert (spec["runtimeClassName"], spec["schedulerName"], spec["priorityClassName"]) == (
            "nvidia",
            "volcano",
            "ml-high",
        )
        assert {"name": "private-ca", "configMap": {"name": "private-ca"}} in spec["volumes"]
        assert pod["metadata"]["annotations"] == {"example.com/owner": "ml-platform"}
        assert pod["metadata"]["labels"]["team"] == "vision"
        container = spec["containers"][0]
        assert container["envFrom"] == [{"configMapRef": {"name": "proxy-settings"}, "prefix": "CORP_"}]
        assert {"name": "private-ca", "mountPath": "/etc/ssl/private-ca", "readOnly": True} in container["volumeMounts"]
        assert {"name": "POD_IP", "valueFrom": {"fieldRef": {"fieldPath": "status.podIP"}}} in container["env"]


def test_the_head_gets_scheduling_too_and_each_role_its_own(full: dict[str, Any]) -> None:
    head, workers = pods(full)
    dedicated = {"key": "dedicated", "operator": "Equal", "value": "ml", "effect": "NoSchedule"}
    assert head["spec"]["tolerations"] == [dedicated]
    assert head["spec"]["nodeSelector"] == {"kubernetes.io/os": "linux", "pool": "cpu"}
    assert head["metadata"]["labels"]["role"] == "driver" and "role" not in workers["metadata"]["labels"]
    # Workers: spec.resources' selector, then the common fragment's, then their own.
    assert workers["spec"]["tolerations"] == [dedicated, GPU_TAINT]
    assert workers["spec"]["nodeSelector"] == {"gpu": "h100", "kubernetes.io/os": "linux"}
    assert {"name": "datasets", "mountPath": "/mnt/datasets", "readOnly": True} in workers["spec"]["containers"][0][
        "volumeMounts"
    ]
    assert "datasets" not in [v["name"] for v in head["spec"]["volumes"]]
    proxy = {e["name"]: e.get("value") for e in workers["spec"]["containers"][0]["env"]}["HTTPS_PROXY"]
    assert proxy == "http://gpu-proxy.corp:3128"  # the workers' value wins over the common one


def test_the_operators_fields_stay_as_they_were(full: dict[str, Any]) -> None:
    plain = build_rayjob(FineTuneJob.from_body(manifest({})), SETTINGS)
    for merged_pod, plain_pod in zip(pods(full), pods(plain), strict=True):
        spec, before = merged_pod["spec"], plain_pod["spec"]
        assert restricted_violations(spec) == []
        context = spec["securityContext"]
        assert {k: context[k] for k in pod_security_context()} == pod_security_context()
        assert context["supplementalGroups"] == [2000]
        container, plain_container = spec["containers"][0], before["containers"][0]
        assert container["securityContext"] == container_security_context()
        for field in ("image", "resources", "name", "imagePullPolicy"):
            assert container[field] == plain_container[field]
        assert container["env"][: len(plain_container["env"])] == plain_container["env"]
        assert container["volumeMounts"][: len(plain_container["volumeMounts"])] == plain_container["volumeMounts"]
        assert spec["volumes"][: len(before["volumes"])] == before["volumes"]
        assert spec["automountServiceAccountToken"] is False
        for key, value in plain_pod["metadata"]["labels"].items():
            assert merged_pod["metadata"]["labels"][key] == value


def test_job_labels_reach_the_rayjob_and_pods_without_bookkeeping() -> None:
    labels = {
        "cost-center": "cv-42",
        "app.kubernetes.io/managed-by": "Helm",
        "helm.sh/chart": "jobs-1.0",
        "kubetune.dev/job": "spoofed",
    }
    rayjob = build_rayjob(FineTuneJob.from_body(manifest({}, labels=labels)), SETTINGS)
    assert rayjob["metadata"]["labels"]["cost-center"] == "cv-42"
    assert rayjob["metadata"]["labels"]["app.kubernetes.io/managed-by"] == "kubetune"
    for pod in pods(rayjob):
        pod_labels = pod["metadata"]["labels"]
        assert pod_labels["cost-center"] == "cv-42"
        assert "helm.sh/chart" not in pod_labels
        assert pod_labels["kubetune.dev/job"] == "flowers"
        assert pod_labels["kubetune.dev/job-name"] == "flowers"
        assert pod_labels["kubetune.dev/job-uid"] == UID


def test_render_has_no_uid_yet_and_labels_the_name() -> None:
    job = FineTuneJob.from_body(manifest({}))
    job.metadata.uid = None
    (rayjob,) = [m for m in manifests([job], SETTINGS) if m["kind"] == "RayJob"]
    for pod in pods(rayjob):
        assert pod["metadata"]["labels"]["kubetune.dev/job-name"] == "flowers"
        assert "kubetune.dev/job-uid" not in pod["metadata"]["labels"]


def test_progress_is_accepted_from_the_heads_service_account() -> None:
    template = {"spec": {"serviceAccountName": "vision-s3"}, "head": {"spec": {"serviceAccountName": "driver"}}}
    assert reporting_account(receive(manifest(template)), "kubetune-trainer") == "driver"
    assert (
        reporting_account(receive(manifest({"spec": {"serviceAccountName": "vision-s3"}})), "kubetune-trainer")
        == "vision-s3"
    )
    assert reporting_account(receive(manifest({})), "kubetune-trainer") == "kubetune-trainer"


def refusal(pod_template: dict[str, Any]) -> list[str]:
    with pytest.raises(ValidationError) as caught:
        FineTuneJob.from_body(manifest(pod_template))
    return format_validation_error(caught.value, "job.yaml")


@pytest.mark.parametrize(
    ("pod_template", "field"),
    [
        (
            {"spec": {"volumes": [{"name": "host", "hostPath": {"path": "/"}}]}},
            "spec.podTemplate.spec.volumes[0].hostPath",
        ),
        ({"spec": {"volumes": [{"name": "dshm", "emptyDir": {}}]}}, "spec.podTemplate.spec.volumes[0].name"),
        (
            {"spec": {"volumes": [{"name": "two", "emptyDir": {}, "secret": {"secretName": "s"}}]}},
            "spec.podTemplate.spec.volumes[0]: needs exactly one source",
        ),
        ({"spec": {"securityContext": {"privileged": True}}}, "spec.podTemplate.spec.securityContext.privileged"),
        (
            {"spec": {"securityContext": {"seccompProfile": {"type": "Unconfined"}}}},
            "spec.podTemplate.spec.securityContext.seccompProfile",
        ),
        (
            {"spec": {"securityContext": {"seLinuxOptions": {"type": "spc_t"}}}},
            "spec.podTemplate.spec.securityContext.seLinuxOptions.type",
        ),
        ({"spec": {"automountServiceAccountToken": True}}, "spec.podTemplate.spec.automountServiceAccountToken"),
        ({"container": {"securityContext": {"runAsUser": 0}}}, "spec.podTemplate.container.securityContext"),
        (
            {"container": {"env": [{"name": "AWS_SECRET_ACCESS_KEY", "value": "x"}]}},
            "spec.podTemplate.container.env[0].name",
        ),
        (
            {"container": {"env": [{"name": "KUBETUNE_ANYTHING", "value": "x"}]}},
            "spec.podTemplate.container.env[0].name",
        ),
        (
            {"container": {"volumeMounts": [{"name": "x", "mountPath": "/"}]}},
            "spec.podTemplate.container.volumeMounts[0].mountPath",
        ),
        (
            {"container": {"volumeMounts": [{"name": "x", "mountPath": "/var/run/secrets"}]}},
            "spec.podTemplate.container.volumeMounts[0].mountPath",
        ),
        (
            {"workers": {"metadata": {"labels": {"ray.io/node-type": "head"}}}},
            "spec.podTemplate.workers.metadata.labels",
        ),
        (
            {"head": {"metadata": {"annotations": {"kubetune.dev/spec-digest": "x"}}}},
            "spec.podTemplate.head.metadata.annotations",
        ),
    ],
)
def test_each_refused_field_is_named(pod_template: dict[str, Any], field: str) -> None:
    lines = refusal(pod_template)
    assert any(line.startswith(f"job.yaml: {field}") for line in lines), lines


def test_a_merge_keeps_the_operators_volumes_and_env_out_of_reach() -> None:
    template = copy.deepcopy(FULL_TEMPLATE)
    template["workers"]["spec"]["volumes"].append({"name": "private-ca", "secret": {"secretName": "ca"}})
    assert any(
        "spec.podTemplate.spec.volumes: private-ca defined twice in the workers pods" in line
        for line in refusal(template)
    )


POD_TEMPLATE_CORPUS = sorted((REPO / "tests" / "fixtures" / "invalid").glob("pod-template-*.yaml"))


def test_the_console_script_names_each_refused_field_from_the_repo_root() -> None:
    kubetune = Path(sys.executable).with_name("kubetune")
    relative = [str(p.relative_to(REPO)) for p in POD_TEMPLATE_CORPUS]
    done = subprocess.run([str(kubetune), "validate", *relative], cwd=REPO, capture_output=True, text=True, timeout=120)
    assert done.returncode == 1
    for path in relative:
        expect = (REPO / path).read_text().splitlines()[0].removeprefix("# expect: ")
        assert any(line.startswith(path + ":") and f": {expect}" in line for line in done.stdout.splitlines()), (
            path,
            done.stdout,
        )


def test_render_of_the_production_example_shows_each_platform_setting() -> None:
    kubetune = Path(sys.executable).with_name("kubetune")
    done = subprocess.run(
        [str(kubetune), "render", "examples/production-cluster.yaml"],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0, done.stderr
    (rayjob,) = [d for d in yaml.safe_load_all(done.stdout) if d["kind"] == "RayJob"]
    assert_valid_rayjob(rayjob)
    head, workers = pods(rayjob)
    assert rayjob["metadata"]["labels"]["cost-center"] == "cv-4711"
    for pod in (head, workers):
        assert pod["spec"]["imagePullSecrets"] == [{"name": "acme-registry"}]
        assert pod["spec"]["serviceAccountName"] == "vision-s3-reader"
        assert pod["metadata"]["labels"]["team"] == "vision"
        assert "kubetune-ca" in [v["name"] for v in pod["spec"]["volumes"]]
        assert "AWS_CA_BUNDLE" in [e["name"] for e in pod["spec"]["containers"][0]["env"]]
    assert head["spec"]["nodeSelector"] == {"node.acme.io/pool": "cpu"}
    assert workers["spec"]["tolerations"][0]["key"] == "nvidia.com/gpu"
