"""Progress status writes are coalesced: at most one per job per write interval, whatever the push rate,
the latest update winning; news (the last step, a new checkpoint) is written at once, and nothing accepted
is lost when the operator stops. Time is a hand-moved clock, the flusher's rounds called by hand (but for one
test of the running flusher on the real clock).

Each runs twice: with the endpoint reading every job from the API server, and reading it, as the operator
does, from its watch cache, here one whose watch delivered each job once and never again (the worst lag):
the endpoint's own writes, laid over the cached job, must keep its view current."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import AsyncIterator, Mapping
from typing import Any

import pytest
import pytest_asyncio
from kubernetes import client

from kubetune_operator.auth import TokenReviewer
from kubetune_operator.incoming import JobRecord, receive
from kubetune_operator.jobcache import JobCache
from kubetune_operator.kube import Kube
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.progress import ProgressServer
from kubetune_operator.progress_writes import CoalescedWrites, Key
from tests.observability.test_progress_endpoint import NS, post, update
from tests.support.observability_stands import FTJ, Cluster, FakeClock

pytestmark = pytest.mark.asyncio


class RecordingKube(Kube):
    """The operator's client, noting each status write the API server receives (at the fake clock's time)."""

    def __init__(self, api: client.ApiClient, clock: FakeClock) -> None:
        super().__init__(api)
        self.clock = clock
        self.written: list[tuple[float, dict[str, Any]]] = []

    async def patch_job_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        await super().patch_job_status(namespace, name, status)
        self.written.append((self.clock(), dict(status)))


class LaggingWatch(JobCache):
    """The operator's watch cache, fed by a watch that delivers each job once (when first asked for) and then
    never again: only the endpoint's own writes bring it forward."""

    def __init__(self, kmock: Cluster) -> None:
        super().__init__()
        self.kmock = kmock

    def get(self, namespace: str, name: str) -> JobRecord | None:
        if super().get(namespace, name) is None and (FTJ, namespace, name) in self.kmock.objects:
            self.seen(receive(self.kmock.job(namespace, name)))
        return super().get(namespace, name)


@pytest_asyncio.fixture(params=["API reads", "lagging watch cache"])
async def served(
    request: pytest.FixtureRequest,
    kmock: Cluster,
    api_client: client.ApiClient,
    metrics: OperatorMetrics,
    clock: FakeClock,
) -> AsyncIterator[tuple[ProgressServer, str, RecordingKube]]:
    kube = RecordingKube(api_client, clock)
    view = LaggingWatch(kmock) if request.param == "lagging watch cache" else None
    server = ProgressServer(TokenReviewer(api_client), kube, metrics, clock=clock, view=view)
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, f"http://127.0.0.1:{port}", kube
    finally:
        await server.stop()


def steps(kube: RecordingKube) -> list[int]:
    return [status["progress"]["step"] for _, status in kube.written]


async def test_a_job_pushing_every_second_is_written_once_per_interval_with_its_latest_update(
    kmock: Cluster, served: tuple[ProgressServer, str, RecordingKube], clock: FakeClock
) -> None:
    server, base, kube = served
    kmock.add_job(NS, "cats")
    token = kmock.issue_token(NS, "cats")
    interval = server.writes.interval_s

    for step in range(1, 21):  # 20 s of one update a second, the trainer's pace
        code, answer, _ = await post(base, "cats", update(step=step, metrics={"trainLoss": 10.0 / step}), token)
        assert (code, answer["applied"]) == (200, True)
        await server.writes.flush()  # the flusher's tick
        clock.advance(1.0)
    clock.advance(interval)
    await server.writes.flush()

    times = [at for at, _ in kube.written]
    # At most one write per interval over the run, and never two closer than the schedule's slack allows.
    assert all(later - earlier >= interval - server.writes.early_s for earlier, later in itertools.pairwise(times))
    assert len(times) <= 20 / interval + 1
    # The latest wins: the status ends where the trainer is, with its latest metrics.
    progress = kmock.job(NS, "cats")["status"]["progress"]
    assert progress["step"] == 20 and progress["metrics"]["trainLoss"] == 0.5
    assert steps(kube) == sorted(steps(kube))


async def test_the_last_step_and_a_new_checkpoint_are_written_at_once(
    kmock: Cluster, served: tuple[ProgressServer, str, RecordingKube], clock: FakeClock
) -> None:
    _server, base, kube = served
    kmock.add_job(NS, "cats")
    token = kmock.issue_token(NS, "cats")

    await post(base, "cats", update(step=40), token)
    clock.advance(1.0)
    await post(base, "cats", update(step=50), token)  # waits for the interval
    assert kmock.job(NS, "cats")["status"]["progress"]["step"] == 40
    clock.advance(1.0)
    checkpoint = "s3://models/cats/checkpoints/checkpoint_000001"
    await post(base, "cats", update(step=60, latestCheckpoint=checkpoint), token)
    status = kmock.job(NS, "cats")["status"]
    assert (status["progress"]["step"], status["latestCheckpoint"]) == (60, checkpoint)
    clock.advance(1.0)
    await post(base, "cats", update(epoch=5, step=100), token)  # the run's last step (totalSteps 100)
    assert kmock.job(NS, "cats")["status"]["progress"]["step"] == 100
    assert steps(kube) == [40, 60, 100]


async def test_updates_still_waiting_are_written_when_the_operator_stops(
    kmock: Cluster, served: tuple[ProgressServer, str, RecordingKube], clock: FakeClock
) -> None:
    server, base, _ = served
    for name in ("cats", "dogs"):
        kmock.add_job(NS, name)
        token = kmock.issue_token(NS, name)
        await post(base, name, update(step=10), token)
        clock.advance(1.0)
        await post(base, name, update(step=11, metrics={"valAccuracy": 0.5}), token)
    assert kmock.job(NS, "cats")["status"]["progress"]["step"] == 10

    await server.stop()

    for name in ("cats", "dogs"):
        progress = kmock.job(NS, name)["status"]["progress"]
        assert (progress["step"], progress["metrics"]["valAccuracy"]) == (11, 0.5)


@pytest_asyncio.fixture
async def watched(
    kmock: Cluster, api_client: client.ApiClient, metrics: OperatorMetrics, clock: FakeClock
) -> AsyncIterator[tuple[ProgressServer, str, LaggingWatch]]:
    """The endpoint reading the jobs from a lagging watch cache, as the operator's reads them from its own."""
    view = LaggingWatch(kmock)
    server = ProgressServer(TokenReviewer(api_client), Kube(api_client), metrics, clock=clock, view=view)
    port = await server.start("127.0.0.1", 0)
    try:
        yield server, f"http://127.0.0.1:{port}", view
    finally:
        await server.stop()


async def test_with_a_lagging_watch_cache_older_updates_stay_ignored_and_a_preemption_is_told_once(
    kmock: Cluster, watched: tuple[ProgressServer, str, LaggingWatch], metrics: OperatorMetrics, clock: FakeClock
) -> None:
    server, base, _ = watched
    kmock.add_job(NS, "cats")
    token = kmock.issue_token(NS, "cats")
    assert (await post(base, "cats", update(step=20), token))[1]["applied"] is True
    clock.advance(server.writes.interval_s)
    # Older than what the endpoint wrote, though the watch never showed that write: ignored.
    code, answer, _ = await post(base, "cats", update(step=10), token)
    assert (code, answer["result"]) == (200, "stale")
    for step in (30, 31):  # the trainer counts one preemption, and keeps sending its count
        clock.advance(server.writes.interval_s)
        assert (await post(base, "cats", update(step=step, preemptions=1, preemptionStepsLost=2), token))[0] == 200

    events = [obj.raw for (resource, ns, _), obj in kmock.objects.items() if resource.plural == "events" and ns == NS]
    preempted = [e for e in events if e.get("reason") == "Preempted"]
    assert len(preempted) == 1, preempted
    assert metrics.registry.get_sample_value("kubetune_job_preemptions_total", {"namespace": NS}) == 1
    assert kmock.job(NS, "cats")["status"]["progress"]["step"] == 31
    assert server.reads == 0  # every update read the job from the cache


async def test_a_job_made_again_under_its_name_reports_before_the_watch_delivers_it(
    kmock: Cluster, watched: tuple[ProgressServer, str, LaggingWatch], clock: FakeClock
) -> None:
    server, base, view = watched
    kmock.add_job(NS, "cats", uid="uid-first")
    old_token = kmock.issue_token(NS, "cats")
    assert (await post(base, "cats", update(step=5), old_token))[0] == 200
    view.forget(NS, "cats")  # the watch delivered the deletion ...
    kmock.add_job(NS, "cats", uid="uid-second")  # ... and the job is made again
    new_token = kmock.issue_token(NS, "cats")
    clock.advance()
    assert (await post(base, "cats", update(step=1), new_token))[0] == 200
    view.forget(NS, "cats")  # the new job not delivered yet: the cache holds the old uid ...
    view.seen(receive({**kmock.job(NS, "cats"), "metadata": {"namespace": NS, "name": "cats", "uid": "uid-first"}}))
    clock.advance()
    # ... so the new job's token is checked against the API server, not refused
    assert (await post(base, "cats", update(step=2), new_token))[0] == 200
    view.forget(NS, "cats")
    clock.advance()
    assert (await post(base, "cats", update(step=6), old_token))[0] == 401
    clock.advance(server.writes.interval_s)
    await server.writes.flush()
    assert kmock.job(NS, "cats")["status"]["progress"]["step"] == 2


async def test_the_running_flusher_writes_each_waiting_update_when_its_interval_is_up() -> None:
    """The flusher on its own (no round called by hand, the real clock): pushes about as far apart as the
    interval are all written, the latest of each wait, at most one write per interval over the run."""
    written: list[tuple[float, int]] = []
    loop = asyncio.get_running_loop()
    locks: dict[Key, asyncio.Lock] = {}

    async def write(namespace: str, name: str, status: Mapping[str, Any]) -> None:
        written.append((loop.time(), status["progress"]["step"]))

    writes = CoalescedWrites(write, lambda key: locks.setdefault(key, asyncio.Lock()), interval_s=0.05, clock=loop.time)
    writes.start()
    try:
        for step in range(1, 7):  # each push a little sooner after the last write than the interval
            await writes.offer(NS, "cats", {"progress": {"step": step}})
            await asyncio.sleep(0.03 if step % 2 else 0.045)
        await asyncio.wait_for(_written(written, 6), timeout=10)
    finally:
        await writes.close()
    times = [at for at, _ in written]
    assert all(later - earlier >= 0.05 - writes.early_s for earlier, later in itertools.pairwise(times))
    assert len(times) <= (times[-1] - times[0] + writes.early_s) / 0.05 + 1  # the bucket's bound
    assert [step for _, step in written] == sorted(step for _, step in written) and written[-1][1] == 6


async def _written(written: list[tuple[float, int]], step: int) -> None:
    while not written or written[-1][1] < step:
        await asyncio.sleep(0.01)
