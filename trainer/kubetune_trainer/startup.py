"""Where a run's start-up time goes: one log line per milestone, stamped with the wall clock.

    kubetune: start-up: connected to Ray at 07:41:40.724Z

The driver marks its own milestones (started, connected to Ray, inputs checked, node prepared: the cache
filled and the base weights loaded once, training handed to Ray Train), the node task its own (started,
its imports done, base weights loaded, cache filled) and rank 0 its own (worker started, model built,
data loaders ready, first step). The wall clock, not a monotonic one: the driver
and the workers are separate processes, on separate nodes in a cluster. `bench/first_step.py` reads these
lines from the driver's log (Ray forwards the workers' output there) to break the time to the first step
down; a user reads them to see why a job took long to start.
"""

from __future__ import annotations

import importlib
import sys
from datetime import UTC, datetime
from typing import Any


def stamp(now: datetime | None = None) -> str:
    """The UTC time of day to the millisecond, as the marks write it."""
    now = now or datetime.now(UTC)
    return now.astimezone(UTC).strftime("%H:%M:%S.%f")[:-3] + "Z"


def mark(what: str) -> None:
    """Log that the run reached `what`, now (stderr, like the trainer's other driver lines)."""
    print(f"kubetune: start-up: {what} at {stamp()}", file=sys.stderr, flush=True)


def node_task(milestone: str | None, module: str, name: str, *args: Any) -> Any:
    """`module.name(*args)`, after marking `milestone` (if any): the body of a Ray task (`run.on_node`).

    Ray sends the task by reference to this light module, so the mark comes before `module`'s imports
    (torch and the rest): they are the task's own start-up cost, not the Ray worker process's.
    """
    if milestone is not None:
        mark(milestone)
    return getattr(importlib.import_module(module), name)(*args)
