"""The driver's side of progress: one place where the workers' updates meet what Ray Train's controller saw.

Rank 0 of the workers puts its updates on a Ray queue (`reporting.RelayReporter`); Ray Train's controller
puts two kinds of events on the same queue through `RunEvents`:

- a checkpoint it has registered (`after_report` runs after Ray's checkpoint manager recorded it), so
  `latestCheckpoint` only ever names a checkpoint a restarted run would resume from — the worker alone
  would announce it when its upload returns, a moment before Ray commits it;
- a worker failure (`after_exception`), counted as `workerFailures`: Ray Train restarts the workers from
  the latest checkpoint while `maxFailures` allows, which the workers themselves cannot see.

`Relay` drains the queue on a daemon thread, stamps both onto every update and hands it to the driver's
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


def run_events(queue: Any) -> Any:
    """A Ray Train UserCallback that puts the controller's checkpoint and failure events on `queue`."""
    import ray.train

    class RunEvents(ray.train.UserCallback):
        def __init__(self, queue: Any) -> None:
            self.queue = queue

        def _put(self, item: dict[str, Any]) -> None:
            try:
                self.queue.put(item, timeout=5)
            except Exception:  # progress is best effort; the controller must never fail for it
                log.debug("progress relay dropped a run event", exc_info=True)

        def after_report(self, run_context: Any, metrics: Any, checkpoint: Any) -> None:
            if checkpoint is not None:
                self._put({EVENT: CHECKPOINT_EVENT, "uri": str(S3Uri.from_fs_path(checkpoint.path))})

        def after_exception(self, run_context: Any, worker_exceptions: dict[int, Exception]) -> None:
            ranks = sorted(worker_exceptions)
            reason = error_line(worker_exceptions[ranks[0]], with_type=True) if ranks else "unknown"
            self._put({EVENT: FAILURE_EVENT, "ranks": ranks, "reason": reason})

    return RunEvents(queue)


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
    """What the driver knows beyond the workers' last update: Ray's committed checkpoint and the failures."""

    def __init__(self, max_failures: int) -> None:
        self.max_failures = max_failures
        self.committed: str | None = None
        self.failures = 0
        self.last: ProgressUpdate | None = None

    def handle(self, item: dict[str, Any]) -> ProgressUpdate | None:
        """Take one queue item (a worker's update or a controller event); the update to show, if any."""
        event = item.get(EVENT)
        if event == CHECKPOINT_EVENT:
            self.committed = str(item["uri"])
        elif event == FAILURE_EVENT:
            self.failures += 1
            ranks = ", ".join(str(r) for r in item.get("ranks", [])) or "?"
            action = (
                "Ray Train restarts the workers from the latest checkpoint"
                if self.failures <= self.max_failures
                else "no restarts left (spec.runPolicy.maxRetries)"
            )
            log.warning(
                "worker failure %d (rank %s): %s; %s", self.failures, ranks, item.get("reason", "unknown"), action
            )
        else:
            self.last = ProgressUpdate.model_validate(item)
        return self.stamped(self.last) if self.last is not None else None

    def stamped(self, update: ProgressUpdate) -> ProgressUpdate:
        """`update` with the committed checkpoint (the worker's own only names the one it resumed from)
        and the failure count."""
        return update.model_copy(
            update={
                "latest_checkpoint": self.committed or update.latest_checkpoint,
                "worker_failures": self.failures,
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
