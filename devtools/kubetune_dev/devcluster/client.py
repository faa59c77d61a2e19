"""A small asyncio client for the embedded API, used by the KubeRay stand-in (it talks HTTP like KubeRay)."""

from __future__ import annotations

import asyncio
import json
import logging
from collections.abc import AsyncIterator, Mapping
from typing import Any

import aiohttp

log = logging.getLogger(__name__)


class ApiError(Exception):
    def __init__(self, status: int, body: str) -> None:
        super().__init__(f"{status}: {body[:300]}")
        self.status = status


def transient(error: ApiError) -> bool:
    """An answer a client retries: the API overloaded or failing for a while (5xx, 429)."""
    return error.status >= 500 or error.status == 429


def path(group: str, version: str, plural: str, namespace: str | None = None, name: str | None = None) -> str:
    base = f"/apis/{group}/{version}" if group else f"/api/{version}"
    if namespace:
        base += f"/namespaces/{namespace}"
    base += f"/{plural}"
    return base + (f"/{name}" if name else "")


class AsyncKube:
    def __init__(self, base_url: str) -> None:
        self.base_url = base_url.rstrip("/")
        self._session: aiohttp.ClientSession | None = None

    @property
    def session(self) -> aiohttp.ClientSession:
        if self._session is None or self._session.closed:
            self._session = aiohttp.ClientSession(timeout=aiohttp.ClientTimeout(total=None, sock_connect=10))
        return self._session

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()

    async def request(
        self, method: str, url: str, body: Any = None, *, content_type: str = "application/json"
    ) -> dict[str, Any]:
        data = None if body is None else json.dumps(body)
        headers = {"Content-Type": content_type} if data is not None else {}
        async with self.session.request(method, self.base_url + url, data=data, headers=headers) as resp:
            text = await resp.text()
            if resp.status >= 400:
                raise ApiError(resp.status, text)
            result: dict[str, Any] = json.loads(text) if text else {}
            return result

    async def get(self, url: str) -> dict[str, Any] | None:
        try:
            return await self.request("GET", url)
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def create(self, url: str, body: Mapping[str, Any]) -> dict[str, Any] | None:
        """Create, tolerating AlreadyExists (returns None then)."""
        try:
            return await self.request("POST", url, dict(body))
        except ApiError as exc:
            if exc.status == 409:
                return None
            raise

    async def merge_patch(self, url: str, patch: Mapping[str, Any]) -> dict[str, Any] | None:
        try:
            return await self.request("PATCH", url, dict(patch), content_type="application/merge-patch+json")
        except ApiError as exc:
            if exc.status == 404:
                return None
            raise

    async def delete(self, url: str) -> None:
        try:
            await self.request("DELETE", url, {"propagationPolicy": "Background"})
        except ApiError as exc:
            if exc.status != 404:
                raise

    async def watch(self, list_url: str) -> AsyncIterator[tuple[str, dict[str, Any]]]:
        """List, then watch from that list's resource version; relist after 410 or a dropped stream."""
        while True:
            try:
                listing = await self.request("GET", list_url)
                for item in listing.get("items", []):
                    yield "ADDED", item
                rv = listing["metadata"]["resourceVersion"]
                while True:
                    url = f"{self.base_url}{list_url}?watch=true&resourceVersion={rv}&timeoutSeconds=60"
                    async with self.session.get(url) as resp:
                        if resp.status >= 400:
                            raise ApiError(resp.status, await resp.text())
                        async for line in resp.content:
                            if not line.strip():
                                continue
                            event = json.loads(line)
                            if event["type"] == "ERROR":
                                raise ApiError(int(event["object"].get("code", 500)), str(event["object"]))
                            rv = event["object"]["metadata"].get("resourceVersion", rv)
                            yield event["type"], event["object"]
            except (TimeoutError, aiohttp.ClientError, ApiError) as exc:
                log.debug("watch of %s restarts after %s", list_url, exc)
                await asyncio.sleep(0.5)
