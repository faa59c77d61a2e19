"""The operator's view of its jobs: the watch's bodies with its own status writes laid over them."""

from __future__ import annotations

from typing import Any

from kubetune_operator.incoming import JobRecord, receive
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
