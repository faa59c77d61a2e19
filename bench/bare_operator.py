"""The control-plane baseline: a bare kopf operator that creates one child RayJob per FineTuneJob.

What kopf's tutorial would write: one synchronous create handler calling the official client, kopf's
default settings (its own annotations, its handler Events), no validation, status or watching of the
children. Run as `python -m kopf run bench/bare_operator.py --standalone --all-namespaces`.
"""

from __future__ import annotations

from typing import Any

import kopf
from kubernetes import client, config


@kopf.on.startup()
def login(memo: kopf.Memo, **_: Any) -> None:
    config.load_kube_config()
    memo["custom"] = client.CustomObjectsApi()


@kopf.on.create("kubetune.dev", "v1alpha1", "finetunejobs")
def create_rayjob(name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    namespace = namespace or "default"
    child: dict[str, Any] = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"entrypoint": "python -m kubetune_trainer --config /etc/kubetune/trainer-config.json"},
    }
    kopf.adopt(child)
    memo["custom"].create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", child)
