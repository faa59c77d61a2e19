"""kopf's diff base in the status, carried by the launch's status write (kubetune_operator.diffbase)."""

from __future__ import annotations

import copy
from typing import Any

import kopf

from kubetune_operator.diffbase import CarriedDiffBase
from kubetune_operator.main import kopf_settings

JOB: dict[str, Any] = {
    "apiVersion": "kubetune.dev/v1alpha1",
    "kind": "FineTuneJob",
    "metadata": {"name": "flowers", "namespace": "default", "uid": "u-1", "labels": {"team": "a"}},
    "spec": {"training": {"epochs": 3}},
}


def storage() -> CarriedDiffBase:
    found = kopf_settings().persistence.diffbase_storage
    assert isinstance(found, CarriedDiffBase)
    return found


def kopf_essence(diffbase: CarriedDiffBase, body: kopf.Body) -> Any:
    # What kopf's processing computes before it stores the diff base (processing._detect_causes).
    return kopf_settings().persistence.progress_storage.clear(essence=diffbase.build(body=body))


def test_kopf_stores_nothing_when_the_status_write_carried_exactly_its_diff_base() -> None:
    diffbase = storage()
    body = kopf.Body(copy.deepcopy(JOB))
    encoded = diffbase.encoded(body)
    diffbase.carried("u-1", encoded)

    patch = kopf.Patch()
    diffbase.store(body=body, patch=patch, essence=kopf_essence(diffbase, body))
    assert not patch  # no second write for a new job

    # Carried once only: the next store (an edited spec, say) is kopf's own write again.
    diffbase.store(body=body, patch=patch, essence=kopf_essence(diffbase, body))
    assert patch["status"]["kopf"]["last-handled-configuration"] == encoded


def test_kopf_stores_its_own_diff_base_when_the_carried_one_differs() -> None:
    diffbase = storage()
    diffbase.carried("u-1", diffbase.encoded(kopf.Body(copy.deepcopy(JOB))))
    edited = copy.deepcopy(JOB)
    edited["spec"]["training"]["epochs"] = 9
    body = kopf.Body(edited)

    patch = kopf.Patch()
    diffbase.store(body=body, patch=patch, essence=kopf_essence(diffbase, body))
    assert '"epochs":9' in patch["status"]["kopf"]["last-handled-configuration"]


def test_the_diff_base_is_read_back_from_the_status_the_launch_wrote() -> None:
    diffbase = storage()
    body = copy.deepcopy(JOB)
    encoded = diffbase.encoded(kopf.Body(body))
    body["status"] = {"phase": "Launching", **CarriedDiffBase.status_fields(encoded)}
    assert diffbase.fetch(body=kopf.Body(body)) == kopf_essence(diffbase, kopf.Body(body))
    assert CarriedDiffBase.written_in(body["status"]) == encoded
