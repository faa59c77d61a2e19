"""Fixtures of the chart tests: the chart loaded once, and every value set rendered once."""

from __future__ import annotations

from collections.abc import Iterator

import helm_python as helm
import pytest

from tests.support.chart_support import CHART_DIR, VALUE_SETS, Rendered, render


@pytest.fixture(scope="session")
def chart() -> Iterator[helm.Chart]:
    with helm.Chart.load(CHART_DIR) as loaded:
        yield loaded


@pytest.fixture(scope="session")
def rendered(chart: helm.Chart) -> dict[str, Rendered]:
    """Every value set of VALUE_SETS, rendered once for the whole session."""
    return {name: render(chart, values) for name, values in VALUE_SETS.items()}
