"""Progress fan-in: many jobs pushing progress at once through the operator's real endpoint.

The API server is the operator tests' harness (kmock, objects looked up by key as in the control-plane
benchmark) answering TokenReviews too (`tests/support/live_operator.ReviewingApiServer`), in this
process. The operator runs as it ships (`python -m kubetune_operator`), in a process of its own, with the
jobs created and launched before the pushes start; each job's pushes carry a projected-token-shaped JWT
for its own audience that the API server authenticates (TokenReview, cached by the operator as in
production). The pushes come from a third process (`python -m bench.progress_fanin drive`), each job on
its own schedule (phases spread over the interval), each push on a connection of its own (as the
trainer's urllib sends them).

The baseline is a bare aiohttp endpoint (`python -m bench.progress_fanin bare`) that merge-patches the
job's status once per push, against the same API server, driven the same way: no token check, no
validation, no coalescing.

Status lag is from the push being sent to the API server storing a status whose `progress.step` is at
least the pushed one (both on the host's monotonic clock); writes are the status patches that carry
`progress`. Each run is cut into windows by send time; each window is one sample.

What the machine gives each process is measured beside it, to tell a slow endpoint from a starved one:
each process's CPU time and its run-queue wait (time runnable but waiting for a CPU, the scheduler's
`schedstat`), per wall second over the pushes, and the API server's event-loop delay (how late a 50 ms
sleep in its loop wakes: every request it serves waits at least that long).
"""

from __future__ import annotations

import asyncio
import bisect
import collections
import dataclasses
import itertools
import json
import os
import random
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.common import (
    REPO,
    Row,
    cpu_seconds,
    free_port,
    log,
    peak_rss_mib,
    run_queue_wait_seconds,
    stop_process,
    wait_for_port,
)
from bench.control_plane import NAMESPACE, indexed, kubeconfig, operator_env, percentile

NAME = "Progress fan-in"
SIDES = ("kubetune", "bare")


@dataclasses.dataclass(frozen=True)
class Scenario:
    jobs: int
    interval_s: float  # each job pushes this often
    duration_s: float
    windows: int = 4  # samples per run

    @property
    def label(self) -> str:
        return f"{self.jobs} jobs every {self.interval_s:g}s"


@dataclasses.dataclass(frozen=True)
class Config:
    # The issue's load, with 250 and 500 jobs beside it (how the lag grows with the load), and the
    # trainer's own pace (one update a second, a little over) on fewer jobs.
    scenarios: tuple[Scenario, ...] = (
        Scenario(250, 5.0, 60.0, 2),
        Scenario(500, 5.0, 60.0, 2),
        Scenario(1000, 5.0, 120.0),
        Scenario(200, 1.1, 40.0, 2),
    )
    write_interval_s: float = 5.0  # progress_writes.WRITE_INTERVAL_S, what "per interval" counts against

    @classmethod
    def full(cls) -> Config:
        return cls()

    @classmethod
    def quick(cls) -> Config:
        return cls(scenarios=(Scenario(200, 5.0, 30.0, 2), Scenario(50, 1.1, 20.0, 2)))

    @classmethod
    def tiny(cls) -> Config:
        return cls(scenarios=(Scenario(3, 2.0, 6.0, 1), Scenario(2, 1.1, 6.0, 1)))


# -- the pushes (a process of their own) ---------------------------------------------------------------------


def body(step: int, total: int) -> dict[str, Any]:
    """An update as the trainer sends it; the last one is the run's last step."""
    return {
        "epoch": 1,
        "totalEpochs": 1,
        "step": step,
        "totalSteps": total,
        "percent": round(100 * step / total, 2),
        "etaSeconds": float(total - step),
        "metrics": {"trainLoss": 1.0 / step, "imagesPerSecond": 100.0},
    }


async def drive(spec: dict[str, Any]) -> list[list[Any]]:
    """Every job's pushes on its own schedule; [job, step, sent, answered, code] for each."""
    import aiohttp

    records: list[list[Any]] = []
    interval, start, total = spec["interval_s"], spec["start"], spec["pushes"]
    rng = random.Random(0)
    connector = aiohttp.TCPConnector(limit=0, force_close=True)
    timeout = aiohttp.ClientTimeout(total=30)

    async def one(name: str, token: str, phase: float) -> None:
        headers = {"Authorization": f"Bearer {token}"}
        for step in range(1, total + 1):
            await asyncio.sleep(max(0.0, start + phase + (step - 1) * interval - time.monotonic()))
            sent = time.monotonic()
            try:
                async with session.post(f"{spec['url']}/{name}", json=body(step, total), headers=headers) as r:
                    await r.read()
                    code = r.status
            except Exception:
                code = 0
            records.append([name, step, sent, time.monotonic(), code])

    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        await asyncio.gather(*(one(name, token, rng.uniform(0, interval)) for name, token in spec["jobs"]))
    return records


# -- the baseline endpoint (a process of its own) ---------------------------------------------------------


async def bare_endpoint(port: int, api: str) -> None:
    """POST /v1/progress/<ns>/<name> → one merge patch of the job's status, nothing else."""
    import aiohttp
    from aiohttp import web

    session = aiohttp.ClientSession(connector=aiohttp.TCPConnector(limit=64))

    async def handle(request: web.Request) -> web.Response:
        update = await request.json()
        path = f"/apis/kubetune.dev/v1alpha1/namespaces/{request.match_info['ns']}/finetunejobs/"
        url = api + path + request.match_info["name"] + "/status"
        headers = {"Content-Type": "application/merge-patch+json"}
        async with session.patch(url, data=json.dumps({"status": {"progress": update}}), headers=headers) as r:
            await r.read()
            return web.json_response({"applied": r.status < 300}, status=200 if r.status < 300 else 503)

    app = web.Application()
    app.router.add_post("/v1/progress/{ns}/{name}", handle)
    runner = web.AppRunner(app, access_log=None)
    await runner.setup()
    await web.TCPSite(runner, "127.0.0.1", port).start()
    await asyncio.Event().wait()


# -- one run ---------------------------------------------------------------------------------------------------


@dataclasses.dataclass
class Outcome:
    lag_p50: list[float]
    lag_p99: list[float]
    answer_p99: list[float]  # push sent → the endpoint's answer back
    writes_per_update: list[float]
    cpu_ms_per_update: list[float]
    accepted_per_s: list[float]
    most_writes_per_interval: int  # the most progress writes of any job within write_interval_s (last step left out)
    peak_rss_mb: float
    final_lag_s: float  # the slowest job's last update to the status
    cpu_share: dict[str, float]  # CPU seconds per wall second over the pushes: operator, API server, pushes
    lost: int  # accepted pushes whose step never reached the status
    wait_share: dict[str, float] = dataclasses.field(default_factory=dict)  # run-queue wait s per wall s, the same
    api_loop_delay_p99: float = 0.0
    # API requests per accepted update over the pushes and the last writes, by method and resource
    requests_per_update: dict[str, float] = dataclasses.field(default_factory=dict)
    # The most progress writes of any job per write_interval_s of the run's pushes (last step left out):
    # the issue's "at most one write per job per 5 s" as a rate.
    writes_per_interval: float = 0.0


def _api_class() -> Any:
    from tests.support.live_operator import ReviewingApiServer

    class TimedApi(indexed(ReviewingApiServer)):  # type: ignore[misc]
        """Noting each progress write: (job, step, when stored), and counting every request by what it does."""

        def __init__(self, **kwargs: Any) -> None:
            super().__init__(**kwargs)
            self.writes: list[tuple[str, int, float]] = []
            self.watching: set[str] = set()
            self.requests: collections.Counter[str] = collections.Counter()

        async def _handle(self, request: Any) -> Any:
            import kmock

            resource = request.resource
            plural = (resource.plural or "") if resource is not None else ""
            if request.action == kmock.action.WATCH and request.headers.get("User-Agent") != "kubetune-tests":
                self.watching.add(plural)
            self.requests[f"{request.method} {plural}{'/' + request.subresource if request.subresource else ''}"] += 1
            result = await super()._handle(request)
            data = request.data if isinstance(request.data, dict) else {}
            step = ((data.get("status") or {}).get("progress") or {}).get("step")
            if plural == "finetunejobs" and request.subresource == "status" and isinstance(step, int):
                self.writes.append((str(request.name), step, time.monotonic()))
            return result

    return TimedApi


async def one_run(side: str, scenario: Scenario, config: Config, workdir: Path) -> Outcome:
    import kmock

    from tests.support import operator_harness as harness

    async with _api_class()() as api, kmock.Server(api):
        harness.declare_resources(api)
        server = str(api.url).rstrip("/")
        tag = f"{side}-{scenario.jobs}-{scenario.interval_s:g}"
        port = free_port()
        with open(workdir / f"endpoint-{tag}.log", "w") as out:
            proc = subprocess.Popen(
                _endpoint_command(side, port, server),
                env={
                    **operator_env(kubeconfig(workdir / f"kubeconfig-{tag}", server)),
                    "KUBETUNE_PROGRESS_PORT": str(port),
                },
                stdout=out,
                stderr=subprocess.STDOUT,
                cwd=REPO,
            )
            try:
                jobs = await _jobs(api, harness, side, scenario, proc)
                await asyncio.to_thread(wait_for_port, port, 60, proc)
                return await _push(api, proc, jobs, side, scenario, config, workdir, f"http://127.0.0.1:{port}")
            finally:
                await asyncio.to_thread(stop_process, proc, 15.0)


async def _quiet(pid: int, most: float = 0.05, within_s: float = 120.0) -> None:
    """Wait until the process uses under `most` CPU seconds per second (or `within_s` passed): what it
    still does for the launch would otherwise count against the first pushes."""
    deadline = time.monotonic() + within_s
    while time.monotonic() < deadline:
        before = cpu_seconds(pid)
        await asyncio.sleep(1.0)
        if cpu_seconds(pid) - before < most:
            return


def _endpoint_command(side: str, port: int, api: str) -> list[str]:
    if side == "kubetune":
        return [sys.executable, "-m", "kubetune_operator", "--liveness", f"http://127.0.0.1:{free_port()}/healthz"]
    return [sys.executable, "-m", "bench.progress_fanin", "bare", str(port), api]


async def _jobs(api: Any, harness: Any, side: str, scenario: Scenario, proc: subprocess.Popen[Any]) -> list[list[str]]:
    """Create the jobs (and for kubetune, wait until it has launched them all); [name, token] of each."""
    from kubetune_operator.builders import token_audience

    client = harness.OperatorHarness(api)
    names = [f"push-{i:04d}" for i in range(scenario.jobs)]
    for chunk in range(0, len(names), 100):
        await asyncio.gather(
            *(client.create_job(harness.finetunejob(n), NAMESPACE) for n in names[chunk : chunk + 100])
        )
    if side == "kubetune":
        deadline = time.monotonic() + 300
        while sum(1 for key in api.objects if key[0].plural == "rayjobs") < scenario.jobs:
            if proc.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError("the operator did not launch every job (see its log)")
            await asyncio.sleep(0.2)
        await _quiet(proc.pid)  # the launch's own status writes and Events settle before the pushes
    from tests.support.observability_stands import FTJ

    uids = {nm: obj.raw["metadata"]["uid"] for (res, ns, nm), obj in api.objects.items() if res == FTJ}
    return [[n, api.issue_token(NAMESPACE, n, audience=token_audience(NAMESPACE, n, uids[n]))] for n in names]


async def _push(
    api: Any,
    proc: subprocess.Popen[Any],
    jobs: list[list[str]],
    side: str,
    scenario: Scenario,
    config: Config,
    workdir: Path,
    url: str,
) -> Outcome:
    """Run the pushes against `url` and measure what the API server saw of them."""
    tag = f"{side}-{scenario.jobs}-{scenario.interval_s:g}"
    start = time.monotonic() + 2.0
    spec = {
        "url": f"{url}/v1/progress/{NAMESPACE}",
        "jobs": jobs,
        "interval_s": scenario.interval_s,
        "start": start,
        "pushes": max(2, round(scenario.duration_s / scenario.interval_s)),
    }
    (workdir / f"spec-{tag}.json").write_text(json.dumps(spec))
    out = workdir / f"pushes-{tag}.json"
    first_write = len(api.writes)
    requests_before = collections.Counter(api.requests)
    command = [sys.executable, "-m", "bench.progress_fanin", "drive", str(workdir / f"spec-{tag}.json"), str(out)]
    driver = subprocess.Popen(command, cwd=REPO)
    cpu = {"operator": [cpu_seconds(proc.pid)], "api": [time.process_time()], "pushes": [0.0]}
    waits = {"operator": [run_queue_wait_seconds(proc.pid)], "api": [run_queue_wait_seconds(os.getpid())]}
    delays: list[float] = []
    probe = asyncio.create_task(_loop_delays(delays))
    ticks = [time.monotonic()]
    window = scenario.duration_s / scenario.windows
    while driver.poll() is None:
        await asyncio.sleep(0.1)
        if driver.poll() is None and time.monotonic() - ticks[-1] >= window and len(ticks) <= scenario.windows:
            ticks.append(time.monotonic())
            cpu["operator"].append(cpu_seconds(proc.pid))
            cpu["api"].append(time.process_time())
    probe.cancel()
    if driver.returncode != 0:
        raise RuntimeError(f"the pushes failed ({driver.returncode})")
    pushes_wall = time.monotonic() - ticks[0]
    for name, pid in (("operator", proc.pid), ("api", os.getpid())):
        waits[name].append(run_queue_wait_seconds(pid))
    await asyncio.sleep(config.write_interval_s + 1.0)  # the last waiting writes land
    rss = peak_rss_mib(proc.pid) * 1024 * 1024 / 1e6
    ticks.append(time.monotonic())
    cpu["operator"].append(cpu_seconds(proc.pid))
    cpu["api"].append(time.process_time())
    records = json.loads(out.read_text())
    outcome = measure(records["pushes"], api.writes[first_write:], ticks, cpu, records["cpu_s"], rss, config)
    outcome.writes_per_interval = _writes_per_interval(api.writes[first_write:], records["pushes"], scenario, config)
    outcome.wait_share = {
        "operator": (waits["operator"][1] - waits["operator"][0]) / pushes_wall,
        "API server": (waits["api"][1] - waits["api"][0]) / pushes_wall,
        "pushes": records["wait_s"] / pushes_wall,
    }
    outcome.api_loop_delay_p99 = percentile(delays, 99) if delays else 0.0
    accepted = sum(1 for push in records["pushes"] if push[4] == 200) or 1
    outcome.requests_per_update = {k: n / accepted for k, n in (api.requests - requests_before).most_common()}
    return outcome


async def _loop_delays(out: list[float], every_s: float = 0.05) -> None:
    """How late each sleep of `every_s` in this event loop (the API server's) wakes, until cancelled."""
    while True:
        asleep = time.monotonic()
        await asyncio.sleep(every_s)
        out.append(time.monotonic() - asleep - every_s)


def measure(
    pushes: list[list[Any]],
    writes: list[tuple[str, int, float]],
    ticks: list[float],
    cpu: dict[str, list[float]],
    pushes_cpu_s: float,
    rss_mb: float,
    config: Config,
) -> Outcome:
    """The figures of one run from its pushes and the API server's progress writes."""
    by_job: dict[str, list[tuple[float, int]]] = {}
    for job, step, at in writes:
        by_job.setdefault(job, []).append((at, step))
    reached: dict[str, tuple[list[float], list[int]]] = {}  # job → (write times, the furthest step by then)
    for job, seen in by_job.items():
        seen.sort()
        furthest = list(itertools.accumulate((step for _, step in seen), max))
        reached[job] = ([at for at, _ in seen], furthest)
    accepted = [p for p in pushes if p[4] == 200]
    lags: list[tuple[float, float]] = []  # (sent, lag)
    lost = 0
    last_step = max((p[1] for p in pushes), default=0)
    final_lags = []
    for job, step, sent, _answered, _code in accepted:
        times, furthest = reached.get(job, ([], []))
        i = bisect.bisect_left(furthest, step)
        if i == len(furthest):
            lost += 1
            continue
        lags.append((sent, max(0.0, times[i] - sent)))
        if step == last_step:
            final_lags.append(times[i] - sent)
    outcome = Outcome(
        [],
        [],
        [],
        [],
        [],
        [],
        _most_writes(by_job, config.write_interval_s, last_step),
        rss_mb,
        max(final_lags, default=0.0),
        {},
        lost,
    )
    for k in range(len(ticks) - 2):  # the windows (the last tick is after the pushes ended)
        low, high = ticks[k], ticks[k + 1]
        window_lags = [lag for sent, lag in lags if low <= sent < high]
        n = sum(1 for p in accepted if low <= p[2] < high)
        if not window_lags or not n:
            continue
        outcome.lag_p50.append(percentile(window_lags, 50))
        outcome.lag_p99.append(percentile(window_lags, 99))
        outcome.answer_p99.append(percentile([p[3] - p[2] for p in accepted if low <= p[2] < high], 99))
        outcome.writes_per_update.append(sum(1 for _, _, at in writes if low <= at < high) / n)
        outcome.cpu_ms_per_update.append((cpu["operator"][k + 1] - cpu["operator"][k]) * 1000 / n)
        outcome.accepted_per_s.append(n / (high - low))
    wall = ticks[-1] - ticks[0]
    outcome.cpu_share = {
        "operator": (cpu["operator"][-1] - cpu["operator"][0]) / wall,
        "API server": (cpu["api"][-1] - cpu["api"][0]) / wall,
        "pushes": pushes_cpu_s / wall,
    }
    return outcome


def _writes_per_interval(
    writes: list[tuple[str, int, float]], pushes: list[list[Any]], scenario: Scenario, config: Config
) -> float:
    """The most progress writes of one job (its last step left out, written at once by design) per write
    interval of the pushes: how often a job's status is written over the run, whatever its pace."""
    last_step = max((p[1] for p in pushes), default=0)
    counts = collections.Counter(job for job, step, _ in writes if step < last_step)
    return max(counts.values(), default=0) / (scenario.duration_s / config.write_interval_s)


def _most_writes(by_job: dict[str, list[tuple[float, int]]], interval: float, last_step: int) -> int:
    """The most progress writes any job had within `interval` seconds (the run's last step, written at once
    by design, left out)."""
    most = 0
    for seen in by_job.values():
        times = sorted(at for at, step in seen if step < last_step)
        for i, at in enumerate(times):
            most = max(most, bisect.bisect_left(times, at + interval) - i)
    return most


def run(config: Config, workdir: Path) -> list[Row]:
    rows: list[Row] = []
    for scenario in config.scenarios:
        log(f"{NAME}: {scenario.label} for {scenario.duration_s:g}s, kubetune then the bare endpoint")
        outcomes = {side: asyncio.run(one_run(side, scenario, config, workdir)) for side in SIDES}
        for side, o in outcomes.items():
            log(
                f"{NAME}: {scenario.label}: {side}: lag p50 {o.lag_p50} p99 {o.lag_p99}, writes/update "
                f"{o.writes_per_update}, most writes per {config.write_interval_s:g}s {o.most_writes_per_interval} "
                f"(per {config.write_interval_s:g}s of pushes {o.writes_per_interval:.3f}), "
                f"CPU ms/update {o.cpu_ms_per_update}, accepted/s {o.accepted_per_s}, peak RSS {o.peak_rss_mb:.0f} MB, "
                f"last update's lag {o.final_lag_s:.2f}s, lost {o.lost}, answered p99 {o.answer_p99}, "
                f"API loop delay p99 {o.api_loop_delay_p99:.3f}s, {_shares(o)}, API requests per update "
                + ", ".join(f"{k} {v:.3f}" for k, v in o.requests_per_update.items())
            )
        rows += _rows(scenario, config, outcomes["kubetune"], outcomes["bare"])
    return rows


def _rows(scenario: Scenario, config: Config, kt: Outcome, bare: Outcome) -> list[Row]:
    label = scenario.label
    note = (
        f"{label} for {scenario.duration_s:g}s ({scenario.windows} windows, one sample each); baseline: a bare "
        "aiohttp endpoint patching the status once per push (no token check, no coalescing), same kmock API server; "
        f"per wall second over the pushes, kubetune: {_shares(kt)}; baseline: {_shares(bare)}"
    )
    per = f"{config.write_interval_s:g}s"
    # Pushes as far apart as the write interval are written at once (target < 2 s); faster ones wait for
    # the job's interval by design (coalescing): their bound is the interval and the flusher's tick.
    lag_bound = 2.0 if scenario.interval_s >= config.write_interval_s else config.write_interval_s + 1.0
    return [
        Row(NAME, f"{label}: status lag p50", "s", kt.lag_p50, bare.lag_p50, None, note),
        Row(NAME, f"{label}: status lag p99", "s", kt.lag_p99, bare.lag_p99, ("<", lag_bound), note, absolute=True),
        Row(NAME, f"{label}: push → the endpoint's answer p99", "s", kt.answer_p99, bare.answer_p99, None, note),
        Row(
            NAME,
            f"{label}: API server event-loop delay p99 (the floor of every request)",
            "s",
            [kt.api_loop_delay_p99],
            [bare.api_loop_delay_p99],
            None,
            note,
        ),
        Row(
            NAME,
            f"{label}: API requests per accepted update",
            "",
            [sum(kt.requests_per_update.values())],
            [sum(bare.requests_per_update.values())],
            None,
            note,
        ),
        Row(
            NAME,
            f"{label}: endpoint process runnable but waiting for a CPU",
            "s/s",
            [kt.wait_share.get("operator", 0.0)],
            [bare.wait_share.get("operator", 0.0)],
            None,
            note,
        ),
        Row(
            NAME,
            f"{label}: status writes per accepted update",
            "",
            kt.writes_per_update,
            bare.writes_per_update,
            None,
            note,
        ),
        Row(
            NAME,
            f"{label}: status writes of one job per {per} of pushes, the most of any job (last step left out)",
            "",
            [kt.writes_per_interval],
            [bare.writes_per_interval],
            ("<=", 1.0),
            note,
            absolute=True,
        ),
        Row(
            NAME,
            f"{label}: most status writes of one job within any {per} (last step left out)",
            "",
            [float(kt.most_writes_per_interval)],
            [float(bare.most_writes_per_interval)],
            None,
            note,
        ),
        Row(NAME, f"{label}: last update → status, slowest job", "s", [kt.final_lag_s], [bare.final_lag_s], None, note),
        Row(NAME, f"{label}: accepted updates per second", "/s", kt.accepted_per_s, bare.accepted_per_s, None, note),
        Row(
            NAME,
            f"{label}: operator CPU per accepted update",
            "ms",
            kt.cpu_ms_per_update,
            bare.cpu_ms_per_update,
            None,
            note,
        ),
        Row(
            NAME,
            f"{label}: operator peak RSS",
            "MB",
            [kt.peak_rss_mb],
            [bare.peak_rss_mb],
            ("<", 300.0),
            note,
            absolute=True,
        ),
    ]


def _shares(outcome: Outcome) -> str:
    """CPU seconds and run-queue wait seconds per wall second of each process."""
    parts = [
        f"{name} CPU {share:.2f} waiting {outcome.wait_share.get(name, 0.0):.2f}"
        for name, share in outcome.cpu_share.items()
    ]
    return ", ".join(parts) + f"; lost {outcome.lost}"


def main(argv: list[str]) -> int:
    if argv[:1] == ["drive"]:
        spec = json.loads(Path(argv[1]).read_text())
        started, waited = time.process_time(), run_queue_wait_seconds(os.getpid())
        pushes = asyncio.run(drive(spec))
        spent = {"cpu_s": time.process_time() - started, "wait_s": run_queue_wait_seconds(os.getpid()) - waited}
        Path(argv[2]).write_text(json.dumps({"pushes": pushes, **spent}))
        return 0
    if argv[:1] == ["bare"]:
        asyncio.run(bare_endpoint(int(argv[1]), argv[2]))
        return 0
    print("usage: python -m bench.progress_fanin drive SPEC OUT | bare PORT API_URL", file=sys.stderr)
    return 2


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
