"""One injector per fault kind (schedule.FAULT_KINDS), each through a seam the dev cluster already has for
the e2e fault tests (`DevCluster.kill_train_worker`, `kill_driver`, `s3_faults`, `fail_api`, `on_api`,
`restart_api`; the busy world's operator crash). Each returns a `FaultRecord`: what it hit and when, or
why it hit nothing (no job running, the job's fault budget spent, the moment never came).
"""

from __future__ import annotations

import logging
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

import kmock

from kubetune_dev.soak.jobs import BACKOFF_LIMIT, MAX_RETRIES, JobRecord, JobStream
from kubetune_dev.soak.schedule import FAULT_KINDS, JOB_FAULTS, PlannedFault
from kubetune_dev.soak.world import SoakWorld
from tests.support.busy_world import NS

log = logging.getLogger(__name__)
ARMED_FOR_S = 90.0  # how long an operator kill waits for its launch or status write to come
TARGET_WAIT_S = 60.0  # how long a job fault waits for a job that is training
S3_SLOW_DELAY_S = 1.5
OPERATOR_AGENTS = ("kopf/", "OpenAPI-Generator/")  # the User-Agents of the operator's two API clients


@dataclass
class FaultRecord:
    planned: PlannedFault
    injected_at: float | None = None  # time.time(); None: not injected
    target: str = ""  # the job a job fault hit
    detail: str = ""  # what happened, or why nothing did
    position: tuple[int, int] | None = None  # the target's (epoch, step) in status when hit
    duration: float = 0.0  # seconds the trouble lasted (a window, the operator's downtime)

    @property
    def injected(self) -> bool:
        return self.injected_at is not None


@dataclass
class Injection:
    """What an injector acts on."""

    world: SoakWorld
    stream: JobStream


Injector = Callable[[Injection, FaultRecord], None]


def inject(ctx: Injection, fault: PlannedFault) -> FaultRecord:
    record = FaultRecord(fault)
    try:
        INJECTORS[fault.kind](ctx, record)
    except Exception as exc:  # recorded; the soak goes on (the invariants judge the jobs)
        record.detail = f"the injector failed: {type(exc).__name__}: {exc}"
    log.info("fault %s%s: %s", fault.kind, f" on {record.target}" if record.target else "", record.detail)
    return record


# --- the operator ----------------------------------------------------------------------------------


def operator_kill(ctx: Injection, record: FaultRecord) -> None:
    killed, up = ctx.world.crash_operator(record.planned.seconds)
    record.injected_at, record.duration = killed, up - killed
    record.detail = f"SIGKILL; up again after {record.duration:.1f}s"


def _from_operator(request: Any) -> bool:
    return str(request.headers.get("User-Agent", "")).startswith(OPERATOR_AGENTS)


def _kill_operator_at(ctx: Injection, record: FaultRecord, what: str, *criteria: Any) -> None:
    """SIGKILL the operator when its request matching kmock `criteria` reaches the API (the request is then
    served: the write lands, the writer is gone), then start it again after the plan's seconds."""
    armed, fired = threading.Event(), threading.Event()
    armed.set()
    seen: dict[str, Any] = {}

    def matches(request: Any) -> bool:
        hit = armed.is_set() and _from_operator(request) and (what != STATUS_WRITE or "status" in (request.data or {}))
        if hit:
            seen["name"] = request.name or ((request.data or {}).get("metadata") or {}).get("name")
        return hit

    def kill() -> None:
        armed.clear()
        ctx.world.kill_operator_now()
        fired.set()

    ctx.world.cluster.on_api(*criteria, matches, action=kill)
    if not fired.wait(ARMED_FOR_S):
        armed.clear()
        record.detail = f"no {what} within {ARMED_FOR_S:.0f}s"
        return
    record.injected_at, record.target = time.time(), str(seen.get("name") or "")
    ctx.world.restart_operator(record.planned.seconds)
    record.duration = time.time() - record.injected_at
    record.detail = f"SIGKILL during a {what}; up again after {record.duration:.1f}s"


STATUS_WRITE = "status write"


def operator_kill_launch(ctx: Injection, record: FaultRecord) -> None:
    _kill_operator_at(ctx, record, "RayJob create", "post", kmock.resource("ray.io", "v1", "rayjobs"))


def operator_kill_status_write(ctx: Injection, record: FaultRecord) -> None:
    _kill_operator_at(ctx, record, STATUS_WRITE, "patch", kmock.resource("kubetune.dev", "v1alpha1", "finetunejobs"))


# --- Ray ---------------------------------------------------------------------------------------------


def _training(ctx: Injection, job: JobRecord) -> dict[str, Any] | None:
    """The job's status.progress if it is training (status Running, a step reported), else None."""
    status = (ctx.world.job(job.name) or {}).get("status") or {}
    progress: dict[str, Any] = status.get("progress") or {}
    step, total = int(progress.get("step") or 0), int(progress.get("totalSteps") or 0)
    # Past its last step a job is evaluating or exporting: its workers are gone, nothing to hit.
    return progress if status.get("phase") == "Running" and step >= 1 and not (total and step >= total) else None


def _hit_a_job(
    ctx: Injection, record: FaultRecord, budget: Callable[[JobRecord], bool], hit: Callable[[JobRecord], int | None]
) -> JobRecord | None:
    """`hit` (returning the pid it signalled, None if the process is not there yet) a training job with budget
    left, chosen by the plan's `pick`; tried for up to TARGET_WAIT_S, as jobs spend much of their life
    starting Ray. The job hit, or None (`record.detail` says why)."""
    deadline = time.monotonic() + TARGET_WAIT_S
    record.detail = "no training job with budget left"
    while True:
        with ctx.stream.lock:
            candidates = [(job, p) for job in ctx.stream.running() if budget(job) and (p := _training(ctx, job))]
            first = int(record.planned.pick * len(candidates))
            # The plan's pick first, then the others: the picked one's workers may be between attempts.
            for job, progress in candidates[first:] + candidates[:first]:
                pid = hit(job)
                if pid is not None:
                    record.injected_at, record.target = time.time(), job.name
                    record.position = (int(progress.get("epoch") or 0), int(progress.get("step") or 0))
                    record.detail = f"pid {pid}"
                    return job
                record.detail = f"{job.name}: the process was not there yet"
        if time.monotonic() > deadline:
            return None
        time.sleep(2.0)


def _kill_worker(ctx: Injection, record: FaultRecord, sig: int) -> None:
    def budget(job: JobRecord) -> bool:  # a preemption costs no retry
        return sig != signal.SIGKILL or job.worker_kills < MAX_RETRIES

    job = _hit_a_job(ctx, record, budget, lambda job: ctx.world.cluster.kill_train_worker(NS, job.name, sig))
    if job is None:
        return
    if sig == signal.SIGKILL:
        job.worker_kills += 1
    record.detail = f"{signal.Signals(sig).name} to a Ray Train worker, {record.detail}"


def worker_kill(ctx: Injection, record: FaultRecord) -> None:
    _kill_worker(ctx, record, signal.SIGKILL)


def worker_preempt(ctx: Injection, record: FaultRecord) -> None:
    _kill_worker(ctx, record, signal.SIGTERM)


def driver_kill(ctx: Injection, record: FaultRecord) -> None:
    def budget(job: JobRecord) -> bool:
        return job.driver_kills < BACKOFF_LIMIT

    job = _hit_a_job(ctx, record, budget, lambda job: ctx.world.cluster.kill_driver(NS, job.name))
    if job is None:
        return
    job.driver_kills += 1
    record.detail = f"SIGKILL to the driver, {record.detail}"


# --- S3, the API, the progress endpoint -----------------------------------------------------------------


def _window(record: FaultRecord, what: str) -> None:
    record.injected_at, record.duration = time.time(), record.planned.seconds
    record.detail = f"{what} for {record.planned.seconds:.1f}s"
    time.sleep(record.planned.seconds)  # one fault at a time: the next starts after this one's window


def s3_503(ctx: Injection, record: FaultRecord) -> None:
    assert ctx.world.cluster.s3_faults is not None
    ctx.world.cluster.s3_faults.fail_for(record.planned.seconds, 503)
    _window(record, "every S3 request answered 503 SlowDown")


def s3_drop(ctx: Injection, record: FaultRecord) -> None:
    assert ctx.world.cluster.s3_faults is not None
    ctx.world.cluster.s3_faults.drop_for(record.planned.seconds)
    _window(record, "every S3 connection cut")


def s3_slow(ctx: Injection, record: FaultRecord) -> None:
    assert ctx.world.cluster.s3_faults is not None
    ctx.world.cluster.s3_faults.slow_for(record.planned.seconds, S3_SLOW_DELAY_S)
    _window(record, f"every S3 request {S3_SLOW_DELAY_S}s late")


def api_restart(ctx: Injection, record: FaultRecord) -> None:
    record.injected_at = time.time()
    ctx.world.cluster.restart_api(record.planned.seconds)
    record.duration = time.time() - record.injected_at
    record.detail = f"the API down {record.duration:.1f}s, every watch cut"


def api_errors(ctx: Injection, record: FaultRecord) -> None:
    ctx.world.cluster.fail_api(_from_operator, status=record.planned.status, seconds=record.planned.seconds)
    _window(record, f"the operator's API requests answered {record.planned.status}")


def progress_down(ctx: Injection, record: FaultRecord) -> None:
    assert ctx.world.progress_proxy is not None
    ctx.world.progress_proxy.drop_for(record.planned.seconds)
    _window(record, "the progress endpoint unreachable")


INJECTORS: dict[str, Injector] = {
    "operator-kill": operator_kill,
    "operator-kill-launch": operator_kill_launch,
    "operator-kill-status-write": operator_kill_status_write,
    "worker-kill": worker_kill,
    "worker-preempt": worker_preempt,
    "driver-kill": driver_kill,
    "s3-503": s3_503,
    "s3-drop": s3_drop,
    "s3-slow": s3_slow,
    "api-restart": api_restart,
    "api-errors": api_errors,
    "progress-down": progress_down,
}
assert set(INJECTORS) == set(FAULT_KINDS) and set(INJECTORS) >= JOB_FAULTS
