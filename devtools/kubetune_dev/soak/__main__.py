"""`python -m kubetune_dev.soak --minutes 20 --jobs 8 --seed 23`: the chaos soak (`make soak`), from the
repository root. Exit status 1 when any invariant failed (soak/results.md says which)."""

from __future__ import annotations

import argparse
import logging
import sys
from collections.abc import Sequence
from pathlib import Path

from kubetune_dev.soak.schedule import FAULT_KINDS

DEFAULTS = {"minutes": 20.0, "jobs": 8, "seed": 23}


def parse(argv: Sequence[str]) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="python -m kubetune_dev.soak", description=__doc__)
    parser.add_argument(
        "--minutes", type=float, default=DEFAULTS["minutes"], help="the window faults and submissions fall in"
    )
    parser.add_argument("--jobs", type=int, default=DEFAULTS["jobs"], help="how many jobs the soak submits")
    parser.add_argument("--seed", type=int, default=DEFAULTS["seed"], help="draws the job and fault schedule")
    parser.add_argument("--faults", default=",".join(FAULT_KINDS), help="the fault kinds to inject, comma-separated")
    parser.add_argument("--results", type=Path, default=Path("soak") / "results.md", help="where results go")
    parser.add_argument("--note", default="", help="a line for results.md (how the run was scheduled, say)")
    options = parser.parse_args(argv)
    kinds = tuple(k for k in options.faults.split(",") if k)
    unknown = sorted(set(kinds) - set(FAULT_KINDS))
    if unknown or not kinds:
        parser.error(f"--faults: unknown kind(s) {unknown}; allowed: {', '.join(FAULT_KINDS)}")
    if not 0 < options.minutes <= 240 or not 1 <= options.jobs <= 100:
        parser.error("--minutes must be in (0, 240] and --jobs in [1, 100]")
    options.kinds = kinds
    return options


def main(argv: Sequence[str] | None = None) -> int:
    args = parse(sys.argv[1:] if argv is None else argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(name)s %(message)s")
    for chatty in ("aiohttp.access", "werkzeug", "botocore", "urllib3"):  # a line per request otherwise
        logging.getLogger(chatty).setLevel(logging.WARNING)
    from kubetune_dev.soak import report
    from kubetune_dev.soak.runner import Options, run

    options = Options(minutes=args.minutes, jobs=args.jobs, seed=args.seed, kinds=args.kinds, results=args.results)
    outcome = run(options)
    path = report.write(outcome, options.results, args.note)
    failed = [check for check in outcome.checks if not check.passed]
    print(
        f"soak {'passed' if not failed else 'FAILED'}: {len(outcome.checks) - len(failed)}/{len(outcome.checks)} checks; {path}"
    )
    for check in failed:
        print(f"  FAIL {check.name} [{check.subject}]: {check.detail}")
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
