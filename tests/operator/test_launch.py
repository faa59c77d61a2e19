"""Creating a FineTuneJob: preflight passes, the operator makes sure of the namespace's trainer
ServiceAccount and creates the job's RayJob."""

from __future__ import annotations

import logging
from typing import Any

import pytest

from kubetune_operator.builders import build_children, build_rayjob, build_service_account
from kubetune_operator.spec import FineTuneJob
from kubetune_trainer.config import TrainerConfig
from tests.support.operator_harness import (
    CONFIGMAPS,
    FAST_SETTINGS,
    NETWORKPOLICIES,
    RAYJOBS,
    SECRETS,
    SERVICEACCOUNTS,
    OperatorHarness,
    finetunejob,
    running_operator,
    serving_api,
)
from tests.support.s3_world import ACCESS_KEY, SECRET_KEY, S3World

pytestmark = pytest.mark.asyncio


def env_value(container: dict[str, Any], name: str) -> str:
    return str(next(e["value"] for e in container["env"] if e["name"] == name))


async def launch(op: OperatorHarness, s3: S3World, name: str = "flowers") -> dict[str, str]:
    uris = s3.seed()
    await op.create_secret(
        "default", "s3-creds", {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    )
    await op.create_job(finetunejob(name, uris=uris, endpoint=s3.endpoint, credentials_secret="s3-creds"))
    await op.wait_for(lambda: op.rayjob("default", name), what=f"RayJob {name}")
    return uris


async def test_a_valid_job_gets_exactly_the_objects_the_builders_describe(
    op: OperatorHarness, s3: S3World, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO, logger="kubetune_operator")
    await launch(op, s3)
    job = op.job("default", "flowers")
    assert job is not None
    expected = {obj["kind"]: obj for obj in build_children(FineTuneJob.from_body(job), FAST_SETTINGS)}

    rayjob = op.rayjob("default", "flowers")
    sa = op.get(SERVICEACCOUNTS, "default", "kubetune-trainer")
    assert rayjob and sa
    assert op.list_objects(CONFIGMAPS) == []  # the trainer config is in the RayJob
    assert rayjob["metadata"]["ownerReferences"] == expected["RayJob"]["metadata"]["ownerReferences"]
    assert rayjob["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
    assert rayjob["spec"] == expected["RayJob"]["spec"]
    policy = op.get(NETWORKPOLICIES, "default", "flowers-ray")
    assert policy and policy["spec"] == expected["NetworkPolicy"]["spec"]
    assert policy["metadata"]["ownerReferences"] == rayjob["metadata"]["ownerReferences"]
    # The pods' ServiceAccount is the namespace's, shared by its jobs: no job owns it.
    shared = build_service_account("default", FAST_SETTINGS)
    assert "ownerReferences" not in sa["metadata"]
    assert sa["metadata"]["labels"] == shared["metadata"]["labels"]
    assert sa["automountServiceAccountToken"] is False
    assert [o["metadata"]["name"] for o in op.list_objects(SERVICEACCOUNTS)] == ["kubetune-trainer"]
    (head,) = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    config = TrainerConfig.model_validate_json(env_value(head, "KUBETUNE_TRAINER_CONFIG"))
    assert config.run_name == job["metadata"]["uid"]
    assert config.progress is not None
    assert config.progress.url.endswith("/v1/progress/default/flowers")

    await op.wait_for(lambda: op.phase("default", "flowers") == "Launching")
    await op.wait_for_event("default", "flowers", "RayJobCreated")
    await op.wait_for(
        lambda: any(r.getMessage().startswith("default/flowers: created RayJob flowers (") for r in caplog.records),
        what="the log line saying the children were created",
    )


async def test_the_rayjob_appearing_marks_the_job_launched(op: OperatorHarness, s3: S3World) -> None:
    await launch(op, s3)
    await op.wait_for_event("default", "flowers", "RayJobCreated")
    await op.set_rayjob_status("default", "flowers", jobDeploymentStatus="Initializing")
    await op.wait_for(lambda: (op.condition("default", "flowers", "Launched") or {}).get("status") == "True")
    job = op.job("default", "flowers")
    assert job is not None
    assert job["status"]["rayJobName"] == "flowers"
    await op.wait_for_event("default", "flowers", "ClusterStarting")
    # One Event for the launch, once the RayJob exists (none before it, while the children are made).
    assert op.event_reasons("default", "flowers") == ["RayJobCreated", "ClusterStarting"]


async def test_a_job_without_a_credentials_secret_launches_without_preflight(op: OperatorHarness) -> None:
    # No Secret, no S3 at all: the pods would use their own cloud identity, which the operator cannot test.
    await op.create_job(finetunejob("irsa"))
    await op.wait_for(lambda: op.rayjob("default", "irsa"), what="RayJob irsa")
    # The status is written once the RayJob exists, a moment after it appears.
    await op.wait_for_phase("default", "irsa", "Launching")


async def test_the_launch_handler_run_again_creates_nothing_new(s3: S3World) -> None:
    async with serving_api() as api:
        async with running_operator(api=api) as first:
            await launch(first, s3)
            rayjob_before = first.rayjob("default", "flowers")
            token_before = first.get(SECRETS, "default", "flowers-ray-token")
            assert token_before is not None
        # A restarted operator resumes every job: the same handler runs again for this one.
        async with running_operator(api=api) as second:
            await second.wait_for(
                lambda: any(r.verb == "get" and r.resource == "rayjobs" for r in second.operator_requests()),
                what="the resumed launch handler to look for the RayJob",
            )
            await second.settle()
            creates = [r for r in second.operator_requests() if r.verb == "create" and r.resource != "events"]
            assert creates == []
            assert [o["metadata"]["name"] for o in second.list_objects(RAYJOBS)] == ["flowers"]
            assert len(second.list_objects(SERVICEACCOUNTS, "default")) == 1
            assert second.rayjob("default", "flowers") == rayjob_before
            reads = {r.resource for r in second.operator_requests() if r.verb == "get"}
            assert {"rayjobs", "serviceaccounts", "secrets", "networkpolicies"} <= reads
            # The Ray cluster's token stays the one its pods and KubeRay were given.
            assert second.get(SECRETS, "default", "flowers-ray-token") == token_before


async def test_a_service_account_already_there_is_kept_as_it_is(op: OperatorHarness) -> None:
    # E.g. one an admin made with a cloud identity's annotation: it is read, never replaced.
    left = await op.create(
        SERVICEACCOUNTS,
        {
            "apiVersion": "v1",
            "kind": "ServiceAccount",
            "metadata": {"name": "kubetune-trainer", "annotations": {"eks.amazonaws.com/role-arn": "arn:x"}},
        },
    )
    await op.create_job(finetunejob("irsa"))
    await op.wait_for(lambda: op.rayjob("default", "irsa"), what="RayJob irsa")
    kept = op.get(SERVICEACCOUNTS, "default", "kubetune-trainer")
    assert kept is not None and kept["metadata"]["uid"] == left["metadata"]["uid"]
    assert kept["metadata"]["annotations"] == {"eks.amazonaws.com/role-arn": "arn:x"}
    assert not [r for r in op.operator_requests() if r.resource == "serviceaccounts" and r.verb == "create"]


async def test_a_rayjob_already_there_is_adopted_as_it_is(op: OperatorHarness) -> None:
    """Get-or-create: a RayJob of the job's name (made by hand, or by an operator that died before its
    status write) is followed, never replaced or updated."""
    rayjob = build_rayjob(FineTuneJob.from_body(finetunejob("irsa")), FAST_SETTINGS)
    rayjob["spec"]["entrypoint"] = "python -m kubetune_trainer --config /etc/kubetune/trainer-config.json"
    old_rayjob = await op.create(RAYJOBS, rayjob)
    await op.create_job(finetunejob("irsa"))
    await op.wait_for_event("default", "irsa", "RayJobCreated")
    await op.settle()
    assert op.rayjob("default", "irsa") == old_rayjob
    assert op.phase("default", "irsa") == "Launching"


@pytest.mark.asyncio
async def test_a_running_job_edited_past_validation_keeps_running_across_a_restart() -> None:
    async with serving_api() as api:
        async with running_operator(api=api) as first:
            await first.create_job(finetunejob("flowers"))
            await first.wait_for(lambda: first.rayjob("default", "flowers"), what="the RayJob")
            await first.set_rayjob_status("default", "flowers", jobDeploymentStatus="Running", jobStatus="RUNNING")
            await first.wait_for_phase("default", "flowers", "Running")
            # No CRD schema here to stop it (as with `kubectl replace --validate=false` on a schema-less CRD).
            await first.patch_job_spec("default", "flowers", {"training": {"epochs": -1}})
            refused = await first.wait_for(lambda: first.condition("default", "flowers", "SpecChangeRefused"))
            assert "spec.training.epochs" in refused["message"]
        async with running_operator(api=api) as second:
            await second.wait_for(
                lambda: any(r.resource == "rayjobs" and r.verb == "get" for r in second.operator_requests()),
                what="the resumed launch handler",
            )
            await second.settle()
            assert second.phase("default", "flowers") == "Running"
