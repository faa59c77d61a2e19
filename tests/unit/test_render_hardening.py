"""`kubetune render` of every example, through the console script from the repository root, as users run it:
every pod meets the restricted Pod Security Standard with a read-only root filesystem, Ray's token
authentication is on, each job has its NetworkPolicy, and no secret value is printed.
"""

from __future__ import annotations

import copy
import json
import subprocess
import sys
from functools import cache
from pathlib import Path
from typing import Any

import kubernetes_validate
import pytest
import yaml
from kubernetes.utils import parse_quantity

from tests.support.k8s_schema import KUBERNETES_VERSION
from tests.support.paths import REPO
from tests.support.pod_security_standards import restricted_violations
from tests.support.rayjob_schema import assert_valid_rayjob

KUBETUNE = Path(sys.executable).with_name("kubetune")
EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
# What may hold a credential, by its name: such an env var must come from a Secret, never as a value.
CREDENTIAL_WORDS = ("KEY", "SECRET", "TOKEN", "PASSWORD")


@cache
def rendered(example: Path) -> tuple[dict[str, Any], ...]:
    done = subprocess.run(
        [str(KUBETUNE), "render", str(example.relative_to(REPO))],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert done.returncode == 0 and not done.stderr, done.stderr
    return tuple(doc for doc in yaml.safe_load_all(done.stdout) if doc)


def one(objs: tuple[dict[str, Any], ...], kind: str) -> dict[str, Any]:
    (found,) = [obj for obj in objs if obj["kind"] == kind]
    return found


def pod_templates(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return [cluster["headGroupSpec"]["template"], *(group["template"] for group in cluster["workerGroupSpecs"])]


def all_containers(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    return [c for t in pod_templates(rayjob) for c in t["spec"]["containers"] + t["spec"].get("initContainers", [])]


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_rendered_pod_is_restricted_with_a_read_only_root(example: Path) -> None:
    rayjob = one(rendered(example), "RayJob")
    assert_valid_rayjob(rayjob)  # KubeRay v1.7's schema (strict) and Kubernetes' own for the pod templates
    for template in pod_templates(rayjob):
        pod = template["spec"]
        assert restricted_violations(pod, template["metadata"].get("annotations")) == []
        volumes = {volume["name"]: volume for volume in pod["volumes"]}
        for container in pod["containers"]:
            assert container["securityContext"]["readOnlyRootFilesystem"] is True
            writable = {m["mountPath"]: volumes[m["name"]] for m in container["volumeMounts"] if not m.get("readOnly")}
            # Where Ray and the trainer write: emptyDirs all, never the image's filesystem.
            assert {"/tmp", "/tmp/ray", "/dev/shm"} <= set(writable)
            assert all("emptyDir" in volume for volume in writable.values())


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_rendered_worker_has_a_bounded_node_cache_and_asks_for_the_disk(example: Path) -> None:
    job = yaml.safe_load(example.read_text())
    cache_size = job["spec"].get("resources", {}).get("cacheSize", "20Gi")
    head, *workers = pod_templates(one(rendered(example), "RayJob"))
    head_env = {e["name"]: e.get("value") for e in head["spec"]["containers"][0]["env"]}
    # What the trainer keeps on the cache volume (stream mode's window included) stays within it.
    cache = json.loads(head_env["KUBETUNE_TRAINER_CONFIG"].replace("$$", "$"))["data"]["cache"]
    assert parse_quantity(cache["sizeLimit"]) <= parse_quantity(cache_size)
    for template in workers:
        (container,) = template["spec"]["containers"]
        env = {e["name"]: e.get("value") for e in container["env"]}
        mounts = {m["mountPath"]: m["name"] for m in container["volumeMounts"]}
        volumes = {v["name"]: v for v in template["spec"]["volumes"]}
        assert volumes[mounts[env["KUBETUNE_CACHE_DIR"]]]["emptyDir"] == {"sizeLimit": cache_size}
        # The disk asked for: the cache volume and 4Gi for /tmp and Ray's session dir.
        requested = parse_quantity(container["resources"]["requests"]["ephemeral-storage"])
        assert requested == parse_quantity(cache_size) + parse_quantity("4Gi")


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_rendered_job_runs_ray_with_token_auth_from_its_own_secret(example: Path) -> None:
    objs = rendered(example)
    rayjob, secret = one(objs, "RayJob"), one(objs, "Secret")
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {
        "mode": "token",
        "secretName": secret["metadata"]["name"],
    }
    for container in all_containers(rayjob):
        env = {e["name"]: e for e in container["env"]}
        assert env["RAY_AUTH_MODE"]["value"] == "token"
        token_ref = {"name": secret["metadata"]["name"], "key": "auth_token"}
        assert env["RAY_AUTH_TOKEN"] == {"name": "RAY_AUTH_TOKEN", "valueFrom": {"secretKeyRef": token_ref}}
    # The token is the operator's to draw: render leaves it out, and says so.
    assert "data" not in secret and "stringData" not in secret
    assert "the operator generates auth_token" in secret["metadata"]["annotations"]["kubetune.dev/note"]
    kubernetes_validate.validate(secret, KUBERNETES_VERSION, strict=True)


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_every_rendered_job_has_a_network_policy_around_its_pods(example: Path) -> None:
    objs = rendered(example)
    policy, rayjob = one(objs, "NetworkPolicy"), one(objs, "RayJob")
    kubernetes_validate.validate(policy, KUBERNETES_VERSION, strict=True)
    selected = policy["spec"]["podSelector"]["matchLabels"]
    for template in pod_templates(rayjob):
        assert selected.items() <= template["metadata"]["labels"].items()
    own, kuberay = policy["spec"]["ingress"]
    assert own == {"from": [{"podSelector": {"matchLabels": selected}}]}  # the job's own pods, on any port
    assert kuberay["ports"] == [{"protocol": "TCP", "port": 8265}]  # KubeRay's operator: the dashboard only
    assert policy["spec"]["policyTypes"] == ["Ingress"]


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_nothing_rendered_holds_a_secret_value(example: Path) -> None:
    objs = rendered(example)
    for obj in objs:
        assert not {"data", "stringData"} & set(obj), obj["kind"]
    for container in all_containers(one(objs, "RayJob")):
        for env in container["env"]:
            if any(word in env["name"] for word in CREDENTIAL_WORDS):
                assert set(env) == {"name", "valueFrom"}, env


@pytest.mark.parametrize("example", EXAMPLES, ids=[p.stem for p in EXAMPLES])
def test_only_the_head_mounts_the_progress_token_and_no_pod_the_api_token(example: Path) -> None:
    """Only the driver (the head's Ray container) reports progress, so only it mounts the projected token
    for the job's audience; workers mount no token at all (data from a bucket runs there)."""
    head, *workers = pod_templates(one(rendered(example), "RayJob"))
    for template in workers:
        pod = template["spec"]
        assert pod["automountServiceAccountToken"] is False
        assert not [v for v in pod["volumes"] if "projected" in v or "secret" in v]
    pod = head["spec"]
    assert pod["automountServiceAccountToken"] is False
    tokens = {
        v["name"]: source["serviceAccountToken"]
        for v in pod["volumes"]
        for source in v.get("projected", {}).get("sources", [])
        if "serviceAccountToken" in source
    }
    progress = {name for name, token in tokens.items() if token.get("audience", "").startswith("kubetune.dev/")}
    assert len(progress) == 1
    (ray,) = [c for c in pod["containers"] if c["name"] == "ray-head"]
    for container in pod["containers"] + pod.get("initContainers", []):
        mounted = {m["name"] for m in container.get("volumeMounts", [])}
        assert (progress <= mounted) == (container is ray), container["name"]


def test_the_checker_refuses_what_the_restricted_standard_refuses() -> None:
    """The checker can fail: pods as they were built before the restricted profile, and single breaches."""
    good = pod_templates(one(rendered(EXAMPLES[0]), "RayJob"))[1]["spec"]
    assert restricted_violations(good) == []
    bare = copy.deepcopy(good)
    bare.pop("securityContext")
    bare["containers"][0].pop("securityContext")
    assert {line.split(":")[0] for line in restricted_violations(bare)} == {
        "spec.containers[0].securityContext.allowPrivilegeEscalation",
        "spec.containers[0].securityContext.runAsNonRoot",
        "spec.containers[0].securityContext.seccompProfile.type",
        "spec.containers[0].securityContext.capabilities.drop",
    }
    breaches: list[tuple[str, Any]] = [
        ("hostNetwork", True),
        ("volumes", [*good["volumes"], {"name": "h", "hostPath": {"path": "/"}}]),
        ("securityContext", {**good["securityContext"], "runAsUser": 0}),
        ("securityContext", {**good["securityContext"], "seccompProfile": {"type": "Unconfined"}}),
        ("initContainers", [{"name": "setup", "image": "busybox"}]),
    ]
    for field, value in breaches:
        pod = {**copy.deepcopy(good), field: value}
        assert restricted_violations(pod), field
    escalating = copy.deepcopy(good)
    escalating["containers"][0]["securityContext"]["capabilities"] = {"drop": ["ALL"], "add": ["SYS_ADMIN"]}
    assert restricted_violations(escalating)
