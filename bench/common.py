"""What every benchmark shares: result rows, statistics, host facts, and the local stand-ins it runs against.

A row holds the raw samples of kubetune's path and of its baseline, both measured in the same run
(interleaved where the benchmark allows), so the ratio compares like with like on a busy machine.
"""

from __future__ import annotations

import contextlib
import math
import os
import platform
import socket
import statistics
import subprocess
import sys
import time
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path
from typing import Any, TypeVar

REPO = Path(__file__).resolve().parent.parent
MiB = 1024 * 1024
# Fake credentials for moto (it accepts any); never real ones.
S3_ENV = {
    "AWS_ACCESS_KEY_ID": "kubetune-bench",
    "AWS_SECRET_ACCESS_KEY": "kubetune-bench-secret",
    "AWS_DEFAULT_REGION": "us-east-1",
    "AWS_EC2_METADATA_DISABLED": "true",
}
REGION = "us-east-1"
T = TypeVar("T")


@dataclass
class Stat:
    """Median and range of a sample."""

    median: float
    low: float
    high: float
    n: int

    @classmethod
    def of(cls, samples: Sequence[float]) -> Stat:
        if not samples:
            raise ValueError("no samples")
        return cls(statistics.median(samples), min(samples), max(samples), len(samples))

    def text(self, digits: int = 3) -> str:
        fmt = _fmt(digits)
        if self.n == 1:
            return fmt(self.median)
        return f"{fmt(self.median)} ({fmt(self.low)}–{fmt(self.high)})"  # noqa: RUF001


def _fmt(digits: int) -> Callable[[float], str]:
    def fmt(value: float) -> str:
        if value == 0 or not math.isfinite(value):
            return str(value)
        magnitude = math.floor(math.log10(abs(value)))
        decimals = max(0, digits - 1 - magnitude)
        return f"{value:,.{decimals}f}"

    return fmt


@dataclass
class Row:
    """One figure: kubetune's samples, the baseline's (if any) and a target.

    `ratio` is kubetune / baseline of the medians, whatever the unit; `goal` says which way is good:
    (">=", 0.95) for throughput, ("<=", 1.3) for a duration. An absolute target has no baseline and
    compares kubetune's median with `goal`.
    """

    benchmark: str
    figure: str
    unit: str
    product: list[float]
    baseline: list[float] = field(default_factory=list)
    goal: tuple[str, float] | None = None
    note: str = ""
    # The goal is on kubetune's own median (p99 < 2 s), not on the ratio, even with a baseline beside it.
    absolute: bool = False
    # The goal is on kubetune's median minus the baseline's (accuracy: at most 0.02 below), not the ratio.
    difference: bool = False

    @property
    def product_stat(self) -> Stat:
        return Stat.of(self.product)

    @property
    def baseline_stat(self) -> Stat | None:
        return Stat.of(self.baseline) if self.baseline else None

    @property
    def ratio(self) -> float | None:
        base = self.baseline_stat
        if base is None or base.median == 0:
            return None
        return self.product_stat.median / base.median

    @property
    def compared(self) -> float:
        """What the goal is checked against: the ratio when there is a baseline, else the median."""
        base = self.baseline_stat
        if self.difference and base is not None:
            return self.product_stat.median - base.median
        ratio = self.ratio
        return ratio if ratio is not None and not self.absolute else self.product_stat.median

    @property
    def met(self) -> bool | None:
        if self.goal is None:
            return None
        op, bound = self.goal
        value = self.compared
        return value >= bound if op == ">=" else value <= bound if op == "<=" else value < bound

    def target_text(self) -> str:
        if self.goal is None:
            return ""
        op, bound = self.goal
        symbol = {">=": "≥", "<=": "≤", "<": "<"}[op]
        if self.baseline and self.difference:
            return f"difference {symbol} {bound:+g}"
        if self.baseline and not self.absolute:
            return f"ratio {symbol} {bound:g}"
        return f"{symbol} {bound:g} {self.unit}"

    def as_dict(self) -> dict[str, Any]:
        return {
            "benchmark": self.benchmark,
            "figure": self.figure,
            "unit": self.unit,
            "product": self.product,
            "baseline": self.baseline,
            "ratio": self.ratio,
            "goal": list(self.goal) if self.goal else None,
            "met": self.met,
            "absolute": self.absolute,
            "difference": self.difference,
            "note": self.note,
        }


def markdown_table(rows: Sequence[Row]) -> str:
    lines = [
        "| Benchmark | Figure | kubetune: median (min–max) | Baseline: median (min–max) | Ratio | Target | Met |",  # noqa: RUF001
        "| --- | --- | --- | --- | --- | --- | --- |",
    ]
    for row in rows:
        base = row.baseline_stat
        ratio = row.ratio
        compared = f"{row.compared:+.3f}" if row.difference and base else f"{ratio:.2f}" if ratio is not None else "—"
        met = {True: "yes", False: "**no**", None: ""}[row.met]
        lines.append(
            f"| {row.benchmark} | {row.figure} | {row.product_stat.text()} {row.unit} | "
            f"{base.text() + ' ' + row.unit if base else '—'} | {compared} | "
            f"{row.target_text()} | {met} |"
        )
    return "\n".join(lines)


# -- host -----------------------------------------------------------------------------------------------


def host_facts() -> dict[str, str]:
    """What the figures depend on: cores, memory, CPU model, load, versions."""
    mem_gib = os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES") / 1024**3
    cpu = ""
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    versions = []
    for name in ("torch", "timm", "ray", "kopf", "kmock", "moto", "boto3", "pyarrow", "pillow"):
        with contextlib.suppress(metadata.PackageNotFoundError):
            versions.append(f"{name} {metadata.version(name)}")
    load = os.getloadavg()
    return {
        "cores": str(os.cpu_count()),
        "memory": f"{mem_gib:.1f} GiB",
        "cpu": cpu or platform.processor() or "unknown",
        "os": f"{platform.system()} {platform.release()}",
        "python": platform.python_version(),
        "versions": ", ".join(versions),
        "load": f"{load[0]:.2f} {load[1]:.2f} {load[2]:.2f}",
    }


# -- processes and servers ---------------------------------------------------------------------------


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


def wait_for_port(port: int, timeout: float, proc: subprocess.Popen[Any] | None = None) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc is not None and proc.poll() is not None:
            raise RuntimeError(f"process exited with {proc.returncode} before listening on port {port}")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), timeout=0.5):
            return
        time.sleep(0.05)
    raise TimeoutError(f"nothing listened on port {port} within {timeout}s")


def stop_process(proc: subprocess.Popen[Any], timeout: float = 10.0) -> None:
    if proc.poll() is None:
        proc.terminate()
        try:
            proc.wait(timeout)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()


def cpu_seconds(pid: int) -> float:
    """User plus system CPU time the process has used so far."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def run_queue_wait_seconds(pid: int) -> float:
    """Seconds the process's threads have spent runnable but waiting for a CPU so far (the scheduler's
    run_delay, /proc/<pid>/task/*/schedstat): what a loaded machine takes from it, whatever it runs."""
    total = 0
    for task in Path(f"/proc/{pid}/task").iterdir():
        with contextlib.suppress(OSError, IndexError, ValueError):  # a thread may end while it is read
            total += int((task / "schedstat").read_text().split()[1])
    return total / 1e9


def peak_rss_mib(pid: int) -> float:
    """The process's peak resident set so far (VmHWM), in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    raise RuntimeError(f"no VmHWM for process {pid}")


@contextlib.contextmanager
def moto_server(log: Path | None = None) -> Iterator[str]:
    """moto's ThreadedMotoServer in a process of its own (its CPU never shares our GIL); its endpoint."""
    port = free_port()
    code = (
        "import sys, threading\n"
        "from moto.server import ThreadedMotoServer\n"
        f"server = ThreadedMotoServer(ip_address='127.0.0.1', port={port}, verbose=False)\n"
        "server.start()\n"
        "threading.Event().wait()\n"
    )
    out = open(log, "w") if log else subprocess.DEVNULL  # noqa: SIM115 - closed below
    proc = subprocess.Popen([sys.executable, "-c", code], stdout=out, stderr=subprocess.STDOUT)
    try:
        wait_for_port(port, 60, proc)
        yield f"http://127.0.0.1:{port}"
    finally:
        stop_process(proc)
        if log:
            out.close()  # type: ignore[union-attr]


@contextlib.contextmanager
def s3_environment(cache_dir: Path | None = None) -> Iterator[None]:
    """Fake S3 credentials (and a private node cache) in the environment, restored afterwards."""
    extra = dict(S3_ENV)
    if cache_dir is not None:
        extra["KUBETUNE_CACHE_DIR"] = str(cache_dir)
    saved = {key: os.environ.get(key) for key in (*extra, "AWS_ENDPOINT_URL")}
    os.environ.update(extra)
    os.environ.pop("AWS_ENDPOINT_URL", None)
    try:
        yield
    finally:
        for key, value in saved.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value


def boto3_client(endpoint: str, max_pool_connections: int = 32) -> Any:
    import boto3
    from botocore.config import Config

    config = Config(region_name=REGION, max_pool_connections=max_pool_connections, s3={"addressing_style": "path"})
    return boto3.session.Session().client("s3", endpoint_url=endpoint, config=config)


def timed(fn: Callable[[], Any]) -> float:
    started = time.perf_counter()
    fn()
    return time.perf_counter() - started


def timed_value(fn: Callable[[], T]) -> tuple[float, T]:
    started = time.perf_counter()
    value = fn()
    return time.perf_counter() - started, value


def log(message: str) -> None:
    print(f"bench: {message}", file=sys.stderr, flush=True)
