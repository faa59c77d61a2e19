"""The soak's invariants: each a small function of facts the soak gathered, returning a `Check`.

Pure except `model_reloads`, which builds the model (torch) to load the exported weights into. The
runner gathers the facts (runner.py); tests/unit/test_soak_invariants.py feeds each crafted ones.
"""

from __future__ import annotations

import itertools
import math
import statistics
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from typing import Any

RSS_GROWTH_ALLOWED = 1.25  # the last quarter's median RSS over the first quarter's, at most
RSS_SLACK_BYTES = 32 * 1024**2  # and this much on top (allocator noise on a small process)
RSS_WARM_S = 30.0  # samples of an operator process younger than this are its start-up, not a trend
FIGURE_TOLERANCE = 1e-6  # relative: status.progress and history.json carry the same floats


@dataclass(frozen=True)
class Check:
    name: str
    subject: str  # the job, or "cluster" / "operator"
    passed: bool
    detail: str


def final_phase(job: str, expected: str, phase: str, message: str = "") -> Check:
    """A job whose fault budget was not exceeded ends `expected` (Succeeded; "Deleted": gone)."""
    passed = phase == expected
    detail = f"{phase or 'no phase'}" + ("" if passed else f", expected {expected}: {message}")
    return Check("final phase", job, passed, detail)


def one_rayjob_per_attempt(job: str, created_uids: Sequence[str], attempts: int, left: int, deleted: bool) -> Check:
    """Exactly one RayJob created per attempt of the job (a FineTuneJob created once is one attempt: KubeRay
    retries and suspensions reuse it), and none left once the job was deleted."""
    distinct = len(set(created_uids))
    problems = []
    if distinct != attempts or len(created_uids) != distinct:
        problems.append(f"{len(created_uids)} RayJob creation(s), {distinct} distinct, for {attempts} attempt(s)")
    if deleted and left:
        problems.append(f"{left} RayJob(s) left after the deletion")
    detail = "; ".join(problems) or f"{distinct} RayJob for {attempts} attempt(s)" + (", none left" if deleted else "")
    return Check("one RayJob per attempt", job, not problems, detail)


def history_complete(job: str, history: Sequence[Mapping[str, Any]] | None, epochs: int) -> Check:
    """history.json has exactly `epochs` entries, their epochs never going back."""
    if history is None:
        return Check("history.json", job, False, "no history.json")
    numbers = [int(entry.get("epoch", -1)) for entry in history]
    problems = []
    if len(numbers) != epochs:
        problems.append(f"{len(numbers)} entries for {epochs} epochs")
    if any(later < earlier for earlier, later in itertools.pairwise(numbers)):
        problems.append(f"epochs go back: {numbers}")
    return Check("history.json", job, not problems, "; ".join(problems) or f"epochs {numbers}")


def progress_matches_history(
    job: str, progress: Mapping[str, Any], history: Sequence[Mapping[str, Any]] | None
) -> Check:
    """status.progress's final epoch and figures equal history.json's last entry."""
    if not history:
        return Check("final progress = history", job, False, "no history to compare with")
    last = history[-1]
    figures = dict(progress.get("metrics") or {})
    problems = []
    if progress.get("epoch") != last.get("epoch"):
        problems.append(f"epoch {progress.get('epoch')} in status, {last.get('epoch')} in history")
    shared = sorted(set(figures) & set(last) - {"epoch"})
    for key in shared:
        if not _same(figures[key], last[key]):
            problems.append(f"{key} {figures[key]} in status, {last[key]} in history")
    if not shared:
        problems.append(f"no figures in common: status {sorted(figures)}, history {sorted(last)}")
    detail = "; ".join(problems) or f"epoch {last.get('epoch')}, {', '.join(shared)} equal"
    return Check("final progress = history", job, not problems, detail)


def _same(a: Any, b: Any) -> bool:
    if isinstance(a, int | float) and isinstance(b, int | float):
        return math.isclose(float(a), float(b), rel_tol=FIGURE_TOLERANCE, abs_tol=1e-12)
    return bool(a == b)


def model_reloads(job: str, card: Mapping[str, Any] | None, weights: bytes | None) -> Check:
    """The exported model.safetensors loads, every tensor, into the architecture model.json names."""
    if card is None or weights is None:
        return Check("model reloads", job, False, "no " + ("model.json" if card is None else "model.safetensors"))
    try:
        model = _model_of(card)
        from safetensors.torch import load

        result = model.load_state_dict(load(weights), strict=True)
    except Exception as exc:  # what a user would see reloading it
        return Check("model reloads", job, False, f"{type(exc).__name__}: {str(exc)[:300]}")
    return Check("model reloads", job, True, f"{card.get('architecture')}: {result}")


def _model_of(card: Mapping[str, Any]) -> Any:
    """The model model.json describes, as export.py's docstring says to rebuild it."""
    if card.get("task") == "detection":
        from kubetune_trainer.detection_model import create_detector

        return create_detector(str(card["architecture"]), int(card["numClasses"]))
    from kubetune_trainer.model import create_model

    return create_model(str(card["architecture"]), int(card["numClasses"]))


def no_orphans(ray_processes: Sequence[str], ray_objects: Sequence[str], temp_files: Sequence[str]) -> Check:
    """Once every job ended: no Ray process, RayCluster or pod, and no temp file of a run, left behind."""
    leftovers = [*ray_processes, *ray_objects, *temp_files]
    detail = "; ".join(leftovers[:10]) + (f" (+{len(leftovers) - 10})" if len(leftovers) > 10 else "")
    return Check("no orphans", "cluster", not leftovers, detail or "no Ray process, RayCluster, pod or temp file left")


def rss_flat(samples: Sequence[tuple[float, int, float]]) -> Check:
    """The operator's RSS (time, bytes, process age) in the last quarter of the run at most RSS_GROWTH_ALLOWED
    times (plus RSS_SLACK_BYTES) its first quarter's, medians of the samples of warm processes."""
    warm = [rss for _, rss, age in samples if age >= RSS_WARM_S]
    if len(warm) < 8:
        return Check("operator RSS flat", "operator", False, f"{len(warm)} warm samples, too few to tell")
    quarter = len(warm) // 4
    first, last = statistics.median(warm[:quarter]), statistics.median(warm[-quarter:])
    passed = last <= first * RSS_GROWTH_ALLOWED + RSS_SLACK_BYTES
    detail = f"median {first / 1024**2:.0f} MiB in the first quarter, {last / 1024**2:.0f} MiB in the last"
    return Check("operator RSS flat", "operator", passed, detail)


def failed(checks: Sequence[Check]) -> list[Check]:
    return [check for check in checks if not check.passed]
