"""The progress endpoint against kmock: who may report, what is refused, and what lands in the status."""

from __future__ import annotations

import json
import time
from typing import Any

import aiohttp
import pytest

from kubetune_operator.metrics import OperatorMetrics
from tests.support.observability_stands import FTJ, TOKENREVIEWS, Cluster, FakeClock, jwt

pytestmark = pytest.mark.asyncio

NS = "vision"


def update(epoch: int = 1, step: int = 10, **extra: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "epoch": epoch,
        "totalEpochs": 5,
        "step": step,
        "totalSteps": 100,
        "percent": step,
        "etaSeconds": 90.0,
        "metrics": {"trainLoss": 1.5, "imagesPerSecond": 240.0, "learningRate": 0.001},
    }
    body.update(extra)
    return body


async def post(
    base: str, job: str, body: Any, token: str | None, *, namespace: str = NS, raw: bytes | None = None
) -> tuple[int, dict[str, Any], dict[str, str]]:
    headers = {"Content-Type": "application/json"}
    if token is not None:
        headers["Authorization"] = f"Bearer {token}"
    data = raw if raw is not None else json.dumps(body).encode()
    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}/v1/progress/{namespace}/{job}", data=data, headers=headers) as response,
    ):
        return response.status, await response.json(), dict(response.headers)


def counted(metrics: OperatorMetrics, result: str, code: int) -> float:
    return (
        metrics.registry.get_sample_value("kubetune_progress_updates_total", {"result": result, "code": str(code)}) or 0
    )


async def test_an_update_from_the_jobs_own_trainer_lands_in_the_status(
    kmock: Cluster, progress_server: tuple[Any, str], metrics: OperatorMetrics
) -> None:
    _, base = progress_server
    kmock.add_job(NS, "cats")
    token = kmock.issue_token(NS, "cats")
    checkpoint = "s3://models/cats/checkpoints/checkpoint_000001"

    code, answer, _ = await post(base, "cats", update(latestCheckpoint=checkpoint, workerFailures=1), token)

    assert (code, answer["applied"]) == (200, True)
    status = kmock.job(NS, "cats")["status"]
    progress = status["progress"]
    assert progress["epoch"] == 1 and progress["totalEpochs"] == 5 and progress["step"] == 10
    assert progress["workerFailures"] == 1
    assert progress["percent"] == 10 and progress["etaSeconds"] == 90.0
    assert progress["metrics"] == {"trainLoss": 1.5, "imagesPerSecond": 240.0, "learningRate": 0.001}
    assert progress["latestCheckpoint"] == checkpoint
    assert progress["updatedAt"].endswith("Z")
    # The operator resumes from status.latestCheckpoint, so the newest one is mirrored there.
    assert status["latestCheckpoint"] == checkpoint
    assert status["phase"] == "Running"  # the rest of the status is untouched
    assert counted(metrics, "accepted", 200) == 1
    assert metrics.registry.get_sample_value("kubetune_job_progress_ratio", {"namespace": NS, "name": "cats"}) == 0.1


async def test_the_effective_learning_rates_and_augmentation_land_in_the_status(
    kmock: Cluster, progress_server: tuple[Any, str]
) -> None:
    _, base = progress_server
    kmock.add_job(NS, "cats")
    training = {
        "learningRate": 0.0043,
        "learningRateSource": "rangeTest",
        "backboneLearningRates": [0.0018, 0.0022, 0.0028, 0.0034, 0.0043],
        "warmupSteps": 19,
        "augment": "light: shifts up to 8 px at 64 px",
    }
    code, _, _ = await post(base, "cats", update(training=training), kmock.issue_token(NS, "cats"))
    assert code == 200
    assert kmock.job(NS, "cats")["status"]["progress"]["training"] == training


async def test_later_updates_merge_metrics_and_older_ones_are_ignored(
    kmock: Cluster, progress_server: tuple[Any, str], metrics: OperatorMetrics, clock: FakeClock
) -> None:
    server, base = progress_server
    kmock.add_job(NS, "cats")
    token = kmock.issue_token(NS, "cats")

    await post(base, "cats", update(epoch=1, step=50), token)
    clock.advance()
    evaluated = update(epoch=1, step=50, metrics={"valLoss": 0.9, "valAccuracy": 0.71})
    code, answer, _ = await post(base, "cats", evaluated, token)
    assert (code, answer["applied"]) == (200, True)
    clock.advance()
    code, answer, _ = await post(base, "cats", update(epoch=2, step=60, metrics={"trainLoss": 0.8}), token)
    assert (code, answer["applied"]) == (200, True)
    clock.advance()
    code, answer, _ = await post(base, "cats", update(epoch=1, step=55, metrics={"trainLoss": 9.9}), token)
    assert (code, answer["applied"], answer["result"]) == (200, False, "stale")
    # The updates after the first wait for the job's write interval (progress_writes.py), merged.
    clock.advance(server.writes.interval_s)
    await server.writes.flush()

    progress = kmock.job(NS, "cats")["status"]["progress"]
    assert (progress["epoch"], progress["step"]) == (2, 60)
    # Each metric keeps its latest value, even when the latest update did not carry it.
    assert progress["metrics"]["trainLoss"] == 0.8
    assert progress["metrics"]["valAccuracy"] == 0.71
    assert progress["metrics"]["imagesPerSecond"] == 240.0
    assert counted(metrics, "accepted", 200) == 3
    assert counted(metrics, "stale", 200) == 1
    assert metrics.registry.get_sample_value("kubetune_job_train_loss", {"namespace": NS, "name": "cats"}) == 0.8
    assert (
        metrics.registry.get_sample_value("kubetune_job_validation_accuracy_ratio", {"namespace": NS, "name": "cats"})
        == 0.71
    )


async def test_a_missing_or_forged_token_is_refused_with_401(
    kmock: Cluster, progress_server: tuple[Any, str], metrics: OperatorMetrics
) -> None:
    _, base = progress_server
    kmock.add_job(NS, "cats")
    kmock.issue_token(NS, "cats")

    code, _, headers = await post(base, "cats", update(), None)
    assert code == 401 and headers["WWW-Authenticate"].startswith("Bearer")
    code, _, _ = await post(base, "cats", update(), "eyJhbGciOiJSUzI1NiJ9.forged.signature")
    assert code == 401

    assert "progress" not in kmock.job(NS, "cats")["status"]
    assert counted(metrics, "rejected", 401) == 2


async def test_a_token_for_another_audience_is_refused_with_401(
    kmock: Cluster, progress_server: tuple[Any, str], metrics: OperatorMetrics
) -> None:
    """An API server that ignored our audience must not let a general-purpose token through."""
    _, base = progress_server
    kmock.add_job(NS, "cats")
    token = kmock.issue_token(NS, "cats")
    kmock.review_mode = "no-audiences"

    code, _, _ = await post(base, "cats", update(), token)

    assert code == 401
    assert counted(metrics, "rejected", 401) == 1


@pytest.mark.parametrize("audience", ["cats-trainer", "kubetune.dev/cats", "https://kubernetes.default.svc"])
async def test_a_token_for_a_legacy_or_general_audience_is_refused_with_401(
    kmock: Cluster, progress_server: tuple[Any, str], metrics: OperatorMetrics, audience: str
) -> None:
    """Authentic tokens of the job's ServiceAccount, but for the old `<job>-trainer` audience, an audience by
    name rather than uid, or the API server's own: none is the job's, and none is reviewed as if it were."""
    _, base = progress_server
    kmock.add_job(NS, "cats")
    token = kmock.issue_token(NS, "cats", audience=audience)

    code, _, _ = await post(base, "cats", update(), token)

    assert code == 401
    assert "progress" not in kmock.job(NS, "cats")["status"]


async def test_another_jobs_token_is_refused(
    kmock: Cluster, progress_server: tuple[Any, str], metrics: OperatorMetrics, clock: FakeClock
) -> None:
    """Every job's pods run as the namespace's one trainer ServiceAccount: the audience tells jobs apart."""
    _, base = progress_server
    kmock.add_job(NS, "cats")
    kmock.add_job(NS, "dogs")
    kmock.add_job("other", "cats")
    dogs_token = kmock.issue_token(NS, "dogs")
    assert (await post(base, "dogs", update(), dogs_token))[0] == 200  # authentic, and now cached
    clock.advance()

    # Authentic for dogs, and so not for cats (dogs' own updates are what it may send, one a second).
    assert (await post(base, "cats", update(), dogs_token))[0] == 401
    clock.advance()
    # Same job name in another namespace: another job, and the token is of another namespace's account.
    assert (await post(base, "cats", update(), dogs_token, namespace="other"))[0] == 403
    # The job's own audience, but minted for another ServiceAccount of the namespace.
    stranger = kmock.issue_token(NS, "cats", service_account="default")
    assert (await post(base, "cats", update(), stranger))[0] == 403

    assert "progress" not in kmock.job(NS, "cats")["status"]
    assert "progress" not in kmock.job("other", "cats")["status"]
    assert counted(metrics, "rejected", 401) == 1
    assert counted(metrics, "rejected", 403) == 2


async def test_a_job_created_again_under_the_same_name_refuses_the_old_jobs_tokens(
    kmock: Cluster, progress_server: tuple[Any, str], clock: FakeClock
) -> None:
    _, base = progress_server
    kmock.add_job(NS, "cats", uid="uid-first")
    old_token = kmock.issue_token(NS, "cats")
    assert (await post(base, "cats", update(), old_token))[0] == 200

    kmock.add_job(NS, "cats", uid="uid-second")  # deleted and created again: a new uid
    clock.advance()
    assert (await post(base, "cats", update(epoch=2), old_token))[0] == 401
    assert kmock.job(NS, "cats")["metadata"]["uid"] == "uid-second"
    new_token = kmock.issue_token(NS, "cats")
    assert (await post(base, "cats", update(epoch=2), new_token))[0] == 200


async def test_a_flood_of_updates_is_throttled_with_429(
    kmock: Cluster, progress_server: tuple[Any, str], metrics: OperatorMetrics, clock: FakeClock
) -> None:
    server, base = progress_server
    kmock.add_job(NS, "cats")
    kmock.add_job(NS, "dogs")
    cats = kmock.issue_token(NS, "cats")
    dogs = kmock.issue_token(NS, "dogs")

    codes = [(await post(base, "cats", update(step=step), cats))[0] for step in range(1, 11)]
    assert codes == [200] + [429] * 9
    code, answer, headers = await post(base, "cats", update(step=11), cats)
    assert code == 429 and int(headers["Retry-After"]) >= 1 and answer["result"] == "throttled"
    # The limit is per job: another job is not held back by this one's flood.
    assert (await post(base, "dogs", update(), dogs))[0] == 200
    clock.advance(server.writes.interval_s)  # the limit, and the job's write interval (progress_writes.py)
    assert (await post(base, "cats", update(step=12), cats))[0] == 200

    assert kmock.job(NS, "cats")["status"]["progress"]["step"] == 12
    assert counted(metrics, "throttled", 429) == 10
    assert counted(metrics, "accepted", 200) == 3


@pytest.mark.parametrize(
    ("body", "raw", "reason"),
    [
        (None, b"{not json", "body is not JSON"),
        (None, b'["a", "list"]', "JSON object"),
        (None, b'{"epoch": NaN, "totalEpochs": 2}', "JSON allows"),
        (update(epoch=-1), None, "epoch"),
        (update(percent=250), None, "percent"),
        (update(metrics={"trainLoss": "low"}), None, "metrics.trainLoss"),
        (update(secret="hunter2"), None, "secret"),
        (None, b"{" + b'"x": "' + b"a" * 20_000 + b'"}', "exceeds"),
    ],
    ids=[
        "not-json",
        "not-an-object",
        "nan",
        "negative-epoch",
        "percent-over-100",
        "loss-not-a-number",
        "unknown-field",
        "oversized",
    ],
)
async def test_a_malformed_or_oversized_body_is_refused_with_400(
    kmock: Cluster,
    progress_server: tuple[Any, str],
    metrics: OperatorMetrics,
    clock: FakeClock,
    body: Any,
    raw: bytes | None,
    reason: str,
) -> None:
    _, base = progress_server
    kmock.add_job(NS, "cats")
    token = kmock.issue_token(NS, "cats")

    code, answer, _ = await post(base, "cats", body, token, raw=raw)

    assert code == 400
    assert reason in answer["message"]
    assert "progress" not in kmock.job(NS, "cats")["status"]
    assert counted(metrics, "rejected", 400) == 1


SWEEP = {"trials": 8, "running": 2, "pending": 6, "metric": "valAccuracy", "bestTrial": "trial-003"}
TRAINING = {"learningRate": 0.004, "learningRateSource": "spec", "warmupSteps": 0, "augment": "none"}


@pytest.mark.parametrize(
    ("raw", "reason"),
    [
        ({**SWEEP, "bestParameters": {"training.learningRate": "9" * 10_000}}, "bestParameters"),
        ({**SWEEP, "bestParameters": {"x" * 5000: "0.1"}}, "bestParameters"),
        ({**SWEEP, "bestParameters": {"training.learningRate": "\u001b[31mred"}}, "bestParameters"),
        ({**SWEEP, "bestTrial": "../../../etc"}, "bestTrial"),
        ({**SWEEP, "metric": "anything at all"}, "metric"),
        ({**SWEEP, "failed": 1000}, "at most trials (8)"),
        ({**SWEEP, "trials": 1_000_000}, "trials"),
        ({**SWEEP, "bestValue": "1e999"}, "finite"),
        ({"training": {**TRAINING, "backboneLearningRates": ["1e999"]}}, "finite"),
    ],
    ids=[
        "long-value",
        "unknown-field",
        "control-characters",
        "trial-id-a-path",
        "unknown-metric",
        "count-over-trials",
        "trials-over-bound",
        "best-value-infinite",
        "infinite-in-a-list",
    ],
)
async def test_a_sweep_or_training_block_out_of_bounds_is_refused_with_400(
    kmock: Cluster, progress_server: tuple[Any, str], clock: FakeClock, raw: dict[str, Any], reason: str
) -> None:
    """What a forged sweep or training block could put in the status (and the metrics) is bounded: a
    trial id, a known metric, the swept fields with short printable values, counts within the trials."""
    _, base = progress_server
    kmock.add_job(NS, "cats")
    token = kmock.issue_token(NS, "cats")
    field = "sweep" if "trials" in raw else "training"
    body = json.dumps(update(**{field: raw["training"] if field == "training" else raw}))
    body = body.replace('"1e999"', "1e999")  # a number JSON parses as infinity

    code, answer, _ = await post(base, "cats", None, token, raw=body.encode())

    assert code == 400 and reason in answer["message"], answer
    assert "progress" not in kmock.job(NS, "cats")["status"]
    clock.advance()
    sweep = {**SWEEP, "bestValue": 0.7, "bestParameters": {"training.learningRate": "0.003", "data.augment": "light"}}
    code, _, _ = await post(base, "cats", update(sweep=sweep), token)
    assert code == 200 and kmock.job(NS, "cats")["status"]["sweep"]["bestParameters"] == sweep["bestParameters"]


async def test_an_update_for_a_job_deleted_since_is_refused_with_404(
    kmock: Cluster, progress_server: tuple[Any, str], metrics: OperatorMetrics
) -> None:
    """A deleted job's pods may still be running for a moment: they learn it, and no series come back."""
    _, base = progress_server
    kmock.add_job(NS, "gone")
    token = kmock.issue_token(NS, "gone")
    del kmock.objects[FTJ, NS, "gone"]

    code, _, _ = await post(base, "gone", update(), token)

    assert code == 404
    assert counted(metrics, "rejected", 404) == 1
    assert metrics.registry.get_sample_value("kubetune_job_progress_ratio", {"namespace": NS, "name": "gone"}) is None


async def test_without_an_authentic_token_nobody_learns_which_jobs_exist(
    kmock: Cluster, progress_server: tuple[Any, str], metrics: OperatorMetrics
) -> None:
    """The token is checked before the job is looked up: a job that exists and one that does not get the same
    401, and the job is never read for a caller without a token authentic for it."""
    _, base = progress_server
    kmock.add_job(NS, "cats")
    forged = jwt({"aud": ["kubetune.dev/uid-cats"], "sub": "system:serviceaccount:vision:kubetune-trainer"})

    answers = []
    for job, token in [("cats", forged), ("nobody", forged), ("cats", None), ("nobody", None), ("cats", "x.y.z")]:
        code, body, _ = await post(base, job, update(), token)
        answers.append((code, body["message"]))

    assert {code for code, _ in answers} == {401}
    assert answers[0][1] == answers[1][1] and answers[2][1] == answers[3][1]
    assert len(kmock[f"get /apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs/cats"]) == 0
    assert len(kmock[f"get /apis/kubetune.dev/v1alpha1/namespaces/{NS}/finetunejobs/nobody"]) == 0
    assert "progress" not in kmock.job(NS, "cats")["status"]


@pytest.mark.parametrize(
    ("path", "code"),
    [
        ("/v1/progress/vision/Cats", 400),
        ("/v1/progress/vision/" + "a" * 48, 400),
        ("/v1/progress/-vision/cats", 400),
        ("/v1/progress/vision/cats%2F..", 404),
        ("/v1/progress/vision", 404),
        ("/v1/progress/vision/cats/extra", 404),
        ("/metrics", 404),
    ],
)
async def test_a_path_that_names_no_job_is_refused_before_anything_else(
    kmock: Cluster, progress_server: tuple[Any, str], metrics: OperatorMetrics, path: str, code: int
) -> None:
    _, base = progress_server
    kmock.add_job(NS, "cats")
    token = kmock.issue_token(NS, "cats")

    async with (
        aiohttp.ClientSession() as session,
        session.post(f"{base}{path}", json=update(), headers={"Authorization": f"Bearer {token}"}) as response,
    ):
        assert response.status == code

    assert len(kmock[TOKENREVIEWS]) == 0  # not even the token was looked at


async def test_when_tokens_cannot_be_reviewed_the_trainer_is_told_to_retry(
    kmock: Cluster, progress_server: tuple[Any, str], metrics: OperatorMetrics
) -> None:
    _, base = progress_server
    kmock.add_job(NS, "cats")
    token = kmock.issue_token(NS, "cats")
    kmock.review_mode = "down"

    code, _, headers = await post(base, "cats", update(), token)

    assert code == 503 and int(headers["Retry-After"]) > 0
    assert counted(metrics, "error", 503) == 1


async def test_an_authentic_token_is_reviewed_once_and_then_cached(
    kmock: Cluster, progress_server: tuple[Any, str], clock: FakeClock
) -> None:
    """Every job reports every second: the API server must not get a TokenReview for each update."""
    _, base = progress_server
    kmock.add_job(NS, "cats")
    token = kmock.issue_token(NS, "cats")

    for step in range(1, 4):
        assert (await post(base, "cats", update(step=step), token))[0] == 200
        clock.advance()
    forged = jwt({"aud": ["kubetune.dev/uid-cats"]})
    for _ in range(3):
        assert (await post(base, "cats", update(), forged))[0] == 401
    assert (await post(base, "cats", update(), "not-even-a-jwt"))[0] == 401

    # One for the authentic token; one for the forged one, whose refusal is remembered for a while; none for
    # a token that names no kubetune job.
    assert len(kmock[TOKENREVIEWS]) == 2


async def test_an_authentic_token_is_not_taken_from_the_cache_past_its_own_expiry(
    kmock: Cluster, progress_server: tuple[Any, str], clock: FakeClock
) -> None:
    """Answers are kept for minutes, but a token that says it has expired is asked about every time."""
    _, base = progress_server
    kmock.add_job(NS, "cats")
    token = kmock.issue_token(NS, "cats", expires=time.time() - 1)

    for step in range(1, 4):
        assert (await post(base, "cats", update(step=step), token))[0] == 200  # kmock ignores exp
        clock.advance()
    assert len(kmock[TOKENREVIEWS]) == 3
