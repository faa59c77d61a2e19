"""Local processes that stand in for pods: a Ray head (`ray start --head --block`), worker nodes joined to
it (`ray start --address`, a worker pod the autoscaler adds), and a job driver.

Each runs in its own session (process group), so stopping it stops everything it started; neither is
ever stopped with `ray stop`, which would end every Ray instance on the machine (other tests' too).
`adopt_orphans` and `kill_descendants` are the last line for a process that must leave nothing behind
(`kubetune demo`): processes whose parent died are re-parented to it, so none escapes the final sweep.
"""

from __future__ import annotations

import asyncio
import contextlib
import ctypes
import os
import shutil
import signal
import socket
import sys
import tempfile
from collections.abc import Mapping
from dataclasses import dataclass
from pathlib import Path

PR_SET_CHILD_SUBREAPER = 36  # <linux/prctl.h>


@dataclass(frozen=True)
class ProcInfo:
    pid: int
    ppid: int
    pgid: int
    cmdline: str
    state: str = "R"  # /proc/<pid>/stat's state: "Z" is a zombie (gone, waiting to be reaped)

    @property
    def alive(self) -> bool:
        return self.state not in ("Z", "X")


def processes() -> list[ProcInfo]:
    """Every process on this machine, from /proc (Linux; the harness needs no psutil)."""
    out = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
            cmdline = (entry / "cmdline").read_bytes().replace(b"\0", b" ").decode(errors="replace").strip()
        except OSError:
            continue
        fields = stat[stat.rindex(")") + 2 :].split()
        out.append(ProcInfo(int(entry.name), int(fields[1]), int(fields[2]), cmdline, fields[0]))
    return out


def descendants_of(pid: int) -> list[ProcInfo]:
    procs = processes()
    children: dict[int, list[ProcInfo]] = {}
    for proc in procs:
        children.setdefault(proc.ppid, []).append(proc)
    out, stack = [], [pid]
    while stack:
        for child in children.get(stack.pop(), []):
            out.append(child)
            stack.append(child.pid)
    return out


def adopt_orphans() -> bool:
    """Make this process the reaper of its descendants' orphans (Linux's child subreaper).

    Ray's processes outlive their parents at times (a worker whose raylet was killed first); re-parented
    here instead of to init, they stay descendants of this process, so `kill_descendants` still finds
    them. Returns whether the kernel agreed (False elsewhere than Linux).
    """
    try:
        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(PR_SET_CHILD_SUBREAPER, 1, 0, 0, 0)) == 0
    except (OSError, AttributeError):
        return False


def send(sig: int, procs: list[ProcInfo], *, group: int | None = None) -> list[ProcInfo]:
    """`sig` to a process group (if given) and to each of `procs`; returns the procs it reached."""
    if group is not None:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.killpg(group, sig)
    reached = []
    for proc in procs:
        with contextlib.suppress(ProcessLookupError, PermissionError):
            os.kill(proc.pid, sig)
            reached.append(proc)
    return reached


def kill_descendants(pid: int | None = None) -> list[ProcInfo]:
    """SIGKILL every live descendant of `pid` (this process by default); returns those it killed."""
    alive = [proc for proc in descendants_of(os.getpid() if pid is None else pid) if proc.alive]
    return send(signal.SIGKILL, alive)


def free_port() -> int:
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def venv_path_env(env: Mapping[str, str]) -> dict[str, str]:
    """`python` and `ray` in commands resolve to this interpreter's environment, as in the trainer image."""
    out = dict(env)
    bin_dir = str(Path(sys.executable).parent)
    out["PATH"] = bin_dir + os.pathsep + out.get("PATH", os.environ.get("PATH", "/usr/bin:/bin"))
    out.setdefault("RAY_USAGE_STATS_ENABLED", "0")
    # A one-node Ray cluster on loopback: without this Ray swaps 127.0.0.1 in RAY_ADDRESS for the
    # machine's outward address, where the head (started with --node-ip-address=127.0.0.1) is not.
    out.setdefault("RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER", "0")
    # Ray turns token auth on when it finds ~/.ray/auth_token (any local ray.init() leaves one), for
    # the head but not for a driver given an address: say it once for both. A RayJob whose
    # `authOptions` asks for token auth (every one the operator makes) sets RAY_AUTH_MODE=token and the
    # token itself (kuberay_auth.py), which this leaves as it is.
    out.setdefault("RAY_AUTH_MODE", "disabled")
    out.setdefault("PYTHONUNBUFFERED", "1")
    return out


class LocalProcess:
    """A process group started from a shell command, logging to a file."""

    def __init__(self, argv: list[str], env: Mapping[str, str], cwd: Path, log_file: Path) -> None:
        self.argv = argv
        self.env = dict(env)
        self.cwd = cwd
        self.log_file = log_file
        self.proc: asyncio.subprocess.Process | None = None

    async def start(self) -> None:
        self.cwd.mkdir(parents=True, exist_ok=True)
        self.log_file.parent.mkdir(parents=True, exist_ok=True)
        with self.log_file.open("ab") as log:
            self.proc = await asyncio.create_subprocess_exec(
                *self.argv,
                cwd=str(self.cwd),
                env=self.env,
                stdin=asyncio.subprocess.DEVNULL,
                stdout=log,
                stderr=asyncio.subprocess.STDOUT,
                start_new_session=True,
            )

    @property
    def pid(self) -> int | None:
        return self.proc.pid if self.proc else None

    @property
    def running(self) -> bool:
        return self.proc is not None and self.proc.returncode is None

    async def wait(self) -> int:
        assert self.proc is not None
        return await self.proc.wait()

    async def stop(self, grace: float = 5.0) -> int:
        """SIGTERM the whole group and every descendant, SIGKILL what is left after `grace` seconds.

        Descendants too: Ray starts each worker (Train workers, actors) in a process group of its own,
        and one left running after its raylet died goes on for a while (writing checkpoints to S3, say)
        where a deleted pod's would be gone. Returns how many live processes it stopped.
        """
        if self.proc is None:
            return 0
        pgid = self.proc.pid
        outside = [p for p in self.descendants() if p.pgid != pgid]
        members = [p for p in self._group_members(pgid) + outside if p.alive]
        if self.proc.returncode is None or members:
            send(signal.SIGTERM, outside, group=pgid)
            if self.proc.returncode is None:
                with contextlib.suppress(TimeoutError):
                    await asyncio.wait_for(self.proc.wait(), timeout=grace)
            send(signal.SIGKILL, members, group=pgid)
        if self.proc.returncode is None:
            await self.proc.wait()
        return len(members)

    def descendants(self) -> list[ProcInfo]:
        return descendants_of(self.proc.pid) if self.proc else []

    @staticmethod
    def _group_members(pgid: int) -> list[ProcInfo]:
        return [proc for proc in processes() if proc.pgid == pgid]

    def log_tail(self, lines: int = 30) -> str:
        try:
            return "\n".join(self.log_file.read_text(errors="replace").splitlines()[-lines:])
        except OSError:
            return ""


def _node_ports() -> list[str]:
    """Free ports for everything one Ray node listens on (several nodes share this machine)."""
    return [
        f"--dashboard-agent-listen-port={free_port()}",
        f"--dashboard-agent-grpc-port={free_port()}",
        f"--runtime-env-agent-port={free_port()}",
        f"--metrics-export-port={free_port()}",
        f"--node-manager-port={free_port()}",
        f"--object-manager-port={free_port()}",
    ]


class RayHead(LocalProcess):
    """A one-node Ray cluster for one RayJob, on free ports, as KubeRay's RayCluster head would be."""

    def __init__(self, env: Mapping[str, str], workdir: Path, num_cpus: int, num_gpus: int = 0) -> None:
        self.port = free_port()
        # Ray's unix sockets live under the temp dir and their paths may not exceed 107 bytes.
        self.temp_dir = Path(tempfile.mkdtemp(prefix="kt-ray-", dir="/tmp"))
        temp_dir = self.temp_dir
        argv = [
            sys.executable,
            "-m",
            "ray.scripts.scripts",
            "start",
            "--head",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--port={self.port}",
            f"--num-cpus={num_cpus}",
            f"--num-gpus={num_gpus}",
            "--include-dashboard=false",
            f"--dashboard-port={free_port()}",
            *_node_ports(),
            "--object-store-memory=200000000",
            f"--temp-dir={temp_dir}",
        ]
        super().__init__(argv, venv_path_env(env), workdir, workdir / "ray-head.log")

    async def stop(self, grace: float = 5.0) -> int:
        stopped = await super().stop(grace)
        shutil.rmtree(self.temp_dir, ignore_errors=True)
        if self.temp_dir.exists():  # a Ray process that was still exiting wrote one last file
            await asyncio.sleep(1.0)
            shutil.rmtree(self.temp_dir, ignore_errors=True)
        return stopped

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    async def wait_ready(self, timeout: float = 120.0) -> None:
        await wait_for_ray_start(self, timeout)

    def train_workers(self) -> list[ProcInfo]:
        """The Ray Train worker actors of this cluster (for fault injection)."""
        return [proc for proc in self.descendants() if "RayTrainWorker" in proc.cmdline]


class RayWorkerNode(LocalProcess):
    """One more Ray node joined to a RayJob's head, with a worker pod's CPUs: what KubeRay's autoscaler adds
    to an elastic worker group (and a reclaimed node takes away)."""

    def __init__(self, head: RayHead, log_file: Path, num_cpus: int) -> None:
        argv = [
            sys.executable,
            "-m",
            "kubetune_dev.devcluster.ray_node",  # Ray's CLI, made to join a head on loopback
            "start",
            f"--address={head.address}",
            "--block",
            "--disable-usage-stats",
            "--node-ip-address=127.0.0.1",
            f"--num-cpus={num_cpus}",
            "--num-gpus=0",
            *_node_ports(),
            "--object-store-memory=100000000",
        ]
        # The head's env: its raylet's, which the Train workers it starts inherit (S3 credentials, test seams).
        super().__init__(argv, head.env, head.cwd, log_file)

    async def wait_ready(self, timeout: float = 120.0) -> None:
        await wait_for_ray_start(self, timeout)


async def wait_for_ray_start(node: LocalProcess, timeout: float) -> None:
    """Until `ray start` says the node runs (its log's line), or it exited, or `timeout` seconds passed."""
    deadline = asyncio.get_running_loop().time() + timeout
    while asyncio.get_running_loop().time() < deadline:
        if not node.running:
            raise RuntimeError(f"ray start exited:\n{node.log_tail()}")
        if "Ray runtime started" in node.log_file.read_text(errors="replace"):
            return
        await asyncio.sleep(0.3)
    raise RuntimeError(f"the Ray node did not start within {timeout:.0f}s:\n{node.log_tail()}")
