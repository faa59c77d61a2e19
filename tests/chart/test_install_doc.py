"""docs/install.md says what the chart does: its env table, permission table and commands match it."""

from __future__ import annotations

import itertools
import re

from kubetune_dev import KUBERAY_VERSION
from tests.support.chart_support import Rendered
from tests.support.paths import REPO

DOC = REPO / "docs" / "install.md"
Grant = tuple[str, str, str]  # (apiGroup, resource, verb)


def _table_rows(heading: str) -> list[list[str]]:
    """The body rows of the first Markdown table under `heading`, cells stripped of backticks."""
    section = DOC.read_text().split(f"## {heading}\n", 1)[1].split("\n## ", 1)[0]
    lines = section.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("|"))
    rows = list(itertools.takewhile(lambda line: line.startswith("|"), lines[start:]))
    return [[cell.strip().replace("`", "") for cell in row.strip("|").split("|")] for row in rows[2:]]


def _split(cell: str) -> list[str]:
    return [item.strip() for item in cell.split(",") if item.strip()]


def test_documented_environment_is_what_the_chart_sets(rendered: dict[str, Rendered]) -> None:
    documented = {name for row in _table_rows("What the chart passes to the operator") for name in _split(row[0])}
    set_by_chart = {
        item["name"]
        for one in rendered.values()
        for item in one.one("Deployment")["spec"]["template"]["spec"]["containers"][0]["env"]
    }
    assert documented == set_by_chart


def test_documented_permissions_are_what_the_chart_grants(rendered: dict[str, Rendered]) -> None:
    documented: set[Grant] = set()
    for group_cell, resource_cell, verb_cell, _ in _table_rows("Permissions"):
        groups = ["" if group == "core" else group for group in _split(group_cell)]
        documented |= {(g, r, v) for g in groups for r in _split(resource_cell) for v in _split(verb_cell)}

    granted: set[Grant] = set()
    for value_set in ("defaults", "namespaced"):
        for kind in ("ClusterRole", "Role"):
            for role in rendered[value_set].all(kind):
                for rule in role["rules"]:
                    granted |= {(g, r, v) for g in rule["apiGroups"] for r in rule["resources"] for v in rule["verbs"]}
    assert documented == granted


def test_documented_commands_name_files_that_exist() -> None:
    text = DOC.read_text()
    for path in sorted(set(re.findall(r"(?:examples|charts/kubetune)/[\w./-]+\.(?:ya?ml|json)", text))):
        assert (REPO / path).exists(), f"docs/install.md refers to {path}, which does not exist"
    assert re.search(r"kubectl (-n \S+ )?get ftj -w", text) and "helm install" in text


def test_the_kuberay_the_docs_install_is_the_one_the_dev_cluster_vendors() -> None:
    """The install commands, the chart's prerequisite note and the vendored RayJob CRD name one KubeRay."""
    install = f"helm install kuberay-operator kuberay/kuberay-operator --version {KUBERAY_VERSION}"
    assert install in (REPO / "README.md").read_text()
    assert re.search(rf"kuberay/kuberay-operator --version {re.escape(KUBERAY_VERSION)}\b", DOC.read_text())
    versions = set(re.findall(r"kuberay-operator --version (\S+)", (REPO / "README.md").read_text() + DOC.read_text()))
    assert versions == {KUBERAY_VERSION}
    assert f"checked against KubeRay v{KUBERAY_VERSION}" in (REPO / "charts" / "kubetune" / "Chart.yaml").read_text()
    assert (
        f"KubeRay v{KUBERAY_VERSION}"
        in (REPO / "devtools" / "kubetune_dev" / "vendor" / "kuberay" / "README.md").read_text()
    )
