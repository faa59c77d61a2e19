"""Stand-ins for the observability tests: a Kubernetes API (kmock) that also answers TokenReviews, a
hand-moved clock, and the Prometheus tools from `make tools`."""

from __future__ import annotations

import base64
import json
import shutil
from pathlib import Path
from typing import Any

import kmock
import pytest
from kmock._internal import apps

from kubetune_operator.auth import service_account_username
from kubetune_operator.builders import token_audience
from kubetune_operator.settings import DEFAULT_TRAINER_SERVICE_ACCOUNT
from tests.support.paths import REPO

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


def jwt(claims: dict[str, Any], signature: str = "forged") -> str:
    """A token shaped like the kubelet's (a JWT); only the reviewing API server knows which are authentic."""

    def b64(data: bytes) -> str:
        return base64.urlsafe_b64encode(data).rstrip(b"=").decode()

    return ".".join((b64(b'{"alg":"RS256"}'), b64(json.dumps(claims).encode()), b64(signature.encode())))


class AnswersTokenReviews:
    """For a kmock Kubernetes emulator: TokenReview as the virtual resource it is (answered, never stored).

    `issue_token()` plays the kubelet projecting a ServiceAccount token; any other token is forged. A
    review succeeds only for the audience the token was issued for, as the API server's does.
    """

    tokens: dict[str, tuple[str, str]]  # token → (username of its ServiceAccount, its audience)
    review_mode: str  # how the API server answers: "ok", "down" (HTTP 500), "no-audiences"
    reviews: int  # TokenReviews answered

    def __attrs_post_init__(self) -> None:
        super().__attrs_post_init__()  # type: ignore[misc]
        self.tokens = {}
        self.review_mode = "ok"
        self.reviews = 0
        self[TOKENREVIEWS] << self._review  # type: ignore[index]

    async def _handle(self, request: Any) -> Any:
        if request.resource is not None and request.resource.plural == "tokenreviews":
            return await apps.RawHandler._handle(self, request)  # type: ignore[arg-type]
        return await super()._handle(request)  # type: ignore[misc]

    def _review(self, request: Any) -> Any:
        self.reviews += 1
        if self.review_mode == "down":
            raise kmock.KubernetesError(status=500, reason="InternalError", message="etcd is on fire")
        spec = request.data["spec"]
        username, audience = self.tokens.get(spec["token"], (None, None))
        wanted = spec.get("audiences", [])
        authentic = username is not None and (not wanted or audience in wanted)
        audiences = [] if self.review_mode == "no-audiences" else wanted
        status: dict[str, Any] = {"authenticated": authentic}
        if authentic:
            status |= {"user": {"username": username, "groups": ["system:serviceaccounts"]}, "audiences": audiences}
        else:
            status["error"] = "invalid bearer token" if username is None else "token audiences are invalid"
        return {"apiVersion": "authentication.k8s.io/v1", "kind": "TokenReview", "spec": spec, "status": status}

    def issue_token(
        self,
        namespace: str,
        job: str,
        *,
        service_account: str | None = None,
        audience: str | None = None,
        expires: float | None = None,
    ) -> str:
        """A token as the kubelet projects it into the job's pods: of the namespace's shared trainer
        ServiceAccount, for the job's audience (by the uid the job has here now, if it exists); `expires`:
        its `exp` claim (seconds since the epoch)."""
        if audience is None:
            audience = token_audience(namespace, job, self.job_uid(namespace, job))
        account = service_account or DEFAULT_TRAINER_SERVICE_ACCOUNT
        username = service_account_username(namespace, account)
        claims: dict[str, Any] = {"aud": [audience], "sub": username}
        if expires is not None:
            claims["exp"] = int(expires)
        token = jwt(claims, signature=f"{namespace}-{job}-{len(self.tokens)}")
        self.tokens[token] = (username, audience)
        return token

    def job_uid(self, namespace: str, name: str) -> str | None:
        for (resource, ns, nm), obj in self.objects.items():  # type: ignore[attr-defined]
            if resource == FTJ and ns == namespace and nm == name and not obj.deleted:
                uid = (obj.raw.get("metadata") or {}).get("uid")
                return str(uid) if uid else None
        return None


class Cluster(AnswersTokenReviews, kmock.KubernetesEmulator):
    """kmock's Kubernetes emulator answering TokenReviews, with helpers to add and read FineTuneJobs."""

    def add_job(
        self, namespace: str, name: str, status: dict[str, Any] | None = None, *, uid: str | None = None
    ) -> None:
        self.objects[FTJ, namespace, name] = {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"namespace": namespace, "name": name, "uid": uid or f"uid-{name}"},
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
