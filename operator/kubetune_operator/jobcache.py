"""The FineTuneJobs as the operator last saw them, so a status write needs no fresh read of the job.

Two sources, combined per job:
- every body the FineTuneJob watch delivers (`seen`): metadata, spec and status as the server had them;
- every status patch the operator itself wrote (`wrote`), laid over the watched status.

The operator is the only writer of the status fields it patches (lifecycle's phase, message,
conditions and the rest; the progress endpoint writes other fields), and it writes them one job at a
time under the job's lock. So its own last patch is the truth for those fields, even while the watch
still delivers bodies from before that patch, and a body seen later than the patch agrees with it.
A job deleted, or re-created under the same name (a new uid), starts afresh.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

Key = tuple[str, str]


@dataclass
class _Entry:
    body: dict[str, Any]
    uid: str | None
    written: dict[str, Any] = field(default_factory=dict)


def uid_of(body: Mapping[str, Any]) -> str | None:
    meta = body.get("metadata")
    uid = meta.get("uid") if isinstance(meta, Mapping) else None
    return str(uid) if uid else None


class JobCache:
    def __init__(self) -> None:
        self._entries: dict[Key, _Entry] = {}

    def seen(self, namespace: str, name: str, body: dict[str, Any]) -> None:
        """The body a watch event delivered (the caller's own copy: it is kept, not copied)."""
        uid = uid_of(body)
        entry = self._entries.get((namespace, name))
        if entry is None or entry.uid != uid:
            self._entries[(namespace, name)] = _Entry(body, uid)
        else:
            entry.body = body

    def wrote(self, namespace: str, name: str, uid: str | None, status_patch: Mapping[str, Any]) -> None:
        """A status merge patch the operator applied to the job with `uid`."""
        entry = self._entries.get((namespace, name))
        if entry is None or entry.uid != uid:
            return  # not seen yet: the next read is from the server anyway
        entry.written.update(status_patch)

    def get(self, namespace: str, name: str) -> dict[str, Any] | None:
        """The job as last seen, with the operator's own status writes applied; None if never seen."""
        entry = self._entries.get((namespace, name))
        if entry is None:
            return None
        if not entry.written:
            return entry.body
        current = entry.body.get("status")
        status = dict(current) if isinstance(current, Mapping) else {}
        for key, value in entry.written.items():
            if value is None:  # a merge patch's null removes the field
                status.pop(key, None)
            else:
                status[key] = value
        return {**entry.body, "status": status}

    def forget(self, namespace: str, name: str) -> None:
        self._entries.pop((namespace, name), None)

    def __len__(self) -> int:
        return len(self._entries)
