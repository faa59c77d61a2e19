"""Progress of a run: reporters that show or send its `ProgressUpdate`s.

`ProgressUpdate` (progress_model.py) is the message the operator's progress endpoint accepts and what
`status.progress` shows. Rank 0 of the workers produces updates; reporters must never slow down or
break training, so `report` only hands the update on and swallows its own failures.

- ConsoleReporter draws a progress line: epoch, step bar, loss, accuracy (detection: mAP and mAP@.5),
  images/s, ETA.
- RelayReporter (in the worker) passes updates to the driver through a Ray queue (`relay.Relay`), so the
  console line is drawn by the driver's terminal rather than interleaved with Ray's worker log prefixes,
  and the committed checkpoint and worker failures that Ray Train's controller sees are added to them.
- The operator reporter (kubetune_trainer.operator_reporter) pushes them from the driver to the operator
  when the config names a progress endpoint (`relay.driver_reporters`).
"""

from __future__ import annotations

import logging
import sys
import time
from typing import Any, Protocol, TextIO

from kubetune_trainer.progress_model import ProgressUpdate, TrainingSettings, console_parts

log = logging.getLogger(__name__)


class ProgressReporter(Protocol):
    def report(self, update: ProgressUpdate) -> None: ...

    def close(self) -> None: ...


def format_duration(seconds: float | None) -> str:
    if seconds is None:
        return "--:--"
    seconds = round(seconds)
    hours, rest = divmod(seconds, 3600)
    minutes, secs = divmod(rest, 60)
    return f"{hours}:{minutes:02d}:{secs:02d}" if hours else f"{minutes:02d}:{secs:02d}"


def progress_line(update: ProgressUpdate, width: int = 24) -> str:
    """`epoch 2/5 [#########-------------]  38% loss 0.4123 acc 93.1% 812 img/s ETA 01:05`"""
    filled = round(width * update.percent / 100)
    parts = [
        f"epoch {update.epoch}/{update.total_epochs}",
        f"[{'#' * filled}{'-' * (width - filled)}] {update.percent:3.0f}%",
    ]
    parts.extend(console_parts(update.metrics))
    parts.append(f"ETA {format_duration(update.eta_seconds)}")
    return " ".join(parts)


def settings_line(training: TrainingSettings) -> str:
    """`learning rate 0.0043 (range test), backbone 0.0018-0.0043, 19 warm-up steps; augment light: …`"""
    source = "range test" if training.learning_rate_source == "rangeTest" else "training.learningRate"
    rates = training.backbone_learning_rates
    backbone = f", backbone {min(rates):.2g}-{max(rates):.2g}" if rates else ", backbone frozen"
    return (
        f"learning rate {training.learning_rate:.2g} ({source}){backbone}, {training.warmup_steps} warm-up steps; "
        f"augment {training.augment}"
    )


class ConsoleReporter:
    """A progress line on a terminal (redrawn in place), or a line every `interval` seconds in a log."""

    def __init__(self, stream: TextIO | None = None, interval: float = 5.0, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = 0.2 if self.tty else interval
        self._last = 0.0
        self._last_epoch = -1
        self._open_line = False
        self._settings_shown = False
        self._said: str | None = None  # the last one-off line: the relay hands an update on again with each event

    def _say(self, line: str) -> None:
        if line != self._said:
            self._said = line
            self._write_line(line)

    def report(self, update: ProgressUpdate) -> None:
        try:
            if update.training is not None and not self._settings_shown:
                self._settings_shown = True
                self._write_line(settings_line(update.training))
            if update.phase == "Resumed":
                self._say(f"resumed from {update.latest_checkpoint} after epoch {update.epoch}")
                return
            if update.phase == "Preempted":
                self._say(f"preempted: step {update.step} saved; waiting for Ray Train to restart the workers")
                return
            now = time.monotonic()
            epoch_done = update.phase in ("Checkpointing", "Evaluated")
            new_epoch = update.epoch != self._last_epoch
            if not (epoch_done or new_epoch or now - self._last >= self.interval):
                return
            self._last, self._last_epoch = now, update.epoch
            line = progress_line(update)
            if self.tty:
                self.stream.write("\r\x1b[2K" + line + ("\n" if epoch_done else ""))
                self._open_line = not epoch_done
            else:
                self.stream.write(line + "\n")
            self.stream.flush()
        except Exception:  # a broken terminal must not stop training
            log.debug("console progress failed", exc_info=True)

    def _write_line(self, text: str) -> None:
        self.stream.write(("\r\x1b[2K" if self._open_line else "") + text + "\n")
        self.stream.flush()
        self._open_line = False

    def close(self) -> None:
        if self._open_line:
            self.stream.write("\n")
            self.stream.flush()
            self._open_line = False


class FanOut:
    """Several reporters as one; a failing one never stops the others."""

    def __init__(self, reporters: list[ProgressReporter]) -> None:
        self.reporters = reporters

    def report(self, update: ProgressUpdate) -> None:
        for reporter in self.reporters:
            try:
                reporter.report(update)
            except Exception:
                log.warning("progress reporter %s failed", type(reporter).__name__, exc_info=True)

    def close(self) -> None:
        for reporter in self.reporters:
            try:
                reporter.close()
            except Exception:
                log.warning("progress reporter %s failed to close", type(reporter).__name__, exc_info=True)


class RelayReporter:
    """Worker side of the console: puts updates on a Ray queue that the driver drains; drops when full."""

    def __init__(self, queue: Any) -> None:
        self.queue = queue

    def report(self, update: ProgressUpdate) -> None:
        try:
            self.queue.put_nowait(update.wire())
        except Exception:  # queue full or driver gone: progress is best effort
            log.debug("progress relay dropped an update", exc_info=True)

    def close(self) -> None:
        pass


def worker_reporters(relay: Any | None, rank: int) -> FanOut:
    """What a worker reports to: the driver's relay (`relay.Relay`), which shows the updates and sends them
    to the operator. Only rank 0 produces updates; the others get an empty fan-out."""
    return FanOut([RelayReporter(relay)] if rank == 0 and relay is not None else [])
