"""A seam for tests in the training loop: functions the loop calls before each epoch's first step, and
after each step.

`KUBETUNE_TEST_EPOCH_CALLBACKS` (before each epoch) and `KUBETUNE_TEST_STEP_CALLBACKS` (after each step)
name them, comma-separated, as `module:function` (importable by the driver and the workers, e.g. through
PYTHONPATH). The driver reads the variable and imports each name, so
a wrong one ends the run at once, and passes the names to the workers in the run plan (a worker on
another node does not inherit the driver's environment). Each is called as `function(worker, state)`
(`loop.Worker`, `loop.TrainState`) and may raise: that is how the tests make a worker fail
(tests/support/trainer_faults.py). Nothing in the product sets the variable.
"""

from __future__ import annotations

import importlib
import os
from collections.abc import Callable, Sequence
from typing import Any

from kubetune_trainer.errors import ConfigError

CALLBACKS_ENV = "KUBETUNE_TEST_EPOCH_CALLBACKS"
STEP_CALLBACKS_ENV = "KUBETUNE_TEST_STEP_CALLBACKS"

EpochCallback = Callable[[Any, Any], None]


def callback_names_from_env(variable: str = CALLBACKS_ENV) -> tuple[str, ...]:
    """The names in `variable`, each checked to import (ConfigError naming the variable otherwise)."""
    names = tuple(name.strip() for name in os.environ.get(variable, "").split(",") if name.strip())
    load_callbacks(names, variable)
    return names


def load_callbacks(names: Sequence[str], variable: str = CALLBACKS_ENV) -> list[EpochCallback]:
    return [_load(name, variable) for name in names]


def _load(name: str, variable: str) -> EpochCallback:
    module_name, _, attribute = name.partition(":")
    try:
        found = getattr(importlib.import_module(module_name), attribute) if attribute else None
    except (ImportError, AttributeError) as error:
        raise ConfigError(f"{variable}: cannot load {name!r}: {error}") from None
    if not callable(found):
        raise ConfigError(f"{variable}: {name!r} is not a function (expected module:function)")
    callback: EpochCallback = found
    return callback
