"""The dev cluster hands processes absolute paths only, whatever the working directory (issue #13):
kubeconfig, logs, materialised volumes, the KubeRay stand-in's folders, the demo's weight cache.

A driver runs in a folder of its own: a kubeconfig, log or mounted volume named relative to the demo's
working directory points nowhere there (the token of `make demo`'s trainer did, so no progress arrived).
"""

from __future__ import annotations

from pathlib import Path

import pytest

from kubetune_dev.devcluster.cluster import DevCluster
from kubetune_dev.devcluster.kuberay import KubeRayStandIn
from kubetune_dev.devcluster.pods import Sandbox
from kubetune_dev.devcluster.seed import DEFAULT_CACHE, base_weights


@pytest.fixture(autouse=True)
def in_a_folder(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.chdir(tmp_path)


def test_a_relative_workdir_gives_absolute_kubeconfig_and_logs(tmp_path: Path) -> None:
    cluster = DevCluster(workdir=Path(".demo") / "cluster")
    assert cluster.workdir == tmp_path / ".demo" / "cluster"
    assert cluster.kubeconfig_path == tmp_path / ".demo" / "cluster" / "kubeconfig"
    assert Path(cluster.env()["KUBECONFIG"]).is_absolute()


def test_mount_paths_are_rewritten_to_absolute_folders(tmp_path: Path) -> None:
    sandbox = Sandbox(Path(".demo") / "attempt-1")
    sandbox.mounts["/var/run/secrets/kubetune.dev"] = sandbox.root / "volumes" / "kubetune-token"
    config = '{"progress": {"tokenPath": "/var/run/secrets/kubetune.dev/token"}}'
    expected = tmp_path / ".demo" / "attempt-1" / "volumes" / "kubetune-token" / "token"
    assert sandbox.rewrite(config) == f'{{"progress": {{"tokenPath": "{expected}"}}}}'


def test_the_kuberay_stand_in_runs_jobs_under_an_absolute_folder(tmp_path: Path) -> None:
    standin = KubeRayStandIn("http://127.0.0.1:1", Path("rayjobs"))
    assert standin.workdir == tmp_path / "rayjobs"


def test_the_demos_cached_base_weights_have_an_absolute_path(tmp_path: Path) -> None:
    # The checkpoint the demo uploads is read from the cache by path; cached already, it is not retrained.
    cached = tmp_path / DEFAULT_CACHE / "test_resnet-digits-0-4-32px.safetensors"
    cached.parent.mkdir(parents=True)
    cached.write_bytes(b"weights")
    assert base_weights("test_resnet", 32) == cached
