"""Pure pieces of Kubernetes API-server behaviour the embedded API needs (no I/O).

Label and field selectors, the JSONPath subset printer columns use, server-side Table rendering with
human-readable ages, JSON merge patch, and structural-schema defaulting. Each follows what
kube-apiserver does closely enough for kubectl, kopf and the kubernetes client to behave as against
a real cluster; corner cases a real server handles and these don't are named where they matter.
"""

from __future__ import annotations

import copy
import datetime as dt
import re
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, field
from typing import Any

# --- selectors --------------------------------------------------------------------------------


@dataclass(frozen=True)
class LabelRequirement:
    key: str
    op: str  # "=", "!=", "in", "notin", "exists", "!exists"
    values: tuple[str, ...] = ()

    def matches(self, labels: Mapping[str, str]) -> bool:
        present = self.key in labels
        value = labels.get(self.key)
        if self.op == "=":
            return present and value == self.values[0]
        if self.op == "!=":
            return not present or value != self.values[0]
        if self.op == "in":
            return present and value in self.values
        if self.op == "notin":
            return not present or value not in self.values
        if self.op == "exists":
            return present
        return not present


_SET_EXPR = re.compile(r"^\s*([^\s!=(),]+)\s+(in|notin)\s+\(([^)]*)\)\s*$")
_EQ_EXPR = re.compile(r"^\s*([^\s!=(),]+)\s*(==|=|!=)\s*([^\s,]*)\s*$")
_EXISTS_EXPR = re.compile(r"^\s*(!?)\s*([^\s!=(),]+)\s*$")


def _split_top_level(selector: str) -> list[str]:
    """Split on commas that are not inside parentheses (set-based values contain commas)."""
    parts: list[str] = []
    current: list[str] = []
    depth = 0
    for char in selector:
        if char == "(":
            depth += 1
        elif char == ")":
            depth -= 1
        if char == "," and depth == 0:
            parts.append("".join(current))
            current = []
        else:
            current.append(char)
    parts.append("".join(current))
    return [part for part in parts if part.strip()]


def parse_label_selector(selector: str | None) -> list[LabelRequirement]:
    """Parse `a=b,c!=d,e in (f,g),!h`; raises ValueError on syntax the API server would reject."""
    if not selector:
        return []
    out = []
    for part in _split_top_level(selector):
        if m := _SET_EXPR.match(part):
            values = tuple(v.strip() for v in m.group(3).split(",") if v.strip())
            out.append(LabelRequirement(m.group(1), m.group(2), values))
        elif m := _EQ_EXPR.match(part):
            op = "!=" if m.group(2) == "!=" else "="
            out.append(LabelRequirement(m.group(1), op, (m.group(3),)))
        elif m := _EXISTS_EXPR.match(part):
            out.append(LabelRequirement(m.group(2), "!exists" if m.group(1) else "exists"))
        else:
            raise ValueError(f"unable to parse requirement: {part!r}")
    return out


def matches_labels(obj: Mapping[str, Any], requirements: Iterable[LabelRequirement]) -> bool:
    labels = (obj.get("metadata") or {}).get("labels") or {}
    return all(req.matches(labels) for req in requirements)


def parse_field_selector(selector: str | None) -> list[tuple[str, str, str]]:
    """Parse `metadata.name=x,involvedObject.uid!=y` into (path, op, value) triples."""
    if not selector:
        return []
    out = []
    for part in selector.split(","):
        if not part.strip():
            continue
        m = re.match(r"^\s*([^=!\s]+)\s*(==|=|!=)\s*(.*?)\s*$", part)
        if not m:
            raise ValueError(f"invalid field selector: {part!r}")
        out.append((m.group(1), "!=" if m.group(2) == "!=" else "=", m.group(3)))
    return out


def dotted(obj: Mapping[str, Any], path: str) -> Any:
    current: Any = obj
    for key in path.split("."):
        if not isinstance(current, Mapping) or key not in current:
            return None
        current = current[key]
    return current


def matches_fields(obj: Mapping[str, Any], requirements: Iterable[tuple[str, str, str]]) -> bool:
    # A real server supports a fixed set of fields per resource; any dotted path is a superset of that.
    for path, op, value in requirements:
        actual = dotted(obj, path)
        actual_text = "" if actual is None else str(actual)
        if (actual_text == value) != (op == "="):
            return False
    return True


# --- JSONPath subset (printer columns) -------------------------------------------------------------

_JSONPATH_TOKEN = re.compile(
    r"\.([A-Za-z0-9_\-]+)|\[(\d+)\]|\[\?\(@\.([A-Za-z0-9_.\-]+)\s*==\s*[\"']([^\"']*)[\"']\)\]"
)


def jsonpath(obj: Any, path: str) -> Any:
    """Evaluate `.a.b`, `.a[0]` and `.a[?(@.type=="Ready")].status` — what printer columns use."""
    current: list[Any] = [obj]
    pos = 0
    path = path.strip()
    if path.startswith("{") and path.endswith("}"):
        path = path[1:-1]
    while pos < len(path):
        m = _JSONPATH_TOKEN.match(path, pos)
        if not m:
            return None
        pos = m.end()
        nxt: list[Any] = []
        for item in current:
            if m.group(1) is not None and isinstance(item, Mapping) and m.group(1) in item:
                nxt.append(item[m.group(1)])
            elif m.group(2) is not None and isinstance(item, list) and int(m.group(2)) < len(item):
                nxt.append(item[int(m.group(2))])
            elif m.group(3) is not None and isinstance(item, list):
                nxt.extend(el for el in item if isinstance(el, Mapping) and str(dotted(el, m.group(3))) == m.group(4))
        current = nxt
    return current[0] if current else None


# --- time ---------------------------------------------------------------------------------------


def now_rfc3339() -> str:
    return dt.datetime.now(tz=dt.UTC).strftime("%Y-%m-%dT%H:%M:%SZ")


def parse_time(value: str) -> dt.datetime | None:
    try:
        parsed = dt.datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


def human_duration(seconds: float) -> str:
    """Kubernetes' duration.HumanDuration, as kubectl shows ages."""
    if seconds < -1:
        return "<invalid>"
    s = max(int(seconds), 0)
    minutes, hours, days = s // 60, s // 3600, s // 86400
    if s < 120:
        return f"{s}s"
    if minutes < 10:
        return f"{minutes}m{s % 60}s" if s % 60 else f"{minutes}m"
    if minutes < 180:
        return f"{minutes}m"
    if hours < 8:
        return f"{hours}h{minutes % 60}m" if minutes % 60 else f"{hours}h"
    if hours < 48:
        return f"{hours}h"
    if hours < 24 * 8:
        return f"{days}d{hours % 24}h" if hours % 24 else f"{days}d"
    if hours < 24 * 365 * 2:
        return f"{days}d"
    if hours < 24 * 365 * 8:
        return f"{days // 365}y{days % 365}d"
    return f"{days // 365}y"


# --- tables ---------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Column:
    name: str
    type: str
    json_path: str
    description: str = ""
    priority: int = 0
    format: str = ""

    def definition(self) -> dict[str, Any]:
        return {
            "name": self.name,
            "type": self.type,
            "format": self.format,
            "description": self.description,
            "priority": self.priority,
        }


NAME_COLUMN = Column("Name", "string", ".metadata.name", "Name must be unique within a namespace.", format="name")
AGE_COLUMN = Column("Age", "date", ".metadata.creationTimestamp", "Time since the object was created.")
DEFAULT_COLUMNS = (AGE_COLUMN,)


def columns_from_crd_version(version: Mapping[str, Any]) -> tuple[Column, ...]:
    columns = tuple(
        Column(
            name=col["name"],
            type=col.get("type", "string"),
            json_path=col["jsonPath"],
            description=col.get("description", ""),
            priority=int(col.get("priority", 0)),
            format=col.get("format", ""),
        )
        for col in version.get("additionalPrinterColumns") or ()
    )
    return columns or DEFAULT_COLUMNS


def _cell(column: Column, obj: Mapping[str, Any], now: dt.datetime) -> Any:
    value = jsonpath(obj, column.json_path)
    if value is None:
        return None
    if column.type == "date" and isinstance(value, str):
        when = parse_time(value)
        return human_duration((now - when).total_seconds()) if when else "<invalid>"
    if isinstance(value, dict | list):
        import json

        return json.dumps(value, separators=(",", ":"))
    return value


def partial_metadata(obj: Mapping[str, Any]) -> dict[str, Any]:
    return {
        "kind": "PartialObjectMetadata",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": copy.deepcopy(obj.get("metadata") or {}),
    }


def table(
    objects: Iterable[Mapping[str, Any]],
    columns: Iterable[Column],
    *,
    resource_version: str,
    include_object: str = "Metadata",
) -> dict[str, Any]:
    """A meta.k8s.io/v1 Table, as kube-apiserver serves `Accept: application/json;as=Table`."""
    cols = (NAME_COLUMN, *columns)
    now = dt.datetime.now(tz=dt.UTC)
    rows = []
    for obj in objects:
        row: dict[str, Any] = {"cells": [_cell(col, obj, now) for col in cols]}
        if include_object == "Object":
            row["object"] = copy.deepcopy(dict(obj))
        elif include_object != "None":
            row["object"] = partial_metadata(obj)
        rows.append(row)
    return {
        "kind": "Table",
        "apiVersion": "meta.k8s.io/v1",
        "metadata": {"resourceVersion": resource_version},
        "columnDefinitions": [col.definition() for col in cols],
        "rows": rows,
    }


def wants_table(accept: str | None) -> bool:
    return bool(accept) and any("as=Table" in part for part in (accept or "").split(","))


# --- patches and defaults ---------------------------------------------------------------------


def merge_patch(target: Any, patch: Any) -> Any:
    """RFC 7386 JSON merge patch (null deletes). Also stands in for strategic merge patch."""
    if not isinstance(patch, Mapping):
        return copy.deepcopy(patch)
    result = dict(target) if isinstance(target, Mapping) else {}
    for key, value in patch.items():
        if value is None:
            result.pop(key, None)
        else:
            result[key] = merge_patch(result.get(key), value)
    return result


def apply_defaults(value: Any, schema: Mapping[str, Any] | None) -> Any:
    """Structural-schema defaulting: fill `default`s of absent properties inside present objects."""
    if not schema:
        return value
    if isinstance(value, dict):
        props = schema.get("properties") or {}
        for key, sub in props.items():
            if key not in value and "default" in sub:
                value[key] = copy.deepcopy(sub["default"])
            if key in value:
                value[key] = apply_defaults(value[key], sub)
        extra = schema.get("additionalProperties")
        if isinstance(extra, Mapping):
            for key in list(value):
                if key not in props:
                    value[key] = apply_defaults(value[key], extra)
    elif isinstance(value, list) and isinstance(schema.get("items"), Mapping):
        return [apply_defaults(item, schema["items"]) for item in value]
    return value


@dataclass
class ResourceKind:
    """What the embedded API knows about one resource (one group/plural, any served version)."""

    group: str
    plural: str
    kind: str
    singular: str
    namespaced: bool
    versions: tuple[str, ...]
    short_names: tuple[str, ...] = ()
    categories: tuple[str, ...] = ()
    subresources: tuple[str, ...] = ()
    columns: dict[str, tuple[Column, ...]] = field(default_factory=dict)
    schemas: dict[str, Mapping[str, Any]] = field(default_factory=dict)
    verbs: tuple[str, ...] = ("create", "delete", "deletecollection", "get", "list", "patch", "update", "watch")

    def api_version(self, version: str) -> str:
        return f"{self.group}/{version}" if self.group else version


def kind_from_crd(crd: Mapping[str, Any]) -> ResourceKind:
    spec = crd["spec"]
    names = spec["names"]
    served = [v for v in spec["versions"] if v.get("served", True)]
    subresources = set()
    for version in served:
        subresources |= set((version.get("subresources") or {}).keys())
    return ResourceKind(
        group=spec["group"],
        plural=names["plural"],
        kind=names["kind"],
        singular=names.get("singular") or names["kind"].lower(),
        namespaced=spec.get("scope", "Namespaced") == "Namespaced",
        versions=tuple(v["name"] for v in served),
        short_names=tuple(names.get("shortNames") or ()),
        categories=tuple(names.get("categories") or ()),
        subresources=tuple(sorted(subresources)),
        columns={v["name"]: columns_from_crd_version(v) for v in served},
        schemas={v["name"]: (v.get("schema") or {}).get("openAPIV3Schema") or {} for v in served},
    )
