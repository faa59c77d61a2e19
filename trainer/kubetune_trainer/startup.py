"""Where a run's start-up time goes: one log line per milestone, stamped with the wall clock.

    kubetune: start-up: connected to Ray at 07:41:40.724Z

The driver marks its own milestones (started, connected to Ray, inputs checked, node prepared: the cache
filled and the base weights loaded once, training handed to Ray Train), the node task its own (started,
its imports done, base weights loaded, cache filled) and rank 0 its own (model imports started and done:
they run beside Ray Train's set-up of the worker group; worker started, node prepared on the worker
(its wait for a node preparation that ran beside that set-up), model built, data loaders ready, first step). The wall clock, not a monotonic one: the driver
and the workers are separate processes, on separate nodes in a cluster. `bench/first_step.py` reads these
lines from the driver's log (Ray forwards the workers' output there) to break the time to the first step
down; a user reads them to see why a job took long to start.
"""

from __future__ import annotations

import importlib
import sys
import threading
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


class ModelImports:
    """On each Ray Train worker (a WorkerCallback, `model_imports_callback`): import the modules the model
    build needs (timm: ~2 s of a cold start) on a thread from the moment Ray Train hands the worker its
    context, so that the import runs while Ray Train sets the worker group up (its process group, the
    train function's hand-over) instead of after, in the model build, which waits for what is left of it.
    """

    def __init__(self, modules: tuple[str, ...]) -> None:
        self.modules = modules

    def after_init_train_context(self) -> None:
        import ray.train

        first = ray.train.get_context().get_world_rank() == 0
        threading.Thread(target=self._import, args=(first,), name="kubetune-model-imports", daemon=True).start()

    def _import(self, first: bool) -> None:
        if first:
            mark("model imports started")
        try:
            for module in self.modules:
                importlib.import_module(module)
        except Exception:  # the model build imports it again and fails with the same error
            return
        if first:
            mark("model imports done")


def model_imports_callback(modules: tuple[str, ...]) -> Any:
    """`ModelImports` as the Ray Train callback the run config takes (a DeveloperAPI of Ray Train V2)."""
    from ray.train.v2._internal.execution.callback import WorkerCallback

    class Imports(ModelImports, WorkerCallback):
        pass

    return Imports(modules)
