"""Control plane: a burst of FineTuneJobs against kmock's API server, until every RayJob exists.

The API server is the operator tests' harness (`tests/support/operator_harness.py`: kmock plus the
metadata a real server stamps), in this process; the operator runs as it ships, `python -m
kubetune_operator`, in a process of its own that reaches the server through a kubeconfig, so its peak
resident memory is its own (VmHWM). The baseline is a bare kopf operator (`bench/bare_operator.py`)
that creates one RayJob per FineTuneJob, run by `kopf run` the same way against the same harness. A
second baseline, the same bare operator making kubetune's API calls for each job (its children, one
status patch, one Event), tells the cost of that work from the cost of kubetune itself.

kmock finds the object of each request by scanning every object it stores, which makes each request
dearer the more objects a run has made; the harness here looks objects up by key instead, for every
operator alike (`Config.indexed_api`), so the figures show the operators' costs rather than kmock's.

Each job is created without `spec.storage.credentialsSecret`, so the operator skips its S3 preflight
(it would otherwise need real objects); every other step runs: validation, KubeRay discovery, status,
Events, the namespace's shared ServiceAccount and the RayJob. Latency is from the server storing a FineTuneJob to the
server storing its RayJob, both read off the server's clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
import statistics
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import REPO, Row, cpu_seconds, free_port, log, peak_rss_mib, stop_process

NAME = "Control plane"
NAMESPACE = "default"


@dataclasses.dataclass(frozen=True)
class Config:
    jobs: int = 500
    repeats: int = 3
    timeout: float = 300.0
    # Objects looked up by key in kmock, for both operators alike (see `one_run`).
    indexed_api: bool = True
    # Larger bursts: how time, latency and memory grow with the burst (the same operators as the main one).
    scale: tuple[int, ...] = (2000, 5000)
    scale_repeats: int = 2

    @classmethod
    def full(cls) -> Config:
        return cls()

    @classmethod
    def quick(cls) -> Config:
        return cls(jobs=200, repeats=1, scale=(), scale_repeats=1)

    @classmethod
    def tiny(cls) -> Config:
        return cls(jobs=5, repeats=1, timeout=60.0, scale=(8,), scale_repeats=1)

    def sized(self, sizes: list[int]) -> Config:
        """This config with the bursts `--burst-jobs` names: the first as the main burst, the rest as scale."""
        return dataclasses.replace(self, jobs=sizes[0], scale=tuple(sizes[1:]))


def _harness() -> Any:
    """The operator tests' harness module (tests/support/operator_harness.py), imported when a run needs it."""
    from tests.support import operator_harness

    return operator_harness


def percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile (q in 0..100)."""
    ordered = sorted(values)
    rank = max(1, math.ceil(q / 100 * len(ordered)))
    return ordered[rank - 1]


def kubeconfig(path: Path, server: str) -> Path:
    path.write_text(
        "apiVersion: v1\nkind: Config\n"
        f"clusters:\n- name: kmock\n  cluster:\n    server: {server}\n"
        "users:\n- name: bench\n  user: {}\n"
        f"contexts:\n- name: kmock\n  context:\n    cluster: kmock\n    user: bench\n    namespace: {NAMESPACE}\n"
        "current-context: kmock\n"
    )
    return path


# The operators each run measures: kubetune, the bare kopf baseline, and bare kopf making kubetune's API
# calls (bench/bare_operator.py): how much of the gap is the work itself.
KINDS = ("kubetune", "bare", "bare-same-work")
# The larger bursts (Config.scale) too: where bare kopf making the same calls is the limit, it shows.
SCALE_KINDS = KINDS


def operator_command(kind: str, liveness: str) -> list[str]:
    if kind == "kubetune":
        return [sys.executable, "-m", "kubetune_operator", "--liveness", liveness]
    script = str(REPO / "bench" / "bare_operator.py")
    return [sys.executable, "-m", "kopf", "run", script, "--standalone", "--all-namespaces", f"--liveness={liveness}"]


def operator_env(config_file: Path, kind: str = "kubetune") -> dict[str, str]:
    env = dict(os.environ)
    if kind == "bare-same-work":
        env["KUBETUNE_BENCH_SAME_WORK"] = "1"
    env.update(
        KUBECONFIG=str(config_file),
        KUBETUNE_METRICS_PORT="0",  # its own free ports: metrics and progress are served, as in production
        KUBETUNE_PROGRESS_PORT="0",
        KUBETUNE_TRAINER_IMAGE="registry.example/kubetune-trainer:bench",
    )
    env.pop("KUBERNETES_SERVICE_HOST", None)
    return env


@dataclasses.dataclass
class Outcome:
    total_s: float
    p50_s: float
    p99_s: float
    peak_rss_mb: float
    cpu_s: float
    # CPU of this process (the kmock API server, and the burst's own creates) over the same window.
    server_cpu_s: float = 0.0
    # The operator's API requests from the burst's start until the last RayJob exists, by kind.
    requests: dict[str, int] = dataclasses.field(default_factory=dict)

    @property
    def requests_total(self) -> int:
        return sum(self.requests.values())


def indexed(base: type) -> type:
    """`base` (a kmock emulator class) finding the object of each request by key.

    kmock finds the object of every fetch, create and patch by scanning all stored objects (and the
    harness's `current` does the same), so each request costs more the more objects a run has made: a
    cost of the emulator, not of any operator, and larger for the operator that makes more objects. Every
    side of a benchmark gets this lookup by key (falling back to the scan when it misses).
    """
    import kmock

    class Indexed(base):
        def _KubernetesEmulator__get_objs(self, request: kmock.Request, strict: bool) -> list[Any]:  # noqa: N802
            if strict and request.name is not None:
                found = self._objects._objects.get((request.resource, request.namespace, request.name))
                if found is not None:
                    return [found]
            objs: list[Any] = super()._KubernetesEmulator__get_objs(request, strict)
            return objs

        def current(self, resource: Any, namespace: str | None, name: str | None) -> dict[str, Any] | None:
            found = self._objects._objects.get((resource, namespace, name))
            if found is not None:
                return None if found.deleted else dict(found.raw)
            current: dict[str, Any] | None = super().current(resource, namespace, name)
            return current

    return Indexed


async def one_run(kind: str, config: Config, workdir: Path, index: int) -> Outcome:
    import kmock

    harness = _harness()

    base = indexed(harness.ApiServer) if config.indexed_api else harness.ApiServer

    class TimedApi(base):  # type: ignore[valid-type,misc]
        """The harness's API server, noting when each object was first stored."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.stored: dict[tuple[str, str], float] = {}
            self.operator_watching: set[str] = set()

        async def _handle(self, request: kmock.Request) -> Any:
            resource = request.resource
            plural = (resource.plural or "") if resource is not None else ""
            if request.action == kmock.action.WATCH and request.headers.get("User-Agent") != harness.TEST_USER_AGENT:
                self.operator_watching.add(plural)  # before handling: a watch is answered when it ends
            result = await super()._handle(request)
            if resource is not None and request.action == kmock.action.CREATE and plural in ("finetunejobs", "rayjobs"):
                name = ((request.data or {}).get("metadata") or {}).get("name")
                if name and self.current(resource, request.namespace, name) is not None:
                    self.stored.setdefault((plural, name), time.monotonic())
            return result

    async with TimedApi() as api, kmock.Server(api):
        harness.declare_resources(api)
        server = str(api.url).rstrip("/")
        config_file = kubeconfig(workdir / f"kubeconfig-{kind}-{config.jobs}-{index}", server)
        liveness = f"http://127.0.0.1:{free_port()}/healthz"
        log_path = workdir / f"operator-{kind}-{config.jobs}-{index}.log"
        with open(log_path, "w") as out:
            proc = subprocess.Popen(
                operator_command(kind, liveness),
                env=operator_env(config_file, kind),
                stdout=out,
                stderr=subprocess.STDOUT,
            )
            try:
                await _wait(
                    lambda: (
                        {"finetunejobs", "rayjobs"} <= api.operator_watching
                        or (kind != "kubetune" and "finetunejobs" in api.operator_watching)
                    ),
                    proc,
                    60,
                    f"the {kind} operator to watch (log: {log_path})",
                )
                cpu_at_start = cpu_seconds(proc.pid)
                first_request = len(api.log)
                server_cpu_at_start = time.process_time()
                client = harness.OperatorHarness(api)
                names = [f"bench-{i:04d}" for i in range(config.jobs)]
                await asyncio.gather(*(client.create_job(harness.finetunejob(n), NAMESPACE) for n in names))
                await _wait(
                    lambda: sum(1 for plural, _ in api.stored if plural == "rayjobs") >= config.jobs,
                    proc,
                    config.timeout,
                    f"{config.jobs} RayJobs from the {kind} operator (log: {log_path})",
                )
                rss = peak_rss_mib(proc.pid) * 1024 * 1024 / 1e6
                cpu = cpu_seconds(proc.pid) - cpu_at_start
                server_cpu = time.process_time() - server_cpu_at_start
                requests = request_counts(harness, api, first_request)
            finally:
                await asyncio.to_thread(stop_process, proc, 15.0)
    created = {name: t for (plural, name), t in api.stored.items() if plural == "finetunejobs"}
    launched = {name: t for (plural, name), t in api.stored.items() if plural == "rayjobs"}
    latencies = [launched[name] - created[name] for name in created]
    return Outcome(
        total_s=max(launched.values()) - min(created.values()),
        p50_s=percentile(latencies, 50),
        p99_s=percentile(latencies, 99),
        peak_rss_mb=rss,
        cpu_s=cpu,
        server_cpu_s=server_cpu,
        requests=requests,
    )


def request_counts(harness: Any, api: Any, first: int) -> dict[str, int]:
    """The operator's requests since `first` in the server's log, as "verb resource[/sub]": count."""
    counts: dict[str, int] = {}
    for r in harness._requests_since(api, first):
        if r.user_agent == harness.TEST_USER_AGENT:
            continue
        key = f"{r.verb} {r.resource}" + (f"/{r.subresource}" if r.subresource else "")
        counts[key] = counts.get(key, 0) + 1
    return counts


async def _wait(done: Any, proc: subprocess.Popen[Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            raise RuntimeError(f"operator exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


def bursts(config: Config, kinds: tuple[str, ...], repeats: int, workdir: Path) -> dict[str, list[Outcome]]:
    """`repeats` bursts of `config.jobs` per operator kind, interleaved; the outcomes by kind."""
    log(f"{NAME}: {config.jobs} FineTuneJobs in one burst, {repeats} repeats per operator")
    outcomes: dict[str, list[Outcome]] = {kind: [] for kind in kinds}
    for repeat in range(repeats):
        shift = repeat % len(kinds)  # each kind goes first, middle and last in turn
        for kind in kinds[shift:] + kinds[:shift]:
            outcome = asyncio.run(one_run(kind, config, workdir, repeat))
            outcomes[kind].append(outcome)
            log(
                f"{NAME}: {config.jobs} jobs: {kind}: all RayJobs after {outcome.total_s:.2f}s, p50 {outcome.p50_s:.2f}s, "
                f"p99 {outcome.p99_s:.2f}s, peak RSS {outcome.peak_rss_mb:.0f} MB, operator CPU {outcome.cpu_s:.1f}s, "
                f"API server CPU {outcome.server_cpu_s:.1f}s, "
                f"{outcome.requests_total / config.jobs:.2f} API requests/job "
                f"({', '.join(f'{k} {v}' for k, v in sorted(outcome.requests.items()))})"
            )
    return outcomes


def run(config: Config, workdir: Path) -> list[Row]:
    outcomes = bursts(config, KINDS, config.repeats, workdir)
    scaled = {
        n: bursts(dataclasses.replace(config, jobs=n), SCALE_KINDS, config.scale_repeats, workdir) for n in config.scale
    }
    return main_rows(config, outcomes) + scale_rows(config, outcomes, scaled)


def main_rows(config: Config, outcomes: dict[str, list[Outcome]]) -> list[Row]:

    def values(kind: str, attr: str) -> list[float]:
        return [getattr(o, attr) for o in outcomes[kind]]

    note = (
        f"{config.jobs} jobs created at once; baseline: bare kopf operator creating one RayJob per job "
        "(bench/bare_operator.py); both as separate processes against the same kmock harness"
        + ("; kmock finds objects by key (both sides)" if config.indexed_api else "; kmock as shipped (scans)")
    )
    same_note = (
        "rows marked 'same API work': the baseline is bare kopf making kubetune's API calls for each job "
        "(bench/bare_operator.py with KUBETUNE_BENCH_SAME_WORK=1: the shared ServiceAccount once, RayJob, "
        "one status patch, one Event; kopf's own annotation patch)"
    )
    burst = f"{config.jobs} jobs: all RayJobs exist after"
    return [
        Row(NAME, burst, "s", values("kubetune", "total_s"), values("bare", "total_s"), ("<=", 1.2), note),
        Row(
            NAME,
            f"{burst} (same API work)",
            "s",
            values("kubetune", "total_s"),
            values("bare-same-work", "total_s"),
            None,
            same_note,
        ),
        Row(NAME, "create → RayJob latency p50", "s", values("kubetune", "p50_s"), values("bare", "p50_s"), None, note),
        Row(
            NAME,
            "create → RayJob latency p99",
            "s",
            values("kubetune", "p99_s"),
            values("bare", "p99_s"),
            ("<", 2.0),
            note,
            absolute=True,
        ),
        Row(
            NAME,
            "operator CPU time per job",
            "ms",
            [o.cpu_s * 1000 / config.jobs for o in outcomes["kubetune"]],
            [o.cpu_s * 1000 / config.jobs for o in outcomes["bare"]],
            None,
            note,
        ),
        Row(
            NAME,
            "operator CPU time per job (same API work)",
            "ms",
            [o.cpu_s * 1000 / config.jobs for o in outcomes["kubetune"]],
            [o.cpu_s * 1000 / config.jobs for o in outcomes["bare-same-work"]],
            None,
            same_note,
        ),
        Row(
            NAME,
            "API server (kmock) CPU time per job",
            "ms",
            [o.server_cpu_s * 1000 / config.jobs for o in outcomes["kubetune"]],
            [o.server_cpu_s * 1000 / config.jobs for o in outcomes["bare"]],
            None,
            note,
        ),
        Row(
            NAME,
            "operator API requests per job (until the last RayJob)",
            "",
            [o.requests_total / config.jobs for o in outcomes["kubetune"]],
            [o.requests_total / config.jobs for o in outcomes["bare"]],
            None,
            note,
        ),
        Row(
            NAME,
            "operator peak RSS",
            "MB",
            values("kubetune", "peak_rss_mb"),
            values("bare", "peak_rss_mb"),
            ("<", 250.0),
            note,
            absolute=True,
        ),
    ]


def _scaled_burst_rows(config: Config, n: int, outcomes: dict[str, list[Outcome]]) -> list[Row]:
    """One larger burst: all RayJobs against bare kopf (the issue's target) and against bare kopf making
    kubetune's calls, and p99."""

    def median(kind: str, attr: str) -> float:
        return statistics.median([getattr(o, attr) for o in outcomes[kind]])

    def spent(attr: str) -> str:
        return ", ".join(f"{kind} {median(kind, attr):.1f}s" for kind in SCALE_KINDS)

    note = (
        f"{n} jobs created at once, {config.scale_repeats} repeats; baseline: bare kopf (bench/bare_operator.py); "
        f"kmock finds objects by key; API server CPU: {spent('server_cpu_s')}; operator CPU: {spent('cpu_s')}; "
        "API requests per job: " + ", ".join(f"{kind} {median(kind, 'requests_total') / n:.2f}" for kind in SCALE_KINDS)
    )
    kt, bare, same = outcomes["kubetune"], outcomes["bare"], outcomes["bare-same-work"]
    burst = f"{n} jobs: all RayJobs exist after"
    return [
        Row(NAME, burst, "s", [o.total_s for o in kt], [o.total_s for o in bare], ("<=", 1.2), note),
        Row(NAME, f"{burst} (same API work)", "s", [o.total_s for o in kt], [o.total_s for o in same], None, note),
        Row(
            NAME,
            f"{n} jobs: create → RayJob latency p99",
            "s",
            [o.p99_s for o in kt],
            [o.p99_s for o in bare],
            None,
            note,
        ),
    ]


def scale_rows(
    config: Config, base: dict[str, list[Outcome]], scaled: dict[int, dict[str, list[Outcome]]]
) -> list[Row]:
    """The larger bursts: all RayJobs against bare kopf, p99, and peak RSS at every size."""
    if not scaled:
        return []
    largest = max(scaled)
    rows: list[Row] = []
    sizes = {config.jobs: base, **scaled}
    for n, outcomes in scaled.items():
        rows += _scaled_burst_rows(config, n, outcomes)
    for n, outcomes in sorted(sizes.items()):
        goal = ("<", 400.0) if n == largest else None
        kt, bare = outcomes["kubetune"], outcomes["bare"]
        rows.append(
            Row(
                NAME,
                f"operator peak RSS, {n} jobs",
                "MB",
                [o.peak_rss_mb for o in kt],
                [o.peak_rss_mb for o in bare],
                goal,
                "peak resident memory (VmHWM) of each operator's process over its burst",
                absolute=True,
            )
        )
    ordered = sorted(sizes)
    if len(ordered) >= 3:
        rss = {n: statistics.median([o.peak_rss_mb for o in sizes[n]["kubetune"]]) for n in ordered}
        low, mid, high = ordered[0], ordered[len(ordered) // 2], ordered[-1]
        upper = (rss[high] - rss[mid]) / (high - mid) * 1000
        lower = (rss[mid] - rss[low]) / (mid - low) * 1000
        rows.append(
            Row(
                NAME,
                f"kubetune peak RSS per 1,000 more jobs, {mid}→{high} (baseline column: {low}→{mid})",
                "MB",
                [upper],
                [lower],
                ("<=", 1.0),
                "growing no worse than linearly: the MB each further 1,000 jobs add at the top of the range is at "
                "most what they add lower down (both kubetune's own medians)",
            )
        )
    return rows
