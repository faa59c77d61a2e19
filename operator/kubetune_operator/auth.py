"""Who sent this bearer token, for which job? Asked of the Kubernetes API with a TokenReview.

Trainer pods carry a projected ServiceAccount token whose audience names their job
(`builders.token_audience`: `kubetune.dev/<job uid>`); the API server checks its signature, expiry,
audience and that the ServiceAccount (and pod) it was issued for still exist.

The token's own claims say which job it claims to be for (`claimed_job_uid`, read without trusting
them); only the TokenReview for that audience decides. So a request is authenticated before anything
about the job is looked up, and a token that is not even a JWT for a kubetune audience costs no
TokenReview at all.

Answers are cached, keyed by a hash of the audience and the token (never the token itself): authentic
ones for `ttl_s` (5 minutes) but never past the token's own expiry (its `exp` claim, which can only
shorten the time), so a job's updates cost one TokenReview per token and TTL rather than one each (at
1,000 jobs: ~3 a second, against ~33 with the 30 s it had); refusals for `failure_ttl_s`, so a forged
token sent again and again costs one. What the longer TTL gives away: a token the API server would refuse
now (its pod deleted) is still accepted for at most `ttl_s` after its first review, and only for its own
job's audience; the job's uid is still checked on every update. Both caches are bounded, concurrent
reviews of the same token share one request, and at most `max_in_flight` reviews run at once.
"""

from __future__ import annotations

import asyncio
import base64
import binascii
import hashlib
import json
import logging
import re
import time
from collections import OrderedDict
from dataclasses import dataclass
from typing import Any

from kubernetes import client

from kubetune_operator.builders import TOKEN_AUDIENCE_PREFIX
from kubetune_operator.kube import REQUEST_TIMEOUT

log = logging.getLogger(__name__)

# A projected ServiceAccount token is about 1 KB; aiohttp refuses header lines over 8 KiB anyway.
MAX_TOKEN_LENGTH = 8 * 1024
# `kubetune.dev/<uid>`: a Kubernetes uid (a UUID); `kubetune.dev/<namespace>/<name>` (what `kubetune
# render` writes for a job without a uid) names no job the operator runs.
_JOB_AUDIENCE = re.compile(rf"^{re.escape(TOKEN_AUDIENCE_PREFIX)}/([A-Za-z0-9][-A-Za-z0-9]{{0,63}})$")


# How long an authentic answer is kept (never past the token's expiry); refusals are kept 10 s.
AUTHENTIC_TTL_S = 300.0


class ReviewUnavailableError(Exception):
    """The API server could not review the token (unreachable, or the operator lacks the permission)."""


@dataclass(frozen=True)
class Identity:
    """An authenticated caller."""

    username: str


def service_account_username(namespace: str, service_account: str) -> str:
    """The username the API server reports for tokens of a ServiceAccount."""
    return f"system:serviceaccount:{namespace}:{service_account}"


def _claims(token: str) -> dict[str, Any]:
    """The token's JWT claims, unverified; empty when it is no JWT."""
    parts = token.split(".")
    if len(token) > MAX_TOKEN_LENGTH or len(parts) != 3:
        return {}
    try:
        claims = json.loads(base64.urlsafe_b64decode(parts[1] + "=" * (-len(parts[1]) % 4)))
    except (binascii.Error, ValueError, RecursionError):
        return {}
    return claims if isinstance(claims, dict) else {}


def claimed_expiry(token: str) -> float | None:
    """When the token says it expires (its unverified `exp`, seconds since the epoch); only ever shortens
    how long an authentic answer is cached."""
    exp = _claims(token).get("exp")
    return float(exp) if isinstance(exp, int | float) and not isinstance(exp, bool) else None


def claimed_job_uid(token: str) -> str | None:
    """The job uid the token's audience names, read from its (unverified) JWT claims; None when it is not
    a JWT naming exactly one kubetune job audience. Only picks which audience to ask the TokenReview about."""
    audiences = _claims(token).get("aud")
    if isinstance(audiences, str):
        audiences = [audiences]
    if not isinstance(audiences, list):
        return None
    uids = {m.group(1) for aud in audiences if isinstance(aud, str) and (m := _JOB_AUDIENCE.match(aud))}
    return uids.pop() if len(uids) == 1 else None


class _Answers:
    """A bounded cache of TokenReview answers, each kept until its own expiry."""

    def __init__(self, ttl_s: float, max_entries: int) -> None:
        self.ttl_s = ttl_s
        self.max_entries = max_entries
        self._entries: OrderedDict[str, tuple[float, Identity | None]] = OrderedDict()

    def get(self, key: str, now: float) -> tuple[bool, Identity | None]:
        """(found, answer)."""
        hit = self._entries.get(key)
        if hit is None or hit[0] <= now:
            return False, None
        return True, hit[1]

    def put(self, key: str, answer: Identity | None, now: float, ttl_s: float | None = None) -> None:
        """Keep `answer` for `ttl_s` (at most the cache's own TTL)."""
        self._entries[key] = (now + min(self.ttl_s, self.ttl_s if ttl_s is None else ttl_s), answer)
        self._entries.move_to_end(key)
        while len(self._entries) > self.max_entries:
            self._entries.popitem(last=False)

    def __len__(self) -> int:
        return len(self._entries)


class TokenReviewer:
    """Authenticates bearer tokens through the Kubernetes TokenReview API."""

    def __init__(
        self,
        api_client: client.ApiClient | None = None,
        *,
        ttl_s: float = AUTHENTIC_TTL_S,
        failure_ttl_s: float = 10.0,
        max_entries: int = 4096,
        max_in_flight: int = 8,
        request_timeout: tuple[float, float] = REQUEST_TIMEOUT,
    ) -> None:
        self._api = client.AuthenticationV1Api(api_client)
        self._request_timeout = request_timeout
        # Separate caches: a flood of forged tokens cannot push the authentic ones out.
        self.authentic = _Answers(ttl_s, max_entries)
        self.refused = _Answers(failure_ttl_s, max_entries)
        self._pending: dict[str, asyncio.Future[Identity | None]] = {}
        self._slots = asyncio.Semaphore(max_in_flight)

    async def authenticate(self, token: str, audience: str) -> Identity | None:
        """The identity behind `token`, or None when it is not an authentic token for `audience`.

        Raises ReviewUnavailableError when the API server cannot answer, which is not the caller's fault
        (and is not cached).
        """
        # Keyed by audience too: a token authentic for one job's audience says nothing about another's.
        key = hashlib.sha256(f"{audience}\0{token}".encode()).hexdigest()
        for answers in (self.authentic, self.refused):
            found, identity = answers.get(key, time.monotonic())
            if found:
                return identity
        pending = self._pending.get(key)
        if pending is not None:
            return await asyncio.shield(pending)
        future: asyncio.Future[Identity | None] = asyncio.get_running_loop().create_future()
        self._pending[key] = future
        try:
            async with self._slots:
                identity = await asyncio.to_thread(self._review, token, audience)
        except asyncio.CancelledError:
            future.cancel()
            raise
        except Exception as exc:
            future.set_exception(exc)
            future.exception()  # retrieved: no "never retrieved" warning when no one else waited
            raise
        finally:
            del self._pending[key]
        if identity is None:
            self.refused.put(key, identity, time.monotonic())
        else:
            expiry = claimed_expiry(token)
            self.authentic.put(key, identity, time.monotonic(), None if expiry is None else expiry - time.time())
        future.set_result(identity)
        return identity

    def _review(self, token: str, audience: str) -> Identity | None:
        body = client.V1TokenReview(spec=client.V1TokenReviewSpec(token=token, audiences=[audience]))
        try:
            response: Any = self._api.create_token_review(
                body, _preload_content=False, _request_timeout=self._request_timeout
            )
        except client.ApiException as exc:
            raise ReviewUnavailableError(f"TokenReview failed: HTTP {exc.status} {exc.reason}") from None
        except Exception as exc:  # urllib3 connection errors, timeouts and the like
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
