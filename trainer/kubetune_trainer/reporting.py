"""Progress of a run: one message shape, and reporters that show or send it.

`ProgressUpdate` is the message the operator's progress endpoint accepts (camelCase on the wire) and
what `status.progress` shows. Rank 0 of the workers produces updates; reporters must never slow down or
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

from pydantic import Field

from kubetune_trainer.config import CamelModel

log = logging.getLogger(__name__)


class ProgressMetrics(CamelModel):
    """The latest figures; validation ones come from the last finished epoch."""

    train_loss: float | None = Field(default=None, description="Mean training loss of the current epoch so far.")
    val_loss: float | None = Field(default=None, description="Validation loss of the last finished epoch.")
    val_accuracy: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Validation top-1 accuracy of the last finished epoch."
    )
    val_map: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Detection: COCO mAP@[.5:.95] of the last finished epoch."
    )
    val_map50: float | None = Field(
        default=None, ge=0.0, le=1.0, description="Detection: COCO mAP@.5 of the last finished epoch."
    )
    images_per_second: float | None = Field(default=None, ge=0.0, description="Training throughput, all workers.")
    learning_rate: float | None = Field(default=None, ge=0.0, description="Current peak learning rate.")


class ProgressUpdate(CamelModel):
    """Where a run is: the message from the trainer to the operator (and the console)."""

    epoch: int = Field(ge=0, description="Current epoch, 1-based (0 before the first starts).")
    total_epochs: int = Field(ge=1)
    step: int = Field(ge=0, description="Optimizer steps done in the whole run.")
    total_steps: int = Field(ge=0)
    percent: float = Field(ge=0.0, le=100.0)
    eta_seconds: float | None = Field(default=None, ge=0.0)
    metrics: ProgressMetrics = Field(default_factory=ProgressMetrics)
    latest_checkpoint: str | None = Field(
        default=None, description="s3:// URI of the latest checkpoint Ray Train committed (a restart resumes from it)."
    )
    worker_failures: int | None = Field(
        default=None,
        ge=0,
        description="Worker failures in this run of the driver; Ray Train restarts the workers from the latest "
        "checkpoint after each, up to maxFailures (spec.runPolicy.maxRetries).",
    )
    phase: str | None = Field(
        default=None, description="Resumed, Training or Checkpointing (sent after each epoch's checkpoint)."
    )
    best_epoch: int | None = Field(
        default=None,
        ge=1,
        description="The epoch whose checkpoint is the best so far by training.selectBy: the one the export takes.",
    )


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
    m = update.metrics
    if m.train_loss is not None:
        parts.append(f"loss {m.train_loss:.4f}")
    if m.val_accuracy is not None:
        parts.append(f"acc {m.val_accuracy:.1%}")
    if m.val_map is not None:
        parts.append(f"mAP {m.val_map:.3f}")
    if m.val_map50 is not None:
        parts.append(f"mAP@.5 {m.val_map50:.3f}")
    if m.images_per_second is not None:
        parts.append(f"{m.images_per_second:.0f} img/s")
    parts.append(f"ETA {format_duration(update.eta_seconds)}")
    return " ".join(parts)


class ConsoleReporter:
    """A progress line on a terminal (redrawn in place), or a line every `interval` seconds in a log."""

    def __init__(self, stream: TextIO | None = None, interval: float = 5.0, tty: bool | None = None) -> None:
        self.stream = stream or sys.stderr
        self.tty = self.stream.isatty() if tty is None else tty
        self.interval = 0.2 if self.tty else interval
        self._last = 0.0
        self._last_epoch = -1
        self._open_line = False

    def report(self, update: ProgressUpdate) -> None:
        try:
            if update.phase == "Resumed":
                self._write_line(f"resumed from {update.latest_checkpoint} after epoch {update.epoch}")
                return
            now = time.monotonic()
            epoch_done = update.phase == "Checkpointing"
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
