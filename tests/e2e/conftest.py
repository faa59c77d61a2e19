"""End-to-end tests on the embedded cluster (kubetune_dev.devcluster): real protocols on 127.0.0.1."""

from __future__ import annotations

import os
import subprocess
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest

from kubetune_dev.devcluster.cluster import DevCluster
from tests.support.paths import find_kubectl

os.environ.setdefault("RAY_USAGE_STATS_ENABLED", "0")


@pytest.fixture(scope="session")
def kubectl_bin() -> str:
    found = find_kubectl()
    if found is None:
        if os.environ.get("CI"):
            pytest.fail("kubectl is missing: `make tools` installs Debian's kubernetes-client into .tools/")
        pytest.skip("kubectl is not installed (run `make tools`)")
    return found


class Kubectl:
    """Runs the real kubectl against a cluster's kubeconfig."""

    def __init__(self, binary: str, kubeconfig: Path) -> None:
        self.binary = binary
        self.kubeconfig = kubeconfig

    def __call__(self, *args: str, check: bool = True, timeout: float = 30) -> str:
        result = subprocess.run(
            [self.binary, f"--kubeconfig={self.kubeconfig}", *args],
            capture_output=True,
            text=True,
            timeout=timeout,
        )
        if check and result.returncode != 0:
            raise AssertionError(f"kubectl {' '.join(args)} failed ({result.returncode}):\n{result.stderr}")
        return result.stdout + (result.stderr if not check else "")

    def popen(self, *args: str) -> subprocess.Popen[str]:
        return subprocess.Popen(
            [self.binary, f"--kubeconfig={self.kubeconfig}", *args],
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
        )


@pytest.fixture(scope="module")
def api_cluster(tmp_path_factory: pytest.TempPathFactory) -> Iterator[DevCluster]:
    """Only the embedded API (no S3, no KubeRay stand-in): for client-compatibility tests."""
    with DevCluster(workdir=tmp_path_factory.mktemp("api"), s3=False, kuberay=False) as cluster:
        yield cluster


@pytest.fixture()
def kubectl(kubectl_bin: str, api_cluster: DevCluster) -> Kubectl:
    return Kubectl(kubectl_bin, api_cluster.kubeconfig_path)


@pytest.fixture(scope="session")
def busy_world(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Any]:
    """One embedded cluster where several jobs run at once, each with its own trouble (busy_world.py).

    Session-wide, so the fault tests and the progress test share its jobs and one operator.
    """
    from tests.support.busy_world import World

    with DevCluster(workdir=tmp_path_factory.mktemp("busy")) as cluster:
        world = World(cluster)
        try:
            world.setup()
            yield world
        finally:
            world.close()
