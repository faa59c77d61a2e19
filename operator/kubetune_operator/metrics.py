"""Prometheus metrics of the operator: families, their pure updates, and the scrape endpoint.

Every family is prefixed `kubetune_` and in base units. Labels stay bounded: `namespace`/`name` only on
per-job gauges, which are removed when the job is deleted; phases, outcomes, handlers, results and a
sweep's trial states are fixed sets (no label names a trial). Times are gauge values (`*_timestamp_seconds`), never labels.

The update methods take the same status and progress dicts the operator writes to the FineTuneJob, so
handlers call one method per change and tests drive them without Kubernetes.
"""

from __future__ import annotations

import contextlib
import platform
import threading
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any
from wsgiref.simple_server import WSGIServer

from prometheus_client import (
    GC_COLLECTOR,
    PLATFORM_COLLECTOR,
    PROCESS_COLLECTOR,
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    Info,
    disable_created_metrics,
    start_http_server,
)

from kubetune_operator.hooks import Hooks
from kubetune_operator.lifecycle import parse_timestamp
from kubetune_operator.settings import package_version
from kubetune_operator.states import PHASES, TERMINAL_PHASES, Phase
from kubetune_trainer.progress_model import METRICS, TRIAL_STATES

OUTCOMES = (Phase.SUCCEEDED, Phase.FAILED)
PROGRESS_RESULTS = ("accepted", "stale", "rejected", "throttled", "error")
JOB_LABELS = ("namespace", "name")
RUNNING_OR_DONE = (Phase.RUNNING, *TERMINAL_PHASES)

# Waiting for GPUs (or a Kueue admission) takes seconds to hours; runs take minutes to days.
QUEUE_BUCKETS = (1, 5, 15, 30, 60, 120, 300, 600, 1800, 3600, 7200, 14400, 43200, 86400)
DURATION_BUCKETS = (60, 300, 600, 1800, 3600, 7200, 14400, 28800, 57600, 86400, 172800, 345600, 604800)


def parse_time(value: Any) -> float | None:
    """Seconds since the epoch of a Kubernetes timestamp (RFC 3339), or None when absent or unreadable."""
    moment = parse_timestamp(value)
    return moment.timestamp() if moment else None


def _number(value: Any) -> float | None:
    if isinstance(value, bool) or not isinstance(value, int | float):
        return None
    return float(value)


@dataclass
class _JobState:
    """What this process has seen of one job, so each transition is counted once."""

    namespace: str
    phase: str | None = None
    restarts: int | None = None
    queue_observed: bool = False
    finish_observed: bool = False
    last_alive: float = 0.0


@dataclass(frozen=True)
class _Times:
    """A job's times from its metadata and status, in seconds since the epoch."""

    created: float | None
    started: float | None
    completed: float | None


class OperatorMetrics:
    """All kubetune_ families in one registry, and the state needed to update them from status dicts."""

    def __init__(
        self,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.time,
        process_collectors: bool = True,
    ) -> None:
        # `*_created` series double the exposition and no dashboard or alert reads them (a setting of
        # prometheus_client's, for the whole process).
        disable_created_metrics()
        self.registry = registry if registry is not None else CollectorRegistry(auto_describe=True)
        self._clock = clock
        # Jobs that finished before this process started were counted by its predecessor, whose counters
        # Prometheus has already seen reset; counting them again would show completions that never were.
        self._started_at = clock()
        self._jobs: dict[tuple[str, str], _JobState] = {}
        # Jobs per phase in each namespace, kept as phases change: recounting every job on each change
        # would make a burst of N new jobs cost N² steps.
        self._phase_counts: dict[str, dict[str, int]] = {}
        self._namespaces: set[str] = set()
        self._lock = threading.Lock()
        if process_collectors:
            for collector in (PROCESS_COLLECTOR, PLATFORM_COLLECTOR, GC_COLLECTOR):
                self.registry.register(collector)
        self._declare_job_families(self.registry)
        self._declare_totals(self.registry)
        self._declare_operator_families(self.registry)
        self._start_series()

    def _declare_job_families(self, r: CollectorRegistry) -> None:
        """The gauges about jobs: per phase, and per job (which go when the job goes)."""
        self.jobs = Gauge("kubetune_jobs", "FineTuneJobs by phase.", ["namespace", "phase"], registry=r)
        self.job_phase = Gauge(
            "kubetune_job_phase", "1 for the current phase of each FineTuneJob.", [*JOB_LABELS, "phase"], registry=r
        )
        self.job_created = Gauge(
            "kubetune_job_created_timestamp_seconds", "When the FineTuneJob was created.", JOB_LABELS, registry=r
        )
        self.job_progress = Gauge(
            "kubetune_job_progress_ratio", "Fraction of the run's training steps done (0 to 1).", JOB_LABELS, registry=r
        )
        self.job_epoch = Gauge("kubetune_job_epoch", "Current epoch of the run (1-based).", JOB_LABELS, registry=r)
        self.job_workers = Gauge(
            "kubetune_job_workers",
            "Ray Train workers the run trains on now (elastic: min to max).",
            JOB_LABELS,
            registry=r,
        )
        # One gauge per metric of the contract's table that names one, by the metric's key in status.progress.
        self.job_metrics = {
            metric.key: Gauge(metric.gauge.name, metric.gauge.help, JOB_LABELS, registry=r)
            for metric in METRICS
            if metric.gauge
        }
        self.job_eta = Gauge(
            "kubetune_job_eta_seconds", "Estimated time until the run finishes training.", JOB_LABELS, registry=r
        )
        self.job_last_progress = Gauge(
            "kubetune_job_last_progress_timestamp_seconds",
            "When the run last proved it is alive: its latest progress update, or the start of the run.",
            JOB_LABELS,
            registry=r,
        )
        # A sweep's trials by state (a fixed set, TRIAL_STATES): five series a job, whatever its trials.
        self.job_sweep_trials = Gauge(
            "kubetune_job_sweep_trials",
            "Trials of a FineTuneJob's sweep by state: pending, running, done, stopped (early, by the scheduler) "
            "or failed.",
            [*JOB_LABELS, "state"],
            registry=r,
        )
        self.job_sweep_best = Gauge(
            "kubetune_job_sweep_best_value",
            "The best value of a sweep's metric (status.sweep.metric) among its trials so far.",
            JOB_LABELS,
            registry=r,
        )
        self._per_job = (
            self.job_created,
            self.job_progress,
            self.job_epoch,
            self.job_workers,
            *self.job_metrics.values(),
            self.job_eta,
            self.job_last_progress,
            self.job_sweep_best,
        )

    def _declare_totals(self, r: CollectorRegistry) -> None:
        """What finished jobs add up to: queue and run times, completions, restarts, preemptions."""
        self.queue_time = Histogram(
            "kubetune_job_queue_duration_seconds",
            "Time from creating a FineTuneJob until its run is Running.",
            buckets=QUEUE_BUCKETS,
            registry=r,
        )
        self.run_duration = Histogram(
            "kubetune_job_run_duration_seconds",
            "Time from a run starting until it finished, by outcome.",
            ["outcome"],
            buckets=DURATION_BUCKETS,
            registry=r,
        )
        self.completed = Counter(
            "kubetune_jobs_completed", "FineTuneJobs that finished, by outcome.", ["namespace", "outcome"], registry=r
        )
        self.restarts = Counter(
            "kubetune_job_restarts",
            "Restarts of FineTuneJob runs (worker or cluster retries).",
            ["namespace"],
            registry=r,
        )
        self.preemptions = Counter(
            "kubetune_job_preemptions",
            "Preemptions of FineTuneJob runs (a node drained or reclaimed, a pod deleted) Ray Train restarted the "
            "workers after, from the checkpoint saved on the notice; not counted in kubetune_job_restarts.",
            ["namespace"],
            registry=r,
        )

    def _declare_operator_families(self, r: CollectorRegistry) -> None:
        """The families about the operator itself."""
        self.build_info = Info("kubetune_build", "Version of the running kubetune operator.", registry=r)
        self.build_info.info({"version": package_version(), "python_version": platform.python_version()})
        self.reconcile_errors = Counter(
            "kubetune_reconcile_errors", "Errors raised by operator handlers, by handler.", ["handler"], registry=r
        )
        self.progress_updates = Counter(
            "kubetune_progress_updates",
            "Progress updates received from trainers, by result and HTTP status code.",
            ["result", "code"],
            registry=r,
        )

    def _start_series(self) -> None:
        """Series that exist from the start, so rate() and increase() see the first event too."""
        for outcome in OUTCOMES:
            self.run_duration.labels(outcome)
        for result, code in (("accepted", 200), ("stale", 200), ("throttled", 429)):
            self.progress_updates.labels(result, str(code))
        for code in (400, 401, 403, 404):
            self.progress_updates.labels("rejected", str(code))

    # -- updates from the operator's handlers -------------------------------------------------------------

    def observe_job(self, metadata: Mapping[str, Any], status: Mapping[str, Any]) -> None:
        """Record the job's current status (call after every status change, and on resume).

        `metadata` is the FineTuneJob's metadata (namespace, name, creationTimestamp); `status` the whole
        status as it is now written. Transitions into Running and into a terminal phase feed the queue-time
        and duration histograms and the completion counter once per job and process.
        """
        namespace, name = str(metadata.get("namespace") or ""), str(metadata["name"])
        phase = status.get("phase") if isinstance(status.get("phase"), str) else None
        progress = status.get("progress")
        progress = progress if isinstance(progress, Mapping) else {}
        times = _Times(
            created=parse_time(metadata.get("creationTimestamp")),
            started=parse_time(status.get("startTime")),
            completed=parse_time(status.get("completionTime")),
        )
        with self._lock:
            self._first_sight_of(namespace)
            state = self._jobs.setdefault((namespace, name), _JobState(namespace=namespace))
            previous = state.phase
            if times.created is not None:
                self.job_created.labels(namespace, name).set(times.created)
            self._observe_phase(namespace, name, state, phase)
            self._observe_queue_time(state, previous, phase, times)
            # The status remembers the last progress across operator restarts: the gauges start from it.
            if progress:
                self._set_progress(namespace, name, progress)
            sweep = status.get("sweep")
            if isinstance(sweep, Mapping):
                self._set_sweep(namespace, name, sweep)
            if phase == Phase.RUNNING:
                alive = max(times.started or 0.0, parse_time(progress.get("updatedAt")) or 0.0)
                if alive > state.last_alive:
                    state.last_alive = alive
                    self.job_last_progress.labels(namespace, name).set(alive)
            self._observe_end(namespace, name, state, previous, phase, times)
            self._observe_restarts(namespace, state, status.get("restarts"))

    def _first_sight_of(self, namespace: str) -> None:
        """Counters at 0 from the first sight of a namespace, so increase() sees its first completion."""
        if namespace not in self._namespaces:
            self._namespaces.add(namespace)
            for outcome in OUTCOMES:
                self.completed.labels(namespace, outcome)
            self.restarts.labels(namespace)
            self.preemptions.labels(namespace)

    def _observe_phase(self, namespace: str, name: str, state: _JobState, phase: str | None) -> None:
        if phase is not None and phase != state.phase:
            if state.phase is not None:
                self.job_phase.remove(namespace, name, state.phase)
            self.job_phase.labels(namespace, name, phase).set(1)
            self._move_phase(namespace, state.phase, phase)
            state.phase = phase

    def _observe_queue_time(self, state: _JobState, previous: str | None, phase: str | None, times: _Times) -> None:
        """Creation → Running, once per job: seen happen here (`previous` is what this process saw before),
        or after this process started."""
        if phase in RUNNING_OR_DONE and times.started is not None and not state.queue_observed:
            state.queue_observed = True
            seen = previous is not None and previous not in RUNNING_OR_DONE
            if (seen or times.started >= self._started_at) and times.created is not None:
                self.queue_time.observe(max(0.0, times.started - times.created))

    def _observe_end(
        self, namespace: str, name: str, state: _JobState, previous: str | None, phase: str | None, times: _Times
    ) -> None:
        """A finished job is counted once per process (again only after it ran again), with its duration."""
        if phase in TERMINAL_PHASES and not state.finish_observed:
            state.finish_observed = True
            seen = previous is not None and previous not in TERMINAL_PHASES
            if seen or (times.completed is not None and times.completed >= self._started_at):
                self.completed.labels(namespace, phase).inc()
                if times.started is not None and times.completed is not None:
                    self.run_duration.labels(phase).observe(max(0.0, times.completed - times.started))
        if phase == Phase.SUCCEEDED:  # done, whatever the last progress update estimated
            self.job_progress.labels(namespace, name).set(1.0)
            self.job_eta.labels(namespace, name).set(0.0)
        if phase is not None and phase not in TERMINAL_PHASES:
            state.finish_observed = False  # a job resumed after failing may finish again

    def _observe_restarts(self, namespace: str, state: _JobState, restarts: Any) -> None:
        if isinstance(restarts, int) and not isinstance(restarts, bool):
            if state.restarts is not None and restarts > state.restarts:
                self.restarts.labels(namespace).inc(restarts - state.restarts)
            state.restarts = restarts

    def observe_progress(self, namespace: str, name: str, progress: Mapping[str, Any]) -> None:
        """Record a job's progress as merged into `status.progress` (camelCase keys, as on the wire)."""
        with self._lock:
            self._set_progress(namespace, name, progress)
        self.mark_alive(namespace, name)

    def _set_progress(self, namespace: str, name: str, progress: Mapping[str, Any]) -> None:
        metrics = progress.get("metrics") or {}
        percent = _number(progress.get("percent"))
        values: list[tuple[Gauge, float | None]] = [
            (self.job_progress, None if percent is None else min(1.0, max(0.0, percent / 100.0))),
            (self.job_epoch, _number(progress.get("epoch"))),
            (self.job_workers, _number(progress.get("workers"))),
            (self.job_eta, _number(progress.get("etaSeconds"))),
            *((gauge, _number(metrics.get(key))) for key, gauge in self.job_metrics.items()),
        ]
        for gauge, value in values:
            if value is not None:
                gauge.labels(namespace, name).set(value)

    def observe_sweep(self, namespace: str, name: str, sweep: Mapping[str, Any]) -> None:
        """Record a sweep's trials and best value as merged into `status.sweep`."""
        with self._lock:
            self._set_sweep(namespace, name, sweep)

    def _set_sweep(self, namespace: str, name: str, sweep: Mapping[str, Any]) -> None:
        for state in TRIAL_STATES:
            count = _number(sweep.get(state))
            self.job_sweep_trials.labels(namespace, name, state).set(count or 0.0)
        best = _number(sweep.get("bestValue"))
        if best is not None:
            self.job_sweep_best.labels(namespace, name).set(best)

    def mark_alive(self, namespace: str, name: str) -> None:
        """The run of this job just sent an authentic update (even one too old to apply)."""
        now = self._clock()
        with self._lock:
            self._jobs.setdefault((namespace, name), _JobState(namespace=namespace)).last_alive = now
            self.job_last_progress.labels(namespace, name).set(now)

    def forget_job(self, namespace: str, name: str) -> None:
        """Drop every series of a deleted job (its counters' contributions stay, as they should)."""
        with self._lock:
            state = self._jobs.pop((namespace, name), None)
            if state is not None and state.phase is not None:
                self.job_phase.remove(namespace, name, state.phase)
            for gauge in self._per_job:
                with contextlib.suppress(KeyError):  # that gauge never got a value for this job
                    gauge.remove(namespace, name)
            for trial_state in TRIAL_STATES:
                with contextlib.suppress(KeyError):  # not a sweep
                    self.job_sweep_trials.remove(namespace, name, trial_state)
            self._move_phase(namespace, state.phase if state is not None else None, None)

    def count_reconcile_error(self, handler: str) -> None:
        """A handler raised (kopf will retry it); `handler` is the handler's fixed id, never a job name."""
        self.reconcile_errors.labels(handler).inc()

    def count_preemptions(self, namespace: str, added: int) -> None:
        """Preemptions a progress update counted (`lifecycle.preemptions_added`)."""
        if added > 0:
            self.preemptions.labels(namespace).inc(added)

    def count_progress_update(self, result: str, code: int) -> None:
        """One progress request answered; `result` is one of PROGRESS_RESULTS."""
        if result not in PROGRESS_RESULTS:
            raise ValueError(f"unknown progress result {result!r}")
        self.progress_updates.labels(result, str(code)).inc()

    def _move_phase(self, namespace: str, old: str | None, new: str | None) -> None:
        """One job of `namespace` went from phase `old` to `new` (None: none, as for a new or deleted job)."""
        counts = self._phase_counts.setdefault(namespace, dict.fromkeys(PHASES, 0))
        if old is not None and old in counts:
            counts[old] -= 1
        if new is not None and new in counts:
            counts[new] += 1
        if not any(counts.values()):
            del self._phase_counts[namespace]
            for phase in PHASES:
                with contextlib.suppress(KeyError):
                    self.jobs.remove(namespace, phase)
            return
        for counted, count in counts.items():
            self.jobs.labels(namespace, counted).set(count)


def serve_metrics(registry: CollectorRegistry, port: int, addr: str = "0.0.0.0") -> tuple[WSGIServer, threading.Thread]:
    """Serve /metrics on `port` from a daemon thread, so scrapes work even while the event loop is busy.

    Port 0 picks a free port; read it from `server.server_port`. Stop with `server.shutdown()`.
    """
    return start_http_server(port, addr=addr, registry=registry)


def install_hooks(hooks: Hooks, metrics: OperatorMetrics) -> None:
    """Keep `metrics` in step with every job the handlers see, delete, or fail on."""
    hooks.job_observed.append(metrics.observe_job)
    hooks.job_deleted.append(metrics.forget_job)
    hooks.handler_failed.append(metrics.count_reconcile_error)
