"""The chart installs the very FineTuneJob CRD the repository generates (Helm installs crds/ first)."""

from __future__ import annotations

import helm_python as helm
import kubernetes_validate
import yaml

from tests.support.chart_support import CHART_DIR
from tests.support.k8s_schema import KUBERNETES_VERSION
from tests.support.paths import REPO

CRD_FILE = "finetunejobs.kubetune.dev.yaml"
REPO_CRD = REPO / "crds" / CRD_FILE
CHART_CRD = CHART_DIR / "crds" / CRD_FILE
HOW_TO_FIX = f"run: cp crds/{CRD_FILE} charts/kubetune/crds/{CRD_FILE}"


def test_chart_crd_is_the_repository_crd() -> None:
    assert REPO_CRD.exists(), f"crds/{CRD_FILE} is missing: python -m kubetune_operator.crd writes it"
    assert CHART_CRD.exists(), f"the chart has no FineTuneJob CRD; {HOW_TO_FIX}"
    assert CHART_CRD.read_text() == REPO_CRD.read_text(), f"the chart's CRD differs from the repository's; {HOW_TO_FIX}"


def test_chart_ships_exactly_that_crd_and_kubernetes_accepts_it(chart: helm.Chart) -> None:
    assert [crd["filename"] for crd in chart.crds] == [f"kubetune/crds/{CRD_FILE}"]
    (crd,) = [doc for doc in yaml.safe_load_all(chart.crds[0]["data"]) if doc]
    kubernetes_validate.validate(crd, KUBERNETES_VERSION, strict=True)
    assert crd["metadata"]["name"] == "finetunejobs.kubetune.dev"
    assert "ftj" in crd["spec"]["names"]["shortNames"]
