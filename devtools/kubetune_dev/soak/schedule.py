"""The soak's plan, drawn from one seed: the jobs it submits and the faults it injects, and when.

Pure: the same (seed, minutes, jobs) always gives the same plan, so a results file's command reproduces
its schedule (what each fault hits depends on which jobs are running at that moment, so not the outcome).
"""

from __future__ import annotations

import random
from dataclasses import dataclass

# Every fault kind the soak injects (faults.py has one injector each); docs/operator.md lists them.
FAULT_KINDS = (
    "operator-kill",  # SIGKILL the operator process, start it again after a few seconds
    "operator-kill-launch",  # SIGKILL it as its RayJob create arrives at the API (a launch in flight)
    "operator-kill-status-write",  # SIGKILL it as a status patch of a job arrives (a status write in flight)
    "worker-kill",  # SIGKILL one Ray Train worker of a running job (Ray Train restarts the workers)
    "worker-preempt",  # SIGTERM one (a preemption notice: the workers save the step and restart)
    "driver-kill",  # SIGKILL a running job's driver (KubeRay retries the run on a new Ray cluster)
    "s3-503",  # S3 answers 503 SlowDown to every request for a few seconds
    "s3-drop",  # S3 cuts every connection for a few seconds
    "s3-slow",  # S3 answers every request late for a few seconds
    "api-restart",  # the API server stops serving (watches cut) and comes back
    "api-errors",  # the API answers the operator's requests 500 or 429 for a while
    "progress-down",  # the operator's progress endpoint is unreachable for a while
)
# Faults that hit one running job (the others hit the whole cluster).
JOB_FAULTS = frozenset({"worker-kill", "worker-preempt", "driver-kill"})
JOB_KINDS = ("classification", "detection")
ACTIONS = ("none", "suspend", "delete")  # what the soak itself does to a job while it runs
FAULTS_PER_MINUTE = 1.6
FIRST_FAULT_AT = 0.08  # of the window: the first jobs are getting started
LAST_FAULT_AT = 0.9
LAST_SUBMIT_AT = 0.6  # later jobs would finish long after the window


@dataclass(frozen=True)
class PlannedJob:
    name: str
    kind: str  # JOB_KINDS
    workers: int
    epochs: int
    action: str  # ACTIONS
    submit_at: float  # seconds into the window


@dataclass(frozen=True)
class PlannedFault:
    at: float  # seconds into the window
    kind: str  # FAULT_KINDS
    seconds: float  # how long a windowed fault lasts, or how long the operator stays down
    pick: float  # in [0, 1): which of the running jobs a job fault hits
    status: int = 0  # api-errors: 500 or 429


@dataclass(frozen=True)
class Plan:
    seed: int
    minutes: float
    jobs: tuple[PlannedJob, ...]
    faults: tuple[PlannedFault, ...]


def plan(seed: int, minutes: float, jobs: int, kinds: tuple[str, ...] = FAULT_KINDS) -> Plan:
    """The jobs and faults of a soak of `minutes` with `jobs` jobs, drawn from `seed`."""
    rng = random.Random(seed)
    window = minutes * 60.0
    return Plan(seed, minutes, plan_jobs(rng, window, jobs), plan_faults(rng, window, kinds))


def plan_jobs(rng: random.Random, window: float, count: int) -> tuple[PlannedJob, ...]:
    """`count` jobs submitted over the first LAST_SUBMIT_AT of the window; the first at 0, one in three a
    detection, about one in five suspended and resumed, one in six deleted (never the first: it must live)."""
    out = []
    for n in range(count):
        submit_at = 0.0 if n == 0 else round(rng.uniform(0.0, LAST_SUBMIT_AT) * window, 1)
        kind = "detection" if rng.random() < 1 / 3 else "classification"
        roll = rng.random()
        action = "none" if n == 0 else "suspend" if roll < 0.2 else "delete" if roll < 0.37 else "none"
        out.append(PlannedJob(f"soak-{n:02d}", kind, rng.choice((1, 2)), rng.choice((2, 3)), action, submit_at))
    return tuple(sorted(out, key=lambda job: job.submit_at))


def plan_faults(rng: random.Random, window: float, kinds: tuple[str, ...]) -> tuple[PlannedFault, ...]:
    """About FAULTS_PER_MINUTE faults, each kind at least once, at random moments of the window."""
    count = max(len(kinds), round(window / 60.0 * FAULTS_PER_MINUTE))
    chosen = list(kinds) + [rng.choice(kinds) for _ in range(count - len(kinds))]
    rng.shuffle(chosen)
    out = []
    for kind in chosen:
        at = round(rng.uniform(FIRST_FAULT_AT, LAST_FAULT_AT) * window, 1)
        status = rng.choice((500, 429)) if kind == "api-errors" else 0
        out.append(PlannedFault(at, kind, round(_duration(rng, kind), 1), round(rng.random(), 3), status))
    return tuple(sorted(out, key=lambda fault: fault.at))


def _duration(rng: random.Random, kind: str) -> float:
    """Seconds a fault lasts: seconds for S3 and API trouble, longer for the progress endpoint."""
    if kind.startswith("operator-"):
        return rng.uniform(1.0, 5.0)
    if kind == "progress-down":
        return rng.uniform(10.0, 30.0)
    if kind == "api-restart":
        return rng.uniform(1.0, 4.0)
    if kind in ("s3-503", "s3-drop", "s3-slow", "api-errors"):
        return rng.uniform(3.0, 12.0)
    return 0.0
