"""The operator logs in with the kubeconfig $KUBECONFIG names when it logs in, not when `kubernetes` was imported.

The kubernetes library reads $KUBECONFIG once, at import; kopf's `login_via_client` relies on that
default, so in a process that set KUBECONFIG later (the demo, an embedding test) it loaded
~/.kube/config and retried its login forever.
"""

from __future__ import annotations

import sys
from pathlib import Path

import kopf
import pytest
import yaml
from kubernetes.config import kube_config

from kubetune_operator.kube import Kube, login


def write_kubeconfig(path: Path, server: str, token: str) -> Path:
    path.write_text(
        yaml.safe_dump(
            {
                "apiVersion": "v1",
                "kind": "Config",
                "clusters": [{"name": "c", "cluster": {"server": server}}],
                "users": [{"name": "u", "user": {"token": token}}],
                "contexts": [{"name": "x", "context": {"cluster": "c", "user": "u", "namespace": "team-a"}}],
                "current-context": "x",
            }
        )
    )
    return path


def host_of(kube: Kube) -> str:
    try:
        return str(kube.api_client.configuration.host)
    finally:
        kube.close()


@pytest.fixture(autouse=True)
def outside_a_cluster(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.delenv("KUBERNETES_SERVICE_HOST", raising=False)
    monkeypatch.delenv("KUBERNETES_SERVICE_PORT", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path / "home"))  # no ~/.kube/config to fall back on


def test_login_reads_kubeconfig_at_login_time(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    assert "kubernetes" in sys.modules  # imported before KUBECONFIG is set, as in an embedding process
    first = write_kubeconfig(tmp_path / "first", "https://first.example:6443", "token-one")
    second = write_kubeconfig(tmp_path / "second", "https://second.example:6443", "token-two")
    assert kube_config.KUBE_CONFIG_DEFAULT_LOCATION not in (str(first), str(second))

    monkeypatch.setenv("KUBECONFIG", str(first))
    info = login()
    assert (info.server, info.scheme, info.token) == ("https://first.example:6443", "Bearer", "token-one")
    assert host_of(Kube.from_environment()) == "https://first.example:6443"

    # kopf logs in again (e.g. after a 401): it reads the environment again.
    monkeypatch.setenv("KUBECONFIG", str(second))
    info = login()
    assert (info.server, info.token) == ("https://second.example:6443", "token-two")


def test_no_credentials_is_a_login_error_naming_the_kubeconfig(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBECONFIG", str(tmp_path / "nowhere"))
    with pytest.raises(kopf.LoginError, match="nowhere"):
        login()
    monkeypatch.delenv("KUBECONFIG")
    with pytest.raises(kopf.LoginError, match=r"~/\.kube/config"):
        login()


def test_an_explicit_kubeconfig_wins_over_the_environment(monkeypatch: pytest.MonkeyPatch, tmp_path: Path) -> None:
    monkeypatch.setenv("KUBECONFIG", str(write_kubeconfig(tmp_path / "env", "https://env.example", "a")))
    given = write_kubeconfig(tmp_path / "given", "https://given.example", "b")
    assert host_of(Kube.from_environment(str(given))) == "https://given.example"
