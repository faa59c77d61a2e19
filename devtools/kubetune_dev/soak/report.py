"""soak/results.md: the command and seed, the jobs and how each ended, the faults by kind, the time they
cost, and every invariant check, failed ones first."""

from __future__ import annotations

import datetime
from collections import Counter
from pathlib import Path

from kubetune_dev.soak.faults import FaultRecord
from kubetune_dev.soak.jobs import JobRecord
from kubetune_dev.soak.runner import Outcome


def lost_seconds(fault: FaultRecord, jobs: dict[str, JobRecord]) -> float:
    """The time a fault cost: for a job fault, until the job's status showed progress past where it was
    hit (its end, if none came); otherwise the fault's window or downtime."""
    if not fault.injected or fault.injected_at is None:
        return 0.0
    job = jobs.get(fault.target)
    if fault.position is None or job is None:
        return fault.duration
    for sample in job.samples:
        position = (int(sample.progress.get("epoch") or 0), int(sample.progress.get("step") or 0))
        if sample.at > fault.injected_at and position > fault.position:
            return sample.at - fault.injected_at
    return max(0.0, (job.ended_at or fault.injected_at) - fault.injected_at)


def render(outcome: Outcome, lock_note: str = "") -> str:
    jobs = {job.name: job for job in outcome.jobs}
    checks = outcome.checks
    failed = [c for c in checks if not c.passed]
    injected = [f for f in outcome.faults if f.injected]
    lost = {id(f): lost_seconds(f, jobs) for f in injected}
    when = datetime.datetime.fromtimestamp(outcome.started, datetime.UTC).strftime("%Y-%m-%d %H:%M UTC")
    lines = [
        "# Chaos soak results",
        "",
        f"**{'PASSED' if outcome.passed else 'FAILED'}**: {len(checks) - len(failed)} of {len(checks)} invariant checks passed.",
        "",
        f"- Command: `{outcome.command}` (or `make soak MINUTES={outcome.options.minutes:g} JOBS={outcome.options.jobs} SEED={outcome.options.seed}`), from the repository root",
        f"- Seed: {outcome.options.seed}; started {when}; window {outcome.options.minutes:g} min; "
        f"whole run (with the drain after the window) {(outcome.ended - outcome.started) / 60:.1f} min",
        f"- Jobs: {len(outcome.jobs)} ({_kinds(outcome.jobs)}), at most {outcome.options.concurrent} at once",
        f"- Faults: {len(injected)} injected of {len(outcome.faults)} planned; time lost to them: {sum(lost.values()):.0f} s",
    ]
    lines += [f"- {note}" for note in ([lock_note] if lock_note else []) + outcome.notes]
    lines += ["", "## Faults by kind", "", "| kind | planned | injected | time lost (s) |", "|---|---|---|---|"]
    planned = Counter(f.planned.kind for f in outcome.faults)
    hit = Counter(f.planned.kind for f in injected)
    for kind in sorted(planned):
        kind_lost = sum(lost[id(f)] for f in injected if f.planned.kind == kind)
        lines.append(f"| {kind} | {planned[kind]} | {hit[kind]} | {kind_lost:.0f} |")
    lines += [
        "",
        "## Jobs",
        "",
        "| job | kind | workers | epochs | soak's action | outcome | minutes |",
        "|---|---|---|---|---|---|---|",
    ]
    for job in outcome.jobs:
        minutes = ((job.ended_at or 0) - (job.submitted_at or 0)) / 60 if job.submitted_at else 0.0
        outcome_text = "deleted" if job.acted == "deleted" else job.phase or job.error or "?"
        planned_job = job.planned
        lines.append(
            f"| {job.name} | {planned_job.kind} | {planned_job.workers} | {planned_job.epochs} | {_cell(job.acted) or '-'} | {_cell(outcome_text)} | {minutes:.1f} |"
        )
    lines += ["", "## Fault log", "", "| at (s) | kind | target | what happened | lost (s) |", "|---|---|---|---|---|"]
    for fault in outcome.faults:
        at = (fault.injected_at - outcome.started) if fault.injected_at else fault.planned.at
        lines.append(
            f"| {at:.0f} | {fault.planned.kind} | {fault.target or '-'} | {_cell(fault.detail)} | {lost.get(id(fault), 0.0):.0f} |"
        )
    lines += ["", "## Invariant checks", "", "| check | subject | result | detail |", "|---|---|---|---|"]
    for check in sorted(checks, key=lambda c: c.passed):
        lines.append(
            f"| {check.name} | {check.subject} | {'pass' if check.passed else '**FAIL**'} | {_cell(check.detail)} |"
        )
    return "\n".join(lines) + "\n"


def _kinds(jobs: list[JobRecord]) -> str:
    counts = Counter(job.planned.kind for job in jobs)
    actions = Counter(job.planned.action for job in jobs if job.planned.action != "none")
    parts = [f"{n} {kind}" for kind, n in sorted(counts.items())]
    parts += [f"{n} to {action}" for action, n in sorted(actions.items())]
    return ", ".join(parts)


def _cell(text: str) -> str:
    return text.replace("|", "\\|").replace("\n", " ")[:300]


def write(outcome: Outcome, path: Path, lock_note: str = "") -> Path:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(render(outcome, lock_note))
    return path
