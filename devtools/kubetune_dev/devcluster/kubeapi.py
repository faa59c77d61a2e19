"""An embedded Kubernetes API on 127.0.0.1: kmock's emulator, extended until real clients work.

kmock (by kopf's author) gives the skeleton: HTTP routing, discovery documents, and a DSL for
injecting faults (its reactions take precedence over everything here; see `DevCluster.fail_api`). On top
of it this module serves the resource semantics that kubectl, kopf and the kubernetes client rely on
and the bare emulator leaves out: uids, resource versions and generations; list kinds; watches that
resume from a resource version and honour `timeoutSeconds`; label and field selectors; server-side
Tables with printer columns; status subresources; JSON, merge and apply patches and PUT; finalizers;
garbage collection of objects whose owners are gone; CRD installation (from files or through the
API) with schema defaults; TokenRequest and TokenReview for service-account tokens.

Not served (no client here needs them): admission and schema validation, RBAC, protobuf,
deletecollection, managedFields, server-side apply field ownership.
"""

from __future__ import annotations

import asyncio
import base64
import collections
import copy
import hashlib
import hmac
import json
import logging
import re
import secrets
import string
import time
import uuid
from collections.abc import AsyncIterator, Callable, Iterable, Mapping
from pathlib import Path
from typing import Any

import aiohttp.web
import attrs
import jsonpatch
import kmock
import yaml
from kmock._internal import rendering

from kubetune_dev.devcluster.apimachinery import (
    AGE_COLUMN,
    Column,
    LabelRequirement,
    ResourceKind,
    apply_defaults,
    kind_from_crd,
    matches_fields,
    matches_labels,
    merge_patch,
    now_rfc3339,
    parse_field_selector,
    parse_label_selector,
    table,
    wants_table,
)

log = logging.getLogger(__name__)

StoreKey = tuple[str, str, str | None, str]  # group, plural, namespace, name

_EVENT_COLUMNS = (
    Column("Last Seen", "date", ".lastTimestamp", "Time of the last occurrence."),
    Column("Type", "string", ".type", "Normal or Warning."),
    Column("Reason", "string", ".reason", "Why the event happened."),
    Column("Object", "string", ".involvedObject.name", "The object the event is about."),
    Column("Message", "string", ".message", "What happened."),
)

BUILTIN_KINDS: tuple[ResourceKind, ...] = (
    ResourceKind("", "namespaces", "Namespace", "namespace", False, ("v1",), ("ns",), subresources=("status",)),
    ResourceKind("", "configmaps", "ConfigMap", "configmap", True, ("v1",), ("cm",)),
    ResourceKind("", "secrets", "Secret", "secret", True, ("v1",)),
    ResourceKind(
        "", "serviceaccounts", "ServiceAccount", "serviceaccount", True, ("v1",), ("sa",), subresources=("token",)
    ),
    ResourceKind("", "events", "Event", "event", True, ("v1",), ("ev",), columns={"v1": _EVENT_COLUMNS}),
    ResourceKind("", "pods", "Pod", "pod", True, ("v1",), ("po",), ("all",), subresources=("status",)),
    ResourceKind("", "services", "Service", "service", True, ("v1",), ("svc",), ("all",), subresources=("status",)),
    ResourceKind("events.k8s.io", "events", "Event", "event", True, ("v1",), ("ev",)),
    ResourceKind("coordination.k8s.io", "leases", "Lease", "lease", True, ("v1",)),
    # Stored, not enforced: every process of the dev cluster shares this machine's loopback.
    ResourceKind("networking.k8s.io", "networkpolicies", "NetworkPolicy", "networkpolicy", True, ("v1",), ("netpol",)),
    ResourceKind(
        "apiextensions.k8s.io",
        "customresourcedefinitions",
        "CustomResourceDefinition",
        "customresourcedefinition",
        False,
        ("v1",),
        ("crd", "crds"),
        subresources=("status",),
    ),
    ResourceKind(
        "authentication.k8s.io", "tokenreviews", "TokenReview", "tokenreview", False, ("v1",), verbs=("create",)
    ),
    ResourceKind(
        "authorization.k8s.io",
        "selfsubjectaccessreviews",
        "SelfSubjectAccessReview",
        "selfsubjectaccessreview",
        False,
        ("v1",),
        verbs=("create",),
    ),
)

# KubeRay's RayCluster CRD is not among the fixtures; the KubeRay stand-in creates RayClusters, so
# the API knows the resource (without a schema) and `kubectl get rayclusters` shows them.
RAYCLUSTER_KIND = ResourceKind(
    "ray.io",
    "rayclusters",
    "RayCluster",
    "raycluster",
    True,
    ("v1",),
    categories=("all",),
    subresources=("status",),
    columns={
        "v1": (
            Column("Desired Workers", "integer", ".status.desiredWorkerReplicas"),
            Column("Status", "string", ".status.state"),
            AGE_COLUMN,
        )
    },
)
OPENAPI_PROTOBUF = "application/octet-stream"  # an empty protobuf document
LOG_LIMIT = 20_000  # watch events kept for resuming watches; older resource versions get 410 Gone


def api_error(
    status: int, reason: str, message: str, details: Mapping[str, Any] | None = None
) -> kmock.KubernetesError:
    return kmock.KubernetesError(status=status, reason=reason, message=message, details=dict(details or {}))


def version_priority(version: str) -> tuple[int, int, int, str]:
    """Kubernetes' version order: GA before beta before alpha, higher numbers first, others last."""
    m = re.fullmatch(r"v(\d+)(?:(alpha|beta)(\d+))?", version)
    if not m:
        return (3, 0, 0, version)
    stability = {None: 0, "beta": 1, "alpha": 2}[m.group(2)]
    return (stability, -int(m.group(1)), -int(m.group(3) or 0), version)


def parse_path(path: str) -> tuple[str | None, str | None, str | None, str | None, str | None, str | None]:
    """(group, version, namespace, plural, name, subresource) of an API path; group None if not one."""
    parts = [p for p in path.strip("/").split("/") if p]
    if len(parts) >= 2 and parts[0] == "api":
        group, version, rest = "", parts[1], parts[2:]
    elif len(parts) >= 3 and parts[0] == "apis":
        group, version, rest = parts[1], parts[2], parts[3:]
    else:
        return (None, None, None, None, None, None)
    namespace = None
    if len(rest) >= 3 and rest[0] == "namespaces":
        namespace, rest = rest[1], rest[2:]
    plural = rest[0] if rest else None
    name = rest[1] if len(rest) > 1 else None
    subresource = "/".join(rest[2:]) or None
    return (group, version, namespace, plural, name, subresource)


async def parse_request(raw_request: aiohttp.web.BaseRequest, *, id: int) -> rendering.Request:
    """kmock's Request, parsed with `parse_path` (kmock's own parser fails on `/api/v1/namespaces`)."""
    body = await raw_request.read()
    text = body.decode("utf-8", errors="replace")
    try:
        data = json.loads(text) if text else None
    except ValueError:
        data = None
    group, version, namespace, plural, name, subresource = parse_path(raw_request.path)
    resource = None if group is None else kmock.resource(group=group, version=version, plural=plural)
    method = kmock.method.guess(raw_request.method)
    params = dict(raw_request.query)
    action = None
    if group is not None:
        if method == kmock.method.GET and str(params.get("watch", "")).lower() in ("true", "1"):
            action = kmock.action.WATCH
        elif name is None:
            action = {"GET": kmock.action.LIST, "POST": kmock.action.CREATE}.get(raw_request.method)
        else:
            action = {"GET": kmock.action.FETCH, "PATCH": kmock.action.UPDATE, "DELETE": kmock.action.DELETE}.get(
                raw_request.method
            )
    return rendering.Request(
        id=id,
        raw_request=raw_request,
        url=raw_request.url,
        method=raw_request.method,
        params=params,
        headers=dict(raw_request.headers),
        cookies=dict(raw_request.cookies),
        data=data,
        body=body,
        text=text,
        action=action,
        resource=resource,
        namespace=namespace,
        name=name,
        subresource=subresource,
    )


def fold_string_data(secret: dict[str, Any]) -> None:
    """Merge a Secret's write-only `stringData` into `data`, base64-encoded, as the API server stores it."""
    string_data = secret.pop("stringData", None)
    if string_data:
        data = dict(secret.get("data") or {})
        data.update({key: base64.b64encode(str(value).encode()).decode() for key, value in string_data.items()})
        secret["data"] = data


def _random_suffix(length: int = 5) -> str:
    # Kubernetes' generateName alphabet (no vowels, no confusable digits).
    return "".join(secrets.choice("bcdfghjklmnpqrstvwxz2456789") for _ in range(length))


def watch_filter(
    namespace: str | None,
    name: str | None,
    labels: Iterable[LabelRequirement],
    fields: Iterable[tuple[str, str, str]],
) -> Callable[[Mapping[str, Any]], bool]:
    """Whether an object is one a watch asked for: its namespace and name (when given), and its selectors."""
    labels, fields = list(labels), list(fields)

    def wanted(obj: Mapping[str, Any]) -> bool:
        meta = obj.get("metadata") or {}
        return (
            (namespace is None or meta.get("namespace") == namespace)
            and (name is None or meta.get("name") == name)
            and matches_labels(obj, labels)
            and matches_fields(obj, fields)
        )

    return wanted


@attrs.define(kw_only=True)
class EmbeddedKubeAPI(kmock.KubernetesEmulator):
    """kmock's emulator with the resource semantics real clients need (see the module docstring)."""

    kinds: dict[tuple[str, str], ResourceKind] = attrs.field(factory=dict, repr=False)
    store: dict[StoreKey, dict[str, Any]] = attrs.field(factory=dict, repr=False)
    _uids: dict[str, StoreKey] = attrs.field(factory=dict, repr=False)
    _rv: int = 1000
    _log: collections.deque[tuple[int, tuple[str, str], dict[str, Any]]] = attrs.field(
        factory=lambda: collections.deque(maxlen=LOG_LIMIT), repr=False
    )
    # The metadata of every object ever created, by (group, plural): unlike the watch log, never trimmed,
    # so a long soak can still count the RayJobs each job had.
    _created: dict[tuple[str, str], list[dict[str, Any]]] = attrs.field(factory=dict, repr=False)
    _changed: asyncio.Event | None = None
    _token_key: bytes = attrs.field(factory=lambda: secrets.token_bytes(32), repr=False)
    _issued_at: float = attrs.field(factory=time.time)

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()
        for kind in (*BUILTIN_KINDS, RAYCLUSTER_KIND):
            self.register(kind)
        # Below user reactions (fault injection), above kmock's own fallbacks (discovery).
        (self**-1000) << self._dispatch
        for namespace in ("default", "kube-system"):
            self.put_object(
                "",
                "v1",
                "namespaces",
                {
                    "apiVersion": "v1",
                    "kind": "Namespace",
                    "metadata": {"name": namespace},
                    "status": {"phase": "Active"},
                },
            )

    # --- registration -----------------------------------------------------------------------

    def register(self, kind: ResourceKind) -> None:
        """Serve a resource (and tell discovery about it)."""
        self.kinds[(kind.group, kind.plural)] = kind
        for version in kind.versions:
            self.resources[f"{kind.group}/{version}/{kind.plural}" if kind.group else f"v1/{kind.plural}"] = (
                kmock.ResourceInfo(
                    namespaced=kind.namespaced,
                    kind=kind.kind,
                    singular=kind.singular,
                    verbs=set(kind.verbs),
                    shortnames=set(kind.short_names),
                    categories=set(kind.categories),
                    subresources=set(kind.subresources),
                )
            )

    def install_crd(self, definition: Mapping[str, Any]) -> None:
        """Install a CustomResourceDefinition: store it and serve its resource."""
        crd: dict[str, Any] = copy.deepcopy(dict(definition))
        crd.setdefault("status", {})["acceptedNames"] = crd["spec"]["names"]
        crd["status"]["conditions"] = [
            {"type": "Established", "status": "True", "reason": "InitialNamesAccepted", "message": ""}
        ]
        name = crd["metadata"]["name"]
        key: StoreKey = ("apiextensions.k8s.io", "customresourcedefinitions", None, name)
        if key in self.store:
            self._write(key, crd, "MODIFIED")
        else:
            self.put_object("apiextensions.k8s.io", "v1", "customresourcedefinitions", crd)
        self.register(kind_from_crd(crd))

    def install_crd_file(self, path: str | Path) -> None:
        loader = getattr(yaml, "CSafeLoader", yaml.SafeLoader)  # KubeRay's CRD is 1.4 MB of YAML
        for doc in yaml.load_all(Path(path).read_text(), Loader=loader):
            if doc and doc.get("kind") == "CustomResourceDefinition":
                self.install_crd(doc)

    # --- discovery (kmock's guesses version order and mis-names the core group) ----------------

    def _group_versions(self) -> dict[str, list[str]]:
        groups: dict[str, set[str]] = collections.defaultdict(set)
        for kind in self.kinds.values():
            groups[kind.group].update(kind.versions)
        return {group: sorted(versions, key=version_priority) for group, versions in groups.items()}

    def _group_document(self, group: str, versions: list[str]) -> dict[str, Any]:
        listed = [{"groupVersion": f"{group}/{v}", "version": v} for v in versions]
        return {"name": group, "versions": listed, "preferredVersion": listed[0]}

    async def _serve_api(self, request: kmock.Request) -> Any:
        return {"kind": "APIVersions", "versions": ["v1"], "serverAddressByClientCIDRs": []}

    async def _serve_apis(self, request: kmock.Request) -> Any:
        groups = [self._group_document(g, vs) for g, vs in sorted(self._group_versions().items()) if g]
        return {"apiVersion": "v1", "kind": "APIGroupList", "groups": groups}

    async def _serve_group(self, request: kmock.Request) -> Any:
        group = request.resource.group if request.resource else None
        versions = self._group_versions().get(group or "")
        if not group or not versions:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        return {"apiVersion": "v1", "kind": "APIGroup", **self._group_document(group, versions)}

    async def _serve_version(self, request: kmock.Request) -> Any:
        group = (request.resource.group if request.resource else None) or ""
        version = request.resource.version if request.resource else None
        resources: list[dict[str, Any]] = []
        for kind in sorted(self.kinds.values(), key=lambda k: k.plural):
            if kind.group != group or version not in kind.versions:
                continue
            entry = {
                "name": kind.plural,
                "singularName": kind.singular,
                "namespaced": kind.namespaced,
                "kind": kind.kind,
                "verbs": list(kind.verbs),
            }
            if kind.short_names:
                entry["shortNames"] = list(kind.short_names)
            if kind.categories:
                entry["categories"] = list(kind.categories)
            resources.append(entry)
            for sub in kind.subresources:
                verbs = ["create"] if sub == "token" else ["get", "patch", "update"]
                sub_kind = "TokenRequest" if sub == "token" else kind.kind
                resources.append(
                    {
                        "name": f"{kind.plural}/{sub}",
                        "singularName": "",
                        "namespaced": kind.namespaced,
                        "kind": sub_kind,
                        "verbs": verbs,
                    }
                )
        if not resources:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        group_version = f"{group}/{version}" if group else str(version)
        return {"apiVersion": "v1", "kind": "APIResourceList", "groupVersion": group_version, "resources": resources}

    # --- direct access (for the harness itself; clients go through HTTP) --------------------

    def put_object(self, group: str, version: str, plural: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        """Create an object as if POSTed (used to seed namespaces, secrets, CRDs)."""
        kind = self.kinds[(group, plural)]
        namespace = (obj.get("metadata") or {}).get("namespace") if kind.namespaced else None
        return self._create(kind, version, namespace or ("default" if kind.namespaced else None), obj)

    def get_object(self, group: str, plural: str, namespace: str | None, name: str) -> dict[str, Any] | None:
        obj = self.store.get((group, plural, namespace, name))
        return copy.deepcopy(obj) if obj is not None else None

    def created(self, group: str, plural: str) -> list[dict[str, Any]]:
        """The metadata of every object of a kind created so far, oldest first (deleted ones too)."""
        return copy.deepcopy(self._created.get((group, plural), []))

    def history(self, group: str, plural: str, namespace: str | None, name: str) -> list[tuple[str, dict[str, Any]]]:
        """Every (event type, object) recorded for one object, oldest first (as a watch saw them)."""
        return [
            (event["type"], copy.deepcopy(event["object"]))
            for _, which, event in list(self._log)
            if which == (group, plural)
            and event["object"]["metadata"].get("name") == name
            and event["object"]["metadata"].get("namespace") == namespace
        ]

    # --- the HTTP dispatcher ----------------------------------------------------------------

    async def __call__(self, raw_request: aiohttp.web.BaseRequest) -> aiohttp.web.StreamResponse:
        """kmock's request entry point, with a path parser that also understands `/api/v1/namespaces`."""
        await raw_request.read()
        raw_response: aiohttp.web.StreamResponse | None = None
        try:
            request = await parse_request(raw_request, id=len(self._requests))
            self._requests.append(request)
            try:
                return await self._handle(request)
            except rendering.StreamingError as exc:
                raw_response = exc.args[0]
                raise exc.__cause__ or exc from None
        except Exception as exc:
            if self._errors:
                self._errors[-1].append(exc)
                del self._errors[-1][:-100]
            if raw_response is None or not raw_response.prepared:
                return await self._render_error(exc)
            await self._stream_error(exc, raw_response)
            await raw_response.write_eof()
            return raw_response
        finally:
            # kmock keeps every request for assertions; a long demo must not grow without bound.
            if len(self._requests) > 4000:
                del self._requests[:2000]
                for payload in self._payloads:
                    del payload._requests[:-100]

    async def _handle(self, request: kmock.Request) -> aiohttp.web.StreamResponse:
        # Skip kmock's emulator bookkeeping (its own object store): `_dispatch` keeps the state here.
        return await kmock.KubernetesScaffold._handle(self, request)

    async def _dispatch(self, request: kmock.Request) -> Any:
        path = request.url.path
        if path == "/openapi/v2":
            # An empty OpenAPI document: kubectl then skips client-side validation of these kinds.
            return self._respond(200, b"", OPENAPI_PROTOBUF)
        if path.startswith("/openapi/"):
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        if request.resource is None or not request.resource.plural or request.resource.version is None:
            raise NotImplementedError  # discovery documents: kmock serves them
        group, version, plural = request.resource.group or "", request.resource.version, request.resource.plural
        kind = self.kinds.get((group, plural))
        if kind is None or version not in kind.versions:
            raise api_error(404, "NotFound", "the server could not find the requested resource")
        namespace = request.namespace if kind.namespaced else None
        method = str(request.method.value).upper()
        sub = request.subresource
        if sub and sub not in kind.subresources:
            raise api_error(404, "NotFound", f"the server could not find the requested resource ({sub})")

        if kind.plural == "serviceaccounts" and sub == "token" and method == "POST":
            return self._respond(201, self._token_request(namespace, request.name or "", request.data or {}))
        if kind.plural == "tokenreviews" and method == "POST":
            return self._respond(201, self._token_review(request.data or {}))
        if kind.plural == "selfsubjectaccessreviews" and method == "POST":
            review = dict(request.data or {})
            review["status"] = {"allowed": True}
            return self._respond(201, review)

        params = request.params
        dry_run = bool(params.get("dryRun"))
        if method == "GET" and str(params.get("watch", "")).lower() in ("true", "1"):
            return self._respond(200, self._watch(kind, version, namespace, request), stream=True)
        if method == "GET" and request.name is None:
            return self._respond(200, self._list(kind, version, namespace, request))
        if method == "GET":
            obj = self._require(kind, namespace, request.name)
            return self._respond(200, self._present(kind, version, [obj], request, single=True))
        if method == "POST" and request.name is None:
            body = self._body(request)
            if namespace and (body.get("metadata") or {}).get("namespace") not in (None, namespace):
                raise api_error(400, "BadRequest", "the namespace of the provided object does not match the request")
            return self._respond(201, self._create(kind, version, namespace, body, dry_run=dry_run))
        if method == "PATCH" and request.name is not None:
            return self._respond(200, self._patch(kind, version, namespace, request, dry_run=dry_run))
        if method == "PUT" and request.name is not None:
            return self._respond(200, self._replace(kind, version, namespace, request, dry_run=dry_run))
        if method == "DELETE" and request.name is not None:
            return self._respond(200, self._delete_request(kind, version, namespace, request, dry_run=dry_run))
        raise api_error(405, "MethodNotAllowed", f"{method} is not supported on {path}")

    @staticmethod
    def _respond(status: int, payload: Any, content_type: str = "application/json", *, stream: bool = False) -> Any:
        # Always a full Response: kmock keeps status and headers on the reaction between requests.
        if isinstance(payload, dict):
            payload = json.dumps(payload).encode()
        return rendering.Response(status=status, headers={"Content-Type": content_type}, payload=payload)

    @staticmethod
    def _body(request: kmock.Request) -> dict[str, Any]:
        text = request.body.decode() if request.body else ""
        try:
            data = yaml.safe_load(text) if text else None
        except yaml.YAMLError as exc:
            raise api_error(400, "BadRequest", f"cannot parse the body: {exc}") from exc
        if not isinstance(data, dict):
            raise api_error(400, "BadRequest", "the body must be an object")
        return data

    def _require(self, kind: ResourceKind, namespace: str | None, name: str | None) -> dict[str, Any]:
        obj = self.store.get((kind.group, kind.plural, namespace, name or ""))
        if obj is None:
            resource = f"{kind.plural}.{kind.group}" if kind.group else kind.plural
            raise api_error(
                404,
                "NotFound",
                f'{resource} "{name}" not found',
                {"name": name, "group": kind.group, "kind": kind.plural},
            )
        return obj

    # --- reading ----------------------------------------------------------------------------

    def _selected(
        self, kind: ResourceKind, namespace: str | None, params: Mapping[str, str], name: str | None = None
    ) -> list[dict[str, Any]]:
        try:
            labels = parse_label_selector(params.get("labelSelector"))
            fields = parse_field_selector(params.get("fieldSelector"))
        except ValueError as exc:
            raise api_error(400, "BadRequest", str(exc)) from exc
        return [
            obj
            for (group, plural, ns, obj_name), obj in sorted(
                self.store.items(), key=lambda kv: (kv[0][2] or "", kv[0][3])
            )
            if (group, plural) == (kind.group, kind.plural)
            and (namespace is None or ns == namespace)
            and (name is None or obj_name == name)
            and matches_labels(obj, labels)
            and matches_fields(obj, fields)
        ]

    def _versioned(self, kind: ResourceKind, version: str, obj: Mapping[str, Any]) -> dict[str, Any]:
        out = copy.deepcopy(dict(obj))
        out["apiVersion"] = kind.api_version(version)
        out["kind"] = kind.kind
        return out

    def _present(
        self, kind: ResourceKind, version: str, objs: list[dict[str, Any]], request: kmock.Request, *, single: bool
    ) -> dict[str, Any]:
        if wants_table(request.headers.get("Accept")):
            return table(
                [self._versioned(kind, version, o) for o in objs],
                kind.columns.get(version, (AGE_COLUMN,)),
                resource_version=str(self._rv),
                include_object=request.params.get("includeObject", "Metadata"),
            )
        if single:
            return self._versioned(kind, version, objs[0])
        return {
            "apiVersion": kind.api_version(version),
            "kind": f"{kind.kind}List",
            "metadata": {"resourceVersion": str(self._rv)},
            "items": [self._versioned(kind, version, o) for o in objs],
        }

    def _list(self, kind: ResourceKind, version: str, namespace: str | None, request: kmock.Request) -> dict[str, Any]:
        return self._present(kind, version, self._selected(kind, namespace, request.params), request, single=False)

    async def _watch(
        self, kind: ResourceKind, version: str, namespace: str | None, request: kmock.Request
    ) -> AsyncIterator[Any]:
        """A watch: the objects there now (from resourceVersion 0) or the events since, then each change
        until timeoutSeconds; 410 Expired when the events since are no longer kept."""
        params = request.params
        try:
            labels = parse_label_selector(params.get("labelSelector"))
            fields = parse_field_selector(params.get("fieldSelector"))
        except ValueError as exc:
            raise api_error(400, "BadRequest", str(exc)) from exc
        timeout = float(params["timeoutSeconds"]) if params.get("timeoutSeconds") else None
        deadline = time.monotonic() + timeout if timeout else None
        since = params.get("resourceVersion") or "0"
        wanted = watch_filter(namespace, request.name, labels, fields)

        def render(event_type: str, obj: Mapping[str, Any]) -> dict[str, Any]:
            return self._watch_event(kind, version, request, event_type, obj)

        yield b""  # send the headers now: the stream is open even while nothing happens
        position = self._rv
        if since == "0":
            for obj in self._selected(kind, namespace, params, request.name):
                yield render("ADDED", obj)
        else:
            position = int(since) if since.isdigit() else self._rv
            expired = self._expired(position)
            if expired is not None:
                yield expired
                return
        async for event in self._events_after(position, kind, wanted, render, deadline):
            yield event

    def _watch_event(
        self, kind: ResourceKind, version: str, request: kmock.Request, event_type: str, obj: Mapping[str, Any]
    ) -> dict[str, Any]:
        """One watch event, its object as a Table when the client asked for one."""
        versioned = self._versioned(kind, version, obj)
        if wants_table(request.headers.get("Accept")):
            versioned = table(
                [versioned],
                kind.columns.get(version, (AGE_COLUMN,)),
                resource_version=versioned["metadata"].get("resourceVersion", ""),
                include_object=request.params.get("includeObject", "Metadata"),
            )
        return {"type": event_type, "object": versioned}

    def _expired(self, position: int) -> dict[str, Any] | None:
        """The 410 Expired error event when the events after `position` are no longer kept, else None."""
        oldest = self._log[0][0] if self._log else self._rv + 1
        if not (len(self._log) == self._log.maxlen and position < oldest - 1):
            return None
        return {
            "type": "ERROR",
            "object": {
                "apiVersion": "v1",
                "kind": "Status",
                "status": "Failure",
                "code": 410,
                "reason": "Expired",
                "message": f"too old resource version: {position} ({oldest - 1})",
            },
        }

    async def _events_after(
        self,
        position: int,
        kind: ResourceKind,
        wanted: Callable[[Mapping[str, Any]], bool],
        render: Callable[[str, Mapping[str, Any]], dict[str, Any]],
        deadline: float | None,
    ) -> AsyncIterator[dict[str, Any]]:
        """The wanted events of `kind` after `position`, as they happen, until `deadline`."""
        while True:
            for rv, which, event in list(self._log):
                if rv > position:
                    position = rv
                    if which == (kind.group, kind.plural) and wanted(event["object"]):
                        yield render(event["type"], event["object"])
            changed = self._changed_event()
            remaining = None if deadline is None else deadline - time.monotonic()
            if remaining is not None and remaining <= 0:
                return
            try:
                await asyncio.wait_for(changed.wait(), timeout=remaining)
            except TimeoutError:
                return

    def _changed_event(self) -> asyncio.Event:
        if self._changed is None:
            self._changed = asyncio.Event()
        return self._changed

    def _notify(self) -> None:
        if self._changed is not None:
            self._changed.set()
            self._changed = None

    # --- writing ----------------------------------------------------------------------------

    def _next_rv(self) -> str:
        self._rv += 1
        return str(self._rv)

    def _write(self, key: StoreKey, obj: dict[str, Any], event_type: str) -> dict[str, Any]:
        obj.setdefault("metadata", {})["resourceVersion"] = self._next_rv()
        if event_type == "DELETED":
            self.store.pop(key, None)
            self._uids.pop(obj["metadata"].get("uid", ""), None)
        else:
            self.store[key] = obj
            self._uids[obj["metadata"]["uid"]] = key
        self._log.append((self._rv, (key[0], key[1]), {"type": event_type, "object": copy.deepcopy(obj)}))
        if event_type == "ADDED":
            self._created.setdefault((key[0], key[1]), []).append(copy.deepcopy(obj["metadata"]))
        self._notify()
        return obj

    def _create(
        self,
        kind: ResourceKind,
        version: str,
        namespace: str | None,
        body: Mapping[str, Any],
        *,
        dry_run: bool = False,
    ) -> dict[str, Any]:
        obj = copy.deepcopy(dict(body))
        meta = obj.setdefault("metadata", {})
        if not meta.get("name") and meta.get("generateName"):
            meta["name"] = meta["generateName"] + _random_suffix()
        name = meta.get("name")
        if not name:
            raise api_error(422, "Invalid", f"{kind.kind}: metadata.name: Required value")
        if kind.namespaced:
            namespace = namespace or meta.get("namespace") or "default"
            if ("", "namespaces", None, namespace) not in self.store:
                raise api_error(404, "NotFound", f'namespaces "{namespace}" not found')
            meta["namespace"] = namespace
        else:
            meta.pop("namespace", None)
            namespace = None
        key: StoreKey = (kind.group, kind.plural, namespace, name)
        if key in self.store:
            resource = f"{kind.plural}.{kind.group}" if kind.group else kind.plural
            raise api_error(
                409, "AlreadyExists", f'{resource} "{name}" already exists', {"name": name, "kind": kind.plural}
            )
        if "status" in kind.subresources and kind.group not in ("", "apiextensions.k8s.io"):
            obj.pop("status", None)  # a status subresource ignores status on create
        apply_defaults(obj, kind.schemas.get(version))
        if (kind.group, kind.plural) == ("", "secrets"):
            fold_string_data(obj)
        obj["apiVersion"], obj["kind"] = kind.api_version(version), kind.kind
        meta["uid"] = str(uuid.uuid4())
        meta["creationTimestamp"] = now_rfc3339()
        meta["generation"] = 1
        for transient in ("deletionTimestamp", "deletionGracePeriodSeconds", "resourceVersion"):
            meta.pop(transient, None)
        if dry_run:
            return obj
        if (kind.group, kind.plural) == ("apiextensions.k8s.io", "customresourcedefinitions"):
            self.register(kind_from_crd(obj))
        return copy.deepcopy(self._write(key, obj, "ADDED"))

    def _check_precondition(self, current: Mapping[str, Any], incoming: Mapping[str, Any]) -> None:
        wanted_rv = (incoming.get("metadata") or {}).get("resourceVersion")
        if wanted_rv and wanted_rv != current["metadata"]["resourceVersion"]:
            name = current["metadata"]["name"]
            raise api_error(
                409,
                "Conflict",
                f'Operation cannot be fulfilled on "{name}": the object has been modified; '
                "please apply your changes to the latest version and try again",
            )

    def _commit_update(
        self,
        kind: ResourceKind,
        key: StoreKey,
        current: dict[str, Any],
        proposed: dict[str, Any],
        subresource: str | None,
        *,
        dry_run: bool,
    ) -> dict[str, Any]:
        """Store `proposed` as the new state of `current`, with the API server's rules for what changes."""
        if subresource == "status":
            result = copy.deepcopy(current)
            if "status" in proposed:
                result["status"] = proposed["status"]
            else:
                result.pop("status", None)
        else:
            result = copy.deepcopy(proposed)
            if (kind.group, kind.plural) == ("", "secrets"):
                fold_string_data(result)
            if "status" in kind.subresources:
                if "status" in current:
                    result["status"] = copy.deepcopy(current["status"])
                else:
                    result.pop("status", None)
        meta, old_meta = result.setdefault("metadata", {}), current["metadata"]
        for fixed in ("name", "namespace", "uid", "creationTimestamp", "deletionTimestamp", "generation"):
            if fixed in old_meta:
                meta[fixed] = old_meta[fixed]
            else:
                meta.pop(fixed, None)
        result["apiVersion"], result["kind"] = current["apiVersion"], current["kind"]
        body_changed = {k: v for k, v in result.items() if k not in ("metadata", "status", "apiVersion", "kind")}
        body_before = {k: v for k, v in current.items() if k not in ("metadata", "status", "apiVersion", "kind")}
        if body_changed != body_before:
            meta["generation"] = int(old_meta.get("generation", 1)) + 1
        if dry_run:
            return result
        if old_meta.get("deletionTimestamp") and not meta.get("finalizers"):
            # The last finalizer is gone: the deletion completes now.
            meta["resourceVersion"] = old_meta["resourceVersion"]
            final = self._write(key, result, "DELETED")
            self._collect_garbage(final["metadata"]["uid"])
            return copy.deepcopy(final)
        if result == current:
            return copy.deepcopy(current)  # a no-op write keeps the resource version (as the real server)
        return copy.deepcopy(self._write(key, result, "MODIFIED"))

    def _patch(
        self, kind: ResourceKind, version: str, namespace: str | None, request: kmock.Request, *, dry_run: bool
    ) -> dict[str, Any]:
        key: StoreKey = (kind.group, kind.plural, namespace, request.name or "")
        content_type = (request.headers.get("Content-Type") or "").split(";")[0].strip()
        text = request.body.decode() if request.body else ""
        if content_type == "application/apply-patch+yaml" and key not in self.store:
            return self._create(kind, version, namespace, self._body(request), dry_run=dry_run)
        current = self._require(kind, namespace, request.name)
        try:
            if content_type == "application/json-patch+json":
                proposed = jsonpatch.apply_patch(current, json.loads(text or "[]"))
            else:
                patch = yaml.safe_load(text) if text else {}
                if not isinstance(patch, dict):
                    raise api_error(400, "BadRequest", "a merge patch must be an object")
                self._check_precondition(current, patch)
                proposed = merge_patch(current, patch)
        except (jsonpatch.JsonPatchException, jsonpatch.JsonPointerException, ValueError, yaml.YAMLError) as exc:
            raise api_error(422, "Invalid", f"the patch cannot be applied: {exc}") from exc
        obj = self._commit_update(kind, key, current, proposed, request.subresource, dry_run=dry_run)
        return self._versioned(kind, version, obj)

    def _replace(
        self, kind: ResourceKind, version: str, namespace: str | None, request: kmock.Request, *, dry_run: bool
    ) -> dict[str, Any]:
        key: StoreKey = (kind.group, kind.plural, namespace, request.name or "")
        body = self._body(request)
        current = self._require(kind, namespace, request.name)
        self._check_precondition(current, body)
        obj = self._commit_update(kind, key, current, body, request.subresource, dry_run=dry_run)
        return self._versioned(kind, version, obj)

    def _delete_request(
        self, kind: ResourceKind, version: str, namespace: str | None, request: kmock.Request, *, dry_run: bool
    ) -> dict[str, Any]:
        options = request.data if isinstance(request.data, dict) else {}
        current = self._require(kind, namespace, request.name)
        preconditions = options.get("preconditions") or {}
        if preconditions.get("uid") and preconditions["uid"] != current["metadata"]["uid"]:
            raise api_error(409, "Conflict", "Precondition failed: UID in precondition does not match")
        if dry_run:
            return self._versioned(kind, version, current)
        orphan = options.get("propagationPolicy") == "Orphan" or request.params.get("propagationPolicy") == "Orphan"
        obj = self.delete_object((kind.group, kind.plural, namespace, request.name or ""), orphan=orphan)
        return self._versioned(kind, version, obj)

    def delete_object(self, key: StoreKey, *, orphan: bool = False) -> dict[str, Any]:
        """Delete as the API server does: mark it while finalizers remain, remove it (and its dependents) when none."""
        current = self.store[key]
        meta = current["metadata"]
        if meta.get("deletionTimestamp"):
            return copy.deepcopy(current)
        if meta.get("finalizers"):
            marked = copy.deepcopy(current)
            marked["metadata"]["deletionTimestamp"] = now_rfc3339()
            marked["metadata"]["deletionGracePeriodSeconds"] = 0
            return copy.deepcopy(self._write(key, marked, "MODIFIED"))
        final = self._write(key, copy.deepcopy(current), "DELETED")
        if not orphan:
            self._collect_garbage(meta["uid"])
        return copy.deepcopy(final)

    def _collect_garbage(self, owner_uid: str) -> None:
        """The garbage collector: delete objects all of whose owners are gone (background propagation)."""
        for key, obj in list(self.store.items()):
            refs = (obj.get("metadata") or {}).get("ownerReferences") or []
            uids = [ref.get("uid") for ref in refs if ref.get("uid")]
            if owner_uid in uids and not any(uid in self._uids for uid in uids) and key in self.store:
                log.debug("garbage-collecting %s/%s %s (owner %s gone)", key[1], key[3], key[2], owner_uid)
                self.delete_object(key)

    # --- service-account tokens -------------------------------------------------------------

    def _sign(self, claims: Mapping[str, Any]) -> str:
        def b64(data: bytes) -> str:
            return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

        header = b64(json.dumps({"alg": "HS256", "typ": "JWT"}).encode())
        payload = b64(json.dumps(claims, sort_keys=True).encode())
        signature = hmac.new(self._token_key, f"{header}.{payload}".encode(), hashlib.sha256).digest()
        return f"{header}.{payload}.{b64(signature)}"

    def _verify(self, token: str) -> dict[str, Any] | None:
        parts = token.split(".")
        if len(parts) != 3:
            return None
        signature = hmac.new(self._token_key, f"{parts[0]}.{parts[1]}".encode(), hashlib.sha256).digest()
        given = base64.urlsafe_b64decode(parts[2] + "=" * (-len(parts[2]) % 4))
        if not hmac.compare_digest(signature, given):
            return None
        claims: dict[str, Any] = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
        return claims

    def issue_token(self, namespace: str, service_account: str, audiences: Iterable[str], seconds: int = 3600) -> str:
        """A bound service-account token (as the kubelet gets for a projected token volume)."""
        sa = self.store.get(("", "serviceaccounts", namespace, service_account))
        if sa is None:
            raise api_error(404, "NotFound", f'serviceaccounts "{service_account}" not found')
        now = int(time.time())
        return self._sign(
            {
                "iss": "https://kubernetes.default.svc",
                "sub": f"system:serviceaccount:{namespace}:{service_account}",
                "aud": list(audiences) or ["https://kubernetes.default.svc"],
                "iat": now,
                "exp": now + max(seconds, 600),
                "kubernetes.io": {
                    "namespace": namespace,
                    "serviceaccount": {"name": service_account, "uid": sa["metadata"]["uid"]},
                },
            }
        )

    def _token_request(self, namespace: str | None, name: str, body: Mapping[str, Any]) -> dict[str, Any]:
        spec = dict(body.get("spec") or {})
        seconds = int(spec.get("expirationSeconds") or 3600)
        token = self.issue_token(namespace or "default", name, spec.get("audiences") or [], seconds)
        expires = time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(time.time() + seconds))
        return {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenRequest",
            "metadata": {"name": name, "namespace": namespace},
            "spec": spec,
            "status": {"token": token, "expirationTimestamp": expires},
        }

    def _token_review(self, body: Mapping[str, Any]) -> dict[str, Any]:
        spec = dict(body.get("spec") or {})
        wanted = list(spec.get("audiences") or [])
        claims = self._verify(str(spec.get("token") or ""))
        status: dict[str, Any] = {"authenticated": False, "user": {}}
        if claims is None:
            status["error"] = "invalid bearer token"
        elif claims["exp"] < time.time():
            status["error"] = "token has expired"
        elif wanted and not set(wanted) & set(claims["aud"]):
            status["error"] = "token audiences are invalid for the target audiences"
        else:
            info = claims["kubernetes.io"]
            sa = self.store.get(("", "serviceaccounts", info["namespace"], info["serviceaccount"]["name"]))
            if sa is None or sa["metadata"]["uid"] != info["serviceaccount"]["uid"]:
                status["error"] = "service account has been deleted"
            else:
                status = {
                    "authenticated": True,
                    "audiences": wanted or claims["aud"],
                    "user": {
                        "username": claims["sub"],
                        "uid": info["serviceaccount"]["uid"],
                        "groups": [
                            "system:serviceaccounts",
                            f"system:serviceaccounts:{info['namespace']}",
                            "system:authenticated",
                        ],
                    },
                }
        return {
            "apiVersion": "authentication.k8s.io/v1",
            "kind": "TokenReview",
            "metadata": {"creationTimestamp": None},
            "spec": spec,
            "status": status,
        }


async def serve(api: EmbeddedKubeAPI, host: str = "127.0.0.1", port: int = 0) -> tuple[aiohttp.web.BaseRunner, int]:
    """Serve `api` over HTTP (the caller has entered `api`); returns the runner and the bound port."""
    server = aiohttp.web.Server(api)
    runner = aiohttp.web.ServerRunner(server, shutdown_timeout=1.0)
    await runner.setup()
    site = aiohttp.web.TCPSite(runner, host, port)
    await site.start()
    bound = runner.addresses[0][1]
    return runner, int(bound)


def kubeconfig(url: str, *, namespace: str = "default", name: str = "kubetune-dev") -> dict[str, Any]:
    """A kubeconfig for the embedded API (it accepts any token; this one only names the user)."""
    return {
        "apiVersion": "v1",
        "kind": "Config",
        "clusters": [{"name": name, "cluster": {"server": url}}],
        "users": [
            {
                "name": f"{name}-admin",
                "user": {"token": "kubetune-dev-" + "".join(secrets.choice(string.ascii_lowercase) for _ in range(8))},
            }
        ],
        "contexts": [{"name": name, "context": {"cluster": name, "user": f"{name}-admin", "namespace": namespace}}],
        "current-context": name,
        "preferences": {},
    }
