"""`python -m bench` (`make bench`): run every benchmark against its baseline and write bench/results.md.

    python -m bench                 # everything, full size (about 40 minutes on 2 cores: 17 before the
                                    # fan-in (~10), first-step (~6) and 2,000/5,000-job bursts (~8) came)
    python -m bench --quick         # smaller and fewer repeats (a few minutes; about 8)
    python -m bench --only control-plane --burst-jobs 500,2000,5000   # the burst sizes (CI's smoke: tiny)
    python -m bench --only storage  # one benchmark (trainer, storage, checkpoint-blocking, pipeline,
                                    # streaming, control-plane, fan-in, first-step, quality);
                                    # the others' rows and set-ups stay as the results page had them
    python -m bench --render bench/out/run-.../results.json   # the page again, e.g. after editing findings.md

Raw samples go to bench/out/results.json. Findings written by hand (profiles, fixes with their before
and after, the GPU figures from bench/gpu.py) live in bench/findings.md and are copied into results.md.
"""

from __future__ import annotations

import argparse
import json
import os
import shutil
import sys
import time
import traceback
from collections.abc import Callable, Sequence
from datetime import UTC, datetime
from pathlib import Path
from types import ModuleType
from typing import Any

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")

from bench import (
    checkpoint_blocking,
    checkpoint_storage,
    control_plane,
    first_step,
    input_pipeline,
    progress_fanin,
    quality,
    streaming,
    trainer_overhead,
)
from bench.common import REPO, Row, host_facts, log, markdown_table

BENCHMARKS: dict[str, ModuleType] = {
    "trainer": trainer_overhead,
    "storage": checkpoint_storage,
    "checkpoint-blocking": checkpoint_blocking,
    "pipeline": input_pipeline,
    "streaming": streaming,
    "control-plane": control_plane,
    "fan-in": progress_fanin,
    "first-step": first_step,
    "quality": quality,
}
RESULTS = REPO / "bench" / "results.md"
FINDINGS = REPO / "bench" / "findings.md"
OUT = REPO / "bench" / "out"


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m bench", description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="smaller sizes and fewer repeats")
    parser.add_argument("--only", action="append", choices=sorted(BENCHMARKS), help="run only this (repeatable)")
    parser.add_argument(
        "--burst-jobs",
        type=_sizes,
        metavar="N[,N...]",
        help="control-plane bursts: the first is the main burst (500), the rest its scale runs (2000,5000)",
    )
    parser.add_argument("--results", type=Path, default=RESULTS, help=f"markdown to write (default {RESULTS})")
    parser.add_argument("--workdir", type=Path, default=None, help="scratch folder (default bench/out/run-<time>)")
    parser.add_argument("--keep", action="store_true", help="keep each benchmark's data in the workdir (logs are kept)")
    parser.add_argument(
        "--render",
        type=Path,
        metavar="RESULTS_JSON",
        help="run nothing: write the results page again from a run's results.json (after editing findings.md)",
    )
    return parser.parse_args(argv)


def _sizes(text: str) -> list[int]:
    sizes = [int(part) for part in text.split(",") if part.strip()]
    if not sizes or any(n < 1 or n > 20000 for n in sizes):
        raise argparse.ArgumentTypeError("burst sizes are 1..20000 jobs, comma separated")
    return sizes


def run_all(
    names: Sequence[str],
    quick: bool,
    workdir: Path,
    config_for: Callable[[ModuleType], Any] | None = None,
    keep: bool = False,
) -> tuple[list[Row], dict[str, str], dict[str, float]]:
    """Run the named benchmarks; (rows, failures by name, seconds by name)."""
    rows: list[Row] = []
    failures: dict[str, str] = {}
    seconds: dict[str, float] = {}
    for name in names:
        module = BENCHMARKS[name]
        config = config_for(module) if config_for else module.Config.quick() if quick else module.Config.full()
        folder = workdir / name
        folder.mkdir(parents=True, exist_ok=True)
        started = time.monotonic()
        try:
            rows += module.run(config, folder)
        except Exception as error:
            failures[name] = f"{type(error).__name__}: {error}"
            traceback.print_exc()
        seconds[name] = time.monotonic() - started
        log(f"{name}: {seconds[name]:.0f}s")
        if not keep:
            tidy(folder)
    return rows, failures, seconds


def tidy(folder: Path) -> None:
    """Keep a benchmark's logs, drop its data (images, checkpoints, caches: hundreds of MB a run)."""
    for path in folder.iterdir():
        if path.is_dir():
            shutil.rmtree(path, ignore_errors=True)
        elif path.suffix != ".log":
            path.unlink(missing_ok=True)


def render(
    rows: Sequence[Row],
    failures: dict[str, str],
    seconds: dict[str, float],
    *,
    quick: bool,
    host: dict[str, str],
    started: datetime,
    findings: str | None,
) -> str:
    lines = [
        "# kubetune benchmarks",
        "",
        "Written by `make bench` (`python -m bench`); do not edit by hand — hand-written findings come from "
        "`bench/findings.md`, appended below.",
        "",
        f"- Date: {started:%Y-%m-%d %H:%M} UTC; mode: {'quick (--quick)' if quick else 'full'}; "
        f"took {sum(seconds.values()) / 60:.1f} min ({', '.join(f'{k} {v:.0f}s' for k, v in seconds.items())})",
        f"- Host: {host['cores']} cores ({host['cpu']}), {host['memory']} memory, {host['os']}, "
        f"Python {host['python']}; load average at start {host['load']} (shared machine: figures are noisy, "
        "which is why each baseline runs interleaved with kubetune in the same run)",
        f"- Versions: {host['versions']}",
        "",
        "Each figure: median of repeated runs with min–max; ratio = kubetune median / baseline median, "  # noqa: RUF001
        "measured in the same run. A target on a ratio reads ≥ for throughput and ≤ for a duration; a target on "
        "a difference (Quality) compares kubetune median minus baseline median, shown in the ratio column.",
        "",
        markdown_table(rows),
        "",
    ]
    if failures:
        lines += ["## Failed", ""] + [f"- {name}: {why}" for name, why in failures.items()] + [""]
    notes: dict[str, list[str]] = {}
    for row in rows:
        if row.note and row.note not in notes.setdefault(row.benchmark, []):
            notes[row.benchmark].append(row.note)
    lines += ["## Set-ups", ""]
    for name, module in BENCHMARKS.items():
        bench_rows = [r for r in rows if r.benchmark == module.NAME]
        if not bench_rows:
            continue
        doc = (module.__doc__ or "").strip()
        lines += [f"### {module.NAME} (`bench/{Path(module.__file__ or name).name}`)", "", doc, ""]
        lines += [f"- {note}" for note in notes.get(module.NAME, [])] + [""]
    if findings:
        lines += [findings.strip(), ""]
    return "\n".join(lines)


def _table_and_setups(page: str) -> tuple[list[str], dict[str, str]]:
    """A results page's table rows (`| Benchmark | …`) and its set-up sections by benchmark name."""
    lines = page.split("\n## Set-ups\n", 1)[0].splitlines()  # the results table, not the findings' tables
    table = [line for line in lines if line.startswith("| ") and not line.startswith(("| Benchmark |", "| ---"))]
    setups: dict[str, str] = {}
    body = page.split("\n## Set-ups\n", 1)[-1].split("\n## ", 1)[0]
    for section in body.split("\n### ")[1:]:
        setups[section.split(" (", 1)[0]] = "### " + section.rstrip("\n")
    return table, setups


def carry_over(old: str, new: str, ran: set[str]) -> str:
    """The new page with the rows and set-ups of the benchmarks this run left out (`--only`) carried over
    from the old page, in the order of BENCHMARKS, and a line that says they are from an earlier run."""
    old_rows, old_setups = _table_and_setups(old)
    new_rows, new_setups = _table_and_setups(new)
    order = [module.NAME for module in BENCHMARKS.values()]
    kept = [row for row in old_rows if row.split(" | ")[0].removeprefix("| ") not in ran]
    rows = sorted(kept + new_rows, key=lambda row: order.index(row.split(" | ")[0].removeprefix("| ")))
    setups = {**{k: v for k, v in old_setups.items() if k not in ran}, **new_setups}
    date = next((line for line in old.splitlines() if line.startswith("- Date: ")), "- Date: unknown")
    head, rest = new.split("\n| Benchmark |", 1)
    header_rows, _ = rest.split("\n\n", 1)
    header = "| Benchmark |" + "\n".join(header_rows.splitlines()[:2])
    findings = new.split("\n## Set-ups\n", 1)[1].split("\n## ", 1)
    carried = sorted({row.split(" | ")[0].removeprefix("| ") for row in kept}, key=order.index)
    note = f"- Rows of {', '.join(carried)}: carried over from the earlier run ({date.removeprefix('- Date: ')})\n"
    if carried:  # among the header's facts, after the versions
        head = head.replace("\n\nEach figure:", "\n" + note + "\nEach figure:", 1)
    parts = [head.rstrip("\n") + "\n", header, *rows, "", "## Set-ups", ""]
    parts += [setups[name] + "\n" for name in order if name in setups]
    if len(findings) > 1:
        parts += ["## " + findings[1]]
    return "\n".join(parts).rstrip("\n") + "\n"


def rerender(raw: Path, results: Path) -> int:
    data = json.loads(raw.read_text())
    rows = [
        Row(
            benchmark=r["benchmark"],
            figure=r["figure"],
            unit=r["unit"],
            product=r["product"],
            baseline=r["baseline"],
            goal=(r["goal"][0], r["goal"][1]) if r["goal"] else None,
            note=r["note"],
            absolute=r.get("absolute", False),
            difference=r.get("difference", False),
        )
        for r in data["rows"]
    ]
    findings = FINDINGS.read_text() if FINDINGS.is_file() else None
    started = datetime.fromisoformat(data["started"])
    text = render(
        rows,
        data["failures"],
        data["seconds"],
        quick=data["quick"],
        host=data["host"],
        started=started,
        findings=findings,
    )
    results.write_text(text)
    log(f"wrote {results} from {raw}")
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    if args.render:
        return rerender(args.render, args.results)
    names = args.only or list(BENCHMARKS)
    started = datetime.now(UTC)
    workdir = (args.workdir or OUT / f"run-{started:%Y%m%d-%H%M%S}").resolve()
    workdir.mkdir(parents=True, exist_ok=True)
    host = host_facts()
    log(f"running {', '.join(names)} ({'quick' if args.quick else 'full'}) in {workdir}")
    config_for = None
    if args.burst_jobs:

        def config_for(module: ModuleType) -> Any:
            config = module.Config.quick() if args.quick else module.Config.full()
            return config.sized(args.burst_jobs) if module is control_plane else config

    rows, failures, seconds = run_all(names, args.quick, workdir, config_for, keep=args.keep)
    findings = FINDINGS.read_text() if FINDINGS.is_file() else None
    text = render(rows, failures, seconds, quick=args.quick, host=host, started=started, findings=findings)
    if args.only and args.results.is_file():
        text = carry_over(args.results.read_text(), text, {BENCHMARKS[name].NAME for name in names})
    args.results.write_text(text)
    (workdir / "results.json").write_text(
        json.dumps(
            {
                "started": started.isoformat(),
                "quick": args.quick,
                "seconds": seconds,
                "host": host,
                "rows": [r.as_dict() for r in rows],
                "failures": failures,
            },
            indent=2,
        )
    )
    print(markdown_table(rows))
    log(f"wrote {args.results} (raw samples: {workdir / 'results.json'})")
    return 1 if failures else 0


if __name__ == "__main__":
    sys.exit(main())
