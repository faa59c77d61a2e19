"""Time to first step: from applying a FineTuneJob to its first training step in `status.progress`.

On the demo's dev cluster (`devtools/kubetune_dev/devcluster`: the embedded Kubernetes API, S3 and the
KubeRay stand-in that runs `ray start --head` per RayJob), with the real operator, the demo's job
(`examples/demo-finetunejob.yaml`: test_resnet on 32 px digits, one CPU worker). Each repeat applies the
job under a new name, so each has a Ray cluster and a node cache of its own (cold, as a new job's are).

The time is cut at the milestones this run can see: the bench polls the API server (every 20 ms) for the
RayJob, the RayJob's Running (the stand-in's Ray head up and the driver process started) and the first
`status.progress.step`; the trainer logs its own milestones with the wall clock (`kubetune_trainer/
startup.py`: driver imports, connected to Ray, inputs checked, the node task's start, its imports, base
weights and cache fill, worker started, model built, data loaders ready, first step), which the bench
reads from the driver's log. Each phase is one figure; whose share it is (the operator's, the trainer's,
Ray's) is in its name. No baseline: the target is on the own shares' sum.

Whose share: what kubetune's code runs or imports is its own, wherever it runs, where it is on the path to
the first step. The node preparation (the node task's torch and timm imports, the base weights, the cache
fill) runs beside Ray Train's worker group start (`run.Preparing`): its phases have rows of their own, in
no sum, and what the worker still waits for of it is the phase "the worker's wait" (the trainer's). The
node task marks its start before it imports the trainer's modules, so its imports are timed apart from
its Ray worker process's start. On the worker, timm's import starts on a thread when Ray Train hands the
worker its context (`startup.ModelImports`), beside Ray Train's set-up: a row of its own, in no sum, and
what the model build still waits for of it is in "model build". Ray's share is the Ray processes'
start-up: the head, the driver's connection, and Ray Train's worker group, whose worker imports torch for
Ray Train's own process-group set-up before kubetune's code runs; it now shares the node's cores with the
node preparation, so the total (apply → first step) is the figure that says what the overlap gained.
The dev cluster has no image pull or pod scheduling, which a real cluster adds before all of this
(bench/findings.md lists them from KubeRay's docs).
"""

from __future__ import annotations

import dataclasses
import re
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.common import REPO, Row, log

NAME = "Time to first step"
MANIFEST = REPO / "examples" / "demo-finetunejob.yaml"
MARK = re.compile(r"kubetune: start-up: (.+?) at (\d\d:\d\d:\d\d\.\d\d\d)Z")

# The phases, in order: (figure, whose share, the milestone that ends it). The milestones come from the
# API server ("rayjob", "running", "status") or the trainer's start-up marks (the rest).
PHASES: tuple[tuple[str, str, str], ...] = (
    ("operator launch: apply → RayJob created", "operator", "rayjob"),
    ("Ray head up, driver started (KubeRay stand-in: ray start --head)", "Ray", "running"),
    ("driver process start (python, kubetune_trainer import)", "trainer", "driver started"),
    ("driver imports (Ray, torch: no timm)", "trainer", "driver imports done"),
    ("driver connects to Ray", "Ray", "connected to Ray"),
    ("driver preflight (architecture, S3 checks, dataset listing)", "trainer", "inputs checked"),
    (
        "Ray Train worker group start (the node preparation and the worker's timm import run beside it: rows below)",
        "Ray",
        "worker started",
    ),
    ("the worker's wait for what is left of the node preparation", "trainer", "node prepared, on the worker"),
    ("model build (what is left of timm's import, then the build)", "trainer", "model built"),
    ("data loaders", "trainer", "data loaders ready"),
    ("first step", "trainer", "first step"),
    ("first step → status.progress (relay, push, operator write)", "trainer", "status"),
)
OWN = ("operator", "trainer")
# Work that runs beside a phase above (figure, whose, from mark, to mark): its own row, in no sum. The node
# preparation (`run.Preparing`) runs beside Ray Train's worker group start; what the worker still waits for
# of it is the phase above.
BESIDE: tuple[tuple[str, str, str, str], ...] = (
    ("node task start (a Ray worker process; beside, in no sum)", "Ray", "inputs checked", "node task started"),
    ("node task imports (torch; beside, in no sum)", "trainer", "node task started", "node task imports done"),
    (
        "base weights: timm import, download and load (beside, in no sum)",
        "trainer",
        "node task imports done",
        "base weights loaded",
    ),
    (
        "data cache fill, what is left of it after the base weights (beside, in no sum)",
        "trainer",
        "base weights loaded",
        "data cache filled",
    ),
    (
        "the node preparation, inputs checked → its result in the driver (beside, in no sum)",
        "trainer",
        "inputs checked",
        "node prepared",
    ),
    (
        "timm import on the worker, beside Ray Train's worker group start (in no sum: its wait is in model build)",
        "trainer",
        "model imports started",
        "model imports done",
    ),
)
# After the first step shows in the status, how long to wait for the driver's log to have every mark:
# Ray forwards the worker's lines to it a moment later.
LOG_WAIT_S = 30.0


@dataclasses.dataclass(frozen=True)
class Config:
    repeats: int = 3
    timeout: float = 300.0

    @classmethod
    def full(cls) -> Config:
        return cls()

    @classmethod
    def quick(cls) -> Config:
        return cls(repeats=1)

    @classmethod
    def tiny(cls) -> Config:
        return cls(repeats=1)


def marks_in(log_text: str, day: datetime) -> dict[str, datetime]:
    """The trainer's start-up marks in a driver log (the first of each), as datetimes on `day` (UTC)."""
    found: dict[str, datetime] = {}
    for what, clock in MARK.findall(log_text):
        at = datetime.strptime(clock, "%H:%M:%S.%f").replace(year=day.year, month=day.month, day=day.day, tzinfo=UTC)
        if at < day - timedelta(hours=12):  # past midnight since the apply
            at += timedelta(days=1)
        found.setdefault(what, at)
    return found


def phases(applied: datetime, milestones: dict[str, datetime]) -> dict[str, float]:
    """Seconds of each phase (PHASES), from the milestone before it (the apply for the first)."""
    out: dict[str, float] = {}
    previous = applied
    for figure, _, ends in PHASES:
        at = milestones.get(ends)
        if at is None:
            raise RuntimeError(f"no milestone {ends!r} (driver log lacks its start-up mark?)")
        out[figure] = max(0.0, (at - previous).total_seconds())
        previous = at
    return out


def one_job(cluster: Any, manifest: dict[str, Any], name: str, timeout: float) -> dict[str, float]:
    """Apply the job as `name`; the seconds of each phase until its first step shows in the status."""
    job = {**manifest, "metadata": {**manifest["metadata"], "name": name}}
    job["spec"] = {**manifest["spec"], "output": {"path": f"s3://kubetune-demo/runs/{name}/"}}
    namespace = job["metadata"].get("namespace") or "default"
    seen: dict[str, datetime] = {}
    applied = datetime.now(UTC)
    cluster.apply(job)
    deadline = time.monotonic() + timeout
    while "status" not in seen:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{name}: no first step in the status within {timeout:g}s (seen: {sorted(seen)})")
        rayjob = cluster.get("ray.io", "v1", "rayjobs", namespace, name) if "running" not in seen else None
        now = datetime.now(UTC)
        if rayjob is not None:
            seen.setdefault("rayjob", now)
            if (rayjob.get("status") or {}).get("jobDeploymentStatus") == "Running":
                seen.setdefault("running", now)
        ftj = cluster.get("kubetune.dev", "v1alpha1", "finetunejobs", namespace, name) or {}
        if int(((ftj.get("status") or {}).get("progress") or {}).get("step") or 0) >= 1:
            seen.setdefault("status", now)
        time.sleep(0.02)
    marks = marks_with_all(lambda: cluster.driver_log(namespace, name), applied)
    return phases(applied, {**marks, **seen}) | beside(marks)


def marks_with_all(read_log: Callable[[], str], applied: datetime) -> dict[str, datetime]:
    """The driver log's marks once it has every one the phases need (or what it has after LOG_WAIT_S)."""
    needed = {ends for _, _, ends in PHASES} - {"rayjob", "running", "status"}
    needed |= {at for _, _, start, end in BESIDE for at in (start, end)}
    deadline = time.monotonic() + LOG_WAIT_S
    while not needed <= (found := marks_in(read_log(), applied)).keys() and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def beside(marks: dict[str, datetime]) -> dict[str, float]:
    """Seconds of each BESIDE figure, from its start mark to its end mark."""
    out: dict[str, float] = {}
    for figure, _, start, end in BESIDE:
        if start not in marks or end not in marks:
            raise RuntimeError(f"no milestone {start!r} or {end!r} (driver log lacks its start-up mark?)")
        out[figure] = max(0.0, (marks[end] - marks[start]).total_seconds())
    return out


def run(config: Config, workdir: Path) -> list[Row]:
    import yaml

    from kubetune_dev.devcluster import DevCluster
    from kubetune_dev.devcluster.seed import seed_demo

    manifest = yaml.safe_load(MANIFEST.read_text())
    samples: list[dict[str, float]] = []
    with DevCluster(workdir=workdir / "cluster", namespace="default") as cluster:
        cluster.use_env()
        cluster.start_operator()
        manifest["spec"]["storage"]["endpoint"] = cluster.s3_url
        seed_demo(cluster.s3(), manifest["spec"])
        for repeat in range(config.repeats):
            name = f"first-step-{repeat}"
            samples.append(one_job(cluster, manifest, name, config.timeout))
            log(f"{NAME}: {name}: " + ", ".join(f"{k.split(':')[0]} {v:.2f}s" for k, v in samples[-1].items()))
            cluster.delete("kubetune.dev", "v1alpha1", "finetunejobs", "default", name)
            # Its Ray cluster goes with it before the next job starts (garbage collection, then the stand-in).
            cluster.wait_for("ray.io", "v1", "rayjobs", "default", name, lambda obj: obj is None, timeout=120)
    return rows(samples)


def rows(samples: list[dict[str, float]]) -> list[Row]:
    note = (
        "the demo's job on the dev cluster (one CPU worker, test_resnet, 32 px digits, cold node cache), "
        "a new job per repeat; phases end at the trainer's start-up marks (startup.py) and at what the API "
        "server shows (RayJob created, RayJob Running, first status.progress.step)"
    )
    out = [Row(NAME, f"{figure} [{who}]", "s", [s[figure] for s in samples], note=note) for figure, who, _ in PHASES]
    out += [
        Row(NAME, f"{figure} [{who}]", "s", [s[figure] for s in samples], note=note) for figure, who, _, _ in BESIDE
    ]
    own = [sum(s[f] for f, who, _ in PHASES if who in OWN) for s in samples]
    ray = [sum(s[f] for f, who, _ in PHASES if who not in OWN) for s in samples]
    total = [sum(s[f] for f, _, _ in PHASES) for s in samples]
    out += [
        Row(NAME, "operator's and trainer's own shares together", "s", own, goal=("<", 5.0), note=note),
        Row(NAME, "Ray's share (head, connect, worker processes, Train worker group)", "s", ray, note=note),
        Row(NAME, "apply → first step in status.progress", "s", total, note=note),
    ]
    return out
