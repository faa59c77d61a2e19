"""The operator's steps: launch a job, follow its RayJob, apply or refuse spec edits, keep its timers.

Each step takes the job as the handler received and parsed it (`incoming.JobRecord`), asks `lifecycle`
(pure) what the status should become, and has the runtime's `StatusWriter` write that (one job at a
time, from the job as last seen); kopf's handlers in `handlers.py` only call these. Every step may run
again with the same job: the children are get-or-create, and a status already saying it writes nothing.
"""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Iterable
from typing import Any, NoReturn

import kopf

from kubetune_operator import allowlist, lifecycle, s3
from kubetune_operator.builders import (
    SPEC_DIGEST_ANNOTATION,
    build_children,
    build_ray_token_secret,
    build_service_account,
    new_ray_token,
    spec_digest,
)
from kubetune_operator.incoming import InvalidJob, JobMeta, JobRecord
from kubetune_operator.kube import KubeRayMissingError, SecretNotReadableError
from kubetune_operator.lifecycle import NO_CHANGE, StatusChange
from kubetune_operator.pod_additions import service_account_name
from kubetune_operator.pod_names import HEAD
from kubetune_operator.retention import SHUTDOWN_PATCH, left_by_the_rules, suspend_patch
from kubetune_operator.runtime import Runtime
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.spec import FineTuneJob, RunPolicy, Workers
from kubetune_operator.states import Phase, Reason
from kubetune_operator.status_writer import Compute
from kubetune_trainer.config import StorageSpec, expand_braces

logger = logging.getLogger("kubetune_operator")

KUBERAY_MISSING = (
    "KubeRay is not installed: this cluster serves no ray.io/v1 RayJobs. Install the KubeRay operator "
    "(https://docs.ray.io/en/latest/cluster/kubernetes/getting-started/kuberay-operator-installation.html); "
    "the job launches once it is there"
)
# A progress check runs this long after its deadline: status times are whole seconds.
PROGRESS_CHECK_MARGIN_SECONDS = 0.1


# -- launch ----------------------------------------------------------------------------------------------


async def launch(rt: Runtime, job: JobRecord, *, retry: int = 0) -> None:
    """Launch a job, on create and on operator restart: validate → KubeRay → preflight → children → status.

    Safe to run any number of times: a finished job is left alone, an invalid one fails once, and a
    job whose RayJob exists skips preflight and only recreates children that are missing.
    """
    if rt.status.launched_already(job) or lifecycle.is_finished(job):
        return
    if isinstance(job.job, InvalidJob):
        await _refuse_invalid_spec(rt, job.meta, job.job)
        return
    spec = job.job
    refusal = None if lifecycle.is_launched(job) else _not_allowed(rt, spec)
    if refusal is not None:
        # Before any request on the job's behalf: its Secret is not read, its endpoint never asked.
        await _refuse(rt, job.meta, *refusal)
        return
    if not await rt.kube.kuberay_installed():
        await _wait_for_kuberay(rt, job.meta)
    first_launch = await _is_first_launch(rt, job, spec)
    if first_launch and not await _preflight_passes(rt, job.meta, spec, retry=retry):
        return
    note = _preflight_note(rt, job.meta, spec) if first_launch else None
    # Taken after the preflight, which has its own slots per namespace (fair between namespaces).
    async with rt.launch_slots:
        await _launch_children(rt, job, spec, first_launch=first_launch, note=note)


async def _launch_children(
    rt: Runtime, job: JobRecord, spec: FineTuneJob, *, first_launch: bool, note: str | None
) -> None:
    rayjob = await _ensure_children(rt, job.meta, spec, likely_new=first_launch)
    if not lifecycle.belongs_to(rayjob, job.meta.uid):
        await _wait_for_previous_rayjob(rt, job.meta, rayjob)
    # The status says Launching/RayJobCreated as soon as the RayJob exists (one write, not one before
    # and one after the children); the RayJob's own watch event then finds nothing to change.
    found = _rayjob_change(rt, rayjob, deleted=False, unless_launched=True)
    if found is not None:
        namespace, name, compute = found
        await rt.status.update(namespace, name, _with_status(compute, preflight=note), ends_launch=True)


def preflight_skipped_message(spec: FineTuneJob, settings: OperatorSettings) -> str:
    """Why S3 was not checked before launch: the pods' identity is not the operator's."""
    account = service_account_name(spec, HEAD, settings.trainer_service_account)
    return (
        "Skipped: spec.storage.credentialsSecret is not set, so the pods read S3 as ServiceAccount "
        f"{account} (its cloud identity: IRSA, GKE workload identity), which the operator cannot check as; a "
        "missing checkpoint or dataset, or denied access, shows once the trainer starts"
    )


def _preflight_note(rt: Runtime, meta: JobMeta, spec: FineTuneJob) -> str | None:
    """What status.preflight says after a first launch without credentialsSecret: skipped, and why."""
    if spec.spec.storage.credentials_secret:
        return None
    message = preflight_skipped_message(spec, rt.settings)
    logger.info("%s: %s", meta.source, message)
    return message


def _with_status(compute: Compute, **fields: str | None) -> Compute:
    """`compute`, whose status patch (if it writes one) also sets `fields` (those not None), in the same write."""
    extra = {key: value for key, value in fields.items() if value is not None}

    def computed(job: JobRecord) -> StatusChange:
        change = compute(job)
        # Written even when the RayJob's watch event moved the phase first (the change is then empty).
        missing = {key: value for key, value in extra.items() if job.status.get(key) != value}
        if not missing:
            return change
        return dataclasses.replace(change, patch={**change.patch, **missing})

    return computed


async def _refuse_invalid_spec(rt: Runtime, meta: JobMeta, invalid: InvalidJob) -> None:
    if await rt.kube.get_rayjob(meta.namespace, meta.name) is not None:
        # Edited past the CRD's checks after launch: the run keeps the spec it was launched with.
        logger.warning("%s: the spec is invalid now; its RayJob runs on unchanged: %s", meta.source, invalid.message)
        return
    await _refuse(rt, meta, Reason.INVALID_SPEC, invalid.message)


def _not_allowed(rt: Runtime, spec: FineTuneJob) -> tuple[Reason, str] | None:
    """The reason and message when the job names an S3 endpoint or an image the operator may not use."""
    settings = rt.settings
    message = allowlist.endpoint_refusal(spec.spec.storage.endpoint, settings.s3_endpoint_entries())
    if message is not None:
        return Reason.ENDPOINT_NOT_ALLOWED, message
    message = allowlist.image_refusal(spec.spec.image, settings.trainer_image, settings.allowed_image_registries)
    return (Reason.IMAGE_NOT_ALLOWED, message) if message is not None else None


async def _refuse(rt: Runtime, meta: JobMeta, reason: Reason, message: str) -> None:
    """Fail a job that can never launch as written (not retried)."""
    logger.warning("%s: not launched: %s", meta.source, message)
    await rt.status.update(
        meta.namespace,
        meta.name,
        lambda cur: lifecycle.failed_before_launch(cur, reason, message, now=rt.clock()),
        ends_launch=True,
    )


async def _is_first_launch(rt: Runtime, job: JobRecord, spec: FineTuneJob) -> bool:
    """Whether the job's RayJob is yet to be made (then preflight runs, and the create goes first)."""
    if spec.spec.storage.credentials_secret or lifecycle.is_launched(job):
        # Whether the RayJob exists decides whether to preflight; a launched job (resumed by a
        # restarted operator) reads its children rather than trying to create them again.
        return await rt.kube.get_rayjob(job.meta.namespace, job.meta.name) is None
    # A new job without preflight: create at once; a child already there answers 409 and is kept.
    return True


async def _ensure_children(rt: Runtime, meta: JobMeta, spec: FineTuneJob, *, likely_new: bool) -> dict[str, Any]:
    """Get-or-create the job's children; its RayJob as the server has it.

    The namespace's shared ServiceAccount comes first (one check for a whole burst of jobs), so the
    RayJob's pods never start without it.
    """
    await rt.accounts.ensure(rt.kube, build_service_account(meta.namespace or "default", rt.settings))
    # The Ray token first (a fresh one, kept only if no Secret is there yet), then the NetworkPolicy:
    # the RayJob's pods and KubeRay's submission need the one, and should never run without the other.
    await _ensure_owned(rt, meta, build_ray_token_secret(spec, new_ray_token()), likely_new=likely_new)
    *guards, rayjob = build_children(spec, rt.settings)
    for guard in guards:
        await _ensure_owned(rt, meta, guard, likely_new=likely_new)
    try:
        obj, created = await rt.kube.ensure(rayjob, likely_new=likely_new)
    except KubeRayMissingError:  # removed between the check and now
        await _wait_for_kuberay(rt, meta)
    if created:
        res = spec.spec.resources
        gpus = f"{res.gpus_per_worker} GPU(s) each" if res.gpus_per_worker else "CPU only"
        logger.info(
            "%s: created RayJob %s (%s worker(s), %s)",
            meta.source,
            rayjob["metadata"]["name"],
            _count(spec.spec.cluster_workers),
            gpus,
        )
    return obj


def _count(workers: Workers) -> str:
    return str(workers.min) if not workers.elastic else f"{workers.min}-{workers.max}"


async def _ensure_owned(rt: Runtime, meta: JobMeta, obj: dict[str, Any], *, likely_new: bool) -> None:
    """Get-or-create one of the job's own objects (never logged: a Secret's data comes back too); one
    that is there and not the job's (an earlier job of this name, still being deleted; one made by hand)
    keeps the job Pending until it is gone."""
    kind, name = obj["kind"], obj["metadata"]["name"]
    found, created = await rt.kube.ensure(obj, likely_new=likely_new)
    if created:
        logger.info("%s: created %s %s", meta.source, kind, name)
        return
    if meta.uid and lifecycle.owner_uid(found) != meta.uid:
        message = lifecycle.previous_owner_message(meta.namespace, {**found, "kind": kind})
        logger.warning("%s: cannot launch yet: %s", meta.source, message)
        delay = rt.settings.previous_rayjob_retry_seconds
        await _wait(rt, meta, Reason.PREVIOUS_CHILD_STILL_EXISTS, message, delay=delay)


async def _wait_for_kuberay(rt: Runtime, meta: JobMeta) -> NoReturn:
    logger.error("%s: cannot launch: %s", meta.source, KUBERAY_MISSING)
    await _wait(rt, meta, Reason.KUBERAY_NOT_INSTALLED, KUBERAY_MISSING, delay=rt.settings.kuberay_retry_seconds)


async def _wait_for_previous_rayjob(rt: Runtime, meta: JobMeta, rayjob: dict[str, Any]) -> NoReturn:
    """Another job's RayJob holds the name: say so, and launch again once it is gone (a retry)."""
    message = lifecycle.previous_owner_message(meta.namespace, rayjob)
    logger.warning("%s: cannot launch yet: %s", meta.source, message)
    await _wait(rt, meta, Reason.PREVIOUS_RAYJOB_STILL_EXISTS, message, delay=rt.settings.previous_rayjob_retry_seconds)


async def _wait(rt: Runtime, meta: JobMeta, reason: Reason, message: str, *, delay: float) -> NoReturn:
    """The job cannot launch yet: Pending for `reason`, and the launch runs again after `delay` seconds."""
    await rt.status.update(
        meta.namespace, meta.name, lambda cur: lifecycle.waiting(cur, reason, message, now=rt.clock())
    )
    raise kopf.TemporaryError(message, delay=delay)


async def _preflight_passes(rt: Runtime, meta: JobMeta, spec: FineTuneJob, *, retry: int) -> bool:
    """Check the job's S3 inputs; on a failure, fail the job saying why. Raises kopf.TemporaryError to
    retry when S3 does not answer."""
    failure = await _preflight(rt, meta, spec, retry=retry)
    if failure is None:
        return True
    logger.warning("%s: preflight failed (%s): %s", meta.source, failure.reason, failure.message)
    await rt.status.update(
        meta.namespace,
        meta.name,
        lambda cur: lifecycle.failed_before_launch(cur, failure.reason, failure.message, now=rt.clock()),
        ends_launch=True,
    )
    return False


async def _preflight(rt: Runtime, meta: JobMeta, spec: FineTuneJob, *, retry: int) -> s3.PreflightFailure | None:
    credentials = await _credentials(rt, meta, spec)
    if not isinstance(credentials, s3.Credentials):
        return credentials
    ca_bundle = await _read_ca_bundle(rt, meta, spec.spec.storage)
    if isinstance(ca_bundle, s3.PreflightFailure):
        return ca_bundle
    data = spec.spec.data
    # A webdataset is probed by its first shard, a manifest by its file, the other layouts by their prefix.
    first = (lambda uri: expand_braces(uri)[0]) if data.format == "webdataset" else (lambda uri: uri)
    datasets = {
        f"spec.data.{part}": first(uri) for part, uri in (("train", data.train), ("validation", data.validation)) if uri
    }
    settings = rt.settings
    try:
        async with rt.preflight_slots.hold(meta.namespace):
            return await s3.preflight(
                spec.spec.storage,
                checkpoint=spec.spec.model.checkpoint,
                datasets=datasets,
                data_files=data.format in ("webdataset", "manifest"),
                credentials=credentials,
                timeout=settings.s3_timeout_seconds,
                deadline=settings.preflight_deadline_seconds,
                ca_bundle=ca_bundle,
            )
    except s3.TransientS3Error as exc:
        delay = min(settings.preflight_backoff_seconds * 2**retry, settings.preflight_backoff_max_seconds)
        message = f"{exc}; preflight retries in {delay:g}s"
        logger.warning("%s: %s", meta.source, message)
        await rt.status.update(
            meta.namespace,
            meta.name,
            lambda cur: lifecycle.waiting(cur, Reason.STORAGE_UNAVAILABLE, message, now=rt.clock()),
        )
        raise kopf.TemporaryError(message, delay=delay) from exc


async def _credentials(rt: Runtime, meta: JobMeta, spec: FineTuneJob) -> s3.Credentials | s3.PreflightFailure | None:
    """The keys preflight checks S3 with, why the job fails instead, or None: no preflight.

    Without spec.storage.credentialsSecret the pods use their own cloud identity (IRSA, workload identity),
    which the operator does not have: a check with the operator's identity proves nothing. Where RBAC does
    not let the operator read Secrets, the status says preflight was skipped.
    """
    name = spec.spec.storage.credentials_secret
    if not name:
        return None
    try:
        secret = await rt.kube.read_secret(meta.namespace, name)
    except SecretNotReadableError:
        logger.warning("%s: preflight skipped: RBAC does not let the operator read Secrets here", meta.source)
        await rt.status.update(
            meta.namespace, meta.name, lambda cur: lifecycle.preflight_skipped(cur, name, now=rt.clock())
        )
        return None
    return s3.credentials_from_secret(name, meta.namespace, secret)


async def _read_ca_bundle(rt: Runtime, meta: JobMeta, storage: StorageSpec) -> str | s3.PreflightFailure | None:
    """spec.storage.caBundle's certificates, for preflight to trust the endpoint as the trainer will."""
    if storage.ca_bundle is None:
        return None
    ref = storage.ca_bundle
    pem = await rt.kube.read_config_map_key(meta.namespace, ref.config_map, ref.key)
    problem = s3.ca_bundle_problem(pem)
    if problem:
        message = f"spec.storage.caBundle: key {ref.key} of ConfigMap {meta.namespace}/{ref.config_map} {problem}"
        return s3.PreflightFailure(Reason.CA_BUNDLE_NOT_FOUND, message)
    return pem


# -- following the RayJob --------------------------------------------------------------------------------


async def follow_rayjob(rt: Runtime, rayjob: dict[str, Any], *, deleted: bool) -> None:
    """Carry a RayJob's new state (or its deletion) into its FineTuneJob's status."""
    found = _rayjob_change(rt, rayjob, deleted=deleted)
    if found is not None:
        # The job's own RayJob exists, so its launch is done: when this event's write comes before the
        # launch's own (a busy operator), it carries kopf's diff base instead, and kopf writes nothing.
        namespace, name, compute = found
        await rt.status.update(namespace, name, _noting_skipped_preflight(rt, compute), ends_launch=not deleted)
        if not deleted and left_by_the_rules(rayjob):
            rayjob_name = str(rayjob["metadata"]["name"])
            await rt.kube.patch_rayjob(namespace, rayjob_name, SHUTDOWN_PATCH)
            logger.info(
                "%s/%s: the Ray job was stopped: RayJob %s shuts its cluster down", namespace, name, rayjob_name
            )


def _noting_skipped_preflight(rt: Runtime, compute: Compute) -> Compute:
    """`compute`, whose write also says why preflight was skipped when the launch's own write has yet to:
    the first write of a launch carries everything it says (one write per new job)."""

    def computed(job: JobRecord) -> StatusChange:
        change = compute(job)
        spec = job.job
        if not change.patch or isinstance(spec, InvalidJob) or job.status.get("preflight"):
            return change
        if spec.spec.storage.credentials_secret:
            return change
        return dataclasses.replace(
            change, patch={**change.patch, "preflight": preflight_skipped_message(spec, rt.settings)}
        )

    return computed


def _rayjob_change(
    rt: Runtime, rayjob: dict[str, Any], *, deleted: bool, unless_launched: bool = False
) -> tuple[str, str, Compute] | None:
    """(namespace, job name, the status change) a RayJob's state makes to the job that owns it; None if none.

    `unless_launched`: only if the status does not name the RayJob yet. The launch passes the RayJob
    its create returned, which the RayJob watch may already have followed past: from then on the
    watch alone, whose events come in order, moves the status.
    """
    owner = lifecycle.owner_job_name(rayjob)
    if owner is None:
        return None
    meta = rayjob.get("metadata") or {}
    rayjob_name = str(meta.get("name") or "")

    def compute(job: JobRecord) -> StatusChange:
        if not lifecycle.belongs_to(rayjob, job.meta.uid):
            return NO_CHANGE  # left over from an earlier job of the same name, or orphaned
        if unless_launched and lifecycle.is_launched(job):
            return NO_CHANGE
        if deleted:
            return lifecycle.rayjob_deleted(job, rayjob_name, now=rt.clock())
        return lifecycle.follow_rayjob(job, rayjob, now=rt.clock())

    return str(meta.get("namespace") or ""), owner, compute


# -- spec edits ------------------------------------------------------------------------------------------


async def apply_spec_change(rt: Runtime, job: JobRecord, diff: Iterable[tuple[Any, ...]]) -> None:
    """A spec edit: apply what may change after launch (suspend, TTL), refuse the rest."""
    fields = lifecycle.changed_spec_fields(diff)
    if not fields:
        return
    refused = [f for f in fields if not lifecycle.is_mutable(f)]
    meta = job.meta
    if lifecycle.is_finished(job):
        if refused:
            logger.warning("%s: refused a change of %s: the job has finished", meta.source, ", ".join(refused))
            await rt.status.update(
                meta.namespace, meta.name, lambda cur: lifecycle.refuse_spec_change(cur, refused, now=rt.clock())
            )
        else:
            await rt.status.update(meta.namespace, meta.name, lifecycle.observe_generation)
        return
    rayjob = await rt.kube.get_rayjob(meta.namespace, meta.name)
    if rayjob is None:
        return  # not launched yet: the launch handler, still retrying, reads the new spec
    await _refuse_or_accept(rt, job, rayjob, refused)
    if "spec.runPolicy.suspend" in fields:
        await _suspend_or_resume(rt, meta, job.run_policy, elastic=job.elastic)


async def _refuse_or_accept(rt: Runtime, job: JobRecord, rayjob: dict[str, Any], refused: list[str]) -> None:
    """The spec matches the run again (its digest is the RayJob's): accept; else refuse what changed."""
    meta = job.meta
    launched_digest = ((rayjob.get("metadata") or {}).get("annotations") or {}).get(SPEC_DIGEST_ANNOTATION)
    digest = spec_digest(job.job) if isinstance(job.job, FineTuneJob) else None
    if launched_digest and digest == launched_digest:
        await rt.status.update(meta.namespace, meta.name, lambda cur: lifecycle.accept_spec(cur, now=rt.clock()))
    elif refused:
        logger.warning("%s: refused a change of %s while the job runs", meta.source, ", ".join(refused))
        await rt.status.update(
            meta.namespace, meta.name, lambda cur: lifecycle.refuse_spec_change(cur, refused, now=rt.clock())
        )


async def _suspend_or_resume(rt: Runtime, meta: JobMeta, policy: RunPolicy, *, elastic: bool) -> None:
    suspend = policy.suspend
    # What KubeRay deletes at the run's end changes too: it suspends no RayJob that has deletion rules.
    await rt.kube.patch_rayjob(meta.namespace, meta.name, suspend_patch(policy, rt.settings, elastic=elastic))
    logger.info("%s: %s RayJob %s", meta.source, "suspended" if suspend else "resumed", meta.name)
    current = await rt.kube.get_rayjob(meta.namespace, meta.name)
    if current is not None:
        await follow_rayjob(rt, current, deleted=False)


# -- every job event: hooks, expiry and progress checks --------------------------------------------------


async def observe_job(rt: Runtime, event_type: str | None, job: JobRecord) -> None:
    """Remember the job, tell the hooks, and keep its TTL timer and progress check in step with its status."""
    meta = job.meta
    uid = meta.uid or meta.source
    if event_type == "DELETED":
        rt.forget(meta.namespace, meta.name, uid)
        return
    rt.status.seen(job)
    rt.hooks.observed(meta.metadata(), job.status)
    _schedule_expiry(rt, job, uid)
    await _check_progress(rt, job, uid)


def _schedule_expiry(rt: Runtime, job: JobRecord, uid: str) -> None:
    meta = job.meta
    delay = lifecycle.expiry_delay(job, now=rt.clock())
    if delay is None or meta.deleting:
        rt.expiry.cancel(uid)
        return
    ttl = job.run_policy.ttl_seconds_after_finished

    async def expire() -> None:
        if await rt.kube.delete_job(meta.namespace, meta.name, uid):
            logger.info("%s: deleted: finished %ss ago (ttlSecondsAfterFinished)", meta.source, ttl)

    rt.expiry.schedule(uid, delay, expire)


async def _check_progress(rt: Runtime, job: JobRecord, uid: str) -> None:
    """Set ProgressReporting when progress arrives, or when it should have; time the next check.

    Only when jobs are given a progress target (settings.progress_base_url): without one, none reports.
    """
    meta = job.meta
    if not rt.settings.progress_base_url or meta.deleting or lifecycle.phase_of(job) != Phase.RUNNING:
        # Judged while Running only; a job turning Running shows so in a later watch event.
        rt.progress_checks.cancel(uid)
        return
    grace = rt.settings.progress_grace_seconds

    def compute(current: JobRecord) -> StatusChange:
        return lifecycle.progress_reporting(current, now=rt.clock(), grace=grace)

    current = await rt.status.current(meta.namespace, meta.name)
    if current is not None and compute(current):
        await rt.status.update(meta.namespace, meta.name, compute)
        current = await rt.status.current(meta.namespace, meta.name)
    due = lifecycle.progress_deadline(current, grace=grace) if current is not None else None
    if due is None:
        rt.progress_checks.cancel(uid)
        return

    async def check() -> None:
        await rt.status.update(meta.namespace, meta.name, compute)

    delay = max((due - rt.clock()).total_seconds(), 0.0) + PROGRESS_CHECK_MARGIN_SECONDS
    rt.progress_checks.schedule(uid, delay, check)


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
