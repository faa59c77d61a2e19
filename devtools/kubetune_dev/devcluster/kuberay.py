"""A local stand-in for the KubeRay operator: runs RayJobs on this machine, reports status as KubeRay does.

Test and demo infrastructure, not the product. It honours the RayJob contract the kubetune operator
relies on, following KubeRay v1.x's RayJob controller:

- `jobDeploymentStatus`: "" (New) -> Initializing -> Running -> Complete | Failed; a failed run with
  retries left (`backoffLimit`) -> Retrying -> New (a fresh cluster); `spec.suspend: true` ->
  Suspending -> Suspended (driver killed, cluster deleted, job fields reset), and back to New on
  resume; `activeDeadlineSeconds` -> Failed with reason DeadlineExceeded; `preRunningDeadlineSeconds`
  passed while Initializing (the pods cannot start yet) -> Failed with reason PreRunningDeadlineExceeded.
- `jobStatus` PENDING -> RUNNING -> SUCCEEDED | FAILED; `startTime`, `endTime`, `failed`,
  `succeeded`, `jobId`, `rayClusterName` ("<rayjob>-<5 chars>"), `dashboardURL` (the head
  service's address, as KubeRay reports it), `reason`, `message`, `observedGeneration`.
- A RayCluster object owned by the RayJob exists while the cluster runs (deleted on suspend, retry
  and — with `shutdownAfterJobFinishes` — at the end), the finalizer
  `ray.io/rayjob-stopjob-finalizer` makes deleting a RayJob stop its run first.
- `deletionStrategy.deletionRules` at the end, as KubeRay applies them (`kuberay_rules.rules_due`):
  DeleteWorkers suspends the RayCluster's worker groups (the run's processes stop: the one Ray head
  here hosts the workers too), DeleteCluster deletes the RayCluster and the attempt's driver log (the
  head pod's `/tmp/ray` goes with it), DeleteSelf the RayJob. A spec KubeRay's validation refuses
  (`kuberay_rules.spec_problem`: suspend without shutdownAfterJobFinishes, rules beside it, ...) ends
  ValidationFailed, on any reconcile, as KubeRay's does.

The Ray cluster: one `ray start --head` per RayJob (as KubeRay starts one RayCluster per RayJob),
with as many logical CPUs as the cluster spec asks for (head plus worker groups), no GPUs, and the
entrypoint run through the shell with `RAY_ADDRESS` pointing at it, as `ray job submit` would. A
cluster per job costs a few seconds but keeps jobs apart: suspending or killing one never touches
another, and "the Ray cluster is gone" is observable (the RayCluster object, the processes). With
`start_ray=False` the entrypoint runs without a cluster (for state-machine tests).

Environment: the driver gets the head container's resolved env over this process's env (the demo
passes credentials that way), and the Ray head gets the worker group's env on top (Train workers run
there). See `pods` for volumes and mount-path rewriting. `authOptions` token auth is honoured as KubeRay
does (`kuberay_auth`): the Ray head runs with the Secret's token, and the driver is submitted with it.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
import secrets
import shutil
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, ClassVar

import aiohttp
import yaml

from kubetune_dev.devcluster.apimachinery import now_rfc3339, parse_time
from kubetune_dev.devcluster.client import ApiError, AsyncKube, path, transient
from kubetune_dev.devcluster.kuberay_auth import (
    MODE_ENV,
    TOKEN_ENV,
    ensure_generated_secret,
    submission_token,
    token_secret_name,
    with_token_auth,
)
from kubetune_dev.devcluster.kuberay_rules import rules_due, spec_problem
from kubetune_dev.devcluster.pods import PodMaterialiser, PodNotReadyError, Sandbox, container_cpus, main_container
from kubetune_dev.devcluster.processes import LocalProcess, RayHead, RayWorkerNode, venv_path_env

log = logging.getLogger(__name__)

FINALIZER = "ray.io/rayjob-stopjob-finalizer"
RAYJOBS = ("ray.io", "v1", "rayjobs")
RAYCLUSTERS = ("ray.io", "v1", "rayclusters")
RETRY_PENDING_POD = 2.0
API_RETRY_SECONDS = 1.0  # after the API failed a reconcile step (down, or 5xx/429)


def _suffix() -> str:
    return "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(5))


@dataclass
class Run:
    """One attempt: its sandbox, Ray head and driver, and the worker nodes added to it since it started
    (`worker_cpus` each: the worker group's)."""

    sandbox: Sandbox
    head: RayHead | None = None
    driver: LocalProcess | None = None
    worker_cpus: int = 1
    nodes: list[RayWorkerNode] = field(default_factory=list)


@dataclass
class RayJobController:
    """Reconciles one RayJob (by uid) until it is deleted."""

    standin: KubeRayStandIn
    namespace: str
    name: str
    uid: str
    obj: dict[str, Any]
    wake: asyncio.Event = field(default_factory=asyncio.Event)
    run: Run | None = None
    attempts: int = 0
    task: asyncio.Task[None] | None = None
    gone: bool = False
    # The deletion rules' policies carried out for the current attempt (each once).
    deleted: set[str] = field(default_factory=set)

    @property
    def kube(self) -> AsyncKube:
        return self.standin.kube

    @property
    def url(self) -> str:
        return path(*RAYJOBS, self.namespace, self.name)

    @property
    def spec(self) -> dict[str, Any]:
        return dict(self.obj.get("spec") or {})

    @property
    def status(self) -> dict[str, Any]:
        return dict(self.obj.get("status") or {})

    def update(self, obj: dict[str, Any]) -> None:
        if obj["metadata"].get("uid") == self.uid:
            self.obj = obj
        self.wake.set()

    async def patch_status(self, changes: Mapping[str, Any]) -> None:
        changes = {**changes, "observedGeneration": self.obj["metadata"].get("generation", 1)}
        result = await self.kube.merge_patch(self.url + "/status", {"status": changes})
        if result is None:
            self.gone = True
            return
        self.obj = result
        log.info(
            "rayjob %s/%s: %s %s",
            self.namespace,
            self.name,
            result.get("status", {}).get("jobDeploymentStatus"),
            result.get("status", {}).get("jobStatus", ""),
        )

    async def sleep(self, seconds: float | None) -> None:
        """Wait for a change of the RayJob (since the last reconcile began), the driver's exit, or `seconds`."""
        waiters: list[asyncio.Future[Any]] = [asyncio.ensure_future(self.wake.wait())]
        if self.run and self.run.driver and self.run.driver.running:
            waiters.append(asyncio.ensure_future(self.run.driver.wait()))
        try:
            await asyncio.wait(waiters, timeout=seconds, return_when=asyncio.FIRST_COMPLETED)
        finally:
            for waiter in waiters:
                waiter.cancel()

    # --- the state machine --------------------------------------------------------------------

    async def reconcile_forever(self) -> None:
        try:
            while not self.gone:
                # Cleared before reading the state, so a change during a reconcile is never missed.
                self.wake.clear()
                try:
                    wait = await self.reconcile()
                except (aiohttp.ClientError, ApiError) as exc:
                    if isinstance(exc, ApiError) and not transient(exc):
                        raise
                    # As KubeRay requeues: an API that is down or answers 5xx/429 for a while (the soak's
                    # faults) delays the step, it does not end the run.
                    log.info("rayjob %s/%s: the API failed (%s); retrying", self.namespace, self.name, exc)
                    wait = API_RETRY_SECONDS
                if self.gone:
                    break
                if wait != 0:
                    await self.sleep(wait)
        except asyncio.CancelledError:
            raise
        except Exception:
            log.exception("rayjob %s/%s: the stand-in failed", self.namespace, self.name)
        finally:
            await self.stop_run()

    def _deadline_passed(self, field: str = "activeDeadlineSeconds") -> bool:
        deadline = self.spec.get(field)
        start = parse_time(self.status.get("startTime") or "")
        return bool(deadline and start and time.time() - start.timestamp() > float(deadline))

    async def reconcile(self) -> float | None:
        """One step; returns how long to wait before the next (None: until something changes)."""
        if self.obj["metadata"].get("deletionTimestamp"):
            await self._on_deleted()
            return None
        deployment = self.status.get("jobDeploymentStatus") or ""
        problem = spec_problem(self.spec)
        if problem is not None:  # as KubeRay validates: on every reconcile, so after an edit too
            if deployment != "ValidationFailed":
                await self._refuse(problem)
            return None
        step = self._STEPS.get(deployment)
        if step is None:
            log.warning("rayjob %s/%s: unknown jobDeploymentStatus %r", self.namespace, self.name, deployment)
            return None
        return await step(self)

    async def _refuse(self, problem: str) -> None:
        """An invalid spec: ValidationFailed, with KubeRay's message (its run, if any, stopped)."""
        log.warning("rayjob %s/%s: invalid: %s", self.namespace, self.name, problem)
        await self.stop_run()
        message = f"{self.namespace}/{self.name}: The RayJob spec is invalid: {problem}"
        await self.patch_status(
            {"jobDeploymentStatus": "ValidationFailed", "reason": "ValidationFailed", "message": message}
        )

    async def _on_deleted(self) -> None:
        """Stop the run, then let the deletion finish (the finalizer's work)."""
        await self.stop_run()
        finalizers = [f for f in self.obj["metadata"].get("finalizers") or [] if f != FINALIZER]
        await self.kube.merge_patch(self.url, {"metadata": {"finalizers": finalizers or None}})
        self.gone = True

    async def _on_new(self) -> float | None:
        """The finalizer on, a cluster named, the job started: Initializing."""
        meta, status = self.obj["metadata"], self.status
        if FINALIZER not in (meta.get("finalizers") or []):
            patched = await self.kube.merge_patch(
                self.url, {"metadata": {"finalizers": [*(meta.get("finalizers") or []), FINALIZER]}}
            )
            if patched is None:
                self.gone = True
                return None
            self.obj = patched
        await self.patch_status(
            {
                "jobDeploymentStatus": "Initializing",
                "jobId": self.spec.get("jobId") or f"{self.name}-{_suffix()}",
                "rayClusterName": f"{self.name}-{_suffix()}",
                "startTime": status.get("startTime") or now_rfc3339(),
                "failed": status.get("failed", 0),
                "succeeded": status.get("succeeded", 0),
            }
        )
        return 0

    async def _suspended_or_late(self) -> float | None:
        """Suspending when asked to, Failed past the deadline; None when neither."""
        if self.spec.get("suspend"):
            await self.patch_status({"jobDeploymentStatus": "Suspending"})
            return 0
        if self._deadline_passed():
            return await self.fail_deadline()
        return None

    async def _on_initializing(self) -> float | None:
        """The cluster up and the entrypoint submitted: Running; Failed if that takes past
        preRunningDeadlineSeconds (here: its pods' Secrets or ConfigMaps missing that long)."""
        stopped = await self._suspended_or_late()
        if stopped is not None:
            return stopped
        if self._deadline_passed("preRunningDeadlineSeconds"):
            return await self.fail_deadline("preRunningDeadlineSeconds", "PreRunningDeadlineExceeded")
        try:
            await self.start_run()
        except PodNotReadyError as exc:
            log.warning("rayjob %s/%s: pods not ready: %s", self.namespace, self.name, exc)
            return RETRY_PENDING_POD
        await self.patch_status(
            {
                "jobDeploymentStatus": "Running",
                "jobStatus": "RUNNING",
                "dashboardURL": f"{self.status.get('rayClusterName')}-head-svc.{self.namespace}.svc.cluster.local:8265",
                "rayJobInfo": {"startTime": now_rfc3339()},
            }
        )
        return 0

    async def _on_running(self) -> float | None:
        """Watch the driver; its exit code decides the end (`finish`)."""
        stopped = await self._suspended_or_late()
        if stopped is not None:
            return stopped
        if self.run is None or self.run.driver is None:
            # The stand-in restarted (or lost the run): resubmit, as KubeRay's HTTP mode does.
            try:
                await self.start_run()
            except PodNotReadyError:
                return RETRY_PENDING_POD
        driver = self.run.driver if self.run else None
        if driver is None or driver.running:
            return 1.0 if self.spec.get("activeDeadlineSeconds") else None
        return await self.finish(await driver.wait())

    async def _on_stopping(self) -> float | None:
        """Suspending or Retrying: the cluster deleted and the job's fields reset; Suspended, or New again."""
        deployment = self.status.get("jobDeploymentStatus")
        await self.stop_run()
        await self.patch_status(
            {
                "jobDeploymentStatus": "Suspended" if deployment == "Suspending" else "New",
                "jobStatus": "",
                "rayClusterName": "",
                "dashboardURL": "",
                "jobId": "",
                "message": "",
                "reason": "",
                "rayJobInfo": None,
            }
        )
        return 0

    async def _on_suspended(self) -> float | None:
        if not self.spec.get("suspend"):
            await self.patch_status({"jobDeploymentStatus": "New", "jobStatus": ""})
            return 0
        return None

    async def _on_finished(self) -> float | None:
        """Complete or Failed: the deletion rules when the RayJob has them, else with shutdownAfterJobFinishes
        the cluster goes after ttlSecondsAfterFinished."""
        if (self.spec.get("deletionStrategy") or {}).get("deletionRules"):
            return await self._apply_deletion_rules()
        if self.run is not None and self.spec.get("shutdownAfterJobFinishes"):
            ttl = float(self.spec.get("ttlSecondsAfterFinished") or 0)
            end = parse_time(self.status.get("endTime") or "")
            left = ttl - (time.time() - end.timestamp()) if end else 0
            if left > 0:
                return left
            await self.stop_run()
        return None

    async def _apply_deletion_rules(self) -> float | None:
        """The most destructive rule due now, as KubeRay's `handleDeletionRules`; then wait for the next.

        What a kept head holds for its user here: the RayCluster object (its workers suspended, as
        KubeRay's DeleteWorkers leaves it) and the driver's log. The run's processes stop with the workers:
        the stand-in's one Ray head hosts the workers too, and a finished driver needs none of them.
        """
        end = parse_time(self.status.get("endTime") or "")
        now = time.time()
        due = rules_due(self.spec, self.status, end=end.timestamp() if end else now, now=now)
        if "DeleteSelf" in due.policies:
            await self.kube.delete(self.url)
            return None
        if "DeleteCluster" in due.policies and "DeleteCluster" not in self.deleted:
            await self.stop_run()
            await self.delete_raycluster()
            self.driver_log_path(self.attempts).unlink(missing_ok=True)  # the head pod's /tmp/ray went with it
            self.deleted.update({"DeleteWorkers", "DeleteCluster"})
        elif "DeleteWorkers" in due.policies and "DeleteWorkers" not in self.deleted:
            await self.stop_run(keep_cluster=True)
            await self.suspend_worker_groups()
            self.deleted.add("DeleteWorkers")
        return None if due.next_at is None else max(due.next_at - time.time(), 0.1)

    async def suspend_worker_groups(self) -> None:
        """DeleteWorkers, as KubeRay does it: every worker group of the RayCluster suspended."""
        name = self.status.get("rayClusterName")
        cluster = await self.kube.get(path(*RAYCLUSTERS, self.namespace, name)) if name else None
        if cluster is None:
            return
        groups = [{**group, "suspend": True} for group in cluster.get("spec", {}).get("workerGroupSpecs") or []]
        await self.kube.merge_patch(path(*RAYCLUSTERS, self.namespace, name), {"spec": {"workerGroupSpecs": groups}})

    def driver_log_path(self, attempt: int) -> Path:
        return self.standin.workdir / self.namespace / self.name / f"attempt-{attempt}" / "driver.log"

    # What each jobDeploymentStatus leads to, as KubeRay's RayJob controller does it.
    _STEPS: ClassVar[dict[str, Callable[[RayJobController], Awaitable[float | None]]]] = {
        "": _on_new,
        "New": _on_new,
        "Initializing": _on_initializing,
        "Running": _on_running,
        "Suspending": _on_stopping,
        "Retrying": _on_stopping,
        "Suspended": _on_suspended,
        "Complete": _on_finished,
        "Failed": _on_finished,
        "ValidationFailed": lambda _: _nothing(),
    }

    async def finish(self, code: int) -> float:
        status = self.status
        now = now_rfc3339()
        if code == 0:
            await self.patch_status(
                {
                    "jobDeploymentStatus": "Complete",
                    "jobStatus": "SUCCEEDED",
                    "succeeded": int(status.get("succeeded") or 0) + 1,
                    "endTime": now,
                    "message": "Job finished successfully.",
                    "rayJobInfo": {**(status.get("rayJobInfo") or {}), "endTime": now},
                }
            )
            return 0
        failed = int(status.get("failed") or 0) + 1
        tail = self.run.driver.log_tail(5) if self.run and self.run.driver else ""
        message = f"Job entrypoint command failed with exit code {code}, last available logs:\n{tail}"
        if failed < int(self.spec.get("backoffLimit") or 0) + 1:
            await self.patch_status({"jobDeploymentStatus": "Retrying", "jobStatus": "FAILED", "failed": failed})
            return 0
        await self.patch_status(
            {
                "jobDeploymentStatus": "Failed",
                "jobStatus": "FAILED",
                "failed": failed,
                "reason": "AppFailed",
                "message": message[-2000:],
                "endTime": now,
                "rayJobInfo": {**(status.get("rayJobInfo") or {}), "endTime": now},
            }
        )
        return 0

    async def fail_deadline(self, field: str = "activeDeadlineSeconds", reason: str = "DeadlineExceeded") -> float:
        # The driver is stopped; what stays of the cluster is the deletion rules' to decide, if any.
        await self.stop_run(keep_cluster=bool((self.spec.get("deletionStrategy") or {}).get("deletionRules")))
        await self.patch_status(
            {
                "jobDeploymentStatus": "Failed",
                "reason": reason,
                "message": (
                    f"The RayJob has passed the {field}. StartTime: {self.status.get('startTime')}. "
                    f"{field[0].upper()}{field[1:]}: {self.spec.get(field)}"
                ),
                "endTime": now_rfc3339(),
            }
        )
        return 0

    # --- the run: cluster and driver ----------------------------------------------------------

    async def start_run(self) -> None:
        await self.stop_run()
        self.attempts += 1
        self.deleted = set()
        cluster_spec = dict(self.spec.get("rayClusterSpec") or {})
        token_secret = await self.token_secret(cluster_spec)
        head_group = dict(cluster_spec.get("headGroupSpec") or {})
        head_template = dict(head_group.get("template") or {})
        head_container = with_token_auth(main_container(head_template), token_secret)
        workdir = self.driver_log_path(self.attempts).parent
        shutil.rmtree(workdir, ignore_errors=True)
        sandbox = Sandbox(workdir)
        pod_name = f"{self.status.get('rayClusterName') or self.name}-head-{_suffix()}"
        head_pod = PodMaterialiser(self.kube, self.namespace, pod_name, sandbox)
        await head_pod.volumes(head_template, head_container)
        workers = [dict(g) for g in cluster_spec.get("workerGroupSpecs") or []]
        worker_env: dict[str, str] = {}
        worker_cpus = 1
        num_cpus = container_cpus(head_container, head_group.get("rayStartParams") or {})
        for group in workers:
            template = dict(group.get("template") or {})
            container = with_token_auth(main_container(template), token_secret)
            worker_pod = PodMaterialiser(self.kube, self.namespace, f"{self.name}-worker-{_suffix()}", sandbox)
            await worker_pod.volumes(template, container)
            worker_env.update(await worker_pod.env(container))
            replicas = int(group.get("replicas", group.get("minReplicas", 1)) or 0)
            worker_cpus = container_cpus(container, group.get("rayStartParams") or {})
            num_cpus += replicas * worker_cpus
        head_pod.rewrite_files()
        head_env = await head_pod.env(head_container)
        base = dict(os.environ) if self.standin.inherit_env else {"PATH": os.environ.get("PATH", "/usr/bin:/bin")}
        base.pop("RAY_ADDRESS", None)
        runtime_env = yaml.safe_load(self.spec.get("runtimeEnvYAML") or "") or {}
        driver_env = {**base, **head_env, **{k: str(v) for k, v in (runtime_env.get("env_vars") or {}).items()}}
        if token_secret is not None:  # KubeRay submits with the token it reads from the Secret
            token = await submission_token(self.kube, self.namespace, token_secret)
            driver_env.update({MODE_ENV: "token", TOKEN_ENV: token})
        run = Run(sandbox, worker_cpus=worker_cpus)
        self.run = run
        if self.standin.start_ray:
            run.head = RayHead({**base, **head_env, **worker_env}, workdir, num_cpus=num_cpus)
            self.standin.temp_dirs.append(run.head.temp_dir)
            await run.head.start()
            try:
                await run.head.wait_ready()
            except RuntimeError as exc:  # a head pod in CrashLoopBackOff: try again later
                raise PodNotReadyError(str(exc)) from exc
            driver_env["RAY_ADDRESS"] = run.head.address
        await self.ensure_raycluster(cluster_spec, num_cpus)
        entrypoint = sandbox.rewrite(str(self.spec.get("entrypoint") or "true"))
        run.driver = LocalProcess(
            ["/bin/sh", "-c", entrypoint], venv_path_env(driver_env), workdir / "work", workdir / "driver.log"
        )
        await run.driver.start()
        log.info("rayjob %s/%s: driver pid %s runs %r", self.namespace, self.name, run.driver.pid, entrypoint)

    async def add_worker(self) -> RayWorkerNode:
        """One more worker node in the running Ray cluster, as the autoscaler adds a pod to an elastic worker
        group; ready (joined) when this returns."""
        run = self.run
        if run is None or run.head is None:
            raise RuntimeError(f"rayjob {self.namespace}/{self.name} has no running Ray cluster")
        log_file = run.head.cwd / f"ray-worker-{len(run.nodes) + 1}.log"
        node = RayWorkerNode(run.head, log_file, run.worker_cpus)
        run.nodes.append(node)
        await node.start()
        await node.wait_ready()
        log.info("rayjob %s/%s: added a worker node (pid %s)", self.namespace, self.name, node.pid)
        return node

    async def remove_worker(self) -> int:
        """Stop the newest added worker node and everything on it, as a reclaimed spot node goes (SIGTERM,
        SIGKILL after the stop grace); how many processes stopped."""
        run = self.run
        if run is None or not run.nodes:
            raise RuntimeError(f"rayjob {self.namespace}/{self.name} has no added worker node")
        node = run.nodes.pop()
        stopped = await node.stop(self.standin.stop_grace)
        log.info("rayjob %s/%s: removed a worker node (%d processes)", self.namespace, self.name, stopped)
        return stopped

    async def token_secret(self, cluster_spec: Mapping[str, Any]) -> str | None:
        """The Secret of the cluster's Ray token (None: token auth off), made as KubeRay makes one when
        `authOptions` names none."""
        cluster = str(self.status.get("rayClusterName") or self.name)
        name = token_secret_name(cluster_spec, cluster)
        if name is not None and not (cluster_spec.get("authOptions") or {}).get("secretName"):
            await ensure_generated_secret(self.kube, self.namespace, name, self.owner_reference())
        return name

    def owner_reference(self) -> dict[str, Any]:
        """This RayJob as the controller of what the stand-in makes for it."""
        return {
            "apiVersion": "ray.io/v1",
            "kind": "RayJob",
            "name": self.name,
            "uid": self.uid,
            "controller": True,
            "blockOwnerDeletion": True,
        }

    async def ensure_raycluster(self, cluster_spec: Mapping[str, Any], num_cpus: int) -> None:
        name = self.status.get("rayClusterName")
        if not name:
            return
        body = {
            "apiVersion": "ray.io/v1",
            "kind": "RayCluster",
            "metadata": {
                "name": name,
                "namespace": self.namespace,
                "labels": {"ray.io/originated-from-crd": "RayJob", "ray.io/originated-from-cr-name": self.name},
                "ownerReferences": [self.owner_reference()],
            },
            "spec": dict(cluster_spec),
        }
        url = path(*RAYCLUSTERS, self.namespace)
        await self.kube.create(url, body)
        workers = sum(int(g.get("replicas", 1) or 0) for g in cluster_spec.get("workerGroupSpecs") or [])
        await self.kube.merge_patch(
            path(*RAYCLUSTERS, self.namespace, name) + "/status",
            {
                "status": {
                    "state": "ready",
                    "desiredWorkerReplicas": workers,
                    "readyWorkerReplicas": workers,
                    "availableWorkerReplicas": workers,
                    "desiredCPU": str(num_cpus),
                    "head": {"podIP": "127.0.0.1", "serviceIP": "127.0.0.1"},
                }
            },
        )

    async def stop_run(self, *, keep_cluster: bool = False) -> None:
        """Stop the run's processes, and delete its RayCluster object unless `keep_cluster`."""
        run, self.run = self.run, None
        if run is None:
            return
        stopped, cancelled = await _stop_together(run, self.standin.stop_grace)
        if stopped:
            log.info(
                "rayjob %s/%s: stopped its driver and Ray cluster (%d processes)", self.namespace, self.name, stopped
            )
            self.standin.stopped.append(
                f"RayJob {self.namespace}/{self.name}: its driver and Ray cluster ({stopped} processes)"
            )
        if not keep_cluster:
            await self.delete_raycluster()
        if cancelled:
            raise asyncio.CancelledError

    async def delete_raycluster(self) -> None:
        name = self.status.get("rayClusterName")
        if name and not self.gone:
            with contextlib.suppress(Exception):
                await self.kube.delete(path(*RAYCLUSTERS, self.namespace, name))


async def _nothing() -> None:
    return None


async def _stop_together(run: Run, grace: float) -> tuple[int, bool]:
    """Stop a run's driver and Ray cluster; (how many processes that stopped, whether we were cancelled).

    Together, as a pod's containers stop in parallel: a Ctrl-C'd demo waits for the slower, not both.
    A stop once begun is finished even if the controller is cancelled meanwhile (the stand-in closing
    while a finished job's cluster is being stopped); the caller goes on with the cancellation after.
    Cut short between SIGTERM and SIGKILL, the Ray cluster would outlive everything.
    """
    parts = [part for part in (run.driver, *run.nodes, run.head) if part is not None]
    stopping = asyncio.gather(*(part.stop(grace) for part in parts))
    cancelled = False
    while True:
        try:
            return sum(await asyncio.shield(stopping)), cancelled
        except asyncio.CancelledError:
            cancelled = True


class KubeRayStandIn:
    """Watches RayJobs through the API and runs a controller per RayJob."""

    def __init__(self, api_url: str, workdir: Path, *, start_ray: bool = True, inherit_env: bool = True) -> None:
        self.kube = AsyncKube(api_url)
        self.workdir = workdir.resolve()  # every path handed to a driver or Ray is absolute
        self.start_ray = start_ray
        self.inherit_env = inherit_env
        self.controllers: dict[str, RayJobController] = {}
        self.temp_dirs: list[Path] = []  # Ray heads' socket dirs, swept again at the end
        self.stopped: list[str] = []  # what stopping runs ended, one line per run (for whoever stops us)
        # Seconds a run's processes get between SIGTERM and SIGKILL, as a pod's grace period (a Ray head
        # drains for up to 30 s); `close` shortens it, as nothing will use what they would finish.
        self.stop_grace = 5.0

    def controller(self, namespace: str, name: str) -> RayJobController | None:
        for ctl in self.controllers.values():
            if (ctl.namespace, ctl.name) == (namespace, name) and not ctl.gone:
                return ctl
        return None

    async def run(self) -> None:
        try:
            async for event_type, obj in self.kube.watch(path(*RAYJOBS)):
                self._dispatch(event_type, obj)
        finally:
            await self.close()

    def _dispatch(self, event_type: str, obj: dict[str, Any]) -> None:
        meta = obj["metadata"]
        uid = meta["uid"]
        ctl = self.controllers.get(uid)
        if event_type == "DELETED":
            if ctl is not None:
                ctl.gone = True
                if ctl.task is not None:
                    ctl.task.cancel()
                self.controllers.pop(uid, None)
            return
        if ctl is None:
            ctl = RayJobController(self, meta["namespace"], meta["name"], uid, obj)
            self.controllers[uid] = ctl
            ctl.task = asyncio.create_task(ctl.reconcile_forever(), name=f"rayjob-{meta['name']}")
        else:
            ctl.update(obj)

    async def close(self, grace: float = 1.0) -> None:
        self.stop_grace = grace
        tasks = [ctl.task for ctl in self.controllers.values() if ctl.task is not None]
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
        self.controllers.clear()
        await self.kube.close()
        for temp_dir in self.temp_dirs:
            shutil.rmtree(temp_dir, ignore_errors=True)
        self.temp_dirs.clear()
