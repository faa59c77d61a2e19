"""Push progress to the kubetune operator, without ever holding up or breaking training.

`report()` only swaps the update into a one-slot mailbox and returns: a background thread sends the
newest update, at most one a second (the operator's limit), and retries with backoff while the operator is
down or restarting. Updates that are overtaken before they are sent are merged into the newer one, so a
metric (say the last validation accuracy) is never lost just because a step update followed it.

It runs in the driver (`relay.driver_reporters`), which gathers the workers' updates. Uses the standard
library only; no Kubernetes client in the trainer.

When updates cannot be delivered, the log says so once per outage, as one warning that names what is
missing (the token, the operator, or its consent) and where it looked, and what the user then sees (no
status.progress, no kubetune_job_* metrics); retries and the undelivered last update are logged below
warning level. Throttling (429) is the operator's normal pacing, not an outage.
"""

from __future__ import annotations

import json
import logging
import math
import random
import threading
import time
import urllib.error
import urllib.request
from pathlib import Path
from typing import Any

from kubetune_trainer.config import ProgressTarget
from kubetune_trainer.progress_model import ProgressUpdate

log = logging.getLogger(__name__)

Payload = dict[str, Any]

# The operator accepts one update per job per second; a little over that keeps us clear of 429s.
MIN_INTERVAL_S = 1.05
# Answers that retrying cannot fix: the update itself is wrong.
PERMANENT_CODES = frozenset({400, 413, 422})


def merge(older: Payload | None, newer: Payload) -> Payload:
    """`newer`, with what only `older` knew filled in (metrics one by one, the latest checkpoint)."""
    if older is None:
        return newer
    merged = {**older, **newer}
    metrics = {**(older.get("metrics") or {}), **(newer.get("metrics") or {})}
    if metrics:
        merged["metrics"] = metrics
    return merged


def finite(payload: Payload) -> Payload:
    """`payload` without NaN or infinite numbers (a diverged loss): JSON, and so the status, cannot hold them."""
    out: Payload = {}
    for key, value in payload.items():
        if isinstance(value, dict):
            out[key] = finite(value)
        elif not (isinstance(value, float) and not math.isfinite(value)):
            out[key] = value
    return out


# What a user sees while updates do not arrive, and that training itself is not affected.
CONSEQUENCE = (
    "Until it does, the job's status.progress and its kubetune_job_* metrics stay empty; "
    "training goes on, and the reporter retries in the background."
)


class _RetryError(Exception):
    """The update could not be delivered now.

    `problem` is the warning a user reads (None: a transient hiccup or throttling, not worth a warning);
    `delay` is how long the operator asked us to wait, if it did.
    """

    def __init__(self, reason: str, *, problem: str | None = None, delay: float | None = None) -> None:
        super().__init__(reason)
        self.problem = problem
        self.delay = delay


class OperatorReporter:
    """A `ProgressReporter` that POSTs updates to the operator's progress endpoint for this job."""

    def __init__(
        self,
        url: str,
        token_path: str | Path,
        *,
        timeout_s: float = 5.0,
        min_interval_s: float = MIN_INTERVAL_S,
        max_backoff_s: float = 30.0,
        close_timeout_s: float = 10.0,
    ) -> None:
        self.url = url
        self.token_path = Path(token_path)
        self._timeout_s = timeout_s
        self._min_interval_s = min_interval_s
        self._max_backoff_s = max_backoff_s
        self._close_timeout_s = close_timeout_s
        self._cond = threading.Condition()
        self._pending: Payload | None = None
        self._closing = False
        self._deadline: float | None = None
        self._thread: threading.Thread | None = None
        self._next_send = 0.0
        self._failures = 0
        self._warned = False  # this outage was reported (reset when updates get through again)
        self.sent = 0  # delivered updates, for logs and tests
        self.dropped = 0  # updates the operator refused for good, or left unsent at close

    @classmethod
    def from_target(cls, target: ProgressTarget | None) -> OperatorReporter | None:
        """The reporter for the config's progress target, or None when the job has none (local runs)."""
        if target is None:
            return None
        return cls(target.url, target.token_path)

    def report(self, update: ProgressUpdate) -> None:
        """Queue `update` (replacing any not yet sent) and return at once; never raises."""
        try:
            payload = finite(update.model_dump(by_alias=True, exclude_none=True, mode="json"))
            with self._cond:
                if self._closing:
                    return
                self._pending = merge(self._pending, payload)
                if self._thread is None:
                    self._thread = threading.Thread(target=self._run, name="kubetune-progress", daemon=True)
                    self._thread.start()
                self._cond.notify()
        except Exception:  # a reporting problem must never become a training problem
            log.debug("could not queue a progress update", exc_info=True)

    def close(self) -> None:
        """Deliver the last update if the operator answers within `close_timeout_s`, then stop."""
        with self._cond:
            if self._closing:
                return
            self._closing = True
            self._deadline = time.monotonic() + self._close_timeout_s
            thread = self._thread
            self._cond.notify()
        if thread is not None:
            thread.join(self._close_timeout_s + self._timeout_s)
        with self._cond:
            if self._pending is not None:
                self.dropped += 1
                self._pending = None
                # Already explained when the outage began: not a second warning for the same cause.
                log.log(
                    logging.INFO if self._warned else logging.WARNING,
                    "progress: the operator did not take the last update before the trainer finished",
                )

    # -- the sender thread ---------------------------------------------------------------------------------

    def _run(self) -> None:
        while True:
            with self._cond:
                while self._pending is None and not self._closing:
                    self._cond.wait()
                if self._pending is None or self._past_deadline():
                    return
                payload, self._pending = self._pending, None
            self._wait(self._next_send - time.monotonic())
            delay = 0.0
            try:
                self._send(payload)
            except _RetryError as retry:
                self._failures += 1
                with self._cond:
                    self._pending = merge(payload, self._pending) if self._pending else payload
                self._tell(retry)
                delay = retry.delay if retry.delay is not None else self._backoff()
            except Exception:
                self.dropped += 1
                log.warning("progress: dropped an update", exc_info=True)
            self._next_send = time.monotonic() + self._min_interval_s
            self._wait(delay)

    def _tell(self, retry: _RetryError) -> None:
        """One warning per outage, for a problem a user can act on; the rest at debug level."""
        if retry.problem is not None and not self._warned:
            self._warned = True
            log.warning("progress: %s %s", retry.problem, CONSEQUENCE)
        else:
            log.debug("progress: try %d failed: %s", self._failures, retry)

    def _send(self, payload: Payload) -> None:
        token = self._read_token()
        request = urllib.request.Request(
            self.url,
            data=json.dumps(payload, allow_nan=False).encode(),
            method="POST",
            headers={
                "Content-Type": "application/json",
                "Authorization": f"Bearer {token}",
                "User-Agent": "kubetune-trainer",
            },
        )
        try:
            with urllib.request.urlopen(request, timeout=self._timeout_s) as response:
                response.read()
        except urllib.error.HTTPError as exc:
            detail = _detail(exc)
            if exc.code in PERMANENT_CODES:
                self.dropped += 1
                log.warning("progress: the operator refused an update (%d): %s", exc.code, detail)
                return
            if exc.code == 429:
                raise _RetryError("throttled", delay=_retry_after(exc.headers)) from None
            problem = f"the operator at {self.url} did not accept this job's progress (HTTP {exc.code}: {detail})."
            raise _RetryError(f"HTTP {exc.code}: {detail}", problem=problem) from None
        except (urllib.error.URLError, OSError) as exc:  # refused, reset, DNS, timeout
            reason = str(getattr(exc, "reason", exc))
            problem = (
                f"cannot reach the operator's progress endpoint at {self.url} ({reason}): is the operator "
                "running, and is its progress URL (KUBETUNE_PROGRESS_URL) reachable from this pod?"
            )
            raise _RetryError(reason, problem=problem) from None
        if self._failures:
            log.info("progress: the operator took this job's progress again after %d failed tries", self._failures)
        self._failures = 0
        self._warned = False
        self.sent += 1

    def _read_token(self) -> str:
        """The job's token, read each time: the kubelet rotates it."""
        try:
            token = self.token_path.read_text().strip()
        except OSError as exc:
            problem = (
                f"no token to send it with: {self.token_path.absolute()} cannot be read ({exc.strerror}). The operator "
                "gives each job's pods a projected ServiceAccount token there (progress.tokenPath of the trainer "
                "config); check that the pod mounts it."
            )
            raise _RetryError(f"no token at {self.token_path}: {exc.strerror}", problem=problem) from None
        if not token:  # caught between the file's creation and its write: the next try has it
            raise _RetryError(f"empty token at {self.token_path}")
        return token

    def _backoff(self) -> float:
        base = min(self._max_backoff_s, 0.5 * 2 ** min(self._failures - 1, 10))
        return base * random.uniform(0.5, 1.0)  # jitter: restarted operators are not hit by every job at once

    def _wait(self, seconds: float) -> None:
        """Sleep up to `seconds`, but never past the close deadline (which close() may set meanwhile)."""
        end = time.monotonic() + seconds
        with self._cond:
            while True:
                limit = end if self._deadline is None else min(end, self._deadline)
                remaining = limit - time.monotonic()
                if remaining <= 0:
                    return
                self._cond.wait(remaining)

    def _past_deadline(self) -> bool:
        return self._deadline is not None and time.monotonic() >= self._deadline


def _retry_after(headers: Any) -> float:
    try:
        return max(0.0, float((headers or {}).get("Retry-After", MIN_INTERVAL_S)))
    except ValueError:
        return MIN_INTERVAL_S


def _detail(exc: urllib.error.HTTPError) -> str:
    try:
        return exc.read(200).decode(errors="replace")
    except Exception:
        return exc.reason if isinstance(exc.reason, str) else ""
