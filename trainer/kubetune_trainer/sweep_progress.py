"""The driver's view of a sweep's trials as they run: one relay for all of them, a board of their states.

Every trial's workers and Ray Train controller put their updates and events on one Ray queue, each item
tagged with its trial (`TrialQueue`, the queue a trial's run is given). `SweepRelay` routes them to one
`relay.RunProgress` per trial (its committed checkpoint, failures, preemptions), draws one console line
per running trial (prefixed with its id), and hands the driver's other reporters (the operator) the
sweep's update: the best trial's latest update — or, before any trial has finished an epoch, the latest
of any — with `sweep` (`SweepProgress`) telling the trials by state and the best so far. So for a sweep,
epoch, step, percent and the metrics are the best trial's own, not the sweep's; `sweep` says how far the
sweep is.
"""

from __future__ import annotations

import logging
import sys
import threading
from collections.abc import Mapping, Sequence
from typing import Any, TextIO

from kubetune_trainer.progress_model import ProgressUpdate
from kubetune_trainer.relay import EVENT, Relay, RunProgress
from kubetune_trainer.reporting import ConsoleReporter, FanOut, ProgressReporter
from kubetune_trainer.selection import best_entry
from kubetune_trainer.sweep_plan import SweepPlan, TrialRecord, sweep_progress

log = logging.getLogger(__name__)

TRIAL_KEY = "kubetuneTrial"
# A trial's Ray Train controller handing the driver its actor handle (`sweep.controller_handle`).
CONTROLLER_EVENT = "trainController"


class TrialQueue:
    """A trial's handle on the sweep's queue: what it puts is tagged with the trial's id (picklable: it
    travels to the trial's workers and controller callbacks like the plain queue it wraps)."""

    def __init__(self, queue: Any, trial_id: str) -> None:
        self.queue, self.trial_id = queue, trial_id

    def put(self, item: dict[str, Any], **kwargs: Any) -> None:
        self.queue.put({**item, TRIAL_KEY: self.trial_id}, **kwargs)

    def put_nowait(self, item: dict[str, Any]) -> None:
        self.queue.put_nowait({**item, TRIAL_KEY: self.trial_id})


class _Prefixed:
    """A text stream that starts every line with a trial's id."""

    def __init__(self, stream: TextIO, prefix: str) -> None:
        self.stream, self.prefix = stream, prefix

    def write(self, text: str) -> int:
        lines = text.splitlines(keepends=True)
        return self.stream.write("".join(f"{self.prefix}{line}" if line.strip() else line for line in lines))

    def flush(self) -> None:
        self.stream.flush()

    def isatty(self) -> bool:
        return False


class SweepBoard:
    """The trials' states and latest updates, and the best trial so far, as the driver sees them."""

    def __init__(self, plan: SweepPlan, records: Sequence[TrialRecord], max_failures: int) -> None:
        self.plan = plan
        self.records: dict[str, TrialRecord] = {r.id: r for r in records}
        self.running: set[str] = set()
        self.progress: dict[str, RunProgress] = {}
        self.max_failures = max_failures
        self.lock = threading.Lock()
        # The running trials' Ray Train controllers: the driver ends a trial's run through it (`sweep.end_train_run`).
        self.controllers: dict[str, Any] = {}

    def trial_progress(self, trial_id: str) -> RunProgress:
        if trial_id not in self.progress:
            self.progress[trial_id] = RunProgress(self.max_failures)
        return self.progress[trial_id]

    def started(self, trial_id: str) -> None:
        with self.lock:
            self.running.add(trial_id)

    def hold_controller(self, trial_id: str, controller: Any) -> None:
        with self.lock:
            self.controllers[trial_id] = controller

    def take_controller(self, trial_id: str) -> Any:
        """The trial's controller handle (None if it never sent one), no longer held here."""
        with self.lock:
            return self.controllers.pop(trial_id, None)

    def ended(self, record: TrialRecord) -> None:
        with self.lock:
            self.running.discard(record.id)
            self.records[record.id] = record

    def best(self) -> tuple[str, float, Mapping[str, Any]] | None:
        """(trial id, value, values) of the best epoch any trial has reported or recorded so far."""
        candidates: list[tuple[str, Mapping[str, Any]]] = []
        for record in self.records.values():
            if record.state != "failed" and record.history:
                candidates += [(record.id, entry) for entry in record.history]
        for trial_id, progress in self.progress.items():
            if trial_id not in self.records and progress.last is not None:
                # The figures of the trial's last finished epoch (history.json's keys).
                candidates.append((trial_id, progress.last.metrics.wire()))
        winner = best_entry([entry for _, entry in candidates], self.plan.metric)
        for trial_id, entry in candidates:
            value = entry.get(self.plan.metric)
            if entry is winner and isinstance(value, int | float):
                return trial_id, float(value), self.values_of(trial_id)
        return None

    def values_of(self, trial_id: str) -> Mapping[str, Any]:
        return next(t.values for t in self.plan.trials if t.id == trial_id)

    def update(self, latest: ProgressUpdate | None) -> ProgressUpdate | None:
        """The sweep's update: the best trial's latest (else `latest`), with `sweep`."""
        with self.lock:
            best = self.best()
            shown = self.progress.get(best[0]) if best else None
            base = shown.last if shown is not None and shown.last is not None else latest
            if base is None:
                return None
            sweep = sweep_progress(self.plan, list(self.records.values()), len(self.running), best)
            return base.model_copy(update={"sweep": sweep})


class SweepRouter:
    """Routes the sweep queue's items by their trial tag: each trial's console line, the sweep's update."""

    def __init__(self, board: SweepBoard, reporter: ProgressReporter, stream: TextIO | None = None) -> None:
        self.board, self.reporter = board, reporter
        self.consoles: dict[str, ConsoleReporter] = {}
        self.stream = stream or sys.stderr

    def console(self, trial_id: str) -> ConsoleReporter:
        if trial_id not in self.consoles:
            prefixed: Any = _Prefixed(self.stream, f"{trial_id}: ")
            self.consoles[trial_id] = ConsoleReporter(prefixed, tty=False)
        return self.consoles[trial_id]

    def handle(self, item: dict[str, Any]) -> None:
        trial_id = str(item.pop(TRIAL_KEY, ""))
        if not trial_id:
            return
        if item.get(EVENT) == CONTROLLER_EVENT:
            self.board.hold_controller(trial_id, item.get("handle"))
            return
        update = self.board.trial_progress(trial_id).handle(item)
        if update is None:
            return
        self.console(trial_id).report(update)
        sweep_update = self.board.update(update)
        if sweep_update is not None:
            self.reporter.report(sweep_update)

    def push(self) -> None:
        """Send the sweep's state now (a trial started or ended: the counts changed)."""
        update = self.board.update(None)
        if update is not None:
            self.reporter.report(update)

    def close(self) -> None:
        for console in self.consoles.values():
            console.close()


class SweepRelay(Relay):
    """`relay.Relay` for every trial of a sweep at once (its queue, its drain thread), items routed by
    `SweepRouter`."""

    def __init__(self, router: SweepRouter, max_failures: int) -> None:
        self.router = router
        super().__init__(router.reporter, max_failures)

    def handle(self, item: dict[str, Any]) -> None:
        self.router.handle(item)

    def push(self) -> None:
        self.router.push()

    def close(self) -> None:
        super().close()
        self.router.close()


def sweep_reporters(reporters: FanOut) -> FanOut:
    """The driver's reporters without the console: a sweep draws its own lines, one per trial."""
    return FanOut([r for r in reporters.reporters if not isinstance(r, ConsoleReporter)])
