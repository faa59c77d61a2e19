"""The soak, start to end: the dev cluster and its world up, the job stream and the fault schedule run for
the window, every job drained, the facts gathered, the invariants checked, the results file written."""

from __future__ import annotations

import json
import os
import shlex
import tempfile
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_dev.devcluster.cluster import DevCluster
from kubetune_dev.devcluster.processes import descendants_of
from kubetune_dev.devcluster.seed import split_uri
from kubetune_dev.soak import invariants
from kubetune_dev.soak.faults import FaultRecord, Injection, inject
from kubetune_dev.soak.invariants import Check
from kubetune_dev.soak.jobs import JobRecord, JobStream, retrying
from kubetune_dev.soak.schedule import FAULT_KINDS, Plan, plan
from kubetune_dev.soak.world import RSS_EVERY_S, SoakWorld
from tests.support.busy_world import FTJ, NS, RAYCLUSTERS, RAYJOBS, progress_of

DRAIN_S = 1800.0  # how long the jobs may run on after the window (2 cores shared with other work: long)
CLEANUP_S = 120.0  # how long finished jobs' Ray clusters may take to go


@dataclass(frozen=True)
class Options:
    minutes: float = 20.0
    jobs: int = 8
    seed: int = 23
    kinds: tuple[str, ...] = FAULT_KINDS
    results: Path = Path("soak") / "results.md"
    concurrent: int = 2


@dataclass
class Outcome:
    options: Options
    plan: Plan
    jobs: list[JobRecord]
    faults: list[FaultRecord]
    checks: list[Check]
    started: float
    window_end: float
    ended: float
    command: str
    notes: list[str] = field(default_factory=list)

    @property
    def passed(self) -> bool:
        return not invariants.failed(self.checks)


def run(options: Options) -> Outcome:
    soak_plan = plan(options.seed, options.minutes, options.jobs, options.kinds)
    workdir = Path(tempfile.mkdtemp(prefix="kubetune-soak-"))
    run_tmp = workdir / "tmp"  # the runs' temp files (TMPDIR of the drivers and workers): none may be left
    run_tmp.mkdir()
    saved_tmpdir = os.environ.get("TMPDIR")
    os.environ["TMPDIR"] = str(run_tmp)
    try:
        with DevCluster(workdir=workdir / "cluster") as cluster:
            world = SoakWorld(cluster)
            world.setup()
            try:
                return _soak(world, soak_plan, options, run_tmp)
            finally:
                world.close()
    finally:
        if saved_tmpdir is None:
            os.environ.pop("TMPDIR", None)
        else:
            os.environ["TMPDIR"] = saved_tmpdir


def _soak(world: SoakWorld, soak_plan: Plan, options: Options, run_tmp: Path) -> Outcome:
    started = time.time()
    window_end = started + options.minutes * 60.0
    stream = JobStream(world, soak_plan.jobs, started, window_end + DRAIN_S, options.concurrent)
    faults: list[FaultRecord] = []
    done = threading.Event()
    threads = [
        threading.Thread(target=_inject_all, args=(Injection(world, stream), soak_plan, started, faults), daemon=True),
        threading.Thread(target=_sample_rss, args=(world, done), daemon=True),
    ]
    stream.start()
    for thread in threads:
        thread.start()
    threads[0].join()
    drained = stream.join(max(0.0, stream.deadline - time.time()) + 60.0)
    notes = [] if drained else [f"jobs still running {DRAIN_S:.0f}s after the window: not drained"]
    checks = [check for record in stream.records.values() for check in job_checks(world, record)]
    checks.append(orphan_check(world, run_tmp))
    done.set()
    threads[1].join()
    checks.append(invariants.rss_flat(world.rss))
    return Outcome(
        options,
        soak_plan,
        list(stream.records.values()),
        faults,
        checks,
        started,
        window_end,
        time.time(),
        command(options),
        notes,
    )


def _inject_all(ctx: Injection, soak_plan: Plan, started: float, out: list[FaultRecord]) -> None:
    """The planned faults in order, each at its moment (or as soon as the one before it is over)."""
    for fault in soak_plan.faults:
        delay = started + fault.at - time.time()
        if delay > 0:
            time.sleep(delay)
        out.append(inject(ctx, fault))


def _sample_rss(world: SoakWorld, done: threading.Event) -> None:
    while not done.wait(RSS_EVERY_S):
        world.sample_rss()


# --- the facts, and the checks on them ---------------------------------------------------------------


def job_checks(world: SoakWorld, record: JobRecord) -> list[Check]:
    """Every invariant of one job, on what the API, S3 and the soak saw of it."""
    deleted = record.acted == "deleted"
    if deleted:
        world.wait_gone(RAYJOBS, record.name, timeout=60)
        gone = world.job(record.name) is None
        phase, message = ("Deleted" if gone else "still there"), ""
    else:
        phase = record.phase
        message = record.error or str(((record.final or {}).get("status") or {}).get("message") or "")
    created = [meta["uid"] for meta in world.cluster.api.created("ray.io", "rayjobs") if _of_job(meta, record)]
    left = len([rj for rj in _items(world, RAYJOBS) if _of_job(rj["metadata"], record)])
    checks = [
        invariants.final_phase(record.name, "Deleted" if deleted else "Succeeded", phase, message),
        invariants.one_rayjob_per_attempt(record.name, created, 1, left, deleted),
    ]
    if deleted:
        return checks
    history = _read_json(world, record.name, "history.json")
    card = _read_json(world, record.name, "model.json")
    return [
        *checks,
        invariants.history_complete(record.name, history, record.planned.epochs),
        invariants.progress_matches_history(record.name, progress_of(record.final), history),
        invariants.model_reloads(record.name, card, _read(world, record.name, "model.safetensors")),
    ]


def _of_job(meta: dict[str, Any], record: JobRecord) -> bool:
    """Whether a RayJob belongs to the job: named after it, or owned by it."""
    owners = {ref.get("uid") for ref in meta.get("ownerReferences") or []}
    return meta.get("name") == record.name or (bool(record.uid) and record.uid in owners)


def _read(world: SoakWorld, name: str, file: str) -> bytes | None:
    bucket, prefix = split_uri(world.output(name))
    try:
        body: bytes = retrying(lambda: world.s3.get_object(Bucket=bucket, Key=prefix + file)["Body"].read(), attempts=3)
    except Exception:
        return None
    return body


def _read_json(world: SoakWorld, name: str, file: str) -> Any:
    body = _read(world, name, file)
    return json.loads(body) if body is not None else None


def orphan_check(world: SoakWorld, run_tmp: Path) -> Check:
    """Once every job ended (and finished ones had CLEANUP_S to clean up): what is left behind."""
    deadline = time.monotonic() + CLEANUP_S
    while True:
        ray, objects, temp = leftovers(world, run_tmp)
        if not (ray or objects or temp) or time.monotonic() > deadline:
            return invariants.no_orphans(ray, objects, temp)
        time.sleep(2.0)


def leftovers(world: SoakWorld, run_tmp: Path) -> tuple[list[str], list[str], list[str]]:
    """Ray processes of this soak, RayClusters, pods and RayJobs of jobs that are gone, temp files of runs."""
    operator = world.cluster.operator_process.pid if world.cluster.operator_process else -1
    ray = [
        f"process {p.pid} ({p.cmdline[:80]})"
        for p in descendants_of(os.getpid())
        if p.alive and "ray" in p.cmdline and p.pid != operator
    ]
    jobs = {job["metadata"]["name"] for job in _items(world, FTJ)}
    objects = [f"RayCluster {rc['metadata']['name']}" for rc in _items(world, RAYCLUSTERS)]
    objects += [f"pod {pod['metadata']['name']}" for pod in _items(world, ("", "v1", "pods"))]
    objects += [f"RayJob {name} (its job is gone)" for name in _names(_items(world, RAYJOBS)) if name not in jobs]
    standin = world.cluster.kuberay
    temp = [f"temp dir {d}" for d in (standin.temp_dirs if standin else []) if d.exists()]
    temp += [f"temp file {p}" for p in sorted(run_tmp.iterdir())]
    return ray, objects, temp


def _items(world: SoakWorld, what: tuple[str, str, str]) -> list[dict[str, Any]]:
    try:
        return world.cluster.list(*what, NS)
    except Exception:  # a kind this API does not serve has none
        return []


def _names(items: list[dict[str, Any]]) -> list[str]:
    return [str(item["metadata"]["name"]) for item in items]


def command(options: Options) -> str:
    """The command that repeats this soak."""
    argv = [
        "python",
        "-m",
        "kubetune_dev.soak",
        "--minutes",
        f"{options.minutes:g}",
        "--jobs",
        str(options.jobs),
        "--seed",
        str(options.seed),
    ]
    if options.kinds != FAULT_KINDS:
        argv += ["--faults", ",".join(options.kinds)]
    return shlex.join(argv)
