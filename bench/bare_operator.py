"""The control-plane baselines: bare kopf operators, as kopf's tutorial would write them.

- Default: one synchronous create handler that creates one child RayJob per FineTuneJob with the
  official client; kopf's default settings (its own annotations, its handler Events); no validation,
  status or watching of the children.
- With `KUBETUNE_BENCH_SAME_WORK=1`: the same handler making kubetune's API calls for a new job, one
  after the other: the namespace's shared trainer ServiceAccount (the first job only), the RayJob
  kubetune's builders make, one status patch (the status kubetune writes once the RayJob exists) and
  one Event; kopf posts only its errors as Events, as kubetune's settings say. kopf's own write of
  its diff base stays an annotation patch here (kubetune's status write carries it). It tells the
  cost of the work itself from kubetune's overhead.

Run as `python -m kopf run bench/bare_operator.py --standalone --all-namespaces`.
"""

from __future__ import annotations

import json
import logging
import os
import threading
from datetime import UTC, datetime
from typing import Any

import kopf
from kubernetes import client, config

SAME_WORK_ENV = "KUBETUNE_BENCH_SAME_WORK"
SAME_WORK = os.environ.get(SAME_WORK_ENV) == "1"


@kopf.on.startup()
def login(memo: kopf.Memo, settings: kopf.OperatorSettings, **_: Any) -> None:
    config.load_kube_config()
    memo["core"] = client.CoreV1Api()
    memo["custom"] = client.CustomObjectsApi()
    memo["networking"] = client.NetworkingV1Api()
    memo["accounts"] = set()
    memo["accounts_lock"] = threading.Lock()
    if SAME_WORK:
        settings.posting.level = logging.ERROR


@kopf.on.create("kubetune.dev", "v1alpha1", "finetunejobs")
def create_rayjob(body: kopf.Body, name: str, namespace: str | None, memo: Any, **_: Any) -> None:
    namespace = namespace or "default"
    if SAME_WORK:
        same_work(body, name, namespace, memo)
        return
    child: dict[str, Any] = {
        "apiVersion": "ray.io/v1",
        "kind": "RayJob",
        "metadata": {"name": name, "namespace": namespace},
        "spec": {"entrypoint": "python -m kubetune_trainer"},
    }
    kopf.adopt(child)
    memo["custom"].create_namespaced_custom_object("ray.io", "v1", namespace, "rayjobs", child)


def same_work(body: kopf.Body, name: str, namespace: str, memo: Any) -> None:
    # kubetune's own modules only make the request bodies, so both sides send the same bytes.
    from kubetune_operator import lifecycle
    from kubetune_operator.builders import (
        build_children,
        build_ray_token_secret,
        build_service_account,
        new_ray_token,
    )
    from kubetune_operator.incoming import InvalidJob, receive
    from kubetune_operator.settings import OperatorSettings

    job = receive(dict(body))
    assert not isinstance(job.job, InvalidJob), job.job.message
    settings = OperatorSettings.from_env()
    *guards, rayjob = build_children(job.job, settings)
    with memo["accounts_lock"]:  # sync handlers run in threads: one create per namespace
        if namespace not in memo["accounts"]:
            memo["core"].create_namespaced_service_account(namespace, build_service_account(namespace, settings))
            memo["accounts"].add(namespace)
    memo["core"].create_namespaced_secret(namespace, build_ray_token_secret(job.job, new_ray_token()))
    for guard in guards:  # the job's NetworkPolicy
        memo["networking"].create_namespaced_network_policy(namespace, guard)
    response = memo["custom"].create_namespaced_custom_object(
        "ray.io", "v1", namespace, "rayjobs", rayjob, _preload_content=False
    )
    created = json.loads(response.data)
    change = lifecycle.follow_rayjob(job, created, now=datetime.now(UTC))
    memo["custom"].patch_namespaced_custom_object_status(
        "kubetune.dev", "v1alpha1", namespace, "finetunejobs", name, {"status": change.patch}
    )
    for event in change.events:
        kopf.event(body, type=event.type, reason=event.reason, message=event.message)
