"""The embedded API behaves as kube-apiserver where the operator's clients depend on it.

Driven with the official kubernetes client (what the operator's kube.py uses), over HTTP.
"""

from __future__ import annotations

import json
from collections.abc import Iterator
from typing import Any

import pytest
from kubernetes import client, config, watch

from kubetune_dev.devcluster.apimachinery import human_duration, jsonpath
from kubetune_dev.devcluster.cluster import DevCluster

NS = "default"
FTJ = ("kubetune.dev", "v1alpha1", NS, "finetunejobs")


@pytest.fixture(scope="module")
def api(api_cluster: DevCluster) -> Iterator[client.ApiClient]:
    api_client = config.new_client_from_config(config_file=str(api_cluster.kubeconfig_path))
    yield api_client
    api_client.close()


def job(name: str, **labels: str) -> dict[str, Any]:
    return {
        "apiVersion": "kubetune.dev/v1alpha1",
        "kind": "FineTuneJob",
        "metadata": {"name": name, "labels": labels},
        "spec": {
            "model": {"architecture": "resnet18", "checkpoint": "s3://b/base.safetensors"},
            "data": {"train": "s3://b/train/"},
            "output": {"path": "s3://b/out/"},
        },
    }


def test_objects_get_identity_versions_and_defaults(api: client.ApiClient) -> None:
    objects = client.CustomObjectsApi(api)
    created = objects.create_namespaced_custom_object(*FTJ, job("identity"))
    meta = created["metadata"]
    assert meta["uid"] and meta["creationTimestamp"] and meta["generation"] == 1
    assert created["spec"]["training"]["epochs"] == 10  # the CRD's default
    with pytest.raises(client.ApiException) as exists:
        objects.create_namespaced_custom_object(*FTJ, job("identity"))
    assert exists.value.status == 409


def test_status_subresource_and_generation(api: client.ApiClient) -> None:
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(*FTJ, job("gen"))
    after_status = objects.patch_namespaced_custom_object_status(*FTJ, "gen", {"status": {"phase": "Running"}})
    assert after_status["status"]["phase"] == "Running" and after_status["metadata"]["generation"] == 1
    # Status written through the main resource is ignored; a spec change bumps the generation.
    after_spec = objects.patch_namespaced_custom_object(
        *FTJ, "gen", {"spec": {"training": {"epochs": 3}}, "status": {"phase": "Failed"}}
    )
    assert after_spec["status"]["phase"] == "Running" and after_spec["metadata"]["generation"] == 2
    # A write based on a stale resource version conflicts.
    stale = dict(after_status)
    with pytest.raises(client.ApiException) as conflict:
        objects.replace_namespaced_custom_object(*FTJ, "gen", stale)
    assert conflict.value.status == 409


def test_label_and_field_selectors(api: client.ApiClient) -> None:
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(*FTJ, job("sel-a", team="vision", tier="gold"))
    objects.create_namespaced_custom_object(*FTJ, job("sel-b", team="vision"))
    objects.create_namespaced_custom_object(*FTJ, job("sel-c", team="nlp"))

    def names(**kwargs: str) -> set[str]:
        listing = objects.list_namespaced_custom_object(*FTJ, **kwargs)
        assert listing["kind"] == "FineTuneJobList"
        return {item["metadata"]["name"] for item in listing["items"] if item["metadata"]["name"].startswith("sel-")}

    assert names(label_selector="team=vision") == {"sel-a", "sel-b"}
    assert names(label_selector="team in (vision,nlp),!tier") == {"sel-b", "sel-c"}
    assert names(label_selector="team!=vision") == {"sel-c"}
    assert names(field_selector="metadata.name=sel-b") == {"sel-b"}


def test_a_watch_resumes_from_a_resource_version(api: client.ApiClient) -> None:
    objects = client.CustomObjectsApi(api)
    objects.create_namespaced_custom_object(*FTJ, job("watched-1"))
    since = objects.list_namespaced_custom_object(*FTJ)["metadata"]["resourceVersion"]
    objects.create_namespaced_custom_object(*FTJ, job("watched-2"))
    objects.patch_namespaced_custom_object_status(*FTJ, "watched-2", {"status": {"phase": "Running"}})
    objects.delete_namespaced_custom_object(*FTJ, "watched-2")
    seen = []
    stream = watch.Watch().stream(
        objects.list_namespaced_custom_object, *FTJ, resource_version=since, timeout_seconds=2
    )
    for event in stream:
        seen.append((event["type"], event["object"]["metadata"]["name"]))
    assert seen == [("ADDED", "watched-2"), ("MODIFIED", "watched-2"), ("DELETED", "watched-2")]


def test_finalizers_hold_deletion_and_owners_take_dependents_along(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    owner = core.create_namespaced_config_map(NS, {"metadata": {"name": "owner", "finalizers": ["kubetune.dev/test"]}})
    ref = {"apiVersion": "v1", "kind": "ConfigMap", "name": "owner", "uid": owner.metadata.uid}
    core.create_namespaced_config_map(NS, {"metadata": {"name": "dependent", "ownerReferences": [ref]}})
    core.delete_namespaced_config_map("owner", NS)
    assert core.read_namespaced_config_map("owner", NS).metadata.deletion_timestamp is not None
    assert core.read_namespaced_config_map("dependent", NS)  # the owner is not gone yet
    core.patch_namespaced_config_map("owner", NS, {"metadata": {"finalizers": None}})
    for name in ("owner", "dependent"):
        with pytest.raises(client.ApiException) as gone:
            core.read_namespaced_config_map(name, NS)
        assert gone.value.status == 404


def test_service_account_tokens_are_reviewed_for_their_audience(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    core.create_namespaced_service_account(NS, {"metadata": {"name": "reviewed"}})
    request = {"spec": {"audiences": ["kubetune.dev"], "expirationSeconds": 600}}
    token = core.create_namespaced_service_account_token("reviewed", NS, request).status.token
    auth = client.AuthenticationV1Api(api)

    def review(token: str, audience: str) -> Any:
        return auth.create_token_review({"spec": {"token": token, "audiences": [audience]}}).status

    ok = review(token, "kubetune.dev")
    assert ok.authenticated and ok.user.username == "system:serviceaccount:default:reviewed"
    assert not review(token, "someone-else").authenticated
    assert not review(token[:-2] + "xx", "kubetune.dev").authenticated
    core.delete_namespaced_service_account("reviewed", NS)
    assert not review(token, "kubetune.dev").authenticated  # bound to the ServiceAccount's life


def test_injected_api_faults_take_precedence_then_heal(api: client.ApiClient, api_cluster: DevCluster) -> None:
    objects = client.CustomObjectsApi(api)
    api_cluster.fail_api("list", api_cluster.api.resource("kubetune.dev", "v1alpha1", "finetunejobs"), times=2)
    for _ in range(2):
        with pytest.raises(client.ApiException) as failed:
            objects.list_namespaced_custom_object(*FTJ)
        assert failed.value.status == 503
    assert objects.list_namespaced_custom_object(*FTJ)["kind"] == "FineTuneJobList"
    assert client.CoreV1Api(api).list_namespace().items  # other requests were never affected


def test_printer_column_helpers() -> None:
    obj = {"status": {"conditions": [{"type": "Ready", "status": "True"}], "progress": {"percent": 40}}}
    assert jsonpath(obj, ".status.progress.percent") == 40
    assert jsonpath(obj, '.status.conditions[?(@.type=="Ready")].status') == "True"
    assert jsonpath(obj, ".status.missing") is None
    assert [human_duration(s) for s in (5, 150, 3700, 90000, 400 * 86400)] == ["5s", "2m30s", "61m", "25h", "400d"]
    assert json.loads(json.dumps(obj)) == obj


def test_secret_string_data_is_stored_as_data(api: client.ApiClient) -> None:
    core = client.CoreV1Api(api)
    body = {"metadata": {"name": "creds"}, "stringData": {"user": "kubetune"}, "data": {"kept": "eA=="}}
    core.create_namespaced_secret(NS, body)
    stored = core.read_namespaced_secret("creds", NS)
    assert stored.data == {"user": "a3ViZXR1bmU=", "kept": "eA=="} and not stored.string_data
    core.patch_namespaced_secret("creds", NS, {"stringData": {"user": "other"}})
    assert core.read_namespaced_secret("creds", NS).data["user"] == "b3RoZXI="
