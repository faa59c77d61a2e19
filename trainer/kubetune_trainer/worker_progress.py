"""A worker's side of progress: rank 0 builds `ProgressUpdate`s and hands them to the driver's relay.

Rank 0 reports about once a second while an epoch trains (`REPORT_INTERVAL_S`; its running mean loss,
no collective mid-epoch), after each epoch, once when it resumed, and once when it has saved the
checkpoint of a preemption notice (so the driver knows the exact step). The other ranks report nothing
(`reporting.worker_reporters`).
"""

from __future__ import annotations

import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from kubetune_trainer.progress_model import ProgressMetrics, ProgressUpdate, TrainerPhase, TrainingSettings
from kubetune_trainer.reporting import worker_reporters
from kubetune_trainer.selection import best_epoch

if TYPE_CHECKING:
    from kubetune_trainer.loop import TrainState

REPORT_INTERVAL_S = 1.0


def percent_done(step: int, total: int) -> float:
    """Share of all steps done, 0-100, to one decimal, rounded down: `kubectl get ftj` shows it as it is
    (41.6, not 41.66666666666667), and 100 only at the last step."""
    return min(100.0, math.floor(1000 * step / max(1, total)) / 10)


@dataclass
class _Clock:
    """ETA from the pace of this attempt (a resumed run does not count the steps it skipped)."""

    total_steps: int
    done: int
    started: float = field(default_factory=time.monotonic)

    def eta(self, step: int) -> float | None:
        ran = step - self.done
        if ran <= 0:
            return None
        return (time.monotonic() - self.started) / ran * max(0, self.total_steps - step)


class WorkerProgress:
    """What this worker says about the run, from the loop's `TrainState` (step, history, the checkpoint it
    resumed from, the learning rate); only rank 0 says anything."""

    def __init__(
        self,
        relay: Any,
        rank: int,
        total_epochs: int,
        steps_per_epoch: int,
        metric_keys: Sequence[str],
        state: TrainState,
        selected_metric: str,
        world: int = 1,
    ) -> None:
        self.reporter = worker_reporters(relay, rank)
        self.enabled = rank == 0
        self.world = world
        self.total_epochs = total_epochs
        self.clock = _Clock(total_steps=total_epochs * steps_per_epoch, done=state.step)
        # The last finished epoch's validation figures, keyed as in history.json (and ProgressMetrics' wire names).
        last = state.history[-1] if state.history else {}
        self.last_val: dict[str, float] = {k: last[k] for k in metric_keys if k in last}
        self.selected_metric = selected_metric

    def update(
        self, state: TrainState, epoch: int, phase: TrainerPhase, train_loss: float | None, ips: float | None
    ) -> ProgressUpdate:
        step, total = state.step, self.clock.total_steps
        return ProgressUpdate(
            epoch=epoch,
            total_epochs=self.total_epochs,
            step=step,
            total_steps=total,
            percent=percent_done(step, total),
            eta_seconds=self.clock.eta(step),
            metrics=ProgressMetrics.model_validate(
                {
                    **{k: v for k, v in self.last_val.items() if math.isfinite(v)},
                    "trainLoss": train_loss if train_loss is None or math.isfinite(train_loss) else None,
                    "imagesPerSecond": ips,
                    "learningRate": state.learning_rate,
                }
            ),
            # The checkpoint this attempt resumed from: the driver's relay names each new one once Ray
            # Train has committed it.
            latest_checkpoint=state.resumed_from,
            workers=self.world,
            phase=phase,
            best_epoch=best_epoch(state.history, self.selected_metric),
            early_stopped=True if state.stopped_early else None,
            training=TrainingSettings.from_effective(state.effective),
        )

    def resumed(self, state: TrainState) -> None:
        if not self.enabled:
            return
        within = f", at step {state.step} of epoch {state.epoch + 1}" if state.epoch_samples else ""
        print(f"kubetune: resumed from {state.resumed_from} after epoch {state.epoch}{within}", flush=True)
        self.reporter.report(self.update(state, state.epoch, "Resumed", None, None))

    def training(self, state: TrainState, running_loss: float, ips: float) -> None:
        """Mid-epoch (`state.epoch` epochs done): rank 0's running mean loss and all workers' throughput."""
        if self.enabled:
            self.reporter.report(self.update(state, state.epoch + 1, "Training", running_loss, ips))

    def epoch_done(self, state: TrainState, validation: Mapping[str, float], *, saved: bool) -> None:
        """After the epoch `state.history[-1]` describes, with its validation figures, and its checkpoint
        (`saved`; with `checkpointEvery` a duration an epoch may end without one)."""
        self.last_val = dict(validation)
        if self.enabled:
            entry = state.history[-1]
            phase: TrainerPhase = "Checkpointing" if saved else "Evaluated"
            self.reporter.report(self.update(state, state.epoch, phase, entry["trainLoss"], entry["imagesPerSecond"]))

    def preempted(self, state: TrainState) -> None:
        """The checkpoint of a preemption notice is saved at `state.step`; the workers wait for the restart."""
        if self.enabled:
            self.reporter.report(self.update(state, state.epoch + 1, "Preempted", None, None))

    def close(self) -> None:
        self.reporter.close()
