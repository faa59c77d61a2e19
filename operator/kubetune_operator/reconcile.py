"""The operator's steps: launch a job, follow its RayJob, apply or refuse spec edits, expire finished jobs.

Each step takes the job, asks `lifecycle` (pure) what the status should become, and applies that
through `kube` (side effects). kopf's handlers in `handlers.py` only call these. Status writes for one
job are serialised by a per-job lock and computed from the job as the watch last delivered it with the
operator's own status writes laid over it (`jobcache`), so the RayJob watcher and the job's own
handlers never overwrite each other with stale views, and a write needs no fresh read of the job.
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import functools
import logging
import time
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, NoReturn

import kopf
from pydantic import ValidationError

from kubetune_operator import lifecycle, s3
from kubetune_operator.accounts import SharedServiceAccounts
from kubetune_operator.builders import SPEC_DIGEST_ANNOTATION, build_children, build_service_account, spec_digest
from kubetune_operator.diffbase import CarriedDiffBase
from kubetune_operator.errors import format_validation_error
from kubetune_operator.hooks import Hooks
from kubetune_operator.jobcache import JobCache, uid_of
from kubetune_operator.kube import Kube, KubeRayMissingError, is_not_found
from kubetune_operator.lifecycle import NO_CHANGE, StatusChange
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.spec import FineTuneJob

logger = logging.getLogger("kubetune_operator")

KUBERAY_MISSING = (
    "KubeRay is not installed: this cluster serves no ray.io/v1 RayJobs. Install the KubeRay operator "
    "(https://docs.ray.io/en/latest/cluster/kubernetes/getting-started/kuberay-operator-installation.html); "
    "the job launches once it is there"
)


# S3 calls may each wait for a timeout; a pool of their own keeps them from delaying anything else.
PREFLIGHT_THREADS = concurrent.futures.ThreadPoolExecutor(8, thread_name_prefix="kubetune-preflight")


def utc_now() -> datetime:
    return datetime.now(UTC)


class Expiry:
    """One timer per finished job with a TTL; it deletes the job when due.

    In-process timers instead of kopf timers or daemons: those put a finalizer on every job, and a job
    with a finalizer cannot be deleted while the operator is down. After a restart, the initial listing
    of jobs schedules every timer again.
    """

    def __init__(self) -> None:
        self._timers: dict[str, tuple[float, asyncio.Task[None]]] = {}

    def schedule(self, key: str, delay: float, action: Callable[[], Awaitable[None]]) -> None:
        due = time.monotonic() + delay
        current = self._timers.get(key)
        if current and not current[1].done() and abs(current[0] - due) < 1.0:
            return  # the same deadline, seen again in a later event
        self.cancel(key)

        async def fire() -> None:
            await asyncio.sleep(delay)
            await action()

        self._timers[key] = (due, asyncio.create_task(fire(), name=f"kubetune-expiry-{key}"))

    def cancel(self, key: str) -> None:
        timer = self._timers.pop(key, None)
        if timer and not timer[1].done():
            timer[1].cancel()

    async def close(self) -> None:
        tasks = [task for _, task in self._timers.values()]
        self._timers.clear()
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)


@dataclass
class Runtime:
    """What every handler shares: settings, the Kubernetes client, hooks, per-job locks and TTL timers."""

    settings: OperatorSettings
    kube: Kube
    hooks: Hooks = field(default_factory=Hooks)
    clock: Callable[[], datetime] = utc_now
    expiry: Expiry = field(default_factory=Expiry)
    jobs: JobCache = field(default_factory=JobCache)
    # The trainer pods' ServiceAccount, made sure of once per namespace rather than once per job.
    accounts: SharedServiceAccounts = field(default_factory=SharedServiceAccounts)
    # kopf's diff-base storage, when it lets the launch's status write carry the diff base.
    diffbase: CarriedDiffBase | None = None
    _locks: dict[tuple[str, str], asyncio.Lock] = field(default_factory=dict)

    def lock(self, namespace: str, name: str) -> asyncio.Lock:
        return self._locks.setdefault((namespace, name), asyncio.Lock())

    def forget(self, namespace: str, name: str) -> None:
        self._locks.pop((namespace, name), None)
        self.jobs.forget(namespace, name)


def _ref(job: Mapping[str, Any]) -> tuple[str, str]:
    meta = job.get("metadata") or {}
    return str(meta.get("namespace") or ""), str(meta.get("name") or "")


async def update_status(
    rt: Runtime,
    namespace: str,
    name: str,
    compute: Callable[[dict[str, Any]], StatusChange],
    *,
    diffbase: str | None = None,
) -> StatusChange:
    """Compute the job's status change, write it and post its events (one job at a time).

    The job is the cached one (`Runtime.jobs`); read from the server only when the watch has not
    delivered it yet (e.g. a RayJob seen before its job after a restart). `diffbase`: kopf's diff base
    for the job, carried by this write if there is one (see `diffbase.py`); only a handler about to
    succeed passes it, as kopf then takes the job as handled.
    """
    async with rt.lock(namespace, name):
        job = rt.jobs.get(namespace, name) or await rt.kube.get_job(namespace, name)
        if job is None or (job.get("metadata") or {}).get("deletionTimestamp"):
            return NO_CHANGE
        change = compute(job)
        if change.patch:
            patch = {**change.patch, **CarriedDiffBase.status_fields(diffbase)} if diffbase else change.patch
            try:
                await rt.kube.patch_job_status(namespace, name, patch)
            except Exception as exc:
                if is_not_found(exc):  # deleted since the watch last delivered it
                    return NO_CHANGE
                raise
            rt.jobs.wrote(namespace, name, uid_of(job), patch)
            if diffbase and rt.diffbase is not None:
                rt.diffbase.carried(uid_of(job), diffbase)
        for event in change.events:
            rt.kube.post_event(job, event)
        if change.phase_changed:
            message = change.patch.get("message", "")
            logger.info("%s/%s: %s -> %s: %s", namespace, name, change.old_phase or "new", change.new_phase, message)
        return change


def invalid_spec_message(exc: ValidationError, namespace: str, name: str) -> str:
    source = f"{namespace}/{name}"
    lines = format_validation_error(exc, source, model=FineTuneJob)
    return "Invalid spec: " + "; ".join(line.removeprefix(f"{source}: ") for line in lines)


# -- launch ----------------------------------------------------------------------------------------------


async def launch(rt: Runtime, body: dict[str, Any], *, retry: int = 0, diffbase: str | None = None) -> None:
    """Validate, preflight, then create the job's children; on create and on operator restart.

    Safe to run any number of times: a finished job is left alone, an invalid one fails once, and a
    job whose RayJob exists skips preflight and only recreates children that are missing. `diffbase`
    (a new job): kopf's diff base, carried by the status write that ends a launch.
    """
    namespace, name = _ref(body)
    if diffbase and rt.diffbase is not None and _diffbase_written(rt, namespace, name, diffbase):
        # A watch event from before this launch's own status write (kopf takes it for a new job again,
        # as it found no diff base in it): this exact spec was launched already.
        rt.diffbase.carried(uid_of(body), diffbase)
        return
    if lifecycle.is_finished(body):
        return
    try:
        job = FineTuneJob.from_body(body)
    except ValidationError as exc:
        message = invalid_spec_message(exc, namespace, name)
        if await rt.kube.get_rayjob(namespace, name) is not None:
            # Edited past the CRD's checks after launch: the run keeps the spec it was launched with.
            logger.warning("%s/%s: the spec is invalid now; its RayJob runs on unchanged: %s", namespace, name, message)
            return
        logger.warning("%s/%s: not launched: %s", namespace, name, message)
        await update_status(
            rt,
            namespace,
            name,
            lambda cur: lifecycle.failed_before_launch(cur, "InvalidSpec", message, now=rt.clock()),
            diffbase=diffbase,
        )
        return

    if not await rt.kube.kuberay_installed():
        await _wait_for_kuberay(rt, namespace, name)

    # Without spec.storage.credentialsSecret the pods use their own cloud identity (IRSA, workload
    # identity), which the operator does not have: a check with the operator's identity proves nothing.
    needs_preflight = bool(job.spec.storage.credentials_secret)
    if needs_preflight or lifecycle.is_launched(body):
        # Whether the RayJob exists decides whether to preflight; a launched job (resumed by a
        # restarted operator) reads its children rather than trying to create them again.
        first_launch = await rt.kube.get_rayjob(namespace, name) is None
    else:
        # A new job without preflight: create at once; a child already there answers 409 and is kept.
        first_launch = True
    if first_launch and needs_preflight:
        failure = await _preflight(rt, job, retry=retry)
        if failure is not None:
            logger.warning("%s/%s: preflight failed (%s): %s", namespace, name, failure.reason, failure.message)
            await update_status(
                rt,
                namespace,
                name,
                lambda cur: lifecycle.failed_before_launch(cur, failure.reason, failure.message, now=rt.clock()),
                diffbase=diffbase,
            )
            return

    try:
        rayjob, created = await _ensure_children(rt, job, likely_new=first_launch)
    except KubeRayMissingError:  # removed between the check above and now
        await _wait_for_kuberay(rt, namespace, name)
    if created:
        res = job.spec.resources
        gpus = f"{res.gpus_per_worker} GPU(s) each" if res.gpus_per_worker else "CPU only"
        logger.info("%s/%s: created %s (%s worker(s), %s)", namespace, name, ", ".join(created), res.workers, gpus)
    # The status says Launching/RayJobCreated as soon as the RayJob exists (one write, not one before
    # and one after the children); the RayJob's own watch event then finds nothing to change.
    await follow_rayjob(rt, rayjob, deleted=False, unless_launched=True, diffbase=diffbase)


def _diffbase_written(rt: Runtime, namespace: str, name: str, diffbase: str) -> bool:
    cached = rt.jobs.get(namespace, name) or {}
    return CarriedDiffBase.written_in(cached.get("status") or {}) == diffbase


async def _ensure_children(rt: Runtime, job: FineTuneJob, *, likely_new: bool) -> tuple[dict[str, Any], list[str]]:
    """Get-or-create the job's children: (its RayJob as the server has it, "Kind name" of those created).

    The namespace's shared ServiceAccount comes first (one check for a whole burst of jobs), so the
    RayJob's pods never start without it.
    """
    await rt.accounts.ensure(rt.kube, build_service_account(job.metadata.namespace or "default", rt.settings))
    (rayjob,) = build_children(job, rt.settings)
    obj, created = await rt.kube.ensure(rayjob, likely_new=likely_new)
    return obj, [f"RayJob {rayjob['metadata']['name']}"] if created else []


async def _wait_for_kuberay(rt: Runtime, namespace: str, name: str) -> NoReturn:
    logger.error("%s/%s: cannot launch: %s", namespace, name, KUBERAY_MISSING)
    await update_status(
        rt, namespace, name, lambda cur: lifecycle.waiting(cur, "KubeRayNotInstalled", KUBERAY_MISSING, now=rt.clock())
    )
    raise kopf.TemporaryError(KUBERAY_MISSING, delay=rt.settings.kuberay_retry_seconds)


async def _preflight(rt: Runtime, job: FineTuneJob, *, retry: int) -> s3.PreflightFailure | None:
    namespace, name = job.metadata.namespace or "", job.metadata.name
    storage = job.spec.storage
    if not storage.credentials_secret:
        return None
    secret = await rt.kube.read_secret(namespace, storage.credentials_secret)
    credentials = s3.credentials_from_secret(storage.credentials_secret, namespace, secret)
    if isinstance(credentials, s3.PreflightFailure):
        return credentials
    datasets = {"spec.data.train": job.spec.data.train}
    if job.spec.data.validation:
        datasets["spec.data.validation"] = job.spec.data.validation
    check = functools.partial(
        s3.preflight,
        storage,
        checkpoint=job.spec.model.checkpoint,
        datasets=datasets,
        credentials=credentials,
        timeout=rt.settings.s3_timeout_seconds,
    )
    try:
        return await asyncio.get_running_loop().run_in_executor(PREFLIGHT_THREADS, check)
    except s3.TransientS3Error as exc:
        settings = rt.settings
        delay = min(settings.preflight_backoff_seconds * 2**retry, settings.preflight_backoff_max_seconds)
        message = f"{exc}; preflight retries in {delay:g}s"
        logger.warning("%s/%s: %s", namespace, name, message)
        await update_status(
            rt, namespace, name, lambda cur: lifecycle.waiting(cur, "StorageUnavailable", message, now=rt.clock())
        )
        raise kopf.TemporaryError(message, delay=delay) from exc


# -- following the RayJob --------------------------------------------------------------------------------


async def follow_rayjob(
    rt: Runtime,
    rayjob: dict[str, Any],
    *,
    deleted: bool,
    unless_launched: bool = False,
    diffbase: str | None = None,
) -> None:
    """Carry a RayJob's new state (or its deletion) into its FineTuneJob's status.

    `unless_launched`: only if the status does not name the RayJob yet. The launch passes the RayJob
    its create returned, which the RayJob watch may already have followed past: from then on the
    watch alone, whose events come in order, moves the status. `diffbase`: see `update_status`.
    """
    namespace, rayjob_name = _ref(rayjob)
    owner = lifecycle.owner_job_name(rayjob)
    if owner is None:
        return
    owner_uid = next(
        (
            ref.get("uid")
            for ref in (rayjob.get("metadata") or {}).get("ownerReferences") or []
            if ref.get("controller")
        ),
        None,
    )

    def compute(job: dict[str, Any]) -> StatusChange:
        if owner_uid and (job.get("metadata") or {}).get("uid") != owner_uid:
            return NO_CHANGE  # a RayJob left over from an earlier job of the same name
        if unless_launched and lifecycle.is_launched(job):
            return NO_CHANGE
        if deleted:
            return lifecycle.rayjob_deleted(job, rayjob_name, now=rt.clock())
        return lifecycle.follow_rayjob(job, rayjob, now=rt.clock())

    await update_status(rt, namespace, owner, compute, diffbase=diffbase)


# -- spec edits ------------------------------------------------------------------------------------------


async def apply_spec_change(rt: Runtime, body: dict[str, Any], diff: Any) -> None:
    """Apply what may change after launch (suspend, TTL); refuse, with a condition and an Event, the rest."""
    namespace, name = _ref(body)
    fields = lifecycle.changed_spec_fields(diff)
    if not fields:
        return
    refused = [f for f in fields if not lifecycle.is_mutable(f)]
    if lifecycle.is_finished(body):
        if refused:
            logger.warning("%s/%s: refused a change of %s: the job has finished", namespace, name, ", ".join(refused))
            await update_status(
                rt, namespace, name, lambda cur: lifecycle.refuse_spec_change(cur, refused, now=rt.clock())
            )
        else:
            await update_status(rt, namespace, name, lifecycle.observe_generation)
        return
    rayjob = await rt.kube.get_rayjob(namespace, name)
    if rayjob is None:
        return  # not launched yet: the launch handler, still retrying, reads the new spec

    launched_digest = ((rayjob.get("metadata") or {}).get("annotations") or {}).get(SPEC_DIGEST_ANNOTATION)
    try:
        digest: str | None = spec_digest(FineTuneJob.from_body(body))
    except ValidationError:
        digest = None
    if launched_digest and digest == launched_digest:
        await update_status(rt, namespace, name, lambda cur: lifecycle.accept_spec(cur, now=rt.clock()))
    elif refused:
        logger.warning("%s/%s: refused a change of %s while the job runs", namespace, name, ", ".join(refused))
        await update_status(rt, namespace, name, lambda cur: lifecycle.refuse_spec_change(cur, refused, now=rt.clock()))

    if "spec.runPolicy.suspend" in fields:
        suspend = bool(lifecycle.run_policy(body).get("suspend"))
        await rt.kube.set_rayjob_suspend(namespace, name, suspend)
        logger.info("%s/%s: %s RayJob %s", namespace, name, "suspended" if suspend else "resumed", name)
        current = await rt.kube.get_rayjob(namespace, name)
        if current is not None:
            await follow_rayjob(rt, current, deleted=False)


# -- every job event: hooks and expiry -------------------------------------------------------------------


async def observe_job(rt: Runtime, event_type: str | None, body: dict[str, Any]) -> None:
    """Tell the hooks about the job, and keep its TTL timer in step with its status."""
    meta = body.get("metadata") or {}
    namespace, name = _ref(body)
    uid = str(meta.get("uid") or f"{namespace}/{name}")
    if event_type == "DELETED":
        rt.expiry.cancel(uid)
        rt.forget(namespace, name)
        rt.hooks.deleted(namespace, name)
        return
    rt.jobs.seen(namespace, name, body)
    rt.hooks.observed(meta, body.get("status") or {})
    delay = lifecycle.expiry_delay(body, now=rt.clock())
    if delay is None or meta.get("deletionTimestamp"):
        rt.expiry.cancel(uid)
        return
    ttl = lifecycle.run_policy(body).get("ttlSecondsAfterFinished")

    async def expire() -> None:
        if await rt.kube.delete_job(namespace, name, uid):
            logger.info("%s/%s: deleted: finished %ss ago (ttlSecondsAfterFinished)", namespace, name, ttl)

    rt.expiry.schedule(uid, delay, expire)


async def check_kuberay(rt: Runtime) -> bool:
    """Say at startup, loudly, when KubeRay is missing: no job can launch until it is installed."""
    try:
        installed = await rt.kube.kuberay_installed()
    except Exception as exc:  # the API may be briefly unreachable; jobs check again themselves
        logger.warning("Could not check for KubeRay at startup: %s", exc)
        return False
    if installed:
        logger.info("KubeRay found: ray.io/v1 RayJobs are served")
    else:
        logger.error("%s. FineTuneJobs wait with condition Launched=False, reason KubeRayNotInstalled", KUBERAY_MISSING)
    return installed
