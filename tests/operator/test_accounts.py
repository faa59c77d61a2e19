"""The shared trainer ServiceAccount against kmock's API server: made sure of once per namespace, checked
again after a while (so one deleted meanwhile comes back), and a failure is not remembered."""

from __future__ import annotations

import asyncio
import socket
from collections.abc import AsyncIterator

import pytest
import pytest_asyncio

from kubetune_operator.accounts import SharedServiceAccounts
from kubetune_operator.builders import build_service_account
from kubetune_operator.kube import Kube
from tests.support.operator_harness import FAST_SETTINGS, SERVICEACCOUNTS, OperatorHarness, serving_api

pytestmark = pytest.mark.asyncio


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


@pytest_asyncio.fixture
async def cluster() -> AsyncIterator[tuple[OperatorHarness, Kube]]:
    async with serving_api() as api:
        kube = Kube.for_server(str(api.url))
        try:
            yield OperatorHarness(api), kube
        finally:
            kube.close()


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


def account_requests(harness: OperatorHarness) -> list[tuple[str, str | None]]:
    return [(r.verb, r.namespace) for r in harness.api_requests() if r.resource == "serviceaccounts"]


async def test_concurrent_callers_share_one_check_per_namespace(cluster: tuple[OperatorHarness, Kube]) -> None:
    harness, kube = cluster
    accounts = SharedServiceAccounts()
    wanted = [build_service_account(ns, FAST_SETTINGS) for ns in ["vision"] * 30 + ["audio"] * 30]

    created = await asyncio.gather(*(accounts.ensure(kube, account) for account in wanted))

    assert all(created)  # every caller learns it was made (by the one check they all waited on)
    assert sorted(account_requests(harness)) == [
        ("create", "audio"),
        ("create", "vision"),
        ("get", "audio"),
        ("get", "vision"),
    ]
    for ns in ("vision", "audio"):
        assert harness.get(SERVICEACCOUNTS, ns, "kubetune-trainer") is not None
    harness.mark()
    assert await accounts.ensure(kube, wanted[0]) is False
    assert account_requests(harness) == []  # remembered: no request at all


async def test_a_deleted_account_is_made_again_once_the_remembered_check_expires(
    cluster: tuple[OperatorHarness, Kube],
) -> None:
    harness, kube = cluster
    clock = Clock()
    accounts = SharedServiceAccounts(remember_seconds=600, clock=clock)
    account = build_service_account("vision", FAST_SETTINGS)
    await accounts.ensure(kube, account)
    first = harness.get(SERVICEACCOUNTS, "vision", "kubetune-trainer")
    assert first is not None

    await harness.delete(SERVICEACCOUNTS, "vision", "kubetune-trainer")
    clock.now += 599
    assert await accounts.ensure(kube, account) is False  # still trusted
    assert harness.get(SERVICEACCOUNTS, "vision", "kubetune-trainer") is None

    clock.now += 2
    harness.mark()
    assert await accounts.ensure(kube, account) is True
    again = harness.get(SERVICEACCOUNTS, "vision", "kubetune-trainer")
    assert again is not None and again["metadata"]["uid"] != first["metadata"]["uid"]
    assert account_requests(harness) == [("get", "vision"), ("create", "vision")]


async def test_a_failed_check_is_not_remembered(cluster: tuple[OperatorHarness, Kube]) -> None:
    harness, kube = cluster
    accounts = SharedServiceAccounts()
    account = build_service_account("vision", FAST_SETTINGS)
    unreachable = Kube.for_server(f"http://127.0.0.1:{free_port()}")  # nothing listens there
    try:
        results = await asyncio.gather(
            *(accounts.ensure(unreachable, account) for _ in range(5)), return_exceptions=True
        )
    finally:
        unreachable.close()
    assert all(isinstance(result, Exception) for result in results)  # every waiting caller learns it

    assert await accounts.ensure(kube, account) is True  # the next job tries again, and succeeds
    assert harness.get(SERVICEACCOUNTS, "vision", "kubetune-trainer") is not None
