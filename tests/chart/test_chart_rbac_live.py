"""The chart's RBAC against the real operator, enforced: every request it makes in a job's whole life is
granted, every grant is used, and the default install, which may read no Secret, still runs the job.

The operator (built exactly as `python -m kubetune_operator` builds it) runs against the operator tests'
kmock API server, which here refuses (403, as the real one would) every request of the operator's that
the rendered rules do not allow in its namespace. One job goes through preflight (its credentials
Secret, a real S3 server), launch, running, suspend and resume, success and TTL deletion. Every request
must be allowed, and every rule must have been used, except the few this harness cannot exercise
(listed below with the reason).
"""

from __future__ import annotations

from typing import Any

import kmock
import pytest

from tests.support.chart_support import Grant, Rendered, grants
from tests.support.operator_harness import (
    FAST_SETTINGS,
    TEST_USER_AGENT,
    ApiRequest,
    ApiServer,
    OperatorHarness,
    api_request,
    declare_resources,
    finetunejob,
    running_operator,
)
from tests.support.s3_world import ACCESS_KEY, SECRET_KEY, S3World

NS, NAME = "default", "flowers"

NOT_EXERCISED_HERE: dict[Grant, str] = {
    ("authentication.k8s.io", "tokenreviews", "create"): "the progress endpoint is off in the harness",
    ("apiextensions.k8s.io", "customresourcedefinitions", "list"): "the harness disables kopf's CRD scanning",
    ("apiextensions.k8s.io", "customresourcedefinitions", "watch"): "the harness disables kopf's CRD scanning",
    ("kubetune.dev", "finetunejobs/finalizers", "update"): "asked by admission for blockOwnerDeletion, not a request",
    ("kubetune.dev", "finetunejobs", "get"): "status writes start from the watched job: read by the progress endpoint "
    "(off here) and for a RayJob seen before its job (an operator restart)",
    (
        "",
        "configmaps",
        "get",
    ): "read only for a job with spec.storage.caBundle (tests/operator/test_production_example.py)",
    ("networking.k8s.io", "networkpolicies", "get"): "read back only when one is already there (a handler run "
    "twice, a namesake's leftover): a new job's is created without a read",
}


def _grant(request: ApiRequest) -> Grant:
    resource = f"{request.resource}/{request.subresource}" if request.subresource else request.resource
    return (request.group, resource, request.verb)


def _granted(rendered: Rendered, namespace: str) -> set[Grant]:
    """What the rendered rules allow the operator in `namespace`: its ClusterRoles and that namespace's Roles."""
    return grants(
        rendered.all("ClusterRole") + [r for r in rendered.all("Role") if r["metadata"]["namespace"] == namespace]
    )


class EnforcingApiServer(ApiServer):
    """The harness' API server, answering 403 to each request of the operator's that `granted` does not allow
    (the tests' own requests, playing users and KubeRay, are let through)."""

    def __init__(self, granted: set[Grant], **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.granted = granted
        self.refused: list[Grant] = []

    async def _handle(self, request: kmock.Request) -> Any:
        found = api_request(request)
        if found is not None and _needs_a_grant(found) and _grant(found) not in self.granted:
            self.refused.append(_grant(found))
            raise kmock.KubernetesError(status=403, reason="Forbidden", message=f"RBAC: {_grant(found)} is not granted")
        return await super()._handle(request)


def _needs_a_grant(request: ApiRequest) -> bool:
    """Whether RBAC decides `request`: one of the operator's on a resource (discovery documents, /api and
    /apis/<group>/<version>, every client may read)."""
    return bool(request.resource) and request.user_agent != TEST_USER_AGENT


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


async def _life_under(granted: set[Grant], s3: S3World) -> tuple[EnforcingApiServer, list[ApiRequest], list[str]]:
    """A job's whole life with the API enforcing `granted`: the server, the operator's requests, and the
    condition reasons the job's status showed on the way."""
    reasons: list[str] = []
    async with EnforcingApiServer(granted) as api, kmock.Server(api):
        declare_resources(api)
        async with running_operator(FAST_SETTINGS, api=api) as op:
            await _whole_life_of_a_job(op, s3)
            reasons = [event["reason"] for event in op.list_objects("v1/events", NS)]
            requests = op.operator_requests()
    return api, requests, reasons


@pytest.mark.asyncio
async def test_every_request_of_a_jobs_life_is_granted_and_every_grant_used(
    rendered: dict[str, Rendered], s3: S3World
) -> None:
    """With Secret reads granted in the job's namespace (rbac.preflightSecrets.namespaces), preflight runs."""
    granted = _granted(rendered["locked-down"], NS)
    api, requests, reasons = await _life_under(granted, s3)

    assert api.refused == [], f"the operator was refused: {api.refused}"
    used = {_grant(request) for request in requests if _needs_a_grant(request)}
    assert ("", "secrets", "get") in used
    unused = granted - used - NOT_EXERCISED_HERE.keys()
    assert unused == set(), f"granted but never used in a job's whole life: {sorted(unused)}"
    assert "SecretNotReadable" not in reasons


@pytest.mark.asyncio
async def test_the_default_install_runs_a_job_without_reading_its_secret_and_says_so(
    rendered: dict[str, Rendered], s3: S3World
) -> None:
    api, _, reasons = await _life_under(_granted(rendered["defaults"], NS), s3)

    assert set(api.refused) == {("", "secrets", "get")}
    assert "SecretNotReadable" in reasons and "TrainingSucceeded" in reasons
