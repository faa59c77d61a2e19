"""The Kubernetes API permissions the operator's code needs, read from its source.

Two kinds of calls reach the API server from the operator process:
- the `kubernetes` client's methods (`read_namespaced_secret`, `patch_namespaced_custom_object`, …):
  each method's URL template and HTTP verb come from the client's own generated code, so the mapping
  to an RBAC (apiGroup, resource, verb) is the client's, not a hand-written table;
- kopf's: every resource a handler serves is listed and watched; change handlers (create, update,
  resume, delete, field, timer, daemon) patch it (finalizers, kopf's annotations), and write its
  status when they return a result or touch `patch.status`; kopf posts Events and watches the CRDs.

Only the modules the operator process imports (from `kubetune_operator/__main__.py`, transitively) are
read: the CLI's demo and the dev cluster talk to APIs as the user, not as the operator.
"""

from __future__ import annotations

import ast
import importlib
import importlib.util
import inspect
import re
from dataclasses import dataclass
from functools import cache
from pathlib import Path
from typing import Any

import kopf
import kubernetes.client
import yaml

from tests.support.paths import REPO

PACKAGE = "kubetune_operator"
# The operator imports the trainer's pydantic-only contract modules too (config, reporting).
OWN_PACKAGES = frozenset({PACKAGE, "kubetune_trainer"})
EXAMPLE_JOB = REPO / "examples" / "classification-head.yaml"
KOPF_WATCHING = {"event", "index"}
KOPF_CHANGING = {"resume", "create", "update", "delete", "field", "timer", "daemon"}
KOPF_EVENT_POSTERS = {"event", "info", "warn", "exception"}
HTTP_VERBS = {"POST": "create", "PUT": "update", "PATCH": "patch"}


@dataclass(frozen=True, order=True)
class Use:
    """One permission the code needs, and where."""

    group: str
    resource: str  # "finetunejobs" or "finetunejobs/status"
    verb: str
    namespaced: bool
    where: str


class UnresolvedError(Exception):
    """An API call whose group or resource is not a literal or a module constant."""


@cache
def _client_methods() -> dict[str, list[tuple[str, str, str, list[str]]]]:
    """client method name → [(Api class, URL template, HTTP method, positional parameters)]."""
    methods: dict[str, list[tuple[str, str, str, list[str]]]] = {}
    api_dir = Path(kubernetes.client.api.__file__).parent
    call = re.compile(r"def (\w+)_with_http_info\(self.*?call_api\(\s*'([^']+)',\s*'(\w+)'", re.S)
    for source in sorted(api_dir.glob("*_api.py")):
        text = source.read_text()
        class_name = re.search(r"^class (\w+)\(", text, re.M)
        assert class_name, source
        cls = getattr(kubernetes.client, class_name.group(1))
        for name, path, http in call.findall(text):
            params = [p.name for p in inspect.signature(getattr(cls, name)).parameters.values()]
            positional = [p for p in params if p not in {"self", "kwargs"}]
            methods.setdefault(name, []).append((class_name.group(1), path, http, positional))
    return methods


def _grant(path: str, http: str, method: str, params: dict[str, str]) -> tuple[str, str, str, bool] | None:
    """(group, resource, verb, namespaced) of one call, from the client's URL template; None for
    discovery documents (/api/v1, /apis/<group>/<version>), which every authenticated client may read."""
    filled = re.sub(r"\{(group|plural)\}", lambda m: params[m.group(1)], path)
    match = re.fullmatch(r"/(?:api/v1|apis/(?P<group>[^/]+)/[^/]+)/(?P<rest>.+)", filled)
    if match is None:
        return None
    group = match["group"] or ""
    segments = match["rest"].split("/")
    namespaced = len(segments) > 2 and segments[0] == "namespaces" and segments[1] == "{namespace}"
    if namespaced:
        segments = segments[2:]
    resource, named, sub = segments[0], len(segments) > 1, segments[2:] if len(segments) > 2 else []
    if sub:
        resource = f"{resource}/{sub[0]}"
    if http == "GET":
        verb = "watch" if method.startswith("watch_") else ("get" if named else "list")
    elif http == "DELETE":
        verb = "delete" if named else "deletecollection"
    else:
        verb = HTTP_VERBS[http]
    return group, resource, verb, namespaced


def _module_file(module: str) -> Path | None:
    try:
        spec = importlib.util.find_spec(module)
    except (ModuleNotFoundError, ValueError):  # `from package.module import name`: name is no module
        return None
    return Path(spec.origin) if spec and spec.origin and spec.origin.endswith(".py") else None


def operator_modules(entry: str = f"{PACKAGE}.__main__") -> dict[str, Path]:
    """Our modules (both packages) the operator process imports, starting from `entry`."""
    found: dict[str, Path] = {}
    todo = [entry]
    while todo:
        module = todo.pop()
        path = _module_file(module)
        if module in found or path is None:
            continue
        found[module] = path
        for node in ast.walk(ast.parse(path.read_text())):
            names: list[str] = []
            if isinstance(node, ast.Import):
                names = [alias.name for alias in node.names]
            elif isinstance(node, ast.ImportFrom) and node.module:
                base = node.module
                if node.level:
                    base = ".".join([*module.split(".")[: -node.level], node.module])
                names = [base] + [f"{base}.{alias.name}" for alias in node.names]
            todo += [name for name in names if name.split(".")[0] in OWN_PACKAGES and name not in found]
    return found


def _value(node: ast.expr, namespace: dict[str, Any]) -> Any:
    """A literal, or a module-level name / dotted attribute, evaluated in the module."""
    if isinstance(node, ast.Constant):
        return node.value
    if isinstance(node, ast.Name) and node.id in namespace:
        return namespace[node.id]
    if isinstance(node, ast.Attribute):
        return getattr(_value(node.value, namespace), node.attr)
    raise UnresolvedError(ast.unparse(node))


def _call_args(call: ast.Call, skip: int, names: list[str], namespace: dict[str, Any]) -> dict[str, str]:
    """The resolvable str arguments among `names` (a method's positional parameters)."""
    given: dict[str, ast.expr] = dict(zip(names, call.args[skip:], strict=False))
    given |= {kw.arg: kw.value for kw in call.keywords if kw.arg}
    resolved: dict[str, str] = {}
    for name in ("group", "plural"):
        if name in given:
            resolved[name] = str(_value(given[name], namespace))
    return resolved


def _kopf_resource(decorator: ast.Call, namespace: dict[str, Any]) -> tuple[str, str] | None:
    """(group, plural) a kopf handler decorator serves, or None for non-resource handlers."""
    args: list[Any] = []
    for arg in decorator.args:
        if isinstance(arg, ast.Starred):  # @kopf.on.create(*FINETUNEJOBS)
            args.extend(_value(arg.value, namespace))
        else:
            args.append(_value(arg, namespace))
    keywords = {kw.arg: kw.value for kw in decorator.keywords if kw.arg}
    strings = [arg for arg in args if isinstance(arg, str)]
    group = str(_value(keywords["group"], namespace)) if "group" in keywords else None
    plural = str(_value(keywords["plural"], namespace)) if "plural" in keywords else None
    if plural is None and strings:
        plural = strings[-1] if len(strings) > 1 else strings[0].split(".")[0]
        if group is None:
            if len(strings) > 1:
                group = strings[0] if "/" not in strings[0] else strings[0].split("/")[0]
            else:
                group = ".".join(strings[0].split(".")[2:])  # "plural.version.group"
    if plural is None:
        return None
    return ("" if group in {None, "v1"} else str(group)), plural


def _writes_status(function: ast.FunctionDef | ast.AsyncFunctionDef) -> bool:
    """kopf writes a handler's result into status, and `patch.status` edits go there too."""
    for node in ast.walk(function):
        if (
            isinstance(node, ast.Return)
            and node.value is not None
            and not (isinstance(node.value, ast.Constant) and node.value.value is None)
        ):
            return True
        if isinstance(node, ast.Attribute) and node.attr == "status" and ast.unparse(node.value) == "patch":
            return True
        if isinstance(node, ast.Subscript) and ast.unparse(node) in {"patch['status']", 'patch["status"]'}:
            return True
    return False


def _kopf_bookkeeping(group: str, plural: str, kind: str, where: str) -> Use:
    """Where kopf writes what it keeps for a changing handler, by the operator's own kopf settings."""
    from kubetune_operator.main import kopf_settings

    persistence = kopf_settings().persistence
    in_status = isinstance(persistence.diffbase_storage, kopf.StatusDiffBaseStorage) and isinstance(
        persistence.progress_storage, kopf.StatusProgressStorage
    )
    # kopf adds a finalizer (a patch of the object itself) only for deletion handlers.
    if in_status and kind != "delete":
        return Use(group, f"{plural}/status", "patch", True, f"{where} (kopf's bookkeeping in status)")
    return Use(group, plural, "patch", True, f"{where} (finalizers, kopf annotations)")


def _kopf_uses(module: str, tree: ast.Module, namespace: dict[str, Any]) -> list[Use]:
    uses: list[Use] = []
    for node in ast.walk(tree):
        if isinstance(node, ast.FunctionDef | ast.AsyncFunctionDef):
            for decorator in node.decorator_list:
                if not isinstance(decorator, ast.Call):
                    continue
                dotted = ast.unparse(decorator.func)
                kind = dotted.removeprefix("kopf.on.").removeprefix("kopf.")
                if not dotted.startswith("kopf.") or kind not in KOPF_WATCHING | KOPF_CHANGING:
                    continue
                served = _kopf_resource(decorator, namespace)
                if served is None:
                    continue
                group, plural = served
                where = f"{module}:{node.lineno} @{dotted}"
                uses += [Use(group, plural, verb, True, where) for verb in ("list", "watch")]
                if kind in KOPF_CHANGING:
                    uses.append(_kopf_bookkeeping(group, plural, kind, where))
                    uses.append(Use("", "events", "create", True, f"{where} (kopf posts handler events)"))
                    if _writes_status(node):
                        uses.append(Use(group, f"{plural}/status", "patch", True, f"{where} (result in status)"))
        elif isinstance(node, ast.Call) and ast.unparse(node.func) in {f"kopf.{name}" for name in KOPF_EVENT_POSTERS}:
            uses.append(Use("", "events", "create", True, f"{module}:{node.lineno} {ast.unparse(node.func)}"))
    return uses


def _api_receivers(tree: ast.Module) -> dict[str, set[str]]:
    """`api` / `self._api` → the client Api classes assigned to it (`api = client.CoreV1Api()`)."""
    receivers: dict[str, set[str]] = {}
    for node in ast.walk(tree):
        if isinstance(node, ast.Assign | ast.AnnAssign) and isinstance(node.value, ast.Call):
            name = ast.unparse(node.value.func).split(".")[-1]
            if name.endswith("Api"):
                for target in node.targets if isinstance(node, ast.Assign) else [node.target]:
                    receivers.setdefault(ast.unparse(target), set()).add(name)
    return receivers


def _client_uses(module: str, path: Path, tree: ast.Module, namespace: dict[str, Any]) -> list[Use]:
    methods = _client_methods()
    instantiated = set(re.findall(r"\b(\w+Api)\(", path.read_text()))
    receivers = _api_receivers(tree)
    uses: list[Use] = []
    parents = {child: parent for parent in ast.walk(tree) for child in ast.iter_child_nodes(parent)}
    for node in ast.walk(tree):
        if not (isinstance(node, ast.Attribute) and node.attr in methods):
            continue
        candidates = methods[node.attr]
        if len(candidates) > 1:
            receiver = node.value
            classes = (
                {ast.unparse(receiver.func).split(".")[-1]}
                if isinstance(receiver, ast.Call)
                else receivers.get(ast.unparse(receiver), instantiated)
            )
            candidates = [c for c in candidates if c[0] in classes]
            if len(candidates) != 1:
                raise UnresolvedError(f"{module}:{node.lineno}: which API class has {node.attr}? {classes}")
        api_class, template, http, params = candidates[0]
        parent = parents.get(node)
        # api.method(args…), or a call that passes the method on: to_thread(api.method, args…),
        # partial(api.method, …), Watch().stream(api.list_…, …); or a reference kept for later
        # (`return core.create_namespaced_service_account`), whose arguments are not known here.
        where = f"{module}:{node.lineno} {api_class}.{node.attr}"
        try:
            if isinstance(parent, ast.Call) and parent.func is node:
                args = _call_args(parent, 0, params, namespace)
            elif isinstance(parent, ast.Call) and node in parent.args:
                args = _call_args(parent, parent.args.index(node) + 1, params, namespace)
            else:
                args = {}
            grant = _grant(template, http, node.attr, args)
        except (UnresolvedError, KeyError) as exc:
            raise UnresolvedError(f"{where}: cannot tell the group/plural ({exc})") from None
        if grant is None:
            continue
        group, resource, verb, namespaced = grant
        uses.append(Use(group, resource, verb, namespaced, where))
        if verb == "list" and isinstance(parent, ast.Call) and ast.unparse(parent.func).endswith(".stream"):
            uses.append(Use(group, resource, "watch", namespaced, where))
    return uses


def owner_reference_uses(example: Path) -> list[Use]:
    """What the API server asks of the creator of a child whose ownerReference blocks owner deletion.

    With the OwnerReferencesPermissionEnforcement admission plugin (OpenShift enables it), setting
    blockOwnerDeletion needs `update` on the owner's `finalizers` subresource.
    """
    builders = importlib.import_module(f"{PACKAGE}.builders")
    spec = importlib.import_module(f"{PACKAGE}.spec")
    settings = importlib.import_module(f"{PACKAGE}.settings")
    body = yaml.safe_load(example.read_text())
    body["metadata"] |= {"namespace": "default", "uid": "00000000-0000-0000-0000-000000000000"}
    children = builders.build_children(spec.FineTuneJob.from_body(body), settings.OperatorSettings())
    return [
        Use(spec.GROUP, f"{spec.PLURAL}/finalizers", "update", True, f"builders: {child['kind']} blockOwnerDeletion")
        for child in children
        for owner in child["metadata"].get("ownerReferences", [])
        if owner.get("blockOwnerDeletion") and owner["kind"] == spec.KIND
    ]


def operator_uses() -> list[Use]:
    """Every permission the operator process needs, with where each comes from."""
    uses = [
        Use("apiextensions.k8s.io", "customresourcedefinitions", verb, False, "kopf: resource discovery")
        for verb in ("list", "watch")
    ]
    for module, path in sorted(operator_modules().items()):
        tree = ast.parse(path.read_text())
        # Importing __main__ would start the operator; it only imports what does the work.
        namespace = {} if module.endswith(".__main__") else vars(importlib.import_module(module))
        uses += _kopf_uses(module, tree, namespace)
        uses += _client_uses(module, path, tree, namespace)
    uses += owner_reference_uses(EXAMPLE_JOB)
    return sorted(uses)
