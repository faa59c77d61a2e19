"""`kubetune demo`, end to end: operator -> RayJob -> KubeRay stand-in -> Ray Train -> S3, and back into status.

One slow test (about two minutes on two cores): it runs the demo's code in this process (test_demo_cli.py
runs the console script, as `make demo` does), then, while the demo's cluster is still up, checks what a
user would check: the metrics endpoint, a real kubectl, the exported model evaluated outside the trainer,
and that deleting the job leaves nothing behind.
"""

from __future__ import annotations

import io
import json
import re
import subprocess
import urllib.request
from pathlib import Path
from typing import Any

import pytest

from kubetune_dev import demo
from kubetune_dev.devcluster.cluster import DevCluster
from kubetune_dev.devcluster.seed import split_uri
from tests.support.paths import REPO

FTJ = ("kubetune.dev", "v1alpha1", "finetunejobs")


def evaluate_exported_model(cluster: DevCluster, output_uri: str, validation_uri: str) -> float:
    """Top-1 accuracy of model.safetensors on the validation images, with only timm and model.json."""
    import timm
    import torch
    from PIL import Image
    from safetensors.torch import load_file
    from timm.data import create_transform

    s3 = cluster.s3()
    bucket, prefix = split_uri(output_uri)
    card = json.loads(s3.get_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/model.json")["Body"].read())
    weights = s3.get_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/model.safetensors")["Body"].read()
    path = Path(cluster.workdir) / "model.safetensors"
    path.write_bytes(weights)
    model = timm.create_model(card["architecture"], pretrained=False, num_classes=card["numClasses"])
    model.load_state_dict(load_file(str(path)))
    model.eval()
    transform = create_transform(**card["dataConfig"], is_training=False)
    index = {name: i for i, name in enumerate(card["classNames"])}
    val_bucket, val_prefix = split_uri(validation_uri)
    correct = total = 0
    pages = s3.get_paginator("list_objects_v2").paginate(Bucket=val_bucket, Prefix=val_prefix)
    for page in pages:
        for item in page.get("Contents", []):
            label = item["Key"][len(val_prefix) :].strip("/").split("/")[0]
            image = Image.open(io.BytesIO(s3.get_object(Bucket=val_bucket, Key=item["Key"])["Body"].read()))
            with torch.no_grad():
                predicted = int(model(transform(image.convert("RGB")).unsqueeze(0)).argmax(1))
            correct += int(predicted == index[label])
            total += 1
    assert total > 0
    return correct / total


@pytest.mark.slow
def test_kubetune_demo_runs_the_job_end_to_end(tmp_path: Path, kubectl_bin: str) -> None:
    checked: dict[str, Any] = {}

    def while_up(cluster: DevCluster, job: dict[str, Any]) -> None:
        meta, spec, status = job["metadata"], job["spec"], job["status"]
        name, namespace = meta["name"], meta["namespace"]
        assert status["phase"] == "Succeeded" and status.get("model"), status

        # The operator's real metrics endpoint has the job's series.
        assert cluster.operator is not None
        scraped = urllib.request.urlopen(cluster.operator.metrics_url, timeout=10).read().decode()
        assert "kubetune_" in scraped and name in scraped

        # A real kubectl, with the kubeconfig the demo printed.
        got = subprocess.run(
            [kubectl_bin, f"--kubeconfig={cluster.kubeconfig_path}", "get", "ftj", name],
            capture_output=True,
            text=True,
            timeout=30,
        )
        assert got.returncode == 0 and "Succeeded" in got.stdout, got.stderr

        # history.json has exactly one entry per epoch; the exported model scores what status said.
        bucket, prefix = split_uri(spec["output"]["path"])
        history = json.loads(
            cluster.s3().get_object(Bucket=bucket, Key=f"{prefix.rstrip('/')}/history.json")["Body"].read()
        )
        assert [entry["epoch"] for entry in history] == list(range(1, spec["training"]["epochs"] + 1))
        reported = status["progress"]["metrics"]["valAccuracy"]
        checked["reported"] = reported
        checked["evaluated"] = evaluate_exported_model(cluster, spec["output"]["path"], spec["data"]["validation"])

        # The run's Ray cluster ran with token auth (the stand-in's head and the driver with the Secret's
        # token), behind the job's NetworkPolicy.
        rayjob = cluster.get("ray.io", "v1", "rayjobs", namespace, name) or {}
        assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": f"{name}-ray-token"}
        guards = [
            ("", "v1", "secrets", f"{name}-ray-token"),
            ("networking.k8s.io", "v1", "networkpolicies", f"{name}-ray"),
        ]
        for group, version, plural, guard in guards:
            obj = cluster.get(group, version, plural, namespace, guard)
            assert obj and obj["metadata"]["ownerReferences"][0]["uid"] == meta["uid"], (plural, obj)

        # Deleting the job leaves none of its own objects behind; the namespace's trainer ServiceAccount,
        # shared by its jobs, stays (and is the only trainer ServiceAccount there).
        cluster.delete(*FTJ, namespace, name)
        cluster.wait_for(*FTJ, namespace, name, lambda o: o is None, timeout=60)
        cluster.wait_for("ray.io", "v1", "rayjobs", namespace, name, lambda o: o is None, timeout=30)
        for group, version, plural, guard in guards:
            cluster.wait_for(group, version, plural, namespace, guard, lambda o: o is None, timeout=30)
        accounts = [sa["metadata"] for sa in cluster.list("", "v1", "serviceaccounts", namespace)]
        trainers = [meta["name"] for meta in accounts if "trainer" in meta["name"]]
        assert trainers == ["kubetune-trainer"], accounts
        assert not any(meta.get("ownerReferences") for meta in accounts if meta["name"] == "kubetune-trainer")
        checked["cleaned"] = True

    out = io.StringIO()
    options = demo.DemoOptions(
        workdir=tmp_path / "demo", manifest=REPO / "examples" / "demo-finetunejob.yaml", timeout=480
    )
    code = demo.run(options, out, on_finished=while_up)
    printed = out.getvalue()
    assert code == 0, printed

    lines = printed.splitlines()
    metrics_line = next(i for i, line in enumerate(lines) if line.startswith("metrics: "))
    applied_line = next(i for i, line in enumerate(lines) if line.startswith("applied "))
    assert metrics_line < applied_line  # printed early, before the job starts
    assert re.fullmatch(r"metrics: http://127\.0\.0\.1:\d+/metrics", lines[metrics_line])
    assert "Running" in printed and "Succeeded" in printed  # the live status table
    assert re.search(r"^model: s3://\S+", printed, re.M)
    accuracy = float(re.search(r"^validation accuracy: ([0-9.]+)", printed, re.M).group(1))  # type: ignore[union-attr]
    assert accuracy > 0.8
    curves = Path(re.search(r"^training curves: (.+)$", printed, re.M).group(1))  # type: ignore[union-attr]
    assert curves.read_bytes().startswith(b"\x89PNG")
    # The demo's job has no test set: its report judges the validation images, and says so.
    report = Path(re.search(r"^evaluation report: (.+)$", printed, re.M).group(1))  # type: ignore[union-attr]
    page = report.read_text()
    assert page.startswith("<!DOCTYPE html>") and "Results on the validation set" in page

    assert checked.get("cleaned")
    assert abs(checked["evaluated"] - checked["reported"]) <= 0.005, checked
