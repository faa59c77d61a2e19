"""DevCluster: the embedded API, S3 and KubeRay stand-in, up and down together, plus the operator.

    with DevCluster() as cluster:
        cluster.apply(manifest)                 # through the API, like kubectl apply
        cluster.start_operator()                # the real kopf operator, in this process
        cluster.wait_for("kubetune.dev", "v1alpha1", "finetunejobs", "default", "job", lambda o: ...)

Handles for fault tests: `cluster.s3_faults` (fail, drop, slow or deny S3 for a while),
`cluster.fail_api(...)` (the next N matching API requests fail, or all for a while), `cluster.on_api(...)`
(an action at the moment a matching request arrives), `cluster.restart_api()` (every connection and watch
cut, then served again), `cluster.stop_operator(abrupt=True)` then `start_operator()` (an operator restart),
`cluster.start_operator_process()` (`python -m kubetune_operator` as its own process, to SIGKILL),
`cluster.kill_train_worker()` (SIGKILL a Ray Train worker), `cluster.kill_driver()` (SIGKILL a RayJob's
driver), `cluster.api.history(...)` (every version of an object a watch saw) and `cluster.api.created(...)`
(every object of a kind ever created).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import contextlib
import dataclasses
import json
import logging
import os
import shutil
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable, Mapping
from pathlib import Path
from types import TracebackType
from typing import Any, TypeVar

import yaml
from kmock._internal import rendering

from kubetune_dev import RAYJOB_CRD
from kubetune_dev.devcluster.client import AsyncKube, path
from kubetune_dev.devcluster.kubeapi import EmbeddedKubeAPI, kubeconfig, serve
from kubetune_dev.devcluster.kuberay import KubeRayStandIn, RayJobController
from kubetune_dev.devcluster.loopthread import LoopThread
from kubetune_dev.devcluster.processes import free_port
from kubetune_dev.devcluster.s3 import DEMO_CREDENTIALS, FaultyS3Proxy, MotoS3, s3_client

log = logging.getLogger(__name__)
T = TypeVar("T")

# The checkout this package sits in (devtools/kubetune_dev/devcluster/ -> the repository root).
REPO_ROOT = Path(__file__).resolve().parents[3]
FTJ_CRD = Path("crds") / "finetunejobs.kubetune.dev.yaml"
# The S3 endpoints the cluster's operator allows jobs to name: its own (moto, and the fault proxy).
LOCAL_S3 = "http://127.0.0.1"


def find_file(relative: Path, *, roots: tuple[Path, ...] = ()) -> Path | None:
    """`relative` under the working directory, the repository root or the given roots, if it exists."""
    for root in (*roots, Path.cwd(), REPO_ROOT):
        candidate = root / relative
        if candidate.is_file():
            return candidate
    return None


def finetunejob_crd() -> dict[str, Any]:
    """The FineTuneJob CRD: the file in crds/, else generated from the spec model (the same source)."""
    found = find_file(FTJ_CRD)
    if found is not None:
        for doc in yaml.safe_load_all(found.read_text()):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                return dict(doc)
    from kubetune_operator.crd import crd

    return crd()


class OperatorThread:
    """The real operator (`kubetune_operator.main.serve`) on its own thread and event loop.

    It logs in with the cluster's kubeconfig, as `python -m kubetune_operator` would with KUBECONFIG
    pointing at it. The metrics and progress ports are chosen here, so callers know them.
    """

    def __init__(self, kubeconfig: Path, namespaces: tuple[str, ...] = (), **overrides: Any) -> None:
        from kubetune_operator.settings import OperatorSettings

        self.kubeconfig = kubeconfig
        self.metrics_port = int(overrides.pop("metrics_port", 0) or free_port())
        self.progress_port = int(overrides.pop("progress_port", 0) or free_port())
        # The cluster's S3 (and the proxy that injects its faults) listen on 127.0.0.1.
        overrides.setdefault("allowed_s3_endpoints", (LOCAL_S3,))
        self.settings = dataclasses.replace(
            OperatorSettings.from_env(),
            namespaces=tuple(namespaces),
            metrics_port=self.metrics_port,
            progress_port=self.progress_port,
            progress_base_url=f"http://127.0.0.1:{self.progress_port}",
            **overrides,
        )
        self.stop_flag = threading.Event()
        self.ready = threading.Event()
        self.error: BaseException | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._task: asyncio.Task[Any] | None = None
        self._thread = threading.Thread(target=self._run, name="kubetune-operator", daemon=True)

    @property
    def metrics_url(self) -> str:
        return f"http://127.0.0.1:{self.metrics_port}/metrics"

    def start(self) -> None:
        self._thread.start()

    def _run(self) -> None:
        import kopf
        from kubernetes import client

        from kubetune_operator.kube import Kube, client_configuration, connection_info
        from kubetune_operator.main import build_registry, build_runtime, kopf_settings, run_operator

        # The cluster's kubeconfig by name, whatever $KUBECONFIG says in this process.
        configuration = client_configuration(str(self.kubeconfig))

        def login(**_: Any) -> kopf.ConnectionInfo:
            return connection_info(configuration)

        async def main() -> None:
            self._task = asyncio.current_task()
            registry = build_registry(login=login)
            kube = Kube(client.ApiClient(configuration))
            runtime = build_runtime(self.settings, kube)
            try:
                await run_operator(
                    runtime,
                    registry=registry,
                    settings=kopf_settings(runtime),
                    stop_flag=self.stop_flag,
                    ready_flag=self.ready,
                )
            finally:
                kube.close()

        self._loop = asyncio.new_event_loop()
        try:
            self._loop.run_until_complete(main())
        except BaseException as exc:  # reported to whoever waits for it
            self.error = exc
            log.debug("the operator stopped: %r", exc)
        finally:
            with contextlib.suppress(Exception):
                self._loop.run_until_complete(self._loop.shutdown_asyncgens())
            self._loop.close()

    def stop(self, timeout: float = 30.0) -> None:
        """A graceful stop (kopf finishes what it is doing and exits)."""
        self.stop_flag.set()
        self._thread.join(timeout)

    def kill(self, timeout: float = 30.0) -> None:
        """An abrupt stop: cancel the operator mid-whatever (the closest to a crash in-process)."""
        loop, task = self._loop, self._task
        if loop is not None and task is not None and not loop.is_closed():
            with contextlib.suppress(RuntimeError):
                loop.call_soon_threadsafe(task.cancel)
        self._thread.join(timeout)

    @property
    def alive(self) -> bool:
        return self._thread.is_alive()


class DevCluster:
    """Everything `kubetune demo` and the e2e tests run the operator against. See the module docstring."""

    def __init__(
        self,
        *,
        workdir: Path | None = None,
        s3: bool = True,
        kuberay: bool = True,
        start_ray: bool = True,
        api_port: int = 0,
        s3_port: int = 0,
        namespace: str = "default",
    ) -> None:
        self._own_workdir = workdir is None
        # Absolute: the kubeconfig, logs and pods' volumes under it are handed to processes that run
        # in other folders.
        self.workdir = Path(workdir or tempfile.mkdtemp(prefix="kubetune-dev-")).resolve()
        self.with_s3 = s3
        self.with_kuberay = kuberay
        self.start_ray = start_ray
        self.api_port = api_port
        self.s3_port = s3_port
        self.namespace = namespace
        self.api = EmbeddedKubeAPI()
        self.loop: LoopThread | None = None
        self.api_url = ""
        self.kubeconfig_path = self.workdir / "kubeconfig"
        self.moto: MotoS3 | None = None
        self.s3_faults: FaultyS3Proxy | None = None
        self.kuberay: KubeRayStandIn | None = None
        self.operator: OperatorThread | None = None
        self.operator_process: subprocess.Popen[bytes] | None = None
        self.operator_process_metrics_url = ""
        self.operator_process_ports = (0, 0)  # (metrics, progress) of the latest operator process
        self._kuberay_task: concurrent.futures.Future[None] | None = None
        self._runner: Any = None
        self._kube: AsyncKube | None = None
        self._saved_env: dict[str, str | None] = {}

    # --- lifecycle ---------------------------------------------------------------------------

    def __enter__(self) -> DevCluster:
        try:
            self.start()
        except BaseException:
            self.stop()
            raise
        return self

    def __exit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        self.stop()

    def start(self) -> None:
        self.workdir.mkdir(parents=True, exist_ok=True)
        self.loop = LoopThread("devcluster")
        self.api_url = self.on_loop(self._start_api())
        self.kubeconfig_path.write_text(yaml.safe_dump(kubeconfig(self.api_url, namespace=self.namespace)))
        self._kube = AsyncKube(self.api_url)
        if self.with_s3:
            self.moto = MotoS3()
            self.moto.start()
            self.s3_faults = FaultyS3Proxy(self.moto.url)
            self.on_loop(self.s3_faults.start(self.s3_port))
        if self.with_kuberay:
            self.kuberay = KubeRayStandIn(self.api_url, self.workdir / "rayjobs", start_ray=self.start_ray)
            self._kuberay_task = self.loop.submit(self.kuberay.run())
        log.info("devcluster up: api %s, s3 %s, workdir %s", self.api_url, self.s3_url, self.workdir)

    async def _start_api(self) -> str:
        await self.api.__aenter__()
        self.api.install_crd(finetunejob_crd())
        self.api.install_crd_file(RAYJOB_CRD)  # vendored with this package: KubeRay's own schema
        self._runner, port = await serve(self.api, port=self.api_port)
        return f"http://127.0.0.1:{port}"

    def stop(self) -> list[str]:
        """Stop everything the cluster started; returns what was running, one line each (the demo says it).

        The Ray runs first: they are the processes, and a Ctrl-C'd demo must not leave them behind
        whatever happens after.
        """
        stopped = self._stop_kuberay()
        if self.operator is not None:
            stopped.append("the operator")
            self.stop_operator()
        if self.operator_process is not None and self.operator_process.poll() is None:
            stopped.append(f"the operator process (pid {self.operator_process.pid})")
        self.stop_operator_process()
        if self.loop is not None:
            if self.s3_faults is not None:
                with contextlib.suppress(Exception):
                    self.on_loop(self.s3_faults.stop())
            with contextlib.suppress(Exception):
                self.on_loop(self._stop_api())
            stopped.append(f"the Kubernetes API at {self.api_url}")
            self.loop.stop()
            self.loop = None
        if self.moto is not None:
            stopped.append(f"S3 (moto) at {self.s3_url}")
            self.moto.stop()
            self.moto = None
        self._restore_env()
        if self._own_workdir:
            shutil.rmtree(self.workdir, ignore_errors=True)
        return stopped

    def _stop_kuberay(self) -> list[str]:
        """Stop the KubeRay stand-in and every run it started; one line per run stopped, and its own."""
        task, self._kuberay_task = self._kuberay_task, None
        if self.loop is None or self.kuberay is None or task is None:
            return []
        before = len(self.kuberay.stopped)
        with contextlib.suppress(Exception):
            self.on_loop(self.kuberay.close(), timeout=60)
        task.cancel()
        return [*self.kuberay.stopped[before:], "the KubeRay stand-in"]

    async def _stop_api(self) -> None:
        if self._kube is not None:
            await self._kube.close()
        if self._runner is not None:
            await self._runner.cleanup()
        await self.api.__aexit__(None, None, None)

    def on_loop(self, coro: Any, timeout: float | None = 60.0) -> Any:
        """Run a coroutine on the cluster's event loop (where the API and the stand-ins live)."""
        assert self.loop is not None, "the cluster is not running"
        return self.loop.call(coro, timeout)

    # --- endpoints ---------------------------------------------------------------------------

    @property
    def s3_url(self) -> str:
        return self.s3_faults.url if self.s3_faults else ""

    def s3(self) -> Any:
        """A boto3 client for the embedded S3 (through the fault proxy)."""
        return s3_client(self.s3_url)

    def env(self) -> dict[str, str]:
        """Environment for clients of this cluster: KUBECONFIG, S3 endpoint and credentials."""
        out = {"KUBECONFIG": str(self.kubeconfig_path), **DEMO_CREDENTIALS, "AWS_DEFAULT_REGION": "us-east-1"}
        if self.s3_url:
            out["AWS_ENDPOINT_URL"] = self.s3_url
        return out

    def use_env(self, extra: Mapping[str, str] | None = None) -> None:
        """Point this process's Kubernetes and S3 clients at the cluster, with `extra` variables for the Ray
        drivers it starts (they inherit this process's env); undone when it stops."""
        for key, value in {**self.env(), **(extra or {})}.items():
            self._saved_env.setdefault(key, os.environ.get(key))
            os.environ[key] = value

    def _restore_env(self) -> None:
        for key, value in self._saved_env.items():
            if value is None:
                os.environ.pop(key, None)
            else:
                os.environ[key] = value
        self._saved_env.clear()

    # --- API helpers (through HTTP, like any client) -------------------------------------------

    @property
    def kube(self) -> AsyncKube:
        assert self._kube is not None
        return self._kube

    def create(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        group, version = _group_version(obj["apiVersion"])
        plural = self._plural(group, obj["kind"])
        namespace = (obj.get("metadata") or {}).get("namespace") or self.namespace
        kind = self.api.kinds[(group, plural)]
        result: dict[str, Any] = self.on_loop(
            self.kube.request("POST", path(group, version, plural, namespace if kind.namespaced else None), dict(obj))
        )
        return result

    def apply(self, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create, or merge-patch the spec, labels and annotations of an existing object."""
        group, version = _group_version(obj["apiVersion"])
        plural = self._plural(group, obj["kind"])
        meta = obj.get("metadata") or {}
        namespace = meta.get("namespace") or self.namespace
        existing = self.get(group, version, plural, namespace, meta["name"])
        if existing is None:
            return self.create(obj)
        patch = {k: v for k, v in obj.items() if k not in ("apiVersion", "kind", "metadata", "status")}
        patch["metadata"] = {k: meta[k] for k in ("labels", "annotations") if k in meta}
        result = self.on_loop(self.kube.merge_patch(path(group, version, plural, namespace, meta["name"]), patch))
        return dict(result or {})

    def get(self, group: str, version: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.on_loop(self.kube.get(path(group, version, plural, namespace, name)))
        return result

    def list(self, group: str, version: str, plural: str, namespace: str | None = None) -> list[dict[str, Any]]:
        result = self.on_loop(self.kube.request("GET", path(group, version, plural, namespace)))
        return list(result.get("items", []))

    def patch(
        self, group: str, version: str, plural: str, namespace: str | None, name: str, patch: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        result: dict[str, Any] | None = self.on_loop(
            self.kube.merge_patch(path(group, version, plural, namespace, name), patch)
        )
        return result

    def patch_status(
        self, group: str, version: str, plural: str, namespace: str | None, name: str, status: Mapping[str, Any]
    ) -> dict[str, Any] | None:
        """Merge `status` into the object's status subresource (as a controller reports)."""
        url = path(group, version, plural, namespace, name) + "/status"
        result: dict[str, Any] | None = self.on_loop(self.kube.merge_patch(url, {"status": dict(status)}))
        return result

    def delete(self, group: str, version: str, plural: str, namespace: str | None, name: str) -> None:
        self.on_loop(self.kube.delete(path(group, version, plural, namespace, name)))

    def create_secret(self, name: str, data: Mapping[str, str], namespace: str | None = None) -> None:
        self.create(
            {
                "apiVersion": "v1",
                "kind": "Secret",
                "metadata": {"name": name, "namespace": namespace or self.namespace},
                "stringData": dict(data),
                "type": "Opaque",
            }
        )

    def wait_for(
        self,
        group: str,
        version: str,
        plural: str,
        namespace: str | None,
        name: str,
        condition: Callable[[dict[str, Any] | None], bool],
        *,
        timeout: float = 120.0,
        interval: float = 0.5,
    ) -> dict[str, Any] | None:
        """Poll an object until `condition(obj)` (obj None when absent); TimeoutError with its last state."""
        deadline = time.monotonic() + timeout
        obj = None
        while time.monotonic() < deadline:
            obj = self.get(group, version, plural, namespace, name)
            if condition(obj):
                return obj
            time.sleep(interval)
        raise TimeoutError(f"{plural}/{name} did not reach the condition in {timeout:.0f}s; last seen: {obj}")

    def _plural(self, group: str, kind: str) -> str:
        for (kind_group, plural), info in self.api.kinds.items():
            if kind_group == group and info.kind == kind:
                return plural
        raise KeyError(f"the API does not serve kind {kind} of group {group!r}")

    def fail_api(self, *criteria: Any, times: int = 1, status: int = 503, seconds: float | None = None) -> None:
        """Answer the next `times` API requests matching kmock criteria with `status` (or, with `seconds`,
        every one for that long), then serve again.

        E.g. `cluster.fail_api("patch", kmock.resource("kubetune.dev", "v1alpha1", "finetunejobs"), times=3)`.
        """
        remaining = [times]
        until = time.monotonic() + seconds if seconds is not None else None

        def respond() -> Any:
            over = time.monotonic() >= until if until is not None else remaining[0] <= 0
            if over:
                return NotImplemented  # kmock retires the reaction and serves normally again
            remaining[0] -= 1
            body = {
                "apiVersion": "v1",
                "kind": "Status",
                "status": "Failure",
                "code": status,
                "message": "injected fault",
            }
            return rendering.Response(
                status=status, headers={"Content-Type": "application/json"}, payload=json.dumps(body).encode()
            )

        async def install() -> None:
            self.api[criteria] << respond

        self.on_loop(install())

    def on_api(self, *criteria: Any, action: Callable[[], None]) -> None:
        """Call `action` (on the API's event loop: keep it short) when the first API request matching kmock
        criteria arrives, then serve that request: a fault at a precise moment, e.g. SIGKILL the operator
        while its status write is in flight."""

        def respond() -> Any:
            action()
            return NotImplemented  # retired: this request and the next are served normally

        async def install() -> None:
            self.api[criteria] << respond

        self.on_loop(install())

    def restart_api(self, down_seconds: float = 1.0) -> None:
        """Stop serving the API (every connection and watch cut), then serve it again on the same port after
        `down_seconds`, with the same objects: what clients see of an API server's restart."""

        async def restart() -> None:
            if self._runner is not None:
                await self._runner.cleanup()
            await asyncio.sleep(down_seconds)
            port = int(self.api_url.rsplit(":", 1)[1])
            self._runner, _ = await serve(self.api, port=port)

        self.on_loop(restart(), timeout=down_seconds + 60)

    # --- the operator --------------------------------------------------------------------------

    def start_operator(self, namespaces: tuple[str, ...] = (), **settings: Any) -> OperatorThread:
        """Run the real operator in this process (on its own thread) against this cluster.

        `settings` override fields of OperatorSettings (ports are picked free unless given).
        """
        self.use_env()
        self.operator = OperatorThread(self.kubeconfig_path, namespaces, **settings)
        self.operator.start()
        deadline = time.monotonic() + 60
        while not self.operator.ready.wait(0.2):
            if not self.operator.alive or time.monotonic() > deadline:
                raise RuntimeError(f"the operator did not get ready: {self.operator.error!r}")
        return self.operator

    def stop_operator(self, *, abrupt: bool = False) -> None:
        if self.operator is None:
            return
        if abrupt:
            self.operator.kill()
        else:
            self.operator.stop()
        self.operator = None

    def start_operator_process(
        self,
        *args: str,
        log_file: Path | None = None,
        metrics_port: int = 0,
        progress_port: int = 0,
        progress_url: str = "",
    ) -> subprocess.Popen[bytes]:
        """`python -m kubetune_operator` as its own process (SIGKILL it for a crash test).

        Ports are picked free unless given: an operator started again after a crash passes the
        previous ones (`operator_process_ports`), since running jobs report progress to that port.
        `progress_url` is the URL the trainers are told to report to (default: the progress port itself;
        the soak puts a proxy that can drop connections in between).
        """
        log_path = log_file or self.workdir / "operator.log"
        metrics_port, progress_port = metrics_port or free_port(), progress_port or free_port()
        self.operator_process_ports = (metrics_port, progress_port)
        self.operator_process_metrics_url = f"http://127.0.0.1:{metrics_port}/metrics"
        env = {
            **os.environ,
            **self.env(),
            "PYTHONUNBUFFERED": "1",
            # Free ports, so a second operator (or another test's) never collides on the defaults.
            "KUBETUNE_METRICS_PORT": str(metrics_port),
            "KUBETUNE_PROGRESS_PORT": str(progress_port),
            "KUBETUNE_PROGRESS_URL": progress_url or f"http://127.0.0.1:{progress_port}",
            "KUBETUNE_LIVENESS_URL": f"http://127.0.0.1:{free_port()}/healthz",
            "KUBETUNE_ALLOWED_S3_ENDPOINTS": LOCAL_S3,
        }
        with log_path.open("ab") as out:
            self.operator_process = subprocess.Popen(
                [sys.executable, "-m", "kubetune_operator", *args],
                env=env,
                stdout=out,
                stderr=subprocess.STDOUT,
                start_new_session=True,
            )
        return self.operator_process

    def stop_operator_process(self, sig: int = signal.SIGTERM) -> None:
        proc, self.operator_process = self.operator_process, None
        if proc is None or proc.poll() is not None:
            return
        with contextlib.suppress(ProcessLookupError):
            os.killpg(proc.pid, sig)
        try:
            proc.wait(30)
        except subprocess.TimeoutExpired:
            os.killpg(proc.pid, signal.SIGKILL)
            proc.wait()

    # --- Ray ------------------------------------------------------------------------------------

    def kill_train_worker(self, namespace: str, rayjob: str, sig: int = signal.SIGKILL) -> int | None:
        """`sig` (SIGKILL: a crash; SIGTERM: a preemption notice, as a pod's preStop hook passes it on) to one
        Ray Train worker of a RayJob's cluster; returns its pid (None if none yet)."""
        assert self.kuberay is not None
        ctl = self.kuberay.controller(namespace, rayjob)
        head = ctl.run.head if ctl and ctl.run else None
        workers = head.train_workers() if head else []
        if not workers:
            return None
        os.kill(workers[0].pid, sig)
        return workers[0].pid

    def add_ray_worker(self, namespace: str, rayjob: str) -> int | None:
        """A worker node joins a RayJob's running Ray cluster (a pod KubeRay's autoscaler adds to an elastic
        worker group, with the group's CPUs); its pid."""
        ctl = self._controller(namespace, rayjob)
        node = self.on_loop(ctl.add_worker(), timeout=180)
        return node.pid

    def remove_ray_worker(self, namespace: str, rayjob: str) -> int:
        """The newest added worker node of a RayJob's cluster goes, with the Train worker on it (a reclaimed
        spot node); how many processes stopped."""
        return int(self.on_loop(self._controller(namespace, rayjob).remove_worker(), timeout=120))

    def _controller(self, namespace: str, rayjob: str) -> RayJobController:
        assert self.kuberay is not None
        ctl = self.kuberay.controller(namespace, rayjob)
        if ctl is None:
            raise LookupError(f"no RayJob {namespace}/{rayjob} in the KubeRay stand-in")
        return ctl

    def kill_driver(self, namespace: str, rayjob: str) -> int | None:
        """SIGKILL a RayJob's driver (its process group), as when the head pod dies; its pid (None if none).

        KubeRay then counts a failed attempt and, with `backoffLimit` left, starts a new Ray cluster.
        """
        assert self.kuberay is not None
        ctl = self.kuberay.controller(namespace, rayjob)
        driver = ctl.run.driver if ctl and ctl.run else None
        pid = driver.pid if driver is not None and driver.running else None
        if pid is not None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(pid, signal.SIGKILL)
        return pid

    def driver_log(self, namespace: str, rayjob: str) -> str:
        """The latest attempt's driver log of a RayJob (for test failure messages)."""
        logs = sorted((self.workdir / "rayjobs" / namespace / rayjob).glob("attempt-*/driver.log"))
        return logs[-1].read_text(errors="replace") if logs else ""


def _group_version(api_version: str) -> tuple[str, str]:
    group, _, version = api_version.rpartition("/")
    return group, version
