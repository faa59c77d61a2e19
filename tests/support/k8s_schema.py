"""The Kubernetes types in the chart's values.schema.json, copied from Kubernetes' own (strict) schemas.

values.schema.json refers to `#/$defs/io.k8s.api.core.v1.<Type>` for the values that are Kubernetes
objects (resources, affinity, tolerations, security contexts, image pull secrets). Those definitions,
and every definition they refer to, are kubernetes-validate's strict schemas for KUBERNETES_VERSION, so
a typo deep inside an affinity fails at install time like one at the top. `tests/chart/test_chart_values.py`
checks that the file holds exactly what `kubernetes_defs` produces; run this module to rewrite them:

    .venv/bin/python -m tests.support.k8s_schema
"""

from __future__ import annotations

import json
from importlib import resources
from typing import Any

from tests.support.paths import REPO

# The Kubernetes version every schema check of the tests is pinned to (chart, RayJob, rendered objects).
KUBERNETES_VERSION = "1.31.0"
K8S_PREFIX = "io.k8s."
SCHEMA_PATH = REPO / "charts" / "kubetune" / "values.schema.json"


def _all_definitions() -> dict[str, Any]:
    folder = resources.files("kubernetes_validate") / "kubernetes-json-schema" / f"v{KUBERNETES_VERSION}-local-strict"
    defs: dict[str, Any] = json.loads((folder / "_definitions.json").read_text())["$defs"]
    return defs


def _refs(node: Any) -> set[str]:
    """Names of the $defs a schema fragment refers to."""
    found: set[str] = set()
    if isinstance(node, dict):
        ref = node.get("$ref")
        if isinstance(ref, str) and ref.startswith("#/$defs/"):
            found.add(ref.removeprefix("#/$defs/"))
        for value in node.values():
            found |= _refs(value)
    elif isinstance(node, list):
        for value in node:
            found |= _refs(value)
    return found


def kubernetes_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """Every Kubernetes definition `schema` needs, directly or through other definitions."""
    available = _all_definitions()
    own = {name: value for name, value in schema["$defs"].items() if not name.startswith(K8S_PREFIX)}
    wanted = {name for name in _refs(schema["properties"]) | _refs(own) if name.startswith(K8S_PREFIX)}
    needed: dict[str, Any] = {}
    while wanted:
        name = wanted.pop()
        if name in needed:
            continue
        needed[name] = available[name]
        wanted |= _refs(available[name]) - needed.keys()
    return dict(sorted(needed.items()))


def with_kubernetes_defs(schema: dict[str, Any]) -> dict[str, Any]:
    """`schema` with its Kubernetes definitions replaced by a fresh copy; its own definitions kept first."""
    own = {name: value for name, value in schema["$defs"].items() if not name.startswith(K8S_PREFIX)}
    return {**schema, "$defs": {**own, **kubernetes_defs(schema)}}


def main() -> None:
    schema = json.loads(SCHEMA_PATH.read_text())
    SCHEMA_PATH.write_text(json.dumps(with_kubernetes_defs(schema), indent=2) + "\n")
    print(f"wrote {SCHEMA_PATH}")


if __name__ == "__main__":
    main()
