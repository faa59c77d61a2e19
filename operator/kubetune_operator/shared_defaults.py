"""One shared instance of each spec section that jobs leave at its defaults, instead of one per job.

The operator keeps every job's parsed spec in its watch cache (`jobcache`), and a parsed FineTuneJob is
24 pydantic models: 17.3 KB each for a job that sets no podTemplate, training, data cache or runPolicy,
which leaves 14 of those models at their defaults (podTemplate alone is 11). With those sections shared
a job holds 7.0 KB (measured with tracemalloc): ~50 MB less in the cache at 5,000 jobs.

Only a section the body did not set at all (pydantic's fields_set is empty) that also equals a section
built from its defaults is shared, so a shared section is exactly what the job would have had.
Nothing changes a parsed spec in place (the builders render copies; an edited spec is parsed anew), and
a shared section must stay so: tests/unit/test_shared_defaults.py renders jobs and checks them.
"""

from __future__ import annotations

from typing import TypeVar

from pydantic import BaseModel, ValidationError

Model = TypeVar("Model", bound=BaseModel)

# Each section type's instance built from its defaults; None for one with required fields (no default).
_DEFAULTS: dict[type[BaseModel], BaseModel | None] = {}


def default_of(kind: type[BaseModel]) -> BaseModel | None:
    """The shared instance of `kind` built from its defaults; None when it has required fields."""
    if kind not in _DEFAULTS:
        try:
            _DEFAULTS[kind] = kind()
        except ValidationError:
            _DEFAULTS[kind] = None
    return _DEFAULTS[kind]


def share_defaults(model: Model) -> Model:
    """`model` with each sub-model left at its defaults replaced by the shared one (in place; ~20 µs a job)."""
    fields = model.__dict__
    for name, value in fields.items():
        if not isinstance(value, BaseModel):
            continue
        default = None if value.model_fields_set else default_of(type(value))
        if default is not None and value == default:
            fields[name] = default
        else:
            share_defaults(value)
    return model
