"""The operator's allow-lists: a job naming an S3 endpoint or an image registry the admin has not allowed
fails before the operator makes any request for it (its Secret unread, its endpoint never asked), and an
endpoint with credentials in it is refused whatever the list says, without echoing them."""

from __future__ import annotations

import asyncio
import contextlib
import json
from collections.abc import AsyncIterator

import pytest

from tests.support.operator_harness import FAST_SETTINGS, OperatorHarness, finetunejob
from tests.support.s3_world import ACCESS_KEY, SECRET_KEY, S3World

pytestmark = pytest.mark.asyncio

NS = "default"
CREDENTIALS = {"AWS_ACCESS_KEY_ID": ACCESS_KEY, "AWS_SECRET_ACCESS_KEY": SECRET_KEY}


class Listener:
    """A TCP port that counts the connections it gets (an internal service a job might aim preflight at)."""

    def __init__(self) -> None:
        self.connections = 0

    async def _count(self, _: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
        self.connections += 1
        writer.close()

    @contextlib.asynccontextmanager
    async def on(self, host: str) -> AsyncIterator[str]:
        server = await asyncio.start_server(self._count, host, 0)
        async with server:
            yield f"http://{host}:{server.sockets[0].getsockname()[1]}"


async def failed_before_any_request(op: OperatorHarness, name: str, reason: str) -> str:
    """The Failed condition's message, once the job failed for `reason` having made no request for it."""
    job = await op.wait_for_phase(NS, name, "Failed")
    failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
    launched = next(c for c in job["status"]["conditions"] if c["type"] == "Launched")
    assert (failed["reason"], launched["status"], launched["reason"]) == (reason, "False", reason)
    assert (await op.wait_for_event(NS, name, reason))["type"] == "Warning"
    assert op.rayjob(NS, name) is None
    touched = {r.resource for r in op.operator_requests() if r.namespace == NS and r.name != name}
    assert "secrets" not in touched and "serviceaccounts" not in touched and "rayjobs" not in touched
    message: str = failed["message"]
    return message


async def test_an_endpoint_not_on_the_allow_list_fails_the_job_before_any_request(
    op: OperatorHarness, s3: S3World
) -> None:
    """The harness allows http://127.0.0.1 (moto); 127.0.0.2 is another host, as an internal service would be."""
    internal = Listener()
    async with internal.on("127.0.0.2") as endpoint:
        await op.create_secret(NS, "s3-creds", CREDENTIALS)
        await op.create_job(finetunejob("probe", uris=s3.seed(), endpoint=endpoint, credentials_secret="s3-creds"))
        message = await failed_before_any_request(op, "probe", "EndpointNotAllowed")
        await op.settle()
    assert internal.connections == 0
    assert "spec.storage.endpoint" in message and "127.0.0.2" in message and "allowedS3Endpoints" in message
    assert "http://127.0.0.1" in message  # what is allowed instead


async def test_an_endpoint_with_credentials_in_it_is_refused_without_echoing_them(
    op: OperatorHarness, s3: S3World
) -> None:
    endpoint = s3.endpoint.replace("http://", "http://admin:hunter2@")
    await op.create_job(finetunejob("userinfo", uris=s3.seed(), endpoint=endpoint))
    message = await failed_before_any_request(op, "userinfo", "InvalidSpec")
    assert "spec.storage.endpoint" in message and "without user:password@" in message
    # (status.kopf is kopf's copy of the spec, as readable as the spec itself)
    said = {key: value for key, value in (op.job(NS, "userinfo") or {})["status"].items() if key != "kopf"}
    assert "hunter2" not in json.dumps([said, op.events(NS, "userinfo")])


async def test_an_image_from_another_registry_fails_the_job_and_one_from_the_trainers_launches(
    op: OperatorHarness,
) -> None:
    await op.create_job(finetunejob("miner", image="evil.example.com/miner:latest"))
    message = await failed_before_any_request(op, "miner", "ImageNotAllowed")
    assert "evil.example.com/miner:latest" in message and "allowedImageRegistries" in message
    assert FAST_SETTINGS.trainer_image.split("/")[0] in message

    same_registry = FAST_SETTINGS.trainer_image.rsplit(":", 1)[0] + ":other-tag"
    await op.create_job(finetunejob("mine", image=same_registry))
    rayjob = await op.wait_for(lambda: op.rayjob(NS, "mine"), what="the RayJob of a job with an allowed image")
    head = rayjob["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"][0]
    assert head["image"] == same_registry
