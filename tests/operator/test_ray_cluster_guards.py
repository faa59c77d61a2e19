"""What the operator puts around each job's Ray cluster: a Ray token of its own, in a Secret the job owns
and nothing else shows, and a NetworkPolicy; a namesake's leftovers hold the launch back."""

from __future__ import annotations

import base64
import json
import logging
import re

import pytest
from prometheus_client import generate_latest

from tests.support.operator_harness import (
    EVENTS,
    FINETUNEJOBS,
    NETWORKPOLICIES,
    RAYJOBS,
    SECRETS,
    SERVICEACCOUNTS,
    OperatorHarness,
    fast_settings,
    finetunejob,
    running_operator,
)

pytestmark = pytest.mark.asyncio


def ray_token(op: OperatorHarness, name: str) -> str:
    secret = op.get(SECRETS, "default", f"{name}-ray-token")
    assert secret is not None, f"no Ray token Secret for {name}"
    return base64.b64decode(secret["data"]["auth_token"]).decode()


async def test_each_job_gets_a_ray_token_of_its_own_that_nothing_else_shows(
    op: OperatorHarness, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.DEBUG)
    for name in ("flowers", "birds"):
        await op.create_job(finetunejob(name))
    for name in ("flowers", "birds"):
        await op.wait_for_event("default", name, "RayJobCreated")

    tokens = {name: ray_token(op, name) for name in ("flowers", "birds")}
    assert all(re.fullmatch(r"[0-9a-f]{64}", token) for token in tokens.values())  # 256 random bits
    assert tokens["flowers"] != tokens["birds"]
    for name in tokens:
        job, rayjob = op.job("default", name), op.rayjob("default", name)
        secret = op.get(SECRETS, "default", f"{name}-ray-token")
        assert job and rayjob and secret
        assert secret["metadata"]["ownerReferences"][0]["uid"] == job["metadata"]["uid"]
        assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": f"{name}-ray-token"}
        assert op.get(NETWORKPOLICIES, "default", f"{name}-ray") is not None

    # The token is in its Secret and nowhere else: not in the RayJob (spec or status), the job, Events,
    # other objects, the operator's logs or its metrics.
    assert op.runtime is not None
    elsewhere = [json.dumps(op.list_objects(resource)) for resource in (FINETUNEJOBS, RAYJOBS, EVENTS, NETWORKPOLICIES)]
    elsewhere += [json.dumps(op.list_objects(SERVICEACCOUNTS)), caplog.text]
    elsewhere.append(generate_latest(op.runtime.metrics.registry).decode())
    for token in tokens.values():
        for text in elsewhere:
            assert token not in text and base64.b64encode(token.encode()).decode() not in text


async def test_a_namesakes_leftover_secret_holds_the_launch_back_until_it_is_gone(op: OperatorHarness) -> None:
    """A job deleted and created again at once: the old job's Secret is still being garbage-collected. Its
    token must not be adopted (it goes any moment), so the new job waits, saying why."""
    old_owner = {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "name": "flowers",
        "uid": "00000000-0000-4000-8000-00000000dead",
        "controller": True,
    }
    leftover = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": "flowers-ray-token", "ownerReferences": [old_owner]},
        "data": {"auth_token": base64.b64encode(b"old").decode()},
    }
    await op.create(SECRETS, leftover)
    await op.create_job(finetunejob("flowers"))
    job = await op.wait_for_phase("default", "flowers", "Pending")
    launched = next(c for c in job["status"]["conditions"] if c["type"] == "Launched")
    assert (launched["status"], launched["reason"]) == ("False", "PreviousChildStillExists")
    assert "Secret flowers-ray-token" in launched["message"]
    await op.settle(0.5)
    assert op.rayjob("default", "flowers") is None

    await op.delete(SECRETS, "default", "flowers-ray-token")
    await op.wait_for(lambda: op.rayjob("default", "flowers"), what="the RayJob once the leftover is gone")
    await op.wait_for_phase("default", "flowers", "Launching")
    assert ray_token(op, "flowers") != "old"
    secret = op.get(SECRETS, "default", "flowers-ray-token")
    assert secret and secret["metadata"]["ownerReferences"][0]["uid"] == (op.job("default", "flowers") or {}).get(
        "metadata", {}
    ).get("uid")


async def test_network_policies_can_be_left_to_the_cluster() -> None:
    async with running_operator(fast_settings(network_policy=False)) as op:
        await op.create_job(finetunejob("flowers"))
        await op.wait_for(lambda: op.rayjob("default", "flowers"), what="the RayJob")
        assert op.list_objects(NETWORKPOLICIES) == []
        assert ray_token(op, "flowers")  # token auth stays on: it is not a setting
