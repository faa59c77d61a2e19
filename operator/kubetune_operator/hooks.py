"""Extension points: what else should happen when the operator sees a job (metrics, for one).

`main.build_runtime` fills a `Hooks`; the handlers call it. A hook that raises is logged and skipped:
observers never break reconciliation.
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

logger = logging.getLogger(__name__)

# (metadata, status) of a FineTuneJob as the operator just saw it: on every ADDED/MODIFIED watch event,
# which includes the initial listing after a restart and every status the operator writes.
JobObserver = Callable[[Mapping[str, Any], Mapping[str, Any]], None]
# (namespace, name) of a FineTuneJob that is gone.
JobForgetter = Callable[[str, str], None]
# The name of an operator handler that raised (it is retried or logged by kopf).
FailureCounter = Callable[[str], None]


@dataclass
class Hooks:
    job_observed: list[JobObserver] = field(default_factory=list)
    job_deleted: list[JobForgetter] = field(default_factory=list)
    handler_failed: list[FailureCounter] = field(default_factory=list)

    def observed(self, metadata: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        for hook in self.job_observed:
            _safely(hook, metadata, status)

    def deleted(self, namespace: str, name: str) -> None:
        for hook in self.job_deleted:
            _safely(hook, namespace, name)

    def failed(self, handler: str) -> None:
        for hook in self.handler_failed:
            _safely(hook, handler)


def _safely(hook: Callable[..., None], *args: Any) -> None:
    try:
        hook(*args)
    except Exception:
        logger.exception("Hook %s failed; ignored", getattr(hook, "__qualname__", hook))
