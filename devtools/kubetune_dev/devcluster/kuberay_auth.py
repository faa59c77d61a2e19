"""KubeRay's token authentication (`rayClusterSpec.authOptions`, KubeRay >= 1.5), as the stand-in honours it.

Following KubeRay v1.7 (`common/pod.go` SetContainerTokenAuthEnvVars, `raycluster_controller.go`
reconcileAuthSecret, `utils.GetRayDashboardClientFunc`):

- `authOptions.mode: token` turns it on; the token is the `auth_token` key of the Secret
  `authOptions.secretName`, or of a Secret KubeRay makes itself, named after the Ray cluster, with a random
  token, when no name is given;
- every Ray container (and KubeRay's wait-gcs-ready init container) gets `RAY_AUTH_MODE=token` and
  `RAY_AUTH_TOKEN` from that key, unless it sets them itself;
- KubeRay reads the token from the Secret to submit the run to the dashboard; a missing Secret or key
  holds the submission back.

The stand-in's Ray head then runs with token auth on (Ray >= 2.52): its GCS, raylet and every client
refuse a caller without the token, so the demo and the end-to-end tests run with it as a cluster would.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Mapping
from typing import Any

from kubetune_dev.devcluster.client import AsyncKube, path
from kubetune_dev.devcluster.pods import PodNotReadyError

TOKEN_KEY = "auth_token"
MODE_ENV = "RAY_AUTH_MODE"
TOKEN_ENV = "RAY_AUTH_TOKEN"


def token_secret_name(cluster_spec: Mapping[str, Any], cluster_name: str) -> str | None:
    """The Secret holding the cluster's token; None when token auth is off."""
    options = cluster_spec.get("authOptions") or {}
    if options.get("mode") != "token":
        return None
    return str(options.get("secretName") or cluster_name)


def with_token_auth(container: Mapping[str, Any], secret_name: str | None) -> dict[str, Any]:
    """`container` with the token auth env KubeRay adds (what it sets itself is kept)."""
    out = dict(container)
    if secret_name is None:
        return out
    env = list(out.get("env") or [])
    names = {var.get("name") for var in env}
    if MODE_ENV not in names:
        env.append({"name": MODE_ENV, "value": "token"})
    if TOKEN_ENV not in names:
        env.append({"name": TOKEN_ENV, "valueFrom": {"secretKeyRef": {"name": secret_name, "key": TOKEN_KEY}}})
    out["env"] = env
    return out


async def ensure_generated_secret(kube: AsyncKube, namespace: str, name: str, owner: Mapping[str, Any]) -> None:
    """KubeRay's own token Secret for a cluster whose authOptions names none (created once)."""
    if await kube.get(path("", "v1", "secrets", namespace, name)) is not None:
        return
    token = base64.b64encode(secrets.token_bytes(32)).decode()
    body = {
        "apiVersion": "v1",
        "kind": "Secret",
        "metadata": {"name": name, "namespace": namespace, "ownerReferences": [dict(owner)]},
        "data": {TOKEN_KEY: base64.b64encode(token.encode()).decode()},
    }
    await kube.create(path("", "v1", "secrets", namespace), body)


async def submission_token(kube: AsyncKube, namespace: str, secret_name: str) -> str:
    """The token KubeRay submits the run with, read from the Secret; PodNotReadyError while it is missing."""
    secret = await kube.get(path("", "v1", "secrets", namespace, secret_name))
    data = (secret or {}).get("data") or {}
    if TOKEN_KEY not in data:
        raise PodNotReadyError(f'failed to get auth secret {namespace}/{secret_name}: no key "{TOKEN_KEY}"')
    return base64.b64decode(data[TOKEN_KEY]).decode()
