"""The operator embedded in a process that set KUBECONFIG after importing `kubernetes` (as the demo and
the e2e tests do) logs in with that kubeconfig and serves jobs, with no login handler of its own."""

from __future__ import annotations

import asyncio
import dataclasses
import sys
import threading

import pytest
import yaml

from kubetune_dev.devcluster.cluster import LOCAL_S3, DevCluster
from kubetune_dev.devcluster.processes import free_port
from kubetune_operator import main
from kubetune_operator.settings import OperatorSettings
from tests.support.paths import DEMO_MANIFEST


def test_the_embedded_operator_logs_in_with_the_kubeconfig_set_after_import(
    api_cluster: DevCluster, monkeypatch: pytest.MonkeyPatch
) -> None:
    assert "kubernetes" in sys.modules
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.setenv("KUBECONFIG", str(api_cluster.kubeconfig_path))
    settings = dataclasses.replace(
        OperatorSettings.from_env(),
        metrics_port=free_port(),
        progress_port=free_port(),
        namespaces=(),
        allowed_s3_endpoints=(LOCAL_S3,),  # the demo job's bucket
    )
    stop = threading.Event()
    thread = threading.Thread(target=lambda: asyncio.run(main.serve(settings, stop_flag=stop)), daemon=True)
    thread.start()
    manifest = dict(yaml.safe_load(DEMO_MANIFEST.read_text()))
    manifest["metadata"]["name"] = "login-check"
    try:
        api_cluster.create(manifest)
        # The API serves RayJobs (no KubeRay runs them here): the operator launching one shows it is in.
        api_cluster.wait_for("ray.io", "v1", "rayjobs", "default", "login-check", lambda o: o is not None, timeout=60)
    finally:
        stop.set()
        thread.join(30)
        api_cluster.delete("kubetune.dev", "v1alpha1", "finetunejobs", "default", "login-check")
    assert not thread.is_alive()
