"""Preemption notices: how a run learns that a node or pod is about to go, and Ray Train's part in it.

A notice is a deadline: the node goes then. Three things give one, and all end the same way, as Ray
Train's own `PreemptionInfo` of the worker (what `RayTrainWorker.mark_preempt` sets when Ray Train's
preemption watcher sees a Ray node drain):

- a Ray node drain (the autoscaler, `ray drain-node`): Ray Train's preemption watcher marks every worker
  (`RAY_TRAIN_ENABLE_PREEMPTION_WATCHER` stays on, `config.RAY_TRAIN_ENV`);
- SIGTERM to a Ray Train worker process: `WorkerNotices` installs the handler in every worker. On
  Kubernetes a pod's main process (`ray start`) does not pass SIGTERM on, so the pods' preStop hook,
  `python -m kubetune_trainer.preemption GRACE` (`main`), sends it to the pod's Train workers and driver;
- SIGTERM to the training driver (the Ray head going): `DriverNotice` posts the notice in Ray's GCS key
  value store, where every worker's `WorkerNotices` thread looks for it every `POLL_S` seconds.

The deadline is `preemptionGraceSeconds` (the pods' terminationGracePeriodSeconds) after the signal, less
DEADLINE_MARGIN_S, so Ray Train restarts the workers before the kubelet kills the pod. Once a worker is
marked, Ray Train's controller waits in its PREEMPTING state until the deadline, then restarts the
worker group from the latest checkpoint, charging `FailureConfig.max_preemption_failures`
(`runPolicy.maxPreemptions`), not `max_failures`. The loop (`cadence.py`) sees the notice at the next
step on every worker at once, checkpoints that step and moves the deadline to now (`restart_now`), so
the restart comes as soon as the checkpoint is committed.

The Ray internals used (the train context's `preemption_context`, `WorkerCallback`, the GCS key value
store) are Ray 2.60's; tests/trainer/test_preemption.py runs them.
"""

from __future__ import annotations

import _thread
import contextlib
import itertools
import json
import logging
import os
import signal
import sys
import threading
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)

# Ray Train restarts the workers this long before the kubelet would kill the pod.
DEADLINE_MARGIN_S = 5.0
# How often a worker looks for the driver's notice.
POLL_S = 2.0
# Ray Train worker processes are titled "ray::RayTrainWorker..." (their /proc cmdline).
TRAIN_WORKER_TITLE = "ray::RayTrainWorker"
DRIVER_MODULE = "kubetune_trainer"


def deadline_ms(grace_s: float, now: float | None = None) -> int:
    """When Ray Train should restart the workers after a notice received `now` (UNIX ms)."""
    margin = min(DEADLINE_MARGIN_S, grace_s / 4)
    return int(((time.time() if now is None else now) + grace_s - margin) * 1000)


# -- a worker's notice: Ray Train's PreemptionInfo ----------------------------------------------------------


def _train_context() -> Any:
    from ray.train.v2._internal.execution.context import get_train_context

    return get_train_context()


def local_notice() -> Any | None:
    """This worker's PreemptionInfo (any notice it got), or None; a plain read, cheap enough for every step."""
    try:
        return _train_context().preemption_context.preemption_info
    except Exception:  # outside a Ray Train worker (unit tests of the loop's parts)
        return None


def mark(deadline: int, ranks: list[int], node_id: str = "") -> None:
    """Merge a notice into this worker's PreemptionInfo, as Ray Train's watcher does (earliest deadline wins)."""
    import ray.train
    from ray.train.v2._internal.execution.preemption import merge_preemption_info

    context = _train_context().preemption_context
    info = ray.train.PreemptionInfo(deadline_ms=deadline, preempted_node_to_ranks={node_id: ranks} if ranks else {})
    current = context.preemption_info
    context.preemption_info = info if current is None else merge_preemption_info(current, info)


def restart_now() -> None:
    """The notice's checkpoint is saved: let Ray Train's controller restart the workers at its next poll."""
    mark(int(time.time() * 1000), [])


def notice_key(job_id: str) -> str:
    """The GCS key of the driver's notice for the Ray job `job_id` (the driver's and its workers')."""
    return f"kubetune-preemption-{job_id}"


class WorkerNotices:
    """Installed on each worker (a Ray Train WorkerCallback, see `worker_callback`): SIGTERM, and the
    driver's notice in the GCS, become this worker's PreemptionInfo."""

    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        # Made on the worker (after_init_train_context): the callback is pickled on its way there.
        self._stop: threading.Event | None = None

    def after_init_train_context(self) -> None:
        """Runs on the worker actor's main thread (Ray Train's init_train_context), where handlers can be set."""
        import ray

        context = _train_context()
        self.rank = context.get_world_rank()
        self.node_id = ray.get_runtime_context().get_node_id()
        self.key = notice_key(ray.get_runtime_context().get_job_id())
        self._stop = threading.Event()
        signal.signal(signal.SIGTERM, self._on_sigterm)
        threading.Thread(target=self._watch_driver, name="kubetune-driver-notice", daemon=True).start()

    def before_worker_shutdown(self) -> None:
        if self._stop is not None:
            self._stop.set()

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        # The process stays: the checkpoint of the current step is what the grace period is for. Ray Train
        # restarts the worker group (and so ends this process) once it is saved, or at the deadline.
        mark(deadline_ms(self.grace_s), [self.rank], self.node_id)
        print(f"kubetune: rank {self.rank} got SIGTERM: checkpointing the current step", file=sys.stderr, flush=True)

    def _watch_driver(self) -> None:
        from ray.experimental.internal_kv import _internal_kv_get

        assert self._stop is not None
        while not self._stop.wait(POLL_S):
            try:
                posted = _internal_kv_get(self.key)
            except Exception:  # the GCS is going (the cluster is stopping)
                log.debug("cannot read the driver's preemption notice", exc_info=True)
                continue
            if posted:
                mark(int(json.loads(posted)["deadlineMs"]), [self.rank], self.node_id)
                return


def worker_callback(grace_s: float) -> Any:
    """`WorkerNotices` as the Ray Train callback the run config takes (a DeveloperAPI of Ray Train V2)."""
    from ray.train.v2._internal.execution.callback import WorkerCallback

    class Notices(WorkerNotices, WorkerCallback):
        pass

    return Notices(grace_s)


# -- the driver's notice: the head going -------------------------------------------------------------------


class DriverNotice:
    """SIGTERM to the training driver: ask the workers for a checkpoint of the current step, wait until it
    is committed (`saved()`) or the deadline passes, then end the driver (KeyboardInterrupt in the main
    thread; `preempted` says why). A second SIGTERM ends it at once."""

    def __init__(self, grace_s: float, saved: Callable[[], bool]) -> None:
        self.grace_s = grace_s
        self.saved = saved
        self.preempted = False
        self._ending = False
        self._key: str | None = None

    def install(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, self._on_sigterm)

    def uninstall(self) -> None:
        if threading.current_thread() is threading.main_thread():
            signal.signal(signal.SIGTERM, signal.SIG_DFL)

    def _on_sigterm(self, signum: int, frame: Any) -> None:
        if self._ending:  # from _end_when_saved: the checkpoint is saved (or the deadline passed)
            raise KeyboardInterrupt
        if self.preempted:
            raise SystemExit(128 + signum)
        self.preempted = True
        deadline = deadline_ms(self.grace_s)
        try:
            import ray
            from ray.experimental.internal_kv import _internal_kv_put

            self._key = notice_key(ray.get_runtime_context().get_job_id())
            _internal_kv_put(self._key, json.dumps({"deadlineMs": deadline}), overwrite=True)
        except Exception:
            log.warning("cannot tell the workers about the preemption; ending now", exc_info=True)
            raise KeyboardInterrupt from None
        log.warning("SIGTERM: the workers checkpoint the current step, then this driver ends")
        threading.Thread(target=self._end_when_saved, args=(deadline / 1000,), daemon=True).start()

    def _end_when_saved(self, deadline: float) -> None:
        while time.time() < deadline and not self.saved():
            time.sleep(0.2)
        if self._key is not None:  # workers Ray Train restarted meanwhile must not checkpoint again
            with contextlib.suppress(Exception):
                from ray.experimental.internal_kv import _internal_kv_del

                _internal_kv_del(self._key)
        self._ending = True
        # SIGTERM, not interrupt_main's default SIGINT: Ray Train's driver takes SIGINT to abort the run.
        _thread.interrupt_main(signal.SIGTERM)


# -- the pods' preStop hook ------------------------------------------------------------------------------------


def _argv(entry: Path) -> list[str]:
    with contextlib.suppress(OSError):
        return (entry / "cmdline").read_bytes().decode(errors="replace").split("\0")
    return []


def is_preemptible(argv: list[str]) -> bool:
    """A Ray Train worker (its process title), or the training driver: `python -m kubetune_trainer`
    itself, not a shell that started it (ending the shell would end the Ray job)."""
    if not argv or not argv[0]:
        return False
    if argv[0].startswith(TRAIN_WORKER_TITLE):
        return True
    python = Path(argv[0]).name.startswith("python")
    return python and any(a == "-m" and b == DRIVER_MODULE for a, b in itertools.pairwise(argv))


def preemptible_processes(proc: Path = Path("/proc")) -> list[int]:
    """This container's Ray Train workers and training driver, never this process."""
    return [
        int(entry.name)
        for entry in proc.iterdir()
        if entry.name.isdigit() and int(entry.name) != os.getpid() and is_preemptible(_argv(entry))
    ]


def main(argv: list[str] | None = None) -> int:
    """`python -m kubetune_trainer.preemption GRACE`: the preStop hook. SIGTERM this pod's Train workers and
    driver, then wait until they are gone (Ray Train ends them once their checkpoint is saved), at most
    GRACE seconds: the kubelet kills the pod then anyway."""
    args = sys.argv[1:] if argv is None else argv
    grace = float(args[0]) if args else 60.0
    pids = preemptible_processes()
    for pid in pids:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(pid, signal.SIGTERM)
    print(f"kubetune: preStop: SIGTERM to {len(pids)} training process(es)", flush=True)
    until = time.monotonic() + grace
    while time.monotonic() < until and any(Path(f"/proc/{pid}").exists() for pid in pids):
        time.sleep(0.5)
    return 0


if __name__ == "__main__":
    sys.exit(main())
