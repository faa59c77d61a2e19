"""The operator running as main.py builds it (the operator tests' harness), over an API server that also
answers TokenReviews, with its metrics and progress endpoints on free ports."""

from __future__ import annotations

import contextlib
import socket
import urllib.request
from collections.abc import AsyncIterator

import kmock
from prometheus_client.parser import text_string_to_metric_families

from tests.support.observability_stands import AnswersTokenReviews
from tests.support.operator_harness import (
    ApiServer,
    OperatorHarness,
    declare_resources,
    fast_settings,
    running_operator,
)


class ReviewingApiServer(AnswersTokenReviews, ApiServer):
    """The operator harness' API server, answering TokenReviews too."""


def free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return int(probe.getsockname()[1])


class Ports:
    """The operator's metrics and progress ports, and the namespace a test's jobs live in."""

    def __init__(self, namespace: str) -> None:
        self.namespace = namespace
        self.metrics = free_port()
        self.progress = free_port()

    def scrape(self) -> dict[tuple[str, tuple[tuple[str, str], ...]], float]:
        """The metrics port's samples in this test's namespace, by (name, sorted labels)."""
        with urllib.request.urlopen(f"http://127.0.0.1:{self.metrics}/metrics", timeout=10) as response:
            text = response.read().decode()
        return {
            (sample.name, tuple(sorted(sample.labels.items()))): sample.value
            for family in text_string_to_metric_families(text)
            for sample in family.samples
            if sample.labels.get("namespace") == self.namespace or sample.name.startswith("kubetune_progress_updates")
        }

    def progress_url(self, name: str) -> str:
        return f"http://127.0.0.1:{self.progress}/v1/progress/{self.namespace}/{name}"


@contextlib.asynccontextmanager
async def live_operator(namespace: str) -> AsyncIterator[tuple[OperatorHarness, ReviewingApiServer, Ports]]:
    """(the harness, its API server, the ports) of a running operator serving metrics and progress."""
    ports = Ports(namespace)
    settings = fast_settings(metrics_port=ports.metrics, progress_port=ports.progress)
    async with ReviewingApiServer() as api, kmock.Server(api):
        declare_resources(api)
        async with running_operator(settings, api=api) as op:
            yield op, api, ports
