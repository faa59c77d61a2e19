"""Stand-ins for the observability tests: a Kubernetes API (kmock) that also answers TokenReviews, a
hand-moved clock, and the Prometheus tools from `make tools`."""

from __future__ import annotations

import shutil
from pathlib import Path
from typing import Any

import kmock
import pytest
from kmock._internal import apps

from kubetune_operator.auth import trainer_username

REPO = Path(__file__).resolve().parents[2]
FTJ = kmock.resource("kubetune.dev/v1alpha1/finetunejobs")
TOKENREVIEWS = "post /apis/authentication.k8s.io/v1/tokenreviews"


def tool(name: str) -> Path:
    """A binary that `make tools` unpacks from Debian's prometheus package."""
    path = REPO / ".tools" / "bin" / name
    if path.exists():
        return path
    found = shutil.which(name)
    if found is None:
        pytest.fail(f"{name} is missing: run `make tools` (it unpacks Debian's prometheus package into .tools/)")
    return Path(found)


class AnswersTokenReviews:
    """For a kmock Kubernetes emulator: TokenReview as the virtual resource it is (answered, never stored).

    `issue_token()` plays the kubelet projecting a ServiceAccount token; any other token is forged.
    """

    tokens: dict[str, str]  # token → username of the ServiceAccount it was issued for
    review_mode: str  # how the API server answers: "ok", "down" (HTTP 500), "no-audiences"

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()  # type: ignore[misc]
        self.tokens = {}
        self.review_mode = "ok"
        self[TOKENREVIEWS] << self._review  # type: ignore[index]

    async def _handle(self, request: Any) -> Any:
        if request.resource is not None and request.resource.plural == "tokenreviews":
            return await apps.RawHandler._handle(self, request)  # type: ignore[arg-type]
        return await super()._handle(request)  # type: ignore[misc]

    def _review(self, request: Any) -> Any:
        if self.review_mode == "down":
            raise kmock.KubernetesError(status=500, reason="InternalError", message="etcd is on fire")
        spec = request.data["spec"]
        username = self.tokens.get(spec["token"])
        audiences = [] if self.review_mode == "no-audiences" else spec.get("audiences", [])
        status: dict[str, Any] = {"authenticated": username is not None}
        if username is not None:
            status |= {"user": {"username": username, "groups": ["system:serviceaccounts"]}, "audiences": audiences}
        else:
            status["error"] = "invalid bearer token"
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec, "status": status}

    def issue_token(self, namespace: str, job: str) -> str:
        """A token of the job's trainer ServiceAccount, as the kubelet would project it."""
        token = f"token-{namespace}-{job}-{len(self.tokens)}"
        self.tokens[token] = trainer_username(namespace, job)
        return token


class Cluster(AnswersTokenReviews, kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator answering TokenReviews, with helpers to add and read FineTuneJobs."""

    def add_job(self, namespace: str, name: str, status: dict[str, Any] | None = None) -> None:
        self.objects[FTJ, namespace, name] = {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"namespace": namespace, "name": name, "uid": f"uid-{name}"},
            "spec": {},
            "status": status or {"phase": "Running"},
        }

    def job(self, namespace: str, name: str) -> dict[str, Any]:
        return dict(self.objects[FTJ, namespace, name].raw)


class FakeClock:
    """A monotonic clock the tests move by hand (the rate limit counts seconds)."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now

    def advance(self, seconds: float = 1.0) -> None:
        self.now += seconds
