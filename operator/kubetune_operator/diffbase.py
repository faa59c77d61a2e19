"""kopf's record of the spec it last handled, kept in the status and written by the launch's own status write.

kopf remembers each job's last handled spec (its "diff base") to tell a new job from an edited one. In
annotations, kopf's default, that is a second write to every new job right after the launch wrote its
status: measured in a burst of new jobs, each write (and the watch event it causes) costs the operator
and the API server as much as creating the RayJob does. Kept in the status instead, the launch's status
write carries it, and kopf's own write is skipped when it would store exactly what was carried.
"""

from __future__ import annotations

import json
from collections import OrderedDict
from collections.abc import Mapping
from typing import Any

import kopf

STATUS_KEY = "kopf"
FIELD_KEY = "last-handled-configuration"
# Carried records wait for kopf's store right after the handler; a handler that failed after its write
# leaves one behind, so the oldest are dropped past this many.
MAX_CARRIED = 10_000


def uid_of(body: Mapping[str, Any]) -> str | None:
    meta = body.get("metadata")
    uid = meta.get("uid") if isinstance(meta, Mapping) else None
    return str(uid) if uid else None


def _encode(essence: Any) -> str:
    return json.dumps(essence, separators=(",", ":"))  # kopf's own encoding: compact, no spaces


class CarriedDiffBase(kopf.StatusDiffBaseStorage):
    """kopf's diff base in `status.kopf.last-handled-configuration`, which a status write may carry."""

    def __init__(self, progress: kopf.ProgressStorage) -> None:
        super().__init__(name=STATUS_KEY, field=f"status.{STATUS_KEY}.{FIELD_KEY}")
        self._progress = progress
        self._carried: OrderedDict[str, str] = OrderedDict()

    def encoded(self, body: kopf.Body) -> str:
        """The diff base kopf stores once it has handled `body` (the same fields, the same encoding)."""
        essence = self._progress.clear(essence=self.build(body=body))
        return _encode(essence)

    @staticmethod
    def status_fields(encoded: str) -> dict[str, Any]:
        """The status merge patch that stores `encoded`."""
        return {STATUS_KEY: {FIELD_KEY: encoded}}

    @staticmethod
    def written_in(status: Mapping[str, Any]) -> str | None:
        """The diff base a status holds, if any."""
        stanza = status.get(STATUS_KEY)
        value = stanza.get(FIELD_KEY) if isinstance(stanza, Mapping) else None
        return value if isinstance(value, str) else None

    def carried(self, uid: str | None, encoded: str) -> None:
        """A status write to the job with `uid` stored `encoded`: kopf need not store it again."""
        if not uid:
            return
        self._carried[uid] = encoded
        self._carried.move_to_end(uid)
        while len(self._carried) > MAX_CARRIED:
            self._carried.popitem(last=False)

    def store(self, *, body: kopf.Body, patch: kopf.Patch, essence: kopf.BodyEssence) -> None:
        if self._carried.pop(uid_of(body) or "", None) == _encode(essence):
            return
        super().store(body=body, patch=patch, essence=essence)
