"""The driver's side of progress: one place where the workers' updates meet what Ray Train's controller saw.

Rank 0 of the workers puts its updates on a Ray queue (`reporting.RelayReporter`); Ray Train's controller
puts events on the same queue through two callbacks:

- `RunEvents` (a UserCallback): a checkpoint it has registered (`after_report` runs after Ray's
  checkpoint manager recorded it), so `latestCheckpoint` only ever names a checkpoint a restarted run
  would resume from — the worker alone would announce it when its upload returns, a moment before Ray
  commits it — with the step it holds;
- `RunStates` (a ControllerCallback, on the controller's state changes): a preemption notice reaching a
  worker (PREEMPTING), then the restart that follows it, counted as `preemptions`, and a worker failure
  Ray Train restarts the workers after (or gives up on), counted as `workerFailures`. Ray Train decides
  which is which, and charges each to its own budget (`maxPreemptions`, `maxFailures`); the workers
  themselves cannot see either.

`Relay` drains the queue on a daemon thread, stamps them onto every update (with the steps the latest
preemption lost: those done since the checkpoint the workers resume from) and hands it to the driver's
reporters: the console and, when the job has a progress endpoint, the operator.
"""

from __future__ import annotations

import logging
import threading
from typing import Any

from kubetune_trainer.config import TrainerConfig
from kubetune_trainer.errors import error_line
from kubetune_trainer.progress_model import ProgressUpdate
from kubetune_trainer.reporting import FanOut, ProgressReporter
from kubetune_trainer.storage import S3Uri

log = logging.getLogger(__name__)

EVENT = "kubetuneEvent"
CHECKPOINT_EVENT = "checkpoint"
FAILURE_EVENT = "workerFailure"
NOTICE_EVENT = "preemptionNotice"
PREEMPTION_EVENT = "preemption"


def _put(queue: Any, item: dict[str, Any]) -> None:
    try:
        queue.put(item, timeout=5)
    except Exception:  # progress is best effort; the controller must never fail for it
        log.debug("progress relay dropped a run event", exc_info=True)


def _step_of(metrics: Any) -> int | None:
    """The step rank 0 reported with a checkpoint (Ray hands the callback one metrics dict per worker)."""
    first = metrics[0] if isinstance(metrics, list) and metrics else metrics
    step = first.get("step") if isinstance(first, dict) else None
    return int(step) if isinstance(step, int | float) else None


def run_events(queue: Any) -> Any:
    """A Ray Train UserCallback that puts the committed checkpoints (and their steps) on `queue`."""
    import ray.train

    class RunEvents(ray.train.UserCallback):
        def __init__(self, queue: Any) -> None:
            self.queue = queue

        def after_report(self, run_context: Any, metrics: Any, checkpoint: Any) -> None:
            if checkpoint is not None:
                uri = str(S3Uri.from_fs_path(checkpoint.path))
                _put(self.queue, {EVENT: CHECKPOINT_EVENT, "uri": uri, "step": _step_of(metrics)})

    return RunEvents(queue)


def state_event(previous: Any, current: Any) -> dict[str, Any] | None:
    """The run event of a Ray Train controller state change, if it is one: a preemption notice, the restart
    after a preemption, or a worker failure (restarted or final)."""
    from ray.train.v2._internal.execution.controller.state import (
        PreemptingState,
        RestartingState,
        RunningState,
        ShuttingDownState,
    )
    from ray.train.v2._internal.execution.failure_handling.default import _is_preemption_failure

    if isinstance(current, PreemptingState) and isinstance(previous, RunningState):
        info = current.preemption_info
        return {EVENT: NOTICE_EVENT, "ranks": info.preempted_ranks, "deadlineMs": info.deadline_ms}
    failure = getattr(current, "training_failed_error", None)
    if isinstance(current, ShuttingDownState):
        failure = getattr(current.next_state, "training_failed_error", None)
    if failure is None:
        return None
    if _is_preemption_failure(failure):
        return {EVENT: PREEMPTION_EVENT, "restarted": isinstance(current, RestartingState)}
    errors = dict(getattr(failure, "worker_failures", None) or {})
    ranks = sorted(errors)
    reason = error_line(errors[ranks[0]], with_type=True) if ranks else error_line(failure, with_type=True)
    return {EVENT: FAILURE_EVENT, "ranks": ranks, "reason": reason}


def run_states(queue: Any) -> Any:
    """A Ray Train ControllerCallback (DeveloperAPI) that puts `state_event`s on `queue`."""
    from ray.train.v2._internal.execution.callback import ControllerCallback

    class RunStates(ControllerCallback):
        def __init__(self, queue: Any) -> None:
            self.queue = queue

        def after_controller_state_update(self, previous_state: Any, current_state: Any) -> None:
            try:
                event = state_event(previous_state, current_state)
            except Exception:  # never fail the controller for progress
                log.debug("cannot read a Ray Train state change", exc_info=True)
                return
            if event is not None:
                _put(self.queue, event)

    return RunStates(queue)


def driver_reporters(config: TrainerConfig, console: ProgressReporter | None) -> FanOut:
    """The console (when given) and the operator (when the job names a progress endpoint)."""
    reporters: list[ProgressReporter] = [console] if console is not None else []
    if config.progress is not None:
        try:
            from kubetune_trainer.operator_reporter import OperatorReporter

            operator = OperatorReporter.from_target(config.progress)
            if operator is not None:
                reporters.append(operator)
        except Exception:
            log.warning("cannot report progress to %s; training goes on", config.progress.url, exc_info=True)
    return FanOut(reporters)


class RunProgress:
    """What the driver knows beyond the workers' last update: Ray's committed checkpoint (and its step),
    the failures and the preemptions, and the furthest step the workers reached since they last started."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.committed: str | None = None
        self.committed_step: int | None = None
        self.failures = 0
        self.preemptions = 0
        self.steps_lost: int | None = None
        self.furthest = 0  # the furthest step the workers reported since they last (re)started
        self.preempted_step: int | None = None  # the step a preemption notice's checkpoint saved
        self.last: ProgressUpdate | None = None

    def handle(self, item: dict[str, Any]) -> ProgressUpdate | None:
        """Take one queue item (a worker's update or a controller event); the update to show, if any."""
        event = item.get(EVENT)
        if event == CHECKPOINT_EVENT:
            self.committed = str(item["uri"])
            self.committed_step = item.get("step")
        elif event == FAILURE_EVENT:
            self._failure(item)
        elif event == NOTICE_EVENT:
            ranks = ", ".join(str(r) for r in item.get("ranks", []))
            log.warning(
                "preemption notice%s: the workers checkpoint the current step", f" (rank {ranks})" if ranks else ""
            )
        elif event == PREEMPTION_EVENT:
            self._preemption(restarted=bool(item.get("restarted")))
        else:
            update = ProgressUpdate.model_validate(item)
            if update.phase == "Resumed":
                self.furthest = update.step
            self.furthest = max(self.furthest, update.step)
            if update.phase == "Preempted":
                self.preempted_step = update.step
            self.last = update
        return self.stamped(self.last) if self.last is not None else None

    def _failure(self, item: dict[str, Any]) -> None:
        self.failures += 1
        ranks = ", ".join(str(r) for r in item.get("ranks", [])) or "?"
        action = (
            "Ray Train restarts the workers from the latest checkpoint"
            if self.failures <= self.max_failures
            else "no restarts left (spec.runPolicy.maxRetries)"
        )
        log.warning("worker failure %d (rank %s): %s; %s", self.failures, ranks, item.get("reason", "unknown"), action)

    def _preemption(self, *, restarted: bool) -> None:
        self.preemptions += 1
        resumes_at = self.committed_step or 0
        self.steps_lost = max(0, self.furthest - resumes_at)
        action = (
            f"Ray Train restarts the workers from {self.committed or 'the start'} (step {resumes_at})"
            if restarted
            else "no restarts left (spec.runPolicy.maxPreemptions)"
        )
        log.warning("preemption %d: %s; %d step(s) lost", self.preemptions, action, self.steps_lost)

    def saved_on_notice(self) -> bool:
        """Whether the checkpoint the workers saved on a preemption notice is committed."""
        return self.preempted_step is not None and (self.committed_step or -1) >= self.preempted_step

    def stamped(self, update: ProgressUpdate) -> ProgressUpdate:
        """`update` with the committed checkpoint (the worker's own only names the one it resumed from)
        and the failure and preemption counts."""
        return update.model_copy(
            update={
                "latest_checkpoint": self.committed or update.latest_checkpoint,
                "worker_failures": self.failures,
                "preemptions": self.preemptions,
                "preemption_steps_lost": self.steps_lost,
            }
        )


class Relay:
    """Drains the progress queue into the driver's reporters on a daemon thread."""

    def __init__(self, reporter: ProgressReporter, max_failures: int) -> None:
        from ray.util.queue import Queue

        self.reporter = reporter
        self.progress = RunProgress(max_failures)
        # No CPU reserved: the queue must never take a slot from a training worker.
        self.queue: Any = Queue(maxsize=64, actor_options={"num_cpus": 0})
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._drain, name="progress-relay", daemon=True)
        self._thread.start()

    def _drain(self) -> None:
        from ray.util.queue import Empty

        while not self._stop.is_set():
            try:
                item = self.queue.get(timeout=0.5)
            except Empty:
                continue
            except Exception:  # the queue actor is gone (shutdown)
                return
            self.handle(item)

    def handle(self, item: dict[str, Any]) -> None:
        update = self.progress.handle(item)
        if update is not None:
            self.reporter.report(update)

    def close(self) -> None:
        self._stop.set()
        self._thread.join(timeout=2)
        try:  # what arrived after the last poll, e.g. the final epoch's line
            while True:
                self.handle(self.queue.get_nowait())
        except Exception:
            pass
        try:
            self.queue.shutdown()
        except Exception:
            log.debug("progress queue shutdown failed", exc_info=True)
        self.reporter.close()
