"""The soak's world: the busy world of the e2e tests (one dev cluster, its S3 seeded, one operator process),
whose reads ride out the API faults the soak injects, with a proxy in front of the progress endpoint that
the `progress-down` fault switches off."""

from __future__ import annotations

import os
import signal
import time
from pathlib import Path
from typing import Any

from kubetune_dev.devcluster.cluster import DevCluster
from kubetune_dev.devcluster.processes import free_port
from kubetune_dev.devcluster.s3 import FaultyS3Proxy
from kubetune_dev.soak.jobs import retrying, seed_detection
from tests.support.busy_world import World

RSS_EVERY_S = 2.0


class SoakWorld(World):
    """A busy world for the soak: see the module docstring."""

    def __init__(self, cluster: DevCluster) -> None:
        super().__init__(cluster)
        self.progress_proxy: FaultyS3Proxy | None = None
        self.operator_started_at = 0.0
        self.rss: list[tuple[float, int, float]] = []  # (time.time(), the operator's RSS in bytes, its age in s)

    def setup(self) -> None:
        self.progress_port = free_port()
        self.progress_proxy = FaultyS3Proxy(f"http://127.0.0.1:{self.progress_port}")
        self.cluster.on_loop(self.progress_proxy.start())
        self.progress_url = self.progress_proxy.url
        super().setup()
        seed_detection(self)

    def start_operator(self, metrics_port: int = 0, progress_port: int = 0) -> None:
        super().start_operator(metrics_port, progress_port)
        self.operator_started_at = time.time()

    def job(self, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = retrying(lambda: super(SoakWorld, self).job(name))
        return result

    def kill_operator_now(self) -> None:
        """SIGKILL the operator process without waiting (safe on the API's event loop)."""
        proc = self.cluster.operator_process
        if proc is not None and proc.poll() is None:
            self.operator_up.clear()
            os.killpg(proc.pid, signal.SIGKILL)

    def restart_operator(self, down_seconds: float) -> None:
        """After `kill_operator_now`: wait for the process to go, `down_seconds`, then start it again."""
        proc = self.cluster.operator_process
        if proc is not None:
            proc.wait(30)
        time.sleep(down_seconds)
        metrics_port, progress_port = self.cluster.operator_process_ports
        self.start_operator(metrics_port, progress_port)

    def sample_rss(self) -> None:
        proc = self.cluster.operator_process
        if proc is None or proc.poll() is not None:
            return
        rss = process_rss(proc.pid)
        if rss is not None:
            now = time.time()
            self.rss.append((now, rss, now - self.operator_started_at))

    def close(self) -> None:
        super().close()
        if self.progress_proxy is not None:
            self.cluster.on_loop(self.progress_proxy.stop())


def process_rss(pid: int) -> int | None:
    """Resident memory of a process in bytes (/proc), None if it is gone."""
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1]) * 1024
    except OSError:
        return None
    return None
