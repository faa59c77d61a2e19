"""KubeRay v1.7's own RayJob schema (vendored) and Kubernetes' PodTemplate schema, as a test check."""

from __future__ import annotations

from functools import cache
from typing import Any

import jsonschema
import kubernetes_validate
import yaml

from kubetune_dev import RAYJOB_CRD  # KubeRay's own RayJob CRD, vendored
from tests.support.k8s_schema import KUBERNETES_VERSION


def _strict(node: Any) -> Any:
    """The CRD schema, refusing unknown fields (as `kubectl apply --validate=strict` does)."""
    if isinstance(node, dict):
        out = {key: _strict(value) for key, value in node.items()}
        if (
            out.get("type") == "object"
            and "properties" in out
            and "additionalProperties" not in out
            and not out.get("x-kubernetes-preserve-unknown-fields")
        ):
            out["additionalProperties"] = False
        return out
    if isinstance(node, list):
        return [_strict(item) for item in node]
    return node


@cache
def rayjob_validator() -> jsonschema.protocols.Validator:
    crd = yaml.load(RAYJOB_CRD.read_text(), Loader=getattr(yaml, "CSafeLoader", yaml.SafeLoader))
    (version,) = [v for v in crd["spec"]["versions"] if v["name"] == "v1"]
    schema = _strict(version["schema"]["openAPIV3Schema"])
    validator_class = jsonschema.validators.validator_for(schema, default=jsonschema.Draft7Validator)
    return validator_class(schema)


def assert_valid_rayjob(rayjob: dict[str, Any]) -> None:
    errors = sorted(rayjob_validator().iter_errors(rayjob), key=lambda e: list(e.absolute_path))
    assert not errors, "\n".join(f"{'.'.join(map(str, e.absolute_path))}: {e.message}" for e in errors)
    # The pod templates inside are Kubernetes' own PodTemplateSpecs: check them with Kubernetes' schema too.
    cluster = rayjob["spec"]["rayClusterSpec"]
    templates = [cluster["headGroupSpec"]["template"]] + [g["template"] for g in cluster["workerGroupSpecs"]]
    for template in templates:
        pod_template = {"apiVersion": "v1", "kind": "PodTemplate", "metadata": {"name": "t"}, "template": template}
        kubernetes_validate.validate(pod_template, KUBERNETES_VERSION, strict=True)
