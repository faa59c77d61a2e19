"""Every Kubernetes API call the operator makes itself (kopf's own watching and patching aside).

One small async client over the official `kubernetes` library (its blocking calls run in threads), so
the RBAC the operator needs is read off this file: FineTuneJobs get/delete, their status patch; RayJobs
get/create/patch; ServiceAccounts get/create; Secrets get (preflight) and get/create (each job's Ray
token); NetworkPolicies get/create; Events create (the progress endpoint's); API discovery of ray.io/v1.
Events go through kopf (`kopf.event`), which creates core/v1 Events, inside kopf's handlers; outside them
(the progress endpoint) `create_event` creates the same kind of Event itself. `login` gives kopf the
same credentials the client uses.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import concurrent.futures
import functools
import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from datetime import UTC, datetime
from typing import Any, cast

import kopf
import urllib3
from kubernetes import client, config
from kubernetes.client.exceptions import ApiException

from kubetune_operator.builders import RAYJOB_API_VERSION, RAYJOB_KIND
from kubetune_operator.lifecycle import Event
from kubetune_operator.spec import GROUP, PLURAL, VERSION

logger = logging.getLogger(__name__)

RAY_GROUP, RAY_VERSION = RAYJOB_API_VERSION.split("/")
RAY_PLURAL = "rayjobs"
# Calls that failed for a reason that usually passes (API server busy or restarting) are tried again.
RETRY_DELAYS = (0.5, 2.0)
TRANSIENT_STATUSES = frozenset({429, 500, 502, 503, 504})
# How long a positive KubeRay discovery is trusted: a burst of new jobs asks once, not once per job. A
# RayJob create answered 404 (KubeRay removed meanwhile) forgets it at once.
KUBERAY_SEEN_SECONDS = 30.0
DEFAULT_KUBECONFIG = "~/.kube/config"
KUBE_THREADS = 16  # API calls in flight at once
# The "From" of the operator's Events (kopf's settings.posting.reporting_component, main.py).
REPORTING_COMPONENT = "kubetune-operator"
# Every API call the operator makes itself (and each TokenReview) gives up after this: (connect, read)
# seconds. Without it a call to an API server that stopped answering would hold its thread for ever.
REQUEST_TIMEOUT = (5.0, 30.0)


def client_configuration(kubeconfig: str | None = None) -> client.Configuration:
    """Credentials as kubectl finds them: `kubeconfig` if given, else in-cluster, else $KUBECONFIG or ~/.kube/config.

    $KUBECONFIG is read now. The kubernetes library's own default is $KUBECONFIG as it was when the
    library was first imported, which is stale in a process that set it later (an embedding test, the
    demo): kopf's `login_via_client` then loads ~/.kube/config and retries its login forever.
    Raises `kubernetes.config.ConfigException` when there are no credentials.
    """
    configuration = client.Configuration()
    if kubeconfig is None:
        try:
            config.load_incluster_config(client_configuration=configuration)
            return configuration
        except config.ConfigException:
            kubeconfig = os.environ.get("KUBECONFIG") or DEFAULT_KUBECONFIG
    config.load_kube_config(config_file=kubeconfig, client_configuration=configuration)
    return configuration


def connection_info(configuration: client.Configuration, *, trust_env: bool = False) -> kopf.ConnectionInfo:
    """kopf's credentials from a client configuration (what kopf's `login_via_client` extracts)."""
    # kubernetes >= 36.0.1 keeps the token under BearerToken, older versions under authorization;
    # get_api_key_with_prefix runs the refresh hook of in-cluster and auth-provider tokens.
    header = configuration.get_api_key_with_prefix("BearerToken") or configuration.get_api_key_with_prefix(
        "authorization"
    )
    scheme, _, token = (header or "").strip().rpartition(" ")
    return kopf.ConnectionInfo(
        server=configuration.host,
        ca_path=configuration.ssl_ca_cert,
        insecure=not configuration.verify_ssl,
        username=configuration.username or None,
        password=configuration.password or None,
        scheme=scheme or None,
        token=token or None,
        certificate_path=configuration.cert_file,
        private_key_path=configuration.key_file,
        trust_env=trust_env,
    )


def login(*, settings: kopf.OperatorSettings | None = None, **_: Any) -> kopf.ConnectionInfo:
    """kopf's login handler: the credentials `client_configuration()` finds at the time kopf logs in."""
    try:
        configuration = client_configuration()
    except config.ConfigException as exc:
        raise kopf.LoginError(
            f"No Kubernetes credentials: not in a cluster, and no usable kubeconfig "
            f"({os.environ.get('KUBECONFIG') or DEFAULT_KUBECONFIG}): {exc}"
        ) from exc
    return connection_info(configuration, trust_env=bool(settings and settings.networking.trust_env))


class KubeRayMissingError(Exception):
    """The ray.io/v1 RayJob API does not exist in this cluster: KubeRay is not installed."""


class SecretNotReadableError(Exception):
    """RBAC does not let the operator read this Secret (the chart grants it per namespace, on request)."""


def is_transient(exc: BaseException) -> bool:
    if isinstance(exc, ApiException):
        return exc.status in TRANSIENT_STATUSES or exc.status == 0
    return isinstance(exc, urllib3.exceptions.HTTPError | ConnectionError | TimeoutError)


def pooled(configuration: client.Configuration, threads: int = KUBE_THREADS) -> client.Configuration:
    """Keep one connection per calling thread: the library's default pool (5 per CPU) is smaller than
    `Kube`'s thread pool, so under load it closed connections and opened new ones for every call."""
    configuration.connection_pool_maxsize = max(configuration.connection_pool_maxsize or 0, threads)
    return configuration


def _call_and_decode(fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
    """One blocking API call and its decoded JSON answer, all in the calling thread.

    Reading the body here (not in the event loop) hands the connection back to the pool as soon as
    the answer is in: read later, the thread's next call found the pool empty and opened a connection.
    """
    response = fn(*args, _preload_content=False, **kwargs)
    data = response.data
    decoded: dict[str, Any] = json.loads(data) if data else {}
    return decoded


def is_not_found(exc: BaseException) -> bool:
    return isinstance(exc, ApiException) and exc.status == 404


class Kube:
    """The operator's Kubernetes client; every method is safe to call again with the same arguments."""

    def __init__(
        self,
        api_client: client.ApiClient,
        *,
        threads: int = KUBE_THREADS,
        request_timeout: tuple[float, float] = REQUEST_TIMEOUT,
    ) -> None:
        self.api_client = api_client
        self.request_timeout = request_timeout
        self.core = client.CoreV1Api(api_client)
        self.custom = client.CustomObjectsApi(api_client)
        self.networking = client.NetworkingV1Api(api_client)
        self._kuberay_seen_at: float | None = None
        # Threads of its own: slow S3 checks or other blocking work never queue the API calls.
        self._executor = concurrent.futures.ThreadPoolExecutor(threads, thread_name_prefix="kubetune-kube")

    @classmethod
    def from_environment(cls, kubeconfig: str | None = None) -> Kube:
        """A client with the credentials `client_configuration(kubeconfig)` finds (as kubectl would)."""
        return cls(client.ApiClient(pooled(client_configuration(kubeconfig))))

    @classmethod
    def for_server(cls, url: str) -> Kube:
        """A client of an unauthenticated API server at `url` (tests, local emulators)."""
        configuration = client.Configuration()
        configuration.host = url.rstrip("/")
        return cls(client.ApiClient(pooled(configuration)))

    def close(self) -> None:
        self._executor.shutdown(wait=False, cancel_futures=True)
        self.api_client.close()

    async def _call(self, fn: Callable[..., Any], *args: Any, **kwargs: Any) -> dict[str, Any]:
        """Run one blocking API call in a thread; the decoded JSON answer."""
        for delay in (*RETRY_DELAYS, None):
            try:
                call = functools.partial(_call_and_decode, fn, *args, _request_timeout=self.request_timeout, **kwargs)
                return await asyncio.get_running_loop().run_in_executor(self._executor, call)
            except Exception as exc:
                if delay is None or not is_transient(exc):
                    raise
                logger.debug("Kubernetes API call %s failed (%s); retrying in %.1fs", fn.__name__, exc, delay)
                await asyncio.sleep(delay)
        raise AssertionError("unreachable")

    async def _read_or_none(self, fn: Callable[..., Any], *args: Any) -> dict[str, Any] | None:
        try:
            return await self._call(fn, *args)
        except ApiException as exc:
            if exc.status == 404:
                return None
            raise

    # -- FineTuneJobs ------------------------------------------------------------------------------------

    async def get_job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read_or_none(
            self.custom.get_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name
        )

    async def patch_job_status(self, namespace: str, name: str, status: Mapping[str, Any]) -> None:
        """Merge `status` into the job's status subresource (lists, e.g. conditions, are replaced whole)."""
        body = {"status": dict(status)}
        await self._call(
            self.custom.patch_namespaced_custom_object_status, GROUP, VERSION, namespace, PLURAL, name, body
        )

    async def delete_job(self, namespace: str, name: str, uid: str) -> bool:
        """Delete the job if it is still the one with `uid` (not a namesake created since); whether it was."""
        options = {"preconditions": {"uid": uid}, "propagationPolicy": "Background"}
        try:
            await self._call(
                self.custom.delete_namespaced_custom_object, GROUP, VERSION, namespace, PLURAL, name, body=options
            )
        except ApiException as exc:
            if exc.status in (404, 409):
                return False
            raise
        return True

    # -- the job's children ------------------------------------------------------------------------------

    async def kuberay_installed(self) -> bool:
        """Whether the API server serves ray.io/v1 rayjobs (discovery; needs no RBAC).

        A positive answer is reused for KUBERAY_SEEN_SECONDS; a negative one never is, so jobs waiting
        for KubeRay notice it as soon as it is installed.
        """
        seen = self._kuberay_seen_at
        if seen is not None and time.monotonic() - seen < KUBERAY_SEEN_SECONDS:
            return True
        try:
            found = await self._call(self.custom.get_api_resources, RAY_GROUP, RAY_VERSION)
        except ApiException as exc:
            if exc.status == 404:
                self._kuberay_seen_at = None
                return False
            raise
        installed = any(item.get("name") == RAY_PLURAL for item in found.get("resources") or [])
        self._kuberay_seen_at = time.monotonic() if installed else None
        return installed

    async def get_rayjob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return await self._read_or_none(
            self.custom.get_namespaced_custom_object, RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name
        )

    async def patch_rayjob(self, namespace: str, name: str, body: Mapping[str, Any]) -> bool:
        """A merge patch of a RayJob (retention.suspend_patch, SHUTDOWN_PATCH); False if it is gone."""
        try:
            await self._call(
                self.custom.patch_namespaced_custom_object, RAY_GROUP, RAY_VERSION, namespace, RAY_PLURAL, name, body
            )
        except ApiException as exc:
            if exc.status == 404:
                return False
            raise
        return True

    async def ensure(self, obj: Mapping[str, Any], *, likely_new: bool = False) -> tuple[dict[str, Any], bool]:
        """Get-or-create `obj` by its name: (the object in the cluster, whether this call created it).

        An existing object is returned as it is, never updated, so running this twice (or after another
        replica) creates nothing new; a create that loses a race (409) reads the winner. `likely_new`
        (a job launching for the first time) creates first and reads only on a conflict: one request
        instead of two for each child of a new job.
        """
        kind = (obj["apiVersion"], obj["kind"])
        namespace, name = obj["metadata"]["namespace"], obj["metadata"]["name"]
        read, create = self._accessors(kind)
        if not likely_new:
            existing = await self._read_if_allowed(kind, read, namespace, name)
            if existing is not None:
                return existing, False
        try:
            return await self._call(create, namespace, dict(obj)), True
        except ApiException as exc:
            if exc.status == 409:
                again = await self._read_if_allowed(kind, read, namespace, name)
                if again is not None:
                    return again, False
                if kind == ("v1", "Secret"):
                    # One the operator may not read (the default install reads none): it is there, and
                    # taken as this job's own (its name is the job's).
                    return dict(obj), False
            if exc.status == 404 and kind == (RAYJOB_API_VERSION, RAYJOB_KIND):
                self._kuberay_seen_at = None
                raise KubeRayMissingError(f"{RAYJOB_API_VERSION} {RAY_PLURAL} is not served by this cluster") from exc
            raise

    async def _read_if_allowed(
        self, kind: tuple[str, str], read: Callable[..., Any], namespace: str, name: str
    ) -> dict[str, Any] | None:
        """The object, or None when it is missing, or when it is a Secret RBAC does not let the operator read."""
        try:
            return await self._read_or_none(read, namespace, name)
        except ApiException as exc:
            if exc.status == 403 and kind == ("v1", "Secret"):
                return None
            raise

    def _accessors(self, kind: tuple[str, str]) -> tuple[Callable[..., Any], Callable[..., Any]]:
        """(read(namespace, name), create(namespace, body)) for a kind the operator creates."""
        core, custom, networking = self.core, self.custom, self.networking
        if kind == ("v1", "ServiceAccount"):
            return (
                lambda ns, name, **kw: core.read_namespaced_service_account(name, ns, **kw),
                core.create_namespaced_service_account,
            )
        if kind == ("v1", "Secret"):  # the job's Ray token: created once, read back only on a conflict
            return (
                lambda ns, name, **kw: core.read_namespaced_secret(name, ns, **kw),
                core.create_namespaced_secret,
            )
        if kind == ("networking.k8s.io/v1", "NetworkPolicy"):
            return (
                lambda ns, name, **kw: networking.read_namespaced_network_policy(name, ns, **kw),
                networking.create_namespaced_network_policy,
            )
        if kind == (RAYJOB_API_VERSION, RAYJOB_KIND):
            return (
                lambda ns, name, **kw: custom.get_namespaced_custom_object(
                    RAY_GROUP, RAY_VERSION, ns, RAY_PLURAL, name, **kw
                ),
                lambda ns, body, **kw: custom.create_namespaced_custom_object(
                    RAY_GROUP, RAY_VERSION, ns, RAY_PLURAL, body, **kw
                ),
            )
        raise ValueError(f"the operator does not create {kind[1]} ({kind[0]}) objects")

    # -- Secrets and Events ------------------------------------------------------------------------------

    async def read_secret(self, namespace: str, name: str) -> dict[str, str] | None:
        """The Secret's data, decoded; None when there is no such Secret. Never logged.

        Raises SecretNotReadableError when RBAC does not allow the read (403).
        """
        try:
            secret = await self._read_or_none(self.core.read_namespaced_secret, name, namespace)
        except ApiException as exc:
            if exc.status == 403:
                raise SecretNotReadableError(f"the operator may not read Secrets in namespace {namespace}") from None
            raise
        if secret is None:
            return None
        decoded: dict[str, str] = {}
        for key, value in (secret.get("data") or {}).items():
            try:
                decoded[key] = base64.b64decode(value).decode()
            except (binascii.Error, UnicodeDecodeError):
                continue  # not text: cannot be a credential
        return decoded

    async def read_config_map_key(self, namespace: str, name: str, key: str) -> str | None:
        """One key of a ConfigMap (spec.storage.caBundle); None when the ConfigMap or the key is missing."""
        found = await self._read_or_none(self.core.read_namespaced_config_map, name, namespace)
        value = ((found or {}).get("data") or {}).get(key)
        return value if isinstance(value, str) else None

    async def create_event(self, job: Mapping[str, Any], event: Event) -> None:
        """An Event on `job`, as `post_event` makes it, from outside kopf's handlers (the progress endpoint)."""
        meta = job.get("metadata") or {}
        namespace = str(meta.get("namespace") or "default")
        now = datetime.now(UTC).isoformat()
        body = {
            "metadata": {"namespace": namespace, "generateName": f"{meta.get('name')}."},
            "type": event.type,
            "reason": str(event.reason),
            "message": event.message,
            "reportingComponent": REPORTING_COMPONENT,
            "source": {"component": REPORTING_COMPONENT},
            "involvedObject": {
                "apiVersion": job.get("apiVersion"),
                "kind": job.get("kind"),
                "name": meta.get("name"),
                "namespace": namespace,
                "uid": meta.get("uid"),
            },
            "firstTimestamp": now,
            "lastTimestamp": now,
            "count": 1,
        }
        await self._call(self.core.create_namespaced_event, namespace, body)

    def post_event(self, job: Mapping[str, Any], event: Event) -> None:
        """An Event on `job` (kopf posts it in the background; needs the operator's context)."""
        kopf.event(
            kopf.Body(cast(kopf.RawBody, dict(job))), type=event.type, reason=event.reason, message=event.message
        )
