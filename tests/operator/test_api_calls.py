"""Every Kubernetes API call the operator makes over a job's whole life, in RBAC's terms.

`OPERATOR_PERMISSIONS` is the list docs/operator.md gives and the Helm chart's RBAC must grant; a new
kind of API call fails this test until both are updated. (kopf additionally lists and watches
customresourcedefinitions, and namespaces when it serves a list of them; these tests disable kopf's
scanning, so those calls do not appear here.)
"""

from __future__ import annotations

import asyncio

import pytest

from tests.support.operator_harness import SERVICEACCOUNTS, OperatorHarness, finetunejob
from tests.support.s3_world import ACCESS_KEY, SECRET_KEY, S3World

# (verb, API group, resource, subresource)
OPERATOR_PERMISSIONS = {
    ("list", "kubetune.dev", "finetunejobs", None),
    ("watch", "kubetune.dev", "finetunejobs", None),
    ("get", "kubetune.dev", "finetunejobs", None),
    ("delete", "kubetune.dev", "finetunejobs", None),  # ttlSecondsAfterFinished
    ("patch", "kubetune.dev", "finetunejobs", "status"),
    ("list", "ray.io", "rayjobs", None),
    ("watch", "ray.io", "rayjobs", None),
    ("get", "ray.io", "rayjobs", None),
    ("create", "ray.io", "rayjobs", None),
    ("patch", "ray.io", "rayjobs", None),  # suspend / resume
    ("get", "", "serviceaccounts", None),
    ("create", "", "serviceaccounts", None),
    ("get", "", "secrets", None),  # preflight reads spec.storage.credentialsSecret
    ("create", "", "secrets", None),  # each job's Ray token
    ("get", "networking.k8s.io", "networkpolicies", None),  # a launched job's, when a restarted operator resumes it
    ("create", "networking.k8s.io", "networkpolicies", None),  # each job's NetworkPolicy
    ("create", "", "events", None),
}
# Status writes start from the job as the watch delivered it; the job is read from the server only by
# the progress endpoint and for a RayJob event that comes before its job's first watch event (restart).
READ_WHEN_NOT_WATCHED_YET = {("get", "kubetune.dev", "finetunejobs", None)}
# A new job's children are created without a read first; a resumed job's are read (test_launch.py).
READ_WHEN_RESUMED = {("get", "networking.k8s.io", "networkpolicies", None)}


@pytest.mark.asyncio
async def test_a_jobs_whole_life_needs_exactly_the_documented_permissions(op: OperatorHarness, s3: S3World) -> None:
    await op.create_secret(
        "default", "s3-creds", {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}
    )
    uris = s3.seed()
    await op.create_job(
        finetunejob(
            "flowers",
            uris=uris,
            endpoint=s3.endpoint,
            credentials_secret="s3-creds",
            runPolicy={"ttlSecondsAfterFinished": 0},
        )
    )
    await op.wait_for(lambda: op.rayjob("default", "flowers"), what="the RayJob")
    await op.set_rayjob_status("default", "flowers", jobDeploymentStatus="Running", jobStatus="RUNNING")
    await op.wait_for_phase("default", "flowers", "Running")
    await op.patch_job_spec("default", "flowers", {"runPolicy": {"suspend": True}, "training": {"epochs": 99}})
    await op.wait_for_phase("default", "flowers", "Suspended")
    await op.wait_for(lambda: op.condition("default", "flowers", "SpecChangeRefused"), what="the refusal")
    await op.set_rayjob_status("default", "flowers", jobDeploymentStatus="Complete", jobStatus="SUCCEEDED")
    await op.wait_for(lambda: op.job("default", "flowers") is None, what="the TTL to delete the job")
    await op.create_job({"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": "x"}})
    await op.wait_for_phase("default", "x", "Failed")
    await op.wait_for_event("default", "x", "InvalidSpec")

    used = {(r.verb, r.group, r.resource, r.subresource) for r in op.operator_requests()}
    assert used == OPERATOR_PERMISSIONS - READ_WHEN_NOT_WATCHED_YET - READ_WHEN_RESUMED


@pytest.mark.asyncio
async def test_a_new_job_costs_one_request_per_child_one_status_write_and_one_event(op: OperatorHarness) -> None:
    # What a burst of new jobs asks of the API server, per job: no reads, one write of each kind. Five:
    # the Ray token Secret, the NetworkPolicy, the RayJob (which carries the trainer config; its pods run
    # as the namespace's shared ServiceAccount, made sure of once for all jobs there), one status write
    # that also carries kopf's diff base, and one Event.
    await op.create_job(finetunejob("first"))  # the namespace's first job: it pays for the ServiceAccount
    await op.wait_for_event("default", "first", "RayJobCreated")
    op.mark()
    await op.create_job(finetunejob("irsa"))  # no credentialsSecret: no preflight
    await op.wait_for_event("default", "irsa", "RayJobCreated")
    await op.wait_for(
        lambda: ((op.job("default", "irsa") or {}).get("status") or {}).get("kopf"), what="kopf's diff base"
    )
    await op.settle(1.0)  # the RayJob's own watch event and kopf's own processing have come and gone

    calls = sorted(
        (r.verb, r.resource, r.subresource or "")
        for r in op.operator_requests()
        if r.verb not in ("list", "watch") and r.name in (None, "irsa", "kubetune-trainer")
    )
    assert calls == [
        ("create", "events", ""),
        ("create", "networkpolicies", ""),
        ("create", "rayjobs", ""),
        ("create", "secrets", ""),
        ("patch", "finetunejobs", "status"),  # the launch's status, carrying kopf's diff base
    ]
    assert op.phase("default", "irsa") == "Launching"
    # kopf keeps no bookkeeping in annotations: it found its diff base in the status the launch wrote.
    annotations = (op.job("default", "irsa") or {}).get("metadata", {}).get("annotations") or {}
    assert not [key for key in annotations if key.startswith("kubetune.dev/")]


@pytest.mark.asyncio
async def test_a_burst_of_jobs_in_one_namespace_makes_sure_of_its_service_account_once(op: OperatorHarness) -> None:
    jobs = [f"burst-{i}" for i in range(12)]
    await asyncio.gather(*(op.create_job(finetunejob(name), "burst") for name in jobs))
    for name in jobs:
        await op.wait_for(lambda name=name: op.rayjob("burst", name), what=f"RayJob {name}")  # type: ignore[misc]

    accounts = [(r.verb, r.name) for r in op.operator_requests() if r.resource == "serviceaccounts"]
    # One read (it is missing) and one create, for all twelve: the jobs launched concurrently waited on
    # the same check. Every RayJob's pods run as it.
    assert accounts == [("get", "kubetune-trainer"), ("create", None)]
    assert op.get(SERVICEACCOUNTS, "burst", "kubetune-trainer") is not None
    for name in jobs:
        pod = (op.rayjob("burst", name) or {})["spec"]["rayClusterSpec"]["workerGroupSpecs"][0]["template"]["spec"]
        assert pod["serviceAccountName"] == "kubetune-trainer"


@pytest.mark.asyncio
async def test_a_burst_larger_than_the_launch_slots_launches_every_job_a_few_at_a_time(op: OperatorHarness) -> None:
    assert op.runtime is not None
    op.runtime.launch_slots = asyncio.Semaphore(3)  # LAUNCHES_AT_ONCE, made small
    jobs = [f"wave-{i}" for i in range(12)]
    await asyncio.gather(*(op.create_job(finetunejob(name), "wave") for name in jobs))
    for name in jobs:
        launched = lambda name=name: ((op.job("wave", name) or {}).get("status") or {}).get("phase")  # noqa: E731
        await op.wait_for(launched, what=f"{name} launched")

    # A launch starts with its Secret and ends with its one status write: never more than 3 between the two,
    # so a burst of thousands holds a few launches' children in memory, not thousands.
    in_flight, most = 0, 0
    for r in op.operator_requests():
        if (r.verb, r.resource) == ("create", "secrets"):
            in_flight += 1
        elif (r.verb, r.resource, r.subresource) == ("patch", "finetunejobs", "status"):
            in_flight -= 1
        most = max(most, in_flight)
    assert most <= 3 and in_flight == 0
    assert all(op.rayjob("wave", name) for name in jobs)
