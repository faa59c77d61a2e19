"""What a sweep (spec.sweep) runs, and what it found: pure functions, no Ray and no S3.

- `plan_sweep`: the trials, drawn once from the sweep's seed (the same plan on every driver start, so a
  restarted driver knows which trials are finished): a list (`values`, `choices`) is stratified, every value
  tried once in a seeded order before any twice; a range (`uniform`, `loguniform`) is sampled.
- `trial_config`: a trial's TrainerConfig, the job's with the trial's values set (`config.trial_sections`,
  the same function validation uses), its own output folder `<output.path>/trials/<id>/` and run name.
- `TrialRecord`: what a finished trial left (trials/<id>/trial.json, and its entry in sweep.json);
  `own_record` reads one back only when it is this sweep's, of this trial, with checkpoints in the trial's
  folder (whoever can write the output bucket could otherwise point the export at any object).
- `best_trial`, `sweep_document` and `sweep_progress`: the best trial, sweep.json and the progress's `sweep`.
"""

from __future__ import annotations

import hashlib
import json
import math
import random
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field, replace
from typing import Any, Literal

from kubetune_trainer.config import (
    SweepParameter,
    SweepSpec,
    SweepValue,
    TrainerConfig,
    metric_mode,
    sweep_metric,
    sweep_value,
    trial_sections,
)
from kubetune_trainer.localpaths import unsafe_reason
from kubetune_trainer.progress_model import TRIAL_ENDS, SweepProgress, TrialEnd
from kubetune_trainer.selection import best_entry

TRIALS_DIR = "trials"
TRIAL_RECORD = "trial.json"  # under trials/<id>/: written once the trial has ended (the driver's resume record)
TRIAL_FITTED = "fitted.json"  # under trials/<id>/: the trial's last and best checkpoints, when it trained to its end
SWEEP_FILE = "sweep.json"
SWEEP_FIGURE = "sweep.png"
SWEEP_ID_LENGTH = 12


@dataclass(frozen=True)
class Trial:
    """One planned trial: its id (trial-000, ...), and its values of the swept fields (spec path to value)."""

    index: int
    values: dict[str, SweepValue]

    @property
    def id(self) -> str:
        return f"trial-{self.index:03d}"


@dataclass(frozen=True)
class SweepPlan:
    """The sweep's id (a digest of the run and the sweep spec), metric, mode and trials."""

    sweep_id: str
    metric: str
    mode: Literal["min", "max"]
    trials: tuple[Trial, ...]


def sweep_id(config: TrainerConfig, sweep: SweepSpec) -> str:
    """The run name and the sweep spec, digested: another sweep in the same output.path has another id, and
    its trials never resume this one's records or checkpoints."""
    text = json.dumps({"run": config.run_name, "sweep": sweep.wire()}, sort_keys=True)
    return hashlib.sha256(text.encode()).hexdigest()[:SWEEP_ID_LENGTH]


def _draw(parameter: SweepParameter, rng: random.Random, order: list[int], trial: int) -> SweepValue:
    listed: Sequence[float | str] | None = parameter.values if parameter.values is not None else parameter.choices
    if listed is not None:
        return sweep_value(parameter.field, listed[order[trial % len(listed)]])
    if parameter.uniform is not None:
        return float(f"{rng.uniform(parameter.uniform.min, parameter.uniform.max):.6g}")
    spread = parameter.loguniform
    assert spread is not None  # exactly one distribution per parameter
    return float(f"{math.exp(rng.uniform(math.log(spread.min), math.log(spread.max))):.6g}")


def _stratified(rng: random.Random, size: int, trials: int) -> list[int]:
    """Indices into a list of `size`, for `trials` trials: each pass over the list in a fresh seeded order."""
    order: list[int] = []
    while len(order) < trials:
        chunk = list(range(size))
        rng.shuffle(chunk)
        order += chunk
    return order


def plan_sweep(config: TrainerConfig) -> SweepPlan:
    """The trials of config.sweep, drawn from sweep.seed (else training.seed)."""
    sweep = config.sweep
    assert sweep is not None
    seed = sweep.seed if sweep.seed is not None else config.training.seed
    rng = random.Random(seed)
    orders = [_stratified(rng, len(p.values or p.choices or [0]), sweep.trials) for p in sweep.parameters]
    trials = tuple(
        Trial(i, {p.field: _draw(p, rng, order, i) for p, order in zip(sweep.parameters, orders, strict=True)})
        for i in range(sweep.trials)
    )
    metric = sweep_metric(config.task, config.training, sweep)
    return SweepPlan(sweep_id(config, sweep), metric, sweep.mode or metric_mode(metric), trials)


def trial_config(config: TrainerConfig, plan: SweepPlan, trial: Trial) -> TrainerConfig:
    """The trial as a run of its own: the swept values set, its output and checkpoints under
    `<output.path>/trials/<id>/`, a run name of its own, ranked by the sweep's metric, no sweep."""
    model, data, training = trial_sections(config.model, config.data, config.training, trial.values)
    training = training.model_copy(update={"select_by": plan.metric})
    output = config.output.model_copy(update={"path": trial_output(config, trial.id)})
    return config.model_copy(
        update={
            "model": model,
            "data": data,
            "training": training,
            "output": output,
            "run_name": f"{config.run_name}.{plan.sweep_id}.{trial.index:03d}"[:200],
            "sweep": None,
        }
    )


def trial_output(config: TrainerConfig, trial_id: str) -> str:
    return f"{config.output.path.rstrip('/')}/{TRIALS_DIR}/{trial_id}/"


def trial_file(config: TrainerConfig, trial_id: str, name: str) -> str:
    """A file of the trial's folder, as the sweep's driver names it (from the sweep's config)."""
    return f"{trial_output(config, trial_id)}{name}"


def fitted_file(trial: TrainerConfig) -> str:
    """Where a trial's run records its checkpoints (TRIAL_FITTED): in its own output, which is already the
    sweep's trials/<id>/ (`trial_config`); the driver reads it as `trial_file(config, id, TRIAL_FITTED)`."""
    return f"{trial.output.path.rstrip('/')}/{TRIAL_FITTED}"


def text_value(value: SweepValue) -> str:
    """A swept value as status.sweep.bestParameters shows it."""
    return f"{value:.6g}" if isinstance(value, float) else str(value)


@dataclass
class TrialRecord:
    """A trial that ended: done (all its epochs, or earlyStopping), stopped (by ASHA) or failed."""

    sweep_id: str
    id: str
    values: dict[str, SweepValue]
    state: TrialEnd
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpoints: dict[str, str] = field(default_factory=dict)  # done trials: "last" and "best" (s3:// URIs)
    reason: str | None = None  # failed trials: why

    def wire(self) -> dict[str, Any]:
        return {
            "sweepId": self.sweep_id,
            "id": self.id,
            "parameters": self.values,
            "state": self.state,
            "history": self.history,
            "checkpoints": self.checkpoints,
            "reason": self.reason,
        }

    @classmethod
    def from_wire(cls, raw: Mapping[str, Any]) -> TrialRecord:
        state = str(raw["state"])
        if state not in TRIAL_ENDS:
            raise ValueError(f"trial record: unknown state {state!r}")
        return cls(
            sweep_id=str(raw["sweepId"]),
            id=str(raw["id"]),
            values=dict(raw["parameters"]),
            state=state,
            history=[dict(entry) for entry in raw.get("history") or []],
            checkpoints={str(k): str(v) for k, v in dict(raw.get("checkpoints") or {}).items()},
            reason=raw.get("reason"),
        )

    def best(self, metric: str) -> Mapping[str, Any] | None:
        return best_entry(self.history, metric) if self.history else None

    def summary(self, metric: str, epochs: int) -> dict[str, Any]:
        """The trial's entry in sweep.json: parameters, state, epochs run, final and best figures."""
        best = self.best(metric)
        return {
            "id": self.id,
            "parameters": self.values,
            "state": self.state,
            "stoppedEarly": self.state == "stopped",
            "epochs": len(self.history),
            "ofEpochs": epochs,
            "final": dict(self.history[-1]) if self.history else None,
            "best": None if best is None else {"epoch": best["epoch"], metric: best.get(metric)},
            "curve": [entry.get(metric) for entry in self.history],
            "reason": self.reason,
        }


def in_trial_folder(config: TrainerConfig, trial_id: str, uri: Any) -> bool:
    """Whether `uri` names something below the trial's own folder (trials/<id>/), with no empty, "." or
    ".." segment after it."""
    folder = trial_output(config, trial_id)
    return isinstance(uri, str) and uri.startswith(folder) and unsafe_reason(uri[len(folder) :].rstrip("/")) is None


def own_record(config: TrainerConfig, plan: SweepPlan, trial: Trial, raw: Any) -> TrialRecord | None:
    """The record read back from trials/<id>/trial.json, when this sweep wrote it for `trial`: its sweep id
    and trial id, its checkpoints in the trial's folder; its values are the plan's (the record's own are
    only what was written). None for anything else (another sweep's record, or not a record)."""
    try:
        record = TrialRecord.from_wire(raw)
    except (KeyError, TypeError, ValueError, AttributeError):
        return None
    if record.sweep_id != plan.sweep_id or record.id != trial.id:
        return None
    if not all(in_trial_folder(config, trial.id, uri) for uri in record.checkpoints.values()):
        return None
    return replace(record, values=dict(trial.values))


def best_trial(records: Sequence[TrialRecord], metric: str) -> TrialRecord | None:
    """The done trial with the best value of `metric` in any epoch (ASHA's stopped trials were judged poor and
    have no exported checkpoint; failed ones none at all)."""
    done = [r for r in records if r.state == "done" and r.history and r.checkpoints.get("best")]
    bests = [r.best(metric) for r in done]
    winner = best_entry([b for b in bests if b is not None], metric)
    return next((r for r, b in zip(done, bests, strict=True) if b is winner), None)


def sweep_document(plan: SweepPlan, config: TrainerConfig, records: Sequence[TrialRecord]) -> dict[str, Any]:
    """sweep.json: the sweep's settings, every trial's summary, and the best trial."""
    sweep = config.sweep
    assert sweep is not None
    best = best_trial(records, plan.metric)
    best_entry_ = best.best(plan.metric) if best else None
    return {
        "sweepId": plan.sweep_id,
        "metric": plan.metric,
        "mode": plan.mode,
        "scheduler": sweep.scheduler.wire(),
        "trials": [r.summary(plan.metric, config.training.epochs) for r in records],
        "best": None
        if best is None or best_entry_ is None
        else {"trial": best.id, "value": best_entry_.get(plan.metric), "parameters": best.values},
    }


def sweep_progress(
    plan: SweepPlan, records: Sequence[TrialRecord], running: int, best: tuple[str, float, Mapping[str, Any]] | None
) -> SweepProgress:
    """The progress's `sweep`: trials by state, and the best (trial id, value, values) so far."""
    counts = {state: sum(1 for r in records if r.state == state) for state in TRIAL_ENDS}
    total = len(plan.trials)
    return SweepProgress(
        trials=total,
        pending=max(0, total - running - sum(counts.values())),
        running=running,
        metric=plan.metric,
        best_trial=best[0] if best else None,
        best_value=best[1] if best else None,
        best_parameters={k: text_value(v) for k, v in best[2].items()} if best else {},
        **counts,
    )
