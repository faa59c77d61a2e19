"""A real kubectl drives the embedded API the way the README tells users to drive the demo."""

from __future__ import annotations

import time
from typing import Any

import yaml

from kubetune_dev.devcluster.cluster import DevCluster
from tests.support.paths import DEMO_MANIFEST

FTJ = ("kubetune.dev", "v1alpha1", "finetunejobs")
Kubectl = Any  # the `kubectl` fixture (conftest.Kubectl)


def _set_progress(cluster: DevCluster, name: str, **status: object) -> None:
    cluster.patch_status(*FTJ, "default", name, status)


def _record_event(cluster: DevCluster, job: dict, reason: str, message: str) -> None:
    meta = job["metadata"]
    cluster.create(
        {
            "apiVersion": "v1",
            "kind": "Event",
            "metadata": {"generateName": meta["name"] + "-", "namespace": meta["namespace"]},
            "involvedObject": {
                "apiVersion": job["apiVersion"],
                "kind": job["kind"],
                "name": meta["name"],
                "namespace": meta["namespace"],
                "uid": meta["uid"],
            },
            "type": "Normal",
            "reason": reason,
            "message": message,
            "firstTimestamp": meta["creationTimestamp"],
            "lastTimestamp": meta["creationTimestamp"],
            "count": 1,
            "source": {"component": "kubetune-operator"},
        }
    )


def test_apply_get_describe_delete_a_finetunejob(kubectl: Kubectl, api_cluster: DevCluster) -> None:
    assert "finetunejob.kubetune.dev/digits-demo created" in kubectl("apply", "-f", str(DEMO_MANIFEST))
    assert "unchanged" in kubectl("apply", "-f", str(DEMO_MANIFEST))

    # The short name and the printer columns, filled from status as the operator would fill it.
    table = kubectl("get", "ftj")
    header = ["NAME", "PHASE", "PROGRESS", "EPOCH", "VAL-ACC", "VAL-MAP", "TRIALS", "BEST", "AGE"]
    assert table.split("\n")[0].split() == header
    _set_progress(
        api_cluster,
        "digits-demo",
        phase="Running",
        progress={"percent": 42, "epoch": 2, "metrics": {"valAccuracy": 0.91}},
    )
    row = kubectl("get", "ftj", "digits-demo").split("\n")[1].split()
    assert row[:5] == ["digits-demo", "Running", "42", "2", "0.91"]
    # A sweep's columns, trials finished of all and the best value, are blank for a job that sweeps nothing
    # (as Val-mAP is for a classifier): the age comes next.
    assert len(row) == 6
    _set_progress(api_cluster, "digits-demo", sweep={"trials": 8, "done": 2, "finished": "3/8", "bestValue": 0.93})
    row = kubectl("get", "ftj", "digits-demo").split("\n")[1].split()
    assert row[:7] == ["digits-demo", "Running", "42", "2", "0.91", "3/8", "0.93"]
    assert "MODEL" in kubectl("get", "ftj", "-o", "wide").split("\n")[0]
    assert "digits-demo" in kubectl("get", "finetunejobs.kubetune.dev", "--all-namespaces")

    # -o yaml: the stored object, with server-set metadata and the CRD's defaults applied.
    job = yaml.safe_load(kubectl("get", "ftj", "digits-demo", "-o", "yaml"))
    assert job["metadata"]["uid"] and job["metadata"]["resourceVersion"]
    assert job["spec"]["training"]["optimizer"] == "adamw"  # a schema default the manifest leaves out
    assert job["status"]["phase"] == "Running"
    listing = yaml.safe_load(kubectl("get", "ftj", "-o", "yaml"))
    assert [item["kind"] for item in listing["items"]] == ["FineTuneJob"]

    # describe tells the story through the job's events.
    _record_event(api_cluster, job, "Launched", "Created RayJob default/digits-demo")
    described = kubectl("describe", "ftj", "digits-demo")
    assert "Launched" in described and "Created RayJob default/digits-demo" in described

    assert 'finetunejob.kubetune.dev "digits-demo" deleted' in kubectl("delete", "ftj", "digits-demo")
    assert "No resources found" in kubectl("get", "ftj", check=False)


def test_get_watch_streams_status_changes(kubectl: Kubectl, api_cluster: DevCluster) -> None:
    manifest = yaml.safe_load(DEMO_MANIFEST.read_text())
    manifest["metadata"]["name"] = "watched"
    api_cluster.create(manifest)
    watcher = kubectl.popen("get", "ftj", "watched", "-w")
    try:
        time.sleep(1.5)
        for percent in (10, 55):
            _set_progress(api_cluster, "watched", phase="Running", progress={"percent": percent, "epoch": 1})
            time.sleep(0.5)
        time.sleep(1.0)
    finally:
        watcher.terminate()
        output, _ = watcher.communicate(timeout=10)
    lines = [line.split() for line in output.strip().split("\n")]
    assert lines[0][0] == "NAME"
    assert [line[2] for line in lines[2:]] == ["10", "55"], output  # one line per change, none repeated
    api_cluster.delete(*FTJ, "default", "watched")


def test_kubectl_lists_core_objects_and_the_kuberay_kinds(kubectl: Kubectl) -> None:
    assert "default" in kubectl("get", "namespaces")
    kubectl("create", "configmap", "settings", "--from-literal=a=1")
    assert yaml.safe_load(kubectl("get", "cm", "settings", "-o", "yaml"))["data"] == {"a": "1"}
    resources = kubectl("api-resources")
    assert "rayjobs" in resources and "finetunejobs" in resources and "ftj" in resources
    assert "No resources found" in kubectl("get", "rayjobs", check=False)
