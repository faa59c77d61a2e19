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
    FINETUNEJOBS,
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
    assert config.run_name.startswith("default.flowers.")  # namespace, name, run-shaping digest
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


def run_name_of(rayjob: dict[str, Any]) -> str:
    (head,) = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    return TrainerConfig.model_validate_json(env_value(head, "KUBETUNE_TRAINER_CONFIG")).run_name


async def test_a_failed_job_deleted_and_applied_again_continues_its_run(op: OperatorHarness) -> None:
    """As the Failed message advises: the new job (a new uid) trains under the same run name, so its trainer
    resumes from the run's last committed checkpoint (docs/trainer.md, run identity)."""
    await op.create_job(finetunejob("irsa"))
    first = await op.wait_for(lambda: op.rayjob("default", "irsa"), what="RayJob irsa")
    first_uid = (op.job("default", "irsa") or {})["metadata"]["uid"]
    await op.set_rayjob_status("default", "irsa", jobDeploymentStatus="Failed", jobStatus="FAILED")
    await op.wait_for_phase("default", "irsa", "Failed")
    await op.delete(FINETUNEJOBS, "default", "irsa")
    await op.wait_for(lambda: op.job("default", "irsa") is None, what="the job gone")
    for kind in (RAYJOBS, SECRETS, NETWORKPOLICIES):  # the garbage collector's part: their owner is gone
        for child in op.list_objects(kind, "default"):
            if any(ref["uid"] == first_uid for ref in child["metadata"].get("ownerReferences", [])):
                await op.delete(kind, "default", child["metadata"]["name"])

    await op.create_job(finetunejob("irsa"))
    second = await op.wait_for(
        lambda: (r := op.rayjob("default", "irsa")) and r["metadata"]["uid"] != first["metadata"]["uid"] and r,
        what="the new job's RayJob",
    )

    assert (op.job("default", "irsa") or {})["metadata"]["uid"] != first_uid
    assert run_name_of(second) == run_name_of(first)
    assert run_name_of(first).startswith("default.irsa.")


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


async def test_a_rayjob_of_the_job_already_there_is_adopted_as_it_is() -> None:
    """Get-or-create: a RayJob the job owns (made by an operator that died before its status write) is
    followed, never replaced or updated."""
    async with serving_api() as api:
        async with running_operator(api=api) as first:
            job = await first.create_job(finetunejob("irsa", runPolicy={"suspend": True}))
        # While the operator is down: its RayJob, as an operator that died after creating it left it.
        rayjob = build_rayjob(FineTuneJob.from_body(job), FAST_SETTINGS)
        rayjob["spec"]["entrypoint"] = "python -m kubetune_trainer --config /etc/kubetune/trainer-config.json"
        async with running_operator(api=api) as op:
            old_rayjob = await op.create(RAYJOBS, rayjob)
            await op.patch_job_spec("default", "irsa", {"runPolicy": {"suspend": False}})
            await op.wait_for_event("default", "irsa", "RayJobCreated")
            await op.settle()
            assert op.rayjob("default", "irsa") == old_rayjob
            assert op.phase("default", "irsa") == "Launching"


async def previous_rayjob_waiting(op: OperatorHarness, name: str) -> str:
    """The Launched condition's message, once the job waits for a RayJob of its name that is not its own."""
    await op.wait_for_phase("default", name, "Pending")
    launched = await op.wait_for(lambda: op.condition("default", name, "Launched"))
    assert (launched["status"], launched["reason"]) == ("False", "PreviousRayJobStillExists"), launched
    event = await op.wait_for_event("default", name, "PreviousRayJobStillExists")
    assert event["type"] == "Warning"
    message: str = launched["message"]
    return message


async def test_a_job_created_again_waits_for_its_predecessors_rayjob_then_launches(op: OperatorHarness) -> None:
    """Deleted and created again while the old RayJob still exists (the garbage collector is slow, here
    absent): the new job says why it waits, and launches once the old RayJob is gone."""
    first = await op.create_job(finetunejob("irsa"))
    await op.wait_for_phase("default", "irsa", "Launching")
    await op.delete(FINETUNEJOBS, "default", "irsa")
    await op.wait_for(lambda: op.job("default", "irsa") is None)
    # The garbage collector has removed the old job's Secret and NetworkPolicy, not yet its RayJob
    # (a leftover Secret or NetworkPolicy holds the launch back the same way: test_ray_cluster_guards).
    await op.delete(SECRETS, "default", "irsa-ray-token")
    await op.delete(NETWORKPOLICIES, "default", "irsa-ray")

    second = await op.create_job(finetunejob("irsa"))
    message = await previous_rayjob_waiting(op, "irsa")
    assert first["metadata"]["uid"] in message and "garbage collector" in message
    old = op.rayjob("default", "irsa")
    assert old is not None and old["metadata"]["ownerReferences"][0]["uid"] == first["metadata"]["uid"]

    await op.delete(RAYJOBS, "default", "irsa")
    new = await op.wait_for(lambda: op.rayjob("default", "irsa"), what="the new job's RayJob")
    assert new["metadata"]["ownerReferences"][0]["uid"] == second["metadata"]["uid"]
    await op.wait_for_phase("default", "irsa", "Launching")
    launched = op.condition("default", "irsa", "Launched")
    assert launched is not None and launched["reason"] == "RayJobCreated"


async def test_an_orphaned_rayjob_of_the_jobs_name_is_not_adopted(op: OperatorHarness) -> None:
    """A RayJob no job owns (its job deleted with --cascade=orphan, or made by hand) may hold another run's
    state: the job waits, saying how to remove it, and follows none of its states."""
    rayjob = build_rayjob(FineTuneJob.from_body(finetunejob("irsa")), FAST_SETTINGS)
    assert "ownerReferences" not in rayjob["metadata"]
    orphan = await op.create(RAYJOBS, rayjob)
    await op.create_job(finetunejob("irsa"))

    message = await previous_rayjob_waiting(op, "irsa")
    assert "kubectl -n default delete rayjob irsa" in message
    await op.set_rayjob_status("default", "irsa", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    await op.settle()
    assert op.phase("default", "irsa") == "Pending"
    assert (op.rayjob("default", "irsa") or {}).get("spec") == orphan["spec"]


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
