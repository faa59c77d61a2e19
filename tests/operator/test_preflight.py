"""Preflight against a real S3 server (moto): a job whose inputs are missing fails before any Ray pod exists."""

from __future__ import annotations

import socket
from typing import Any

import kmock
import pytest

from tests.support.operator_harness import RAYJOBS, OperatorHarness, finetunejob
from tests.support.s3_world import ACCESS_KEY, SECRET_KEY, S3World

pytestmark = pytest.mark.asyncio

NS = "default"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


async def submit(op: OperatorHarness, s3: S3World, name: str, uris: dict[str, str], **sections: Any) -> None:
    await op.create_job(finetunejob(name, uris=uris, endpoint=s3.endpoint, credentials_secret="s3-creds", **sections))


async def failed_with(op: OperatorHarness, name: str, reason: str) -> str:
    """The Failed condition's message, once the job failed for `reason`; nothing was created for it."""
    job = await op.wait_for_phase(NS, name, "Failed")
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    assert failed["reason"] == reason, failed
    launched = next(c for c in job["status"]["conditions"] if c["type"] == "Launched")
    assert (launched["status"], launched["reason"]) == ("False", reason)
    event = await op.wait_for_event(NS, name, reason)
    assert event["type"] == "Warning"
    assert op.rayjob(NS, name) is None  # (the namespace's shared ServiceAccount is not the job's)
    message: str = failed["message"]
    return message


async def test_a_missing_secret(op: OperatorHarness, s3: S3World) -> None:
    await submit(op, s3, "no-secret", s3.seed())
    message = await failed_with(op, "no-secret", "SecretNotFound")
    assert "'s3-creds'" in message and "namespace 'default'" in message


async def test_a_secret_without_the_keys(op: OperatorHarness, s3: S3World) -> None:
    await op.create_secret(NS, "s3-creds", {"AWS_ACCESS_KEY_ID": ACCESS_KEY})
    await submit(op, s3, "half-secret", s3.seed())
    message = await failed_with(op, "half-secret", "InvalidSecret")
    assert "AWS_SECRET_ACCESS_KEY" in message
    assert SECRET_KEY not in message and ACCESS_KEY not in message


async def test_missing_base_weights(op: OperatorHarness, s3: S3World) -> None:
    await op.create_secret(NS, "s3-creds", CREDENTIALS)
    uris = s3.seed()
    uris["checkpoint"] = f"s3://{uris['bucket']}/base/missing.safetensors"
    await submit(op, s3, "no-weights", uris)
    message = await failed_with(op, "no-weights", "CheckpointNotFound")
    assert "spec.model.checkpoint" in message and "missing.safetensors" in message


async def test_an_empty_dataset(op: OperatorHarness, s3: S3World) -> None:
    await op.create_secret(NS, "s3-creds", CREDENTIALS)
    uris = s3.seed()
    uris["train"] = f"s3://{uris['bucket']}/data/nothing-here/"
    await submit(op, s3, "no-data", uris)
    message = await failed_with(op, "no-data", "DatasetNotFound")
    assert "spec.data.train" in message


async def test_a_missing_manifest_or_first_shard_is_named(op: OperatorHarness, s3: S3World) -> None:
    await op.create_secret(NS, "s3-creds", CREDENTIALS)
    uris = s3.seed()
    shards = f"s3://{uris['bucket']}/shards/train-{{000..015}}.tar"
    await submit(op, s3, "no-shards", uris, data={"format": "webdataset", "train": shards})
    message = await failed_with(op, "no-shards", "DatasetNotFound")
    assert f"spec.data.train: no object s3://{uris['bucket']}/shards/train-000.tar" in message
    await submit(op, s3, "no-manifest", uris, data={"format": "manifest", "train": f"s3://{uris['bucket']}/m.csv"})
    message = await failed_with(op, "no-manifest", "DatasetNotFound")
    assert f"spec.data.train: no object s3://{uris['bucket']}/m.csv" in message
    s3.client().put_object(Bucket=uris["bucket"], Key="m.csv", Body=b"uri,label\n")
    await submit(op, s3, "a-manifest", uris, data={"format": "manifest", "train": f"s3://{uris['bucket']}/m.csv"})
    await op.wait_for(lambda: op.rayjob(NS, "a-manifest"), what="the RayJob of a job whose manifest exists")


async def test_every_missing_input_is_reported_at_once(op: OperatorHarness, s3: S3World) -> None:
    await op.create_secret(NS, "s3-creds", CREDENTIALS)
    uris = s3.seed(with_validation=True)
    uris["checkpoint"] = "s3://no-such-bucket-kubetune/base/model.pt"
    await submit(op, s3, "all-wrong", uris, data={"validation": f"s3://{uris['bucket']}/data/empty/"})
    message = await failed_with(op, "all-wrong", "CheckpointNotFound")
    assert "spec.model.checkpoint" in message and "spec.data.validation" in message


async def test_credentials_without_permission_are_access_denied(op: OperatorHarness, s3: S3World) -> None:
    uris = s3.seed()
    key, secret = s3.create_user("kubetune-no-rights")  # a valid identity with no policy at all
    await op.create_secret(NS, "s3-creds", {"AWS_ACCESS_KEY_ID": key, "AWS_SECRET_ACCESS_KEY": secret})
    with s3.iam_enforced():
        await submit(op, s3, "denied", uris)
        message = await failed_with(op, "denied", "AccessDenied")
    assert "credentialsSecret" in message
    assert secret not in message


async def test_unknown_credentials_are_access_denied(op: OperatorHarness, s3: S3World) -> None:
    uris = s3.seed()
    await op.create_secret(NS, "s3-creds", {"AWS_ACCESS_KEY_ID": "UNKNOWNTESTKEY000000", "AWS_SECRET_ACCESS_KEY": "x"})
    with s3.iam_enforced():
        await submit(op, s3, "stranger", uris)
        await failed_with(op, "stranger", "AccessDenied")


def closed_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
    return port


async def test_an_unreachable_store_is_retried_until_it_answers(op: OperatorHarness, s3: S3World) -> None:
    await op.create_secret(NS, "s3-creds", CREDENTIALS)
    uris = s3.seed()
    manifest = finetunejob(
        "flaky", uris=uris, endpoint=f"http://127.0.0.1:{closed_port()}", credentials_secret="s3-creds"
    )
    await op.create_job(manifest)
    job = await op.wait_for_phase(NS, "flaky", "Pending")
    launched = next(c for c in job["status"]["conditions"] if c["type"] == "Launched")
    assert (launched["status"], launched["reason"]) == ("False", "StorageUnavailable")
    assert "retries" in launched["message"]
    assert op.rayjob(NS, "flaky") is None
    # The store comes back (here: the endpoint is corrected); the next retry launches the job.
    await op.patch_job_spec(NS, "flaky", {"storage": {"endpoint": s3.endpoint}})
    await op.wait_for(lambda: op.rayjob(NS, "flaky"), what="the RayJob after the store answered")
    assert op.rayjob(NS, "flaky") is not None
    assert [r.name for r in op.operator_requests() if r.verb == "create" and r.resource == "rayjobs"] == [None]
    assert len(op.list_objects(RAYJOBS, NS)) == 1


async def test_a_secret_rbac_keeps_from_the_operator_skips_preflight_and_says_so(
    op: OperatorHarness, s3: S3World
) -> None:
    """The chart's default grants no Secret reads (docs/install.md, Permissions): the job launches unchecked,
    and its status and Events say why and how to have it checked."""

    def forbidden(_: Any) -> None:
        raise kmock.KubernetesError(
            status=403, reason="Forbidden", message='secrets "s3-creds" is forbidden: cannot get resource "secrets"'
        )

    op.api[f"get /api/v1/namespaces/{NS}/secrets/s3-creds"] << forbidden
    await op.create_secret(NS, "s3-creds", CREDENTIALS)
    await submit(op, s3, "unchecked", s3.seed())

    await op.wait_for(lambda: op.rayjob(NS, "unchecked"), what="the RayJob, launched without preflight")
    checked = await op.wait_for(lambda: op.condition(NS, "unchecked", "PreflightChecked"))
    assert (checked["status"], checked["reason"]) == ("False", "SecretNotReadable")
    assert "'s3-creds'" in checked["message"] and "rbac.preflightSecrets.namespaces" in checked["message"]
    assert (await op.wait_for_event(NS, "unchecked", "SecretNotReadable"))["type"] == "Warning"
    await op.wait_for_phase(NS, "unchecked", "Launching")
