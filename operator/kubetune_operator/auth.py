"""Who sent this bearer token, for which audience? Asked of the Kubernetes API with a TokenReview.

Trainer pods carry a projected ServiceAccount token whose audience names their job
(`builders.token_audience`); the API server checks its signature, expiry, audience and that the
ServiceAccount (and pod) it was issued for still exist. Authentic answers are cached for a short while,
keyed by a hash of the audience and the token (never the token itself), so a job's updates cost one
TokenReview per TTL rather than one each.
"""

from __future__ import annotations

import asyncio
import hashlib
import json
import logging
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from kubernetes import client

log = logging.getLogger(__name__)


class ReviewUnavailableError(Exception):
    """The API server could not review the token (unreachable, or the operator lacks the permission)."""


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    username: str


def service_account_username(namespace: str, service_account: str) -> str:
    """The username the API server reports for tokens of a ServiceAccount."""
    return f"system:serviceaccount:{namespace}:{service_account}"


class TokenReviewer:
    """Authenticates bearer tokens through the Kubernetes TokenReview API."""

    def __init__(
        self,
        api_client: client.ApiClient | None = None,
        *,
        ttl_s: float = 30.0,
        max_entries: int = 4096,
    ) -> None:
        self._api = client.AuthenticationV1Api(api_client)
        self._ttl_s = ttl_s
        self._max_entries = max_entries
        self._cache: OrderedDict[str, tuple[float, Identity]] = OrderedDict()

    async def authenticate(self, token: str, audience: str) -> Identity | None:
        """The identity behind `token`, or None when it is not an authentic token for `audience`.

        Raises ReviewUnavailableError when the API server cannot answer, which is not the caller's fault.
        """
        # Keyed by audience too: a token authentic for one job's audience says nothing about another's.
        key = hashlib.sha256(f"{audience}\0{token}".encode()).hexdigest()
        now = time.monotonic()
        hit = self._cache.get(key)
        if hit is not None and hit[0] > now:
            return hit[1]
        identity = await asyncio.to_thread(self._review, token, audience)
        if identity is not None:
            self._cache[key] = (now + self._ttl_s, identity)
            self._cache.move_to_end(key)
            while len(self._cache) > self._max_entries:
                self._cache.popitem(last=False)
        return identity

    def _review(self, token: str, audience: str) -> Identity | None:
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=[audience]))
        try:
            response: Any = self._api.create_token_review(body, _preload_content=False)
        except client.ApiException as exc:
            raise ReviewUnavailableError(f"TokenReview failed: HTTP {exc.status} {exc.reason}") from None
        except Exception as exc:  # urllib3 connection errors and the like
            raise ReviewUnavailableError(f"TokenReview failed: {type(exc).__name__}: {exc}") from None
        status = _json(response).get("status") or {}
        if not status.get("authenticated"):
            if status.get("error"):
                log.debug("token rejected: %s", status["error"])
            return None
        # An API server that does not know audiences would ignore ours; insist that it confirmed it.
        if audience not in (status.get("audiences") or []):
            return None
        username = (status.get("user") or {}).get("username")
        return Identity(username=username) if isinstance(username, str) and username else None


def _json(response: Any) -> dict[str, Any]:
    data = json.loads(response.data)
    return data if isinstance(data, dict) else {}
