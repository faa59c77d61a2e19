"""examples/production-cluster.yaml launched by the operator (kmock): the RayJob carries the pull secret,
the workload-identity ServiceAccount, the head on CPU nodes, the workers on tainted GPU nodes, the CA
bundle and the labels, KubeRay's schema accepts it, and the status says why preflight was skipped. And a
caBundle is read by preflight, which fails the job when it is missing."""

from __future__ import annotations

import dataclasses
from pathlib import Path
from typing import Any

import certifi
import pytest
import yaml

from kubetune_operator.builders import build_rayjob
from kubetune_operator.pod_names import CA_DIR, CA_VOLUME
from kubetune_operator.spec import FineTuneJob
from tests.support.operator_harness import CONFIGMAPS, FAST_SETTINGS, OperatorHarness, finetunejob, running_operator
from tests.support.paths import REPO
from tests.support.rayjob_schema import assert_valid_rayjob
from tests.support.s3_world import ACCESS_KEY, SECRET_KEY, S3World

pytestmark = pytest.mark.asyncio

EXAMPLE = REPO / "examples" / "production-cluster.yaml"
NS = "ml-training"


def pod_specs(rayjob: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    cluster = rayjob["spec"]["rayClusterSpec"]
    return cluster["headGroupSpec"]["template"], cluster["workerGroupSpecs"][0]["template"]


# The example's S3 endpoint, allowed as a cluster admin would (operator.allowedS3Endpoints).
SETTINGS = dataclasses.replace(
    FAST_SETTINGS, allowed_s3_endpoints=(*FAST_SETTINGS.allowed_s3_endpoints, "https://s3.storage.acme.internal")
)


async def test_the_production_example_launches_fitted_to_the_cluster() -> None:
    async with running_operator(SETTINGS) as op:
        await check_the_example(op)


async def check_the_example(op: OperatorHarness) -> None:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    await op.create_job(manifest, NS)
    rayjob = await op.wait_for(lambda: op.rayjob(NS, "retail-convnext"), what="the example's RayJob")
    job = op.job(NS, "retail-convnext")
    assert job is not None
    assert_valid_rayjob(rayjob)
    assert rayjob["spec"] == build_rayjob(FineTuneJob.from_body(job), SETTINGS)["spec"]
    assert rayjob["metadata"]["labels"]["cost-center"] == "cv-4711"

    head, workers = pod_specs(rayjob)
    for pod in (head, workers):
        spec, labels = pod["spec"], pod["metadata"]["labels"]
        assert spec["imagePullSecrets"] == [{"name": "acme-registry"}]
        assert spec["serviceAccountName"] == "vision-s3-reader"
        assert (labels["team"], labels["app.kubernetes.io/part-of"]) == ("vision", "retail-search")
        assert labels["kubetune.dev/job-uid"] == job["metadata"]["uid"]
        assert {
            "name": CA_VOLUME,
            "configMap": {"name": "acme-root-ca", "items": [{"key": "ca.crt", "path": "ca.crt"}]},
        } in spec["volumes"]
        (container,) = spec["containers"]
        assert {"name": "AWS_CA_BUNDLE", "value": f"{CA_DIR}/ca.crt"} in container["env"]
        assert not [e for e in container["env"] if e["name"].startswith("AWS_ACCESS")]  # no static keys
    assert head["spec"]["nodeSelector"] == {"node.acme.io/pool": "cpu"} and "tolerations" not in head["spec"]
    assert workers["spec"]["nodeSelector"] == {"node.acme.io/pool": "gpu-l4"}
    assert workers["spec"]["tolerations"] == [{"key": "nvidia.com/gpu", "operator": "Exists", "effect": "NoSchedule"}]
    # No GPUs within an hour: the job fails saying so; a failed run's head stays 8 h, its workers go at once.
    assert rayjob["spec"]["preRunningDeadlineSeconds"] == 3600
    kept = {
        (r["condition"].get("jobStatus"), r["policy"]): r["condition"]["ttlSeconds"] for r in deletion_rules(rayjob)
    }
    assert (kept[("FAILED", "DeleteWorkers")], kept[("FAILED", "DeleteCluster")]) == (0, 8 * 3600)

    preflight = await op.wait_for(lambda: preflight_of(op, NS, "retail-convnext"), what="status.preflight")
    assert (
        preflight.startswith("Skipped: spec.storage.credentialsSecret is not set") and "vision-s3-reader" in preflight
    )


def deletion_rules(rayjob: dict[str, Any]) -> list[dict[str, Any]]:
    rules: list[dict[str, Any]] = rayjob["spec"]["deletionStrategy"]["deletionRules"]
    return rules


def preflight_of(op: OperatorHarness, namespace: str, name: str) -> str | None:
    found: str | None = ((op.job(namespace, name) or {}).get("status") or {}).get("preflight")
    return found


async def preflighted(op: OperatorHarness, s3: S3World, name: str) -> None:
    await op.create_secret(
        "default", "s3-creds", {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    )
    manifest = finetunejob(name, uris=s3.seed(), endpoint=s3.endpoint, credentials_secret="s3-creds")
    manifest["spec"]["storage"]["caBundle"] = {"configMap": "private-ca"}
    await op.create_job(manifest)


async def test_preflight_fails_a_job_whose_ca_bundle_is_missing(op: OperatorHarness, s3: S3World) -> None:
    await preflighted(op, s3, "no-ca")
    job = await op.wait_for_phase("default", "no-ca", "Failed")
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == "CABundleNotFound"
    assert "spec.storage.caBundle: key ca.crt of ConfigMap default/private-ca is missing" in failed["message"]
    assert op.rayjob("default", "no-ca") is None


async def test_preflight_reads_the_ca_bundle_and_launches(op: OperatorHarness, s3: S3World) -> None:
    # moto serves plain HTTP, so the bundle is not put to use here; that it is read and passed is.
    config_map = {
        "apiVersion": "v1",
        "kind": "ConfigMap",
        "metadata": {"name": "private-ca"},
        "data": {"ca.crt": Path(certifi.where()).read_text()},
    }
    await op.create(CONFIGMAPS, config_map)
    await preflighted(op, s3, "with-ca")
    await op.wait_for_phase("default", "with-ca", "Launching")
    assert preflight_of(op, "default", "with-ca") is None  # it ran
