"""A reusable harness: the real kubetune operator (kopf) against kmock's in-process Kubernetes API.

    async with running_operator(settings) as op:          # or the `op` fixture in conftest.py
        await op.create_job(finetunejob("flowers"))        # POST, as kubectl apply would
        await op.wait_for_phase("default", "flowers", "Launching")
        await op.set_rayjob_status("default", "flowers", jobDeploymentStatus="Running", jobStatus="RUNNING")
        await op.wait_for_phase("default", "flowers", "Running")
        op.events("default", "flowers")                    # the Events posted about the job
        op.operator_requests()                             # every API call the operator made

The operator runs on a thread and event loop of its own (as in production, nothing else shares its
loop): on exit, kopf waits for, and then cancels, every task its loop gained while it ran, which in a
shared loop would include the test's own. The API server runs in the test's loop, so a test must never
block that loop (use `asyncio.to_thread` for blocking calls) or the operator waits on it.

kmock stores objects and streams watch events, but it is not a full API server: `ApiServer` below adds
the few server-side behaviours the operator relies on (uid, creationTimestamp, resourceVersion, a
generation that moves on spec changes, names from generateName). There is no garbage collection, no
optimistic concurrency, no selectors, no schema validation, no listing of Namespace objects (so kopf
with scanning on and a namespace list cannot run against it), and no KubeRay: tests play KubeRay by
writing RayJob status.
"""

from __future__ import annotations

import asyncio
import base64
import contextlib
import dataclasses
import itertools
import json
import threading
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, TypeVar

import kmock
import kopf

from kubetune_operator.kube import Kube
from kubetune_operator.main import build_registry, build_runtime, kopf_settings, run_operator
from kubetune_operator.runtime import Runtime
from kubetune_operator.settings import OperatorSettings

T = TypeVar("T")

FINETUNEJOBS = "kubetune.dev/v1alpha1/finetunejobs"
RAYJOBS = "ray.io/v1/rayjobs"
SECRETS = "v1/secrets"
EVENTS = "v1/events"
CONFIGMAPS = "v1/configmaps"
SERVICEACCOUNTS = "v1/serviceaccounts"
NETWORKPOLICIES = "networking.k8s.io/v1/networkpolicies"
TEST_USER_AGENT = "kubetune-tests"  # the tests' own writes, told apart from the operator's

# Operator settings for tests: retries and backoffs short, and no metrics or progress servers (their
# own tests start them); override with `fast_settings(...)` or the `operator_settings` fixture.
FAST_SETTINGS = OperatorSettings(
    trainer_image="registry.example/kubetune-trainer:test",
    progress_base_url="http://kubetune.kubetune-system.svc:8081",
    preflight_backoff_seconds=0.1,
    preflight_backoff_max_seconds=0.5,
    kuberay_retry_seconds=0.3,
    previous_rayjob_retry_seconds=0.3,
    s3_timeout_seconds=3.0,
    # moto's S3 listens on 127.0.0.1, on a port of its own each session.
    allowed_s3_endpoints=("http://127.0.0.1",),
    metrics_port=None,
    progress_port=None,
)


def fast_settings(**overrides: Any) -> OperatorSettings:
    return dataclasses.replace(FAST_SETTINGS, **overrides)


def path_of(resource: str, namespace: str | None = None, name: str | None = None, sub: str | None = None) -> str:
    """The API path of `group/version/plural` (`version/plural` for the core group)."""
    parts = resource.split("/")
    base = f"/api/{parts[0]}" if len(parts) == 2 else f"/apis/{parts[0]}/{parts[1]}"
    path = base + (f"/namespaces/{namespace}" if namespace else "") + f"/{parts[-1]}"
    return path + (f"/{name}" if name else "") + (f"/{sub}" if sub else "")


def _plain(obj: Any) -> Any:
    return json.loads(json.dumps(obj))


class ApiServer(kmock.KubernetesEmulator):
    """kmock's emulator plus the metadata a real API server sets on writes, and a request log.

    kmock matches each request against its whole request history (quadratic: a few hundred requests
    cost seconds), so its own history keeps only the requests in flight; the full log is `log`.
    """

    _counter = itertools.count(1)
    _versions = itertools.count(1000)

    def __init__(self, **kwargs: Any) -> None:
        super().__init__(**kwargs)
        self.log: list[kmock.Request] = []
        self._in_flight: set[kmock.Request] = set()

    async def _handle(self, request: kmock.Request) -> Any:
        self.log.append(request)
        self._in_flight.add(request)
        self._requests[:] = [r for r in self._requests if r in self._in_flight]
        try:
            return await self._handle_stamped(request)
        finally:
            self._in_flight.discard(request)

    async def _handle_stamped(self, request: kmock.Request) -> Any:
        data = request.data
        if request.resource is not None and isinstance(data, dict):
            if request.action in (kmock.action.CREATE, kmock.action.UPDATE):
                # kopf compares resourceVersions to skip watch events older than its own last patch.
                data.setdefault("metadata", {})["resourceVersion"] = str(next(self._versions))
            if request.action == kmock.action.CREATE:
                meta = data.setdefault("metadata", {})
                if not meta.get("name") and meta.get("generateName"):
                    meta["name"] = f"{meta['generateName']}{next(self._counter):05d}"
                if request.namespace:
                    meta.setdefault("namespace", request.namespace)
                meta["uid"] = str(uuid.uuid4())
                meta["creationTimestamp"] = datetime.now(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")
                meta["generation"] = 1
            elif request.action == kmock.action.UPDATE and request.subresource is None and "spec" in data:
                current = self.current(request.resource, request.namespace, request.name)
                if current is not None:
                    generation = (current.get("metadata") or {}).get("generation") or 1
                    data.setdefault("metadata", {})["generation"] = generation + 1
        return await super()._handle(request)

    def current(self, resource: Any, namespace: str | None, name: str | None) -> dict[str, Any] | None:
        for (res, ns, nm), obj in self.objects.items():
            if res == resource and ns == namespace and nm == name and not obj.deleted:
                return dict(obj.raw)
        return None

    def versions(self, resource: Any, namespace: str | None, name: str | None) -> list[dict[str, Any]]:
        """Every state the object has had, oldest first, deleted or not (kmock keeps each write's result)."""
        for (res, ns, nm), obj in self.objects.items():
            if res == resource and ns == namespace and nm == name:
                return [dict(version.raw) for version in obj.history if version is not None]
        return []


def declare_resources(api: kmock.KubernetesEmulator, *, kuberay: bool = True) -> None:
    """Kubernetes' built-in resources, the FineTuneJob CRD and (unless `kuberay=False`) KubeRay's RayJob."""
    api.resources.load_bundled()
    verbs = {"get", "list", "watch", "create", "update", "patch", "delete"}
    api.resources[FINETUNEJOBS] = kmock.ResourceInfo(
        kind="FineTuneJob",
        singular="finetunejob",
        namespaced=True,
        shortnames={"ftj"},
        subresources={"status"},
        verbs=verbs,
    )
    if kuberay:
        api.resources[RAYJOBS] = kmock.ResourceInfo(
            kind="RayJob", singular="rayjob", namespaced=True, subresources={"status"}, verbs=verbs
        )


@contextlib.asynccontextmanager
async def serving_api(*, kuberay: bool = True) -> AsyncIterator[ApiServer]:
    """A fresh API server on a free local port (`kuberay=False`: one without KubeRay's RayJob API)."""
    async with ApiServer() as api, kmock.Server(api):
        declare_resources(api, kuberay=kuberay)
        yield api


class OperatorThread:
    """`coroutine_factory(stop_flag, ready_flag)` run on a thread with its own event loop."""

    def __init__(self, coroutine_factory: Callable[[threading.Event, threading.Event], Awaitable[None]]) -> None:
        self.stop_flag = threading.Event()
        self.ready_flag = threading.Event()
        self.error: BaseException | None = None
        self._factory = coroutine_factory
        self._thread = threading.Thread(target=self._run, name="kubetune-operator", daemon=True)

    def _run(self) -> None:
        async def main() -> None:
            await self._factory(self.stop_flag, self.ready_flag)

        try:
            asyncio.run(main())
        except BaseException as exc:  # raised again in the test by stop()
            self.error = exc

    async def start(self, timeout: float) -> None:
        self._thread.start()
        await asyncio.to_thread(self._wait_ready, timeout)

    def _wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.ready_flag.wait(0.02):
            if not self._thread.is_alive():
                raise AssertionError(f"the operator exited before it was ready: {self.error!r}") from self.error
            if time.monotonic() > deadline:
                raise AssertionError(f"the operator was not ready within {timeout}s")

    async def stop(self, timeout: float = 20.0) -> None:
        """Stop gracefully (the API server keeps answering meanwhile); raise what the operator raised."""
        self.stop_flag.set()
        await asyncio.to_thread(self._thread.join, timeout)
        if self._thread.is_alive():
            raise AssertionError(f"the operator did not stop within {timeout}s")
        if self.error is not None:
            raise self.error


@dataclass(frozen=True)
class ApiRequest:
    """One request the API server received, in RBAC's terms."""

    verb: str  # get, list, watch, create, patch, delete
    group: str  # "" for the core group
    resource: str
    subresource: str | None
    namespace: str | None
    name: str | None
    user_agent: str


_VERBS = {"list": "list", "watch": "watch", "fetch": "get", "create": "create", "update": "patch", "delete": "delete"}


def api_request(request: kmock.Request) -> ApiRequest | None:
    """One request in RBAC's terms; None for discovery (/api, /apis/...), which needs no RBAC."""
    if request.resource is None or request.action is None or not request.resource.plural:
        return None
    action = str(request.action.value).lower()
    return ApiRequest(
        verb=_VERBS.get(action, action),
        group=request.resource.group or "",
        resource=request.resource.plural or "",
        subresource=request.subresource,
        namespace=request.namespace,
        name=request.name,
        user_agent=request.headers.get("User-Agent", ""),
    )


def _requests_since(api: ApiServer, first: int) -> list[ApiRequest]:
    return [found for request in api.log[first:] if (found := api_request(request)) is not None]


class OperatorHarness:
    """The running operator, the API server it talks to, and helpers to drive and inspect both."""

    def __init__(self, api: ApiServer, runtime: Runtime | None = None) -> None:
        """`runtime`: the in-process operator's, when it runs in this process (None: it runs elsewhere)."""
        self.api = api
        self.runtime = runtime
        self._first_request = 0

    # -- writing, as users and KubeRay would ------------------------------------------------------------

    async def _send(self, method: str, path: str, body: Any = None, content_type: str | None = None) -> Any:
        headers = {"Content-Type": content_type} if content_type else {}
        headers["User-Agent"] = TEST_USER_AGENT
        async with self.api.request(method, path, json=body, headers=headers) as response:
            text = await response.text()
            if response.status >= 400:
                raise AssertionError(f"{method} {path} -> {response.status}: {text}")
            return json.loads(text) if text else None

    async def create(self, resource: str, obj: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        obj = _plain(obj)
        namespace = obj.setdefault("metadata", {}).get("namespace") or namespace
        created: dict[str, Any] = await self._send("POST", path_of(resource, namespace), obj)
        return created

    async def create_job(self, manifest: dict[str, Any], namespace: str = "default") -> dict[str, Any]:
        """`kubectl create -f` of a FineTuneJob (in `namespace` unless the manifest names one)."""
        return await self.create(FINETUNEJOBS, manifest, namespace)

    async def patch(
        self, resource: str, namespace: str, name: str, patch: dict[str, Any], sub: str | None = None
    ) -> None:
        path = path_of(resource, namespace, name, sub)
        await self._send("PATCH", path, patch, content_type="application/merge-patch+json")

    async def patch_job_spec(self, namespace: str, name: str, spec_patch: dict[str, Any]) -> None:
        """`kubectl patch ftj NAME --type=merge -p '{"spec": ...}'`: the generation moves on."""
        await self.patch(FINETUNEJOBS, namespace, name, {"spec": spec_patch})

    async def delete(self, resource: str, namespace: str, name: str) -> None:
        await self._send("DELETE", path_of(resource, namespace, name))

    async def set_rayjob_status(self, namespace: str, name: str, **status: Any) -> None:
        """Play KubeRay: merge `status` into the RayJob's status."""
        await self.patch(RAYJOBS, namespace, name, {"status": status}, sub="status")

    async def create_secret(self, namespace: str, name: str, data: dict[str, str]) -> None:
        encoded = {key: base64.b64encode(value.encode()).decode() for key, value in data.items()}
        secret = {"apiVersion": "v1", "kind": "Secret", "metadata": {"name": name}, "data": encoded}
        await self.create(SECRETS, secret, namespace)

    # -- reading ---------------------------------------------------------------------------------------

    def get(self, resource: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        found = self.api.current(kmock.resource(resource), namespace, name)
        return _plain(found) if found is not None else None

    def job(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(FINETUNEJOBS, namespace, name)

    def rayjob(self, namespace: str, name: str) -> dict[str, Any] | None:
        return self.get(RAYJOBS, namespace, name)

    def list_objects(self, resource: str, namespace: str | None = None) -> list[dict[str, Any]]:
        wanted = kmock.resource(resource)
        listed: list[dict[str, Any]] = _plain(
            [
                dict(obj.raw)
                for (res, ns, _), obj in self.api.objects.items()
                if res == wanted and not obj.deleted and (namespace is None or ns == namespace)
            ]
        )
        return listed

    def phase(self, namespace: str, name: str) -> str | None:
        job = self.job(namespace, name) or {}
        phase: str | None = (job.get("status") or {}).get("phase")
        return phase

    def phases(self, namespace: str, name: str) -> list[str]:
        """Every phase the job's status has had, in order, however briefly, even once the job is deleted
        (a TTL of 1 s may delete it a millisecond after it finished, before any poll saw it finished)."""
        seen: list[str] = []
        for version in self.api.versions(kmock.resource(FINETUNEJOBS), namespace, name):
            phase = (version.get("status") or {}).get("phase")
            if phase and (not seen or seen[-1] != phase):
                seen.append(phase)
        return seen

    def condition(self, namespace: str, name: str, type_: str) -> dict[str, Any] | None:
        job = self.job(namespace, name) or {}
        return next((c for c in (job.get("status") or {}).get("conditions") or [] if c["type"] == type_), None)

    def events(self, namespace: str, name: str, kind: str = "FineTuneJob") -> list[dict[str, Any]]:
        """The Events about one object, oldest first."""
        found = [
            event
            for event in self.list_objects(EVENTS, namespace)
            if event.get("involvedObject", {}).get("name") == name and event["involvedObject"].get("kind") == kind
        ]
        return sorted(found, key=lambda event: event["metadata"]["name"])

    def event_reasons(self, namespace: str, name: str) -> list[str]:
        return [event["reason"] for event in self.events(namespace, name)]

    # -- waiting ---------------------------------------------------------------------------------------

    async def wait_for(
        self, predicate: Callable[[], T | None], timeout: float = 10.0, what: str | Callable[[], str] = ""
    ) -> T:
        """Poll until `predicate()` is truthy and return it; fail saying `what` after `timeout` seconds
        (a callable `what` is asked then, so it describes the state that timed out, not the one before)."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + timeout
        while True:
            value = predicate()
            if value:
                return value
            if loop.time() > deadline:
                described = what() if callable(what) else what
                raise AssertionError(f"timed out after {timeout}s waiting for {described or predicate}")
            await asyncio.sleep(0.02)

    async def wait_for_phase(self, namespace: str, name: str, phase: str, timeout: float = 10.0) -> dict[str, Any]:
        def reached() -> dict[str, Any] | None:
            job = self.job(namespace, name)
            return job if job and (job.get("status") or {}).get("phase") == phase else None

        def described() -> str:
            now = "it is gone" if self.job(namespace, name) is None else f"it is {self.phase(namespace, name)}"
            return f"{namespace}/{name} to reach phase {phase} ({now}; it went {self.phases(namespace, name)})"

        return await self.wait_for(reached, timeout, described)

    async def wait_for_event(self, namespace: str, name: str, reason: str, timeout: float = 10.0) -> dict[str, Any]:
        """The first Event with `reason` about the job (Events are posted in the background)."""
        return await self.wait_for(
            lambda: next((e for e in self.events(namespace, name) if e["reason"] == reason), None),
            timeout,
            lambda: f"an Event {reason} on {namespace}/{name} (seen: {self.event_reasons(namespace, name)})",
        )

    async def settle(self, seconds: float = 0.3) -> None:
        """Give the operator time to react, before asserting that it did nothing more."""
        await asyncio.sleep(seconds)

    # -- what was asked of the API ---------------------------------------------------------------------

    def mark(self) -> None:
        """Count `api_requests()` from now on."""
        self._first_request = len(self.api.log)

    def api_requests(self) -> list[ApiRequest]:
        """Every API request since the operator started (or since `mark()`), by the operator or the test."""
        return _requests_since(self.api, self._first_request)

    def operator_requests(self) -> list[ApiRequest]:
        """The API requests the operator made (kopf's own and its client's), not the test's."""
        return [r for r in self.api_requests() if r.user_agent != TEST_USER_AGENT]


@contextlib.asynccontextmanager
async def running_operator(
    settings: OperatorSettings = FAST_SETTINGS,
    *,
    api: ApiServer | None = None,
    kuberay: bool = True,
    liveness_endpoint: str | None = None,
    ready_timeout: float = 10.0,
) -> AsyncIterator[OperatorHarness]:
    """The operator, built exactly as main.py builds it, against `api` (a fresh API server when None).

    Pass the same `api` to a later `running_operator` to restart the operator over existing objects.
    """
    async with contextlib.AsyncExitStack() as stack:
        if api is None:
            api = await stack.enter_async_context(serving_api(kuberay=kuberay))
        server = str(api.url).rstrip("/")
        kube = Kube.for_server(server)
        stack.callback(kube.close)
        runtime = build_runtime(settings, kube)

        def login(**_: Any) -> kopf.ConnectionInfo:
            return kopf.ConnectionInfo(server=server)

        registry = build_registry(login=login)

        config = kopf_settings(runtime)
        config.scanning.disabled = True  # resources are declared up front; no CRD objects to scan
        config.watching.reconnect_backoff = 0.05
        config.persistence.consistency_timeout = 0.5
        config.networking.error_backoffs = [0.05, 0.1, 0.2]

        def operator(stop: threading.Event, ready: threading.Event) -> Awaitable[None]:
            return run_operator(
                runtime,
                registry=registry,
                settings=config,
                liveness_endpoint=liveness_endpoint,
                stop_flag=stop,
                ready_flag=ready,
            )

        harness = OperatorHarness(api, runtime)
        harness.mark()
        thread = OperatorThread(operator)
        await thread.start(ready_timeout)
        try:
            yield harness
        finally:
            await thread.stop()


def finetunejob(
    name: str,
    *,
    uris: dict[str, str] | None = None,
    endpoint: str | None = None,
    credentials_secret: str | None = None,
    image: str | None = None,
    **sections: dict[str, Any],
) -> dict[str, Any]:
    """A valid FineTuneJob manifest; `uris` as from `S3World.seed()`, `sections` merged into the spec."""
    uris = uris or {
        "checkpoint": "s3://models/base/resnet18.safetensors",
        "train": "s3://datasets/flowers/train/",
        "output": "s3://runs/flowers/",
    }
    spec: dict[str, Any] = {
        "model": {"architecture": "resnet18", "checkpoint": uris["checkpoint"]},
        "data": {"train": uris["train"]},
        "output": {"path": uris["output"]},
        "resources": {"workers": 2, "gpusPerWorker": 1, "cpusPerWorker": 4, "memoryPerWorker": "16Gi"},
        "storage": {"region": "us-east-1"},
    }
    if endpoint:
        spec["storage"]["endpoint"] = endpoint
    if credentials_secret:
        spec["storage"]["credentialsSecret"] = credentials_secret
    if image:
        spec["image"] = image
    for section, values in sections.items():
        spec[section] = {**spec.get(section, {}), **values}
    return {"apiVersion": "kubetune.dev/v1alpha1", "kind": "FineTuneJob", "metadata": {"name": name}, "spec": spec}
