"""The operator's view of its jobs: the watch's bodies with its own status writes laid over them."""

from __future__ import annotations

from typing import Any

from kubetune_operator.incoming import InvalidJob, JobRecord, receive
from kubetune_operator.jobcache import JobCache


def body(uid: str = "u1", generation: int = 1, **status: Any) -> JobRecord:
    return receive(
        {
            "metadata": {"name": "flowers", "namespace": "default", "uid": uid, "generation": generation},
            "spec": {"runPolicy": {}},
            "status": status,
        }
    )


def test_a_job_never_watched_is_unknown() -> None:
    assert JobCache().get("default", "flowers") is None


def test_the_operators_own_write_wins_over_an_older_watched_body() -> None:
    cache = JobCache()
    cache.seen(body())
    cache.wrote("default", "flowers", "u1", {"phase": "Launching", "rayJobName": "flowers"})
    # The watch still delivers the body from before the write (its events lag behind the writes).
    cache.seen(body(generation=2, progress={"epoch": 1}))
    job = cache.get("default", "flowers")
    assert job is not None
    assert job.status == {"progress": {"epoch": 1}, "phase": "Launching", "rayJobName": "flowers"}
    assert job.meta.generation == 2  # spec and metadata come from the watch


def test_a_null_in_a_write_removes_the_field() -> None:
    cache = JobCache()
    cache.seen(body(dashboardURL="http://old"))
    cache.wrote("default", "flowers", "u1", {"dashboardURL": None})
    job = cache.get("default", "flowers")
    assert job is not None and "dashboardURL" not in job.status


def test_a_job_recreated_under_the_same_name_starts_afresh() -> None:
    cache = JobCache()
    cache.seen(body())
    cache.wrote("default", "flowers", "u1", {"phase": "Succeeded"})
    cache.seen(body(uid="u2"))
    job = cache.get("default", "flowers")
    assert job is not None and job.status == {}
    cache.wrote("default", "flowers", "u1", {"phase": "Failed"})  # a late write for the old job
    job = cache.get("default", "flowers")
    assert job is not None and job.status == {}


def test_a_forgotten_job_is_unknown() -> None:
    cache = JobCache()
    cache.seen(body())
    cache.forget("default", "flowers")
    assert cache.get("default", "flowers") is None and len(cache) == 0


def job_body(version: str, output: str = "s3://runs/flowers/", **status: Any) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {
            "name": "flowers",
            "namespace": "default",
            "uid": "u1",
            "generation": 1,
            "resourceVersion": version,
        },
        "spec": {
            "model": {"architecture": "resnet18", "checkpoint": "s3://models/resnet18.safetensors"},
            "data": {"train": "s3://datasets/flowers/train/"},
            "output": {"path": output},
        },
        "status": status,
    }


def test_a_record_of_the_body_the_watch_delivered_shares_its_parsed_job() -> None:
    # A burst's launches wait for a slot: each holding a parsed job of its own cost ~85 MB at 5,000 jobs.
    watched = receive(job_body("7"))
    launched = receive(job_body("7", phase="Pending"), parsed=watched)
    assert launched.job is watched.job
    assert launched.status == {"phase": "Pending"}  # the status is always the body's own


def test_a_record_of_another_version_of_the_job_is_parsed_afresh() -> None:
    watched = receive(job_body("7"))
    launched = receive(job_body("8", output="s3://runs/flowers-2/"), parsed=watched)
    assert launched.job is not watched.job
    assert not isinstance(launched.job, InvalidJob)
    assert launched.job.spec.output.path == "s3://runs/flowers-2/"
