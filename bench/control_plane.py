"""Control plane: a burst of FineTuneJobs against kmock's API server, until every RayJob exists.

The API server is the operator tests' harness (`tests/operator/operator_harness.py`: kmock plus the
metadata a real server stamps), in this process; the operator runs as it ships, `python -m
kubetune_operator`, in a process of its own that reaches the server through a kubeconfig, so its peak
resident memory is its own (VmHWM). The baseline is a bare kopf operator (`bench/bare_operator.py`)
that creates one RayJob per FineTuneJob, run by `kopf run` the same way against the same harness.

Each job is created without `spec.storage.credentialsSecret`, so the operator skips its S3 preflight
(it would otherwise need real objects); every other step runs: validation, KubeRay discovery, status,
Events, ServiceAccount, ConfigMap and RayJob. Latency is from the server storing a FineTuneJob to the
server storing its RayJob, both read off the server's clock.
"""

from __future__ import annotations

import asyncio
import dataclasses
import math
import os
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

    @classmethod
    def full(cls) -> Config:
        return cls()

    @classmethod
    def quick(cls) -> Config:
        return cls(jobs=200, repeats=1)

    @classmethod
    def tiny(cls) -> Config:
        return cls(jobs=5, repeats=1, timeout=60.0)


def _harness() -> Any:
    """The operator tests' harness module (tests/operator is no package)."""
    path = str(REPO / "tests" / "operator")
    if path not in sys.path:
        sys.path.insert(0, path)
    import operator_harness

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


def operator_command(kind: str, liveness: str) -> list[str]:
    if kind == "kubetune":
        return [sys.executable, "-m", "kubetune_operator", "--liveness", liveness]
    script = str(REPO / "bench" / "bare_operator.py")
    return [sys.executable, "-m", "kopf", "run", script, "--standalone", "--all-namespaces", f"--liveness={liveness}"]


def operator_env(config_file: Path) -> dict[str, str]:
    env = dict(os.environ)
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


async def one_run(kind: str, config: Config, workdir: Path, index: int) -> Outcome:
    import kmock

    harness = _harness()

    class TimedApi(harness.ApiServer):  # type: ignore[name-defined]
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
        config_file = kubeconfig(workdir / f"kubeconfig-{kind}-{index}", server)
        liveness = f"http://127.0.0.1:{free_port()}/healthz"
        log_path = workdir / f"operator-{kind}-{index}.log"
        with open(log_path, "w") as out:
            proc = subprocess.Popen(
                operator_command(kind, liveness), env=operator_env(config_file), stdout=out, stderr=subprocess.STDOUT
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
    )


async def _wait(done: Any, proc: subprocess.Popen[Any], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not done():
        if proc.poll() is not None:
            raise RuntimeError(f"operator exited with {proc.returncode} while waiting for {what}")
        if time.monotonic() > deadline:
            raise TimeoutError(f"timed out after {timeout:g}s waiting for {what}")
        await asyncio.sleep(0.02)


def run(config: Config, workdir: Path) -> list[Row]:
    log(f"{NAME}: {config.jobs} FineTuneJobs in one burst, {config.repeats} repeats per operator")
    outcomes: dict[str, list[Outcome]] = {"kubetune": [], "bare": []}
    for repeat in range(config.repeats):
        for kind in ("kubetune", "bare") if repeat % 2 == 0 else ("bare", "kubetune"):
            outcome = asyncio.run(one_run(kind, config, workdir, repeat))
            outcomes[kind].append(outcome)
            log(
                f"{NAME}: {kind}: all RayJobs after {outcome.total_s:.2f}s, p50 {outcome.p50_s:.2f}s, "
                f"p99 {outcome.p99_s:.2f}s, peak RSS {outcome.peak_rss_mb:.0f} MB, operator CPU {outcome.cpu_s:.1f}s"
            )

    def values(kind: str, attr: str) -> list[float]:
        return [getattr(o, attr) for o in outcomes[kind]]

    note = (
        f"{config.jobs} jobs created at once; baseline: bare kopf operator creating one RayJob per job "
        "(bench/bare_operator.py); both as separate processes against the same kmock harness"
    )
    burst = f"{config.jobs} jobs: all RayJobs exist after"
    return [
        Row(NAME, burst, "s", values("kubetune", "total_s"), values("bare", "total_s"), ("<=", 1.3), note),
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
            "operator peak RSS",
            "MB",
            values("kubetune", "peak_rss_mb"),
            values("bare", "peak_rss_mb"),
            ("<", 250.0),
            note,
            absolute=True,
        ),
    ]
