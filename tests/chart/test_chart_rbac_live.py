"""The chart's RBAC against the real operator: every request it makes in a job's whole life is granted.

The operator (built exactly as `python -m kubetune_operator` builds it) runs against kmock's API server
through the operator tests' harness, which records each request in RBAC's terms (verb, group,
resource, subresource). One job goes through preflight (its credentials Secret, a real S3 server),
launch, running, suspend and resume, success and TTL deletion. Every request must be allowed by the
rules the chart renders, and every rule must have been used, except the few this harness cannot
exercise (listed below with the reason).
"""

from __future__ import annotations

from typing import Any

import pytest

from tests.support.chart_support import Grant, Rendered, grants
from tests.support.operator_harness import FAST_SETTINGS, OperatorHarness, finetunejob, running_operator
from tests.support.s3_world import ACCESS_KEY, SECRET_KEY, S3World

NS, NAME = "default", "flowers"

NOT_EXERCISED_HERE: dict[Grant, str] = {
    ("authentication.k8s.io", "tokenreviews", "create"): "the progress endpoint is off in the harness",
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): "the harness disables kopf's CRD scanning",
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): "the harness disables kopf's CRD scanning",
    ("kubetune.dev", "finetunejobs/finalizers", "update"): "asked by admission for blockOwnerDeletion, not a request",
    ("kubetune.dev", "finetunejobs", "get"): "status writes start from the watched job: read by the progress endpoint "
    "(off here) and for a RayJob seen before its job (an operator restart)",
    ("networking.k8s.io", "networkpolicies", "get"): "read back only when one is already there (a handler run "
    "twice, a namesake's leftover): a new job's is created without a read",
}


async def _set_rayjob(op: OperatorHarness, deployment: str, job: str) -> None:
    await op.set_rayjob_status(NS, NAME, jobDeploymentStatus=deployment, jobStatus=job)


async def _whole_life_of_a_job(op: OperatorHarness, s3: S3World) -> None:
    uris = s3.seed()
    await op.create_secret(NS, "s3-creds", {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY})
    manifest: dict[str, Any] = finetunejob(NAME, uris=uris, endpoint=s3.endpoint, credentials_secret="s3-creds")
    await op.create_job(manifest)
    await op.wait_for(lambda: op.rayjob(NS, NAME), what="the RayJob")
    await _set_rayjob(op, "Running", "RUNNING")
    await op.wait_for_phase(NS, NAME, "Running")

    await op.patch_job_spec(NS, NAME, {"runPolicy": {"suspend": True}})
    await op.wait_for_phase(NS, NAME, "Suspended")
    await _set_rayjob(op, "Suspended", "STOPPED")
    await op.patch_job_spec(NS, NAME, {"runPolicy": {"suspend": False}})
    await op.wait_for_phase(NS, NAME, "Launching")
    await _set_rayjob(op, "Running", "RUNNING")
    await op.wait_for_phase(NS, NAME, "Running")

    await op.patch_job_spec(NS, NAME, {"runPolicy": {"ttlSecondsAfterFinished": 0}})
    await _set_rayjob(op, "Complete", "SUCCEEDED")
    await op.wait_for(lambda: op.job(NS, NAME) is None, timeout=10, what="the job deleted after its TTL")


@pytest.mark.asyncio
async def test_every_request_of_a_jobs_life_is_granted_and_every_grant_used(
    rendered: dict[str, Rendered], s3: S3World
) -> None:
    async with running_operator(FAST_SETTINGS) as op:
        await _whole_life_of_a_job(op, s3)
        requests = op.operator_requests()

    used: dict[Grant, str] = {}
    for request in requests:
        if not request.resource:
            continue  # discovery documents (/api, /apis/<group>/<version>): every client may read them
        resource = f"{request.resource}/{request.subresource}" if request.subresource else request.resource
        used.setdefault((request.group, resource, request.verb), f"{request.namespace}/{request.name}")
    granted = grants(rendered["defaults"].all("ClusterRole"))

    denied = {grant: example for grant, example in used.items() if grant not in granted}
    assert denied == {}, f"the operator would be refused these (grant: an object it was for): {denied}"
    unused = granted - used.keys() - NOT_EXERCISED_HERE.keys()
    assert unused == set(), f"granted but never used in a job's whole life: {sorted(unused)}"
