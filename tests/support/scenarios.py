"""What happens to each job of the busy world (busy_world.py): one function per job, run on its own thread.

Each submits its job, makes its trouble at the right moment, waits for the outcome and records facts
for the tests to assert on. A scenario raises only when it cannot go on (its job never got where the
trouble was to be made); outcomes, good or bad, are facts.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from typing import Any

from tests.support.busy_world import (
    BUCKET,
    DENIED_CHECKPOINT,
    FTJ,
    NS,
    RAYCLUSTERS,
    RAYJOBS,
    SECRET,
    SERVICEACCOUNTS,
    TERMINAL,
    ProgressSampler,
    World,
    condition,
    progress_of,
    status_of,
)
from tests.support.trainer_faults import ELASTIC_MARKS_ENV, MARK_ENV

OPERATOR_DOWN_SECONDS = 3.0
# The preemption pair: the same small job, one preempted mid-epoch, one not.
PREEMPT_EPOCHS, PREEMPT_BATCH = 3, 8
S3_ERROR_SECONDS = 4.0
S3_OUTAGE_SECONDS = 3.0
# How long the failing job's Ray head stays (runPolicy.keepFailedFor): long enough to look at on a busy
# machine, short enough to see it go.
KEEP_FAILED_FOR_SECONDS = 20


def _finish(world: World, name: str, facts: dict[str, Any], epochs: int) -> None:
    """Wait for the job's end; record it, its history.json (if it succeeded) and its driver logs."""
    final = world.wait_phase(name, *TERMINAL)
    facts["epochs"] = epochs
    facts["final"] = final
    facts["driver_logs"] = world.driver_logs(name)
    if status_of(final).get("phase") == "Succeeded":
        facts["history"] = world.history(name)


def steady(world: World, facts: dict[str, Any]) -> None:
    """A healthy job; once its progress shows, the operator is SIGKILLed and started again 3 s later."""
    name, epochs = "steady", 10
    with world.training_slot(), ProgressSampler(world, name) as sampler:
        world.submit(world.manifest(name, epochs=epochs))
        job = world.wait_job(name, lambda j: progress_of(j).get("epoch", 0) >= 1, "progress in status")
        facts["rayjob_uid"] = (world.cluster.get(*RAYJOBS, NS, name) or {}).get("metadata", {}).get("uid")
        facts["progress_before_crash"] = progress_of(job)
        facts["killed_at"], facts["restarted_at"] = world.crash_operator(OPERATOR_DOWN_SECONDS)
        _finish(world, name, facts, epochs)
    facts["samples"] = sampler.samples
    facts["rayjob_versions"] = world.rayjob_versions(name)


def kills(world: World, facts: dict[str, Any]) -> None:
    """Once Ray Train has committed a checkpoint, SIGKILL the job's Ray Train worker (mid-epoch: it went
    on to the next epoch as soon as it had reported the checkpoint); once the run has resumed and
    committed another, SIGKILL its driver (KubeRay retries the run: backoffLimit 1)."""
    name, epochs = "kills", 10
    with world.training_slot(), ProgressSampler(world, name) as sampler:
        world.submit(world.manifest(name, epochs=epochs, run_policy={"backoffLimit": 1}))
        world.wait_job(name, lambda _: world.committed_epoch(name) >= 1, "a committed checkpoint")
        facts["committed_before_worker_kill"] = before = world.committed_epoch(name)
        facts["killed_worker"] = _kill(lambda: world.cluster.kill_train_worker(NS, name), "a Ray Train worker")
        world.wait_job(name, lambda _: world.committed_epoch(name) > before, "a checkpoint after the restart")
        facts["restarts_after_worker_kill"] = status_of(world.job(name)).get("restarts", 0)
        facts["committed_before_driver_kill"] = world.committed_epoch(name)
        facts["killed_driver"] = _kill(lambda: world.cluster.kill_driver(NS, name), "the driver")
        _finish(world, name, facts, epochs)
    facts["samples"] = sampler.samples


def preempted(world: World, facts: dict[str, Any]) -> None:
    """SIGTERM (a preemption notice, as the pod's preStop hook passes it on) to the job's Ray Train worker
    mid-epoch 2, while the worker pauses there (trainer_faults.MARK_MID_EPOCH_2: the notice lands at a
    known step however fast the machine trains); the run goes on in the same Ray cluster."""
    name = "preempted"
    mark = world.cluster.workdir / f"{name}.mark"
    with world.training_slot(), ProgressSampler(world, name) as sampler:
        world.submit(world.manifest(name, epochs=PREEMPT_EPOCHS, batch_size=PREEMPT_BATCH, env={MARK_ENV: str(mark)}))
        world.wait_job(name, lambda _: mark.exists(), "the worker's pause mid-epoch 2")
        facts["step_at_notice"] = int(mark.read_text())
        facts["terminated_worker"] = _kill(
            lambda: world.cluster.kill_train_worker(NS, name, signal.SIGTERM), "a Ray Train worker"
        )
        _finish(world, name, facts, PREEMPT_EPOCHS)
    facts["samples"] = sampler.samples
    facts["events"] = world.events(name)


def uninterrupted(world: World, facts: dict[str, Any]) -> None:
    """The preempted job's twin, left alone: the weights a preempted run must end with."""
    name = "uninterrupted"
    with world.training_slot():
        world.submit(world.manifest(name, epochs=PREEMPT_EPOCHS, batch_size=PREEMPT_BATCH))
        _finish(world, name, facts, PREEMPT_EPOCHS)


ELASTIC_EPOCHS, ELASTIC_BATCH = 3, 8


def elastic(world: World, facts: dict[str, Any]) -> None:
    """An elastic job ({min: 1, max: 2}) starts on the one worker its cluster has room for; a worker node
    joins (a pod KubeRay's autoscaler adds) and the run grows to 2 workers; the node goes (a reclaimed spot
    node) and the run shrinks back to 1 and completes. The workers hold at each count until Ray Train
    replaces them (trainer_faults.hold_for_resize), so the run cannot end first."""
    name = "elastic"
    marks = world.cluster.workdir / f"{name}-marks"
    marks.mkdir(exist_ok=True)
    workers = {"min": 1, "max": 2, "resizeIntervalSeconds": 2}
    manifest = world.manifest(
        name,
        epochs=ELASTIC_EPOCHS,
        batch_size=ELASTIC_BATCH,
        workers=workers,
        checkpoint_every="1s",
        # The node's Train worker gets SIGTERM as the node goes: Ray Train restarts the workers at the
        # notice's deadline at the latest (the held workers take no step to checkpoint it sooner).
        run_policy={"preemptionGraceSeconds": 10},
        # Right after the node went, Ray Train's view of the nodes (refreshed every 20 s) may still count 2
        # workers: the restart then waits out this timeout (60 s by default) before it tries with 1.
        env={ELASTIC_MARKS_ENV: str(marks), "RAY_TRAIN_WORKER_GROUP_START_TIMEOUT_S": "30"},
    )
    with world.training_slot(), ProgressSampler(world, name) as sampler:
        world.submit(manifest)
        world.wait_job(name, lambda _: (marks / "w1").exists(), "training on 1 worker, holding")
        facts["added_node"] = world.cluster.add_ray_worker(NS, name)
        world.wait_job(name, lambda j: (marks / "w2").exists() and progress_of(j).get("workers") == 2, "2 workers")
        facts["removed_processes"] = world.cluster.remove_ray_worker(NS, name)
        world.wait_job(name, lambda j: progress_of(j).get("workers") == 1, "back to 1 worker")
        _finish(world, name, facts, ELASTIC_EPOCHS)
    facts["samples"] = sampler.samples


def _kill(kill: Callable[[], int | None], what: str) -> int:
    deadline = time.monotonic() + 30
    while (pid := kill()) is None:
        if time.monotonic() > deadline:
            raise AssertionError(f"no {what} to kill")
        time.sleep(0.2)
    return pid


def s3_trouble(world: World, facts: dict[str, Any]) -> None:
    """S3 answers 503 to the job's writes for 4 s from its first checkpoint upload, then drops every
    connection for its files for 3 s from the next checkpoint upload after that."""
    name, epochs = "s3-trouble", 6
    faults = world.cluster.s3_faults
    assert faults is not None
    with world.training_slot():
        world.submit(world.manifest(name, epochs=epochs))
        # The run's checkpoint folders: <output>/checkpoints/<run name>/epoch-NNNN/.
        checkpoints = f"s3://{BUCKET}/{world.run_folder(name)}epoch-"
        errors = faults.fail_for(
            S3_ERROR_SECONDS, 503, methods=["PUT"], prefix=world.output(name), starts_on=checkpoints
        )
        world.wait_job(name, lambda _: errors.over, "S3 errors during a checkpoint")
        outage = faults.drop_for(S3_OUTAGE_SECONDS, prefix=world.output(name), starts_on=checkpoints)
        world.wait_job(name, lambda _: outage.over, "an S3 outage during a checkpoint")
        facts["error_hits"], facts["outage_hits"] = errors.hits, outage.hits
        _finish(world, name, facts, epochs)


def suspend(world: World, facts: dict[str, Any]) -> None:
    """Suspend once a checkpoint exists; once Suspended (Ray cluster gone), resume."""
    name, epochs = "suspend", 10
    with world.training_slot(), ProgressSampler(world, name) as sampler:
        world.submit(world.manifest(name, epochs=epochs))
        world.wait_job(name, lambda _: world.committed_epoch(name) >= 1, "a committed checkpoint")
        # Not while steady's operator crash holds the edit up: the run might finish before it lands.
        world.wait_job(name, lambda _: world.operator_up.is_set(), "the operator up")
        ray = world.ray_processes(name)
        world.cluster.patch(*FTJ, NS, name, {"spec": {"runPolicy": {"suspend": True}}})
        suspended = world.wait_job(
            name, lambda j: condition(j, "Suspended").get("reason") == "Suspended", "Suspended (cluster stopped)"
        )
        facts["suspended"] = suspended
        facts["committed_when_suspended"] = world.committed_epoch(name)  # the first run's last
        facts["rayclusters_while_suspended"] = world.rayclusters_of(name)
        facts["ray_processes_before"] = ray
        facts["ray_processes_while_suspended"] = world.survivors(ray)
        world.cluster.patch(*FTJ, NS, name, {"spec": {"runPolicy": {"suspend": False}}})
        _finish(world, name, facts, epochs)
    facts["samples"] = sampler.samples


def deleted_while_running(world: World, facts: dict[str, Any]) -> None:
    """Delete the job while it runs; record whatever of it is left a minute later."""
    name = "deleted"
    world.submit(world.manifest(name, epochs=4))
    world.wait_phase(name, "Running", *TERMINAL)
    facts["phase_when_deleted"] = status_of(world.job(name)).get("phase")
    ray = world.ray_processes(name)
    facts["ray_processes_before"] = ray
    world.cluster.delete(*FTJ, NS, name)
    leftovers = []
    for what, child in (
        (FTJ, name),
        (RAYJOBS, name),
    ):
        if not world.wait_gone(what, child):
            leftovers.append(f"{what[2]}/{child}")
    leftovers += [f"rayclusters/{rc}" for rc in world.rayclusters_of(name)]
    leftovers += [f"process {pid}" for pid in world.survivors(ray)]
    facts["leftovers"] = leftovers
    # The namespace's trainer ServiceAccount is shared by its jobs and stays, by design.
    facts["service_accounts"] = sorted(sa["metadata"]["name"] for sa in world.cluster.list(*SERVICEACCOUNTS, NS))


def _beside_steady(world: World) -> dict[str, Any]:
    """Wait until the steady job trains, so a failing job fails beside a running one."""
    world.start(steady)
    return world.wait_phase("steady", "Running", *TERMINAL)


def missing_checkpoint(world: World, facts: dict[str, Any]) -> None:
    """Base weights that do not exist, and no credentialsSecret: no preflight, the trainer finds out. Its
    Ray head, with the driver's log, stays KEEP_FAILED_FOR_SECONDS (runPolicy.keepFailedFor), the workers
    go at once: record the RayCluster and the log while kept, and whether both are gone after."""
    name = "missing"
    facts["steady_when_submitted"] = status_of(_beside_steady(world)).get("phase")
    keep = {"keepFailedFor": f"{KEEP_FAILED_FOR_SECONDS}s"}
    world.submit(world.manifest(name, epochs=2, checkpoint=f"s3://{BUCKET}/base/missing.safetensors", run_policy=keep))
    facts["final"] = world.wait_phase(name, *TERMINAL)
    cluster = ((world.cluster.get(*RAYJOBS, NS, name) or {}).get("status") or {}).get("rayClusterName")
    facts["cluster"] = cluster
    facts["kept_cluster"] = _poll(lambda: _with_workers_suspended(world, cluster), KEEP_FAILED_FOR_SECONDS)
    facts["kept_driver_log"] = (world.driver_logs(name) or [""])[-1]
    facts["head_gone"] = world.wait_gone(RAYCLUSTERS, str(cluster), timeout=KEEP_FAILED_FOR_SECONDS + 60)
    facts["driver_log_after"] = (world.driver_logs(name) or [""])[-1]


def _with_workers_suspended(world: World, cluster: str | None) -> dict[str, Any] | None:
    """The RayCluster once KubeRay's DeleteWorkers has suspended all its worker groups."""
    found = world.cluster.get(*RAYCLUSTERS, NS, cluster) if cluster else None
    groups = ((found or {}).get("spec") or {}).get("workerGroupSpecs") or []
    return found if groups and all(group.get("suspend") for group in groups) else None


def _poll(probe: Callable[[], dict[str, Any] | None], timeout: float) -> dict[str, Any] | None:
    deadline = time.monotonic() + timeout
    while (found := probe()) is None and time.monotonic() < deadline:
        time.sleep(0.2)
    return found


def access_denied(world: World, facts: dict[str, Any]) -> None:
    """S3 refuses the job's credentials on its base weights: the operator's preflight finds out."""
    name = "denied"
    assert world.cluster.s3_faults is not None
    facts["steady_when_submitted"] = status_of(_beside_steady(world)).get("phase")
    world.cluster.s3_faults.deny(DENIED_CHECKPOINT.rsplit("/", 1)[0] + "/")
    world.submit(world.manifest(name, epochs=2, checkpoint=DENIED_CHECKPOINT, credentials_secret=SECRET))
    facts["final"] = world.wait_phase(name, *TERMINAL)
    facts["rayjob"] = world.cluster.get(*RAYJOBS, NS, name)


# In this order: the first three take the training slots (busy_world.MAX_TRAINING) at once, the rest
# as they free. The elastic job is one of the first: it is the longest, mostly waiting on its holds
# (trainer_faults.hold_for_resize), so it overlaps the others best; started last it ended the module.
FAULTS = (
    steady,
    kills,
    elastic,
    suspend,
    preempted,
    uninterrupted,
    s3_trouble,
    deleted_while_running,
    missing_checkpoint,
    access_denied,
)
