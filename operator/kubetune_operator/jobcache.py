"""The FineTuneJobs as the operator last saw them, so a status write needs no fresh read of the job.

Two sources, combined per job:
- every record the FineTuneJob watch delivers (`seen`): metadata, spec and status as the server had them;
- every status patch the operator itself wrote (`wrote`), laid over the watched status.

The operator is the only writer of the status fields it patches (lifecycle's phase, message,
conditions and the rest, through `status_writer.StatusWriter`, one job at a time under the job's lock;
progress, the latest checkpoint and a sweep's trials through the progress endpoint, which reads the jobs
from here too and lays its writes over them the same way, each field's whole new value). So its own last patch is the truth for those
fields, even while the watch still delivers bodies from before that patch, and a body seen later than
the patch agrees with it. A job deleted, or re-created under the same name (a new uid), starts afresh.
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any

from kubetune_operator.incoming import JobRecord

Key = tuple[str, str]


@dataclass
class _Entry:
    record: JobRecord
    written: dict[str, Any] = field(default_factory=dict)


class JobCache:
    def __init__(self) -> None:
        self._entries: dict[Key, _Entry] = {}

    def seen(self, record: JobRecord) -> None:
        """The job as a watch event delivered it."""
        key = (record.meta.namespace, record.meta.name)
        entry = self._entries.get(key)
        if entry is None or entry.record.meta.uid != record.meta.uid:
            self._entries[key] = _Entry(record)
        else:
            entry.record = record

    def wrote(self, namespace: str, name: str, uid: str | None, status_patch: Mapping[str, Any]) -> None:
        """A status merge patch the operator applied to the job with `uid`."""
        entry = self._entries.get((namespace, name))
        if entry is None or entry.record.meta.uid != uid:
            return  # not seen yet: the next read is from the server anyway
        entry.written.update(status_patch)

    def last_seen(self, namespace: str, name: str) -> JobRecord | None:
        """The job as the watch last delivered it, without the operator's writes; None if never seen."""
        entry = self._entries.get((namespace, name))
        return entry.record if entry is not None else None

    def get(self, namespace: str, name: str) -> JobRecord | None:
        """The job as last seen, with the operator's own status writes applied; None if never seen."""
        entry = self._entries.get((namespace, name))
        if entry is None:
            return None
        if not entry.written:
            return entry.record
        status = dict(entry.record.status)
        for key, value in entry.written.items():
            if value is None:  # a merge patch's null removes the field
                status.pop(key, None)
            else:
                status[key] = value
        return entry.record.with_status(status)

    def forget(self, namespace: str, name: str) -> None:
        self._entries.pop((namespace, name), None)

    def __len__(self) -> int:
        return len(self._entries)
