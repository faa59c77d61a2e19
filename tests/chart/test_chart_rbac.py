"""Least privilege: the chart grants exactly what the operator's code uses, in the right scope.

What the code uses is read from the operator's source by `operator_api` (kubernetes-client calls and
kopf handlers, mapped to RBAC through the client's own URL templates), so a new API call in the
operator fails here until the chart grants it, and a grant the code no longer needs fails too.
"""

from __future__ import annotations

from collections import defaultdict

from tests.support import operator_api
from tests.support.chart_support import Grant, Rendered, grants

# kopf lists and watches namespaces when it serves a list of them rather than the whole cluster.
NAMESPACE_SCANNING: set[Grant] = {("", "namespaces", "list"), ("", "namespaces", "watch")}


def _needed() -> tuple[dict[Grant, list[str]], set[Grant]]:
    """Every permission the operator uses (with where it is used), and which of them are cluster-scoped."""
    modules = operator_api.operator_modules()
    assert modules, "kubetune_operator/__main__.py is missing: nothing tells what the operator process runs"
    where: dict[Grant, list[str]] = defaultdict(list)
    cluster_scoped: set[Grant] = set()
    for use in operator_api.operator_uses():
        grant = (use.group, use.resource, use.verb)
        where[grant].append(use.where)
        if not use.namespaced:
            cluster_scoped.add(grant)
    return dict(where), cluster_scoped


def _report(missing: set[Grant], unused: set[Grant], where: dict[Grant, list[str]]) -> str:
    lines = [f"not granted: {grant} used at {', '.join(where.get(grant, []))}" for grant in sorted(missing)]
    lines += [f"granted but never used: {grant}" for grant in sorted(unused)]
    return "\n".join(lines)


def test_cluster_wide_install_grants_exactly_what_the_operator_uses(rendered: dict[str, Rendered]) -> None:
    where, _ = _needed()
    defaults = rendered["defaults"]
    granted = grants(defaults.all("ClusterRole"))
    needed = set(where)
    assert granted == needed, _report(needed - granted, granted - needed, where)
    binding = defaults.one("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == defaults.one("ClusterRole")["metadata"]["name"]
    assert binding["subjects"][0]["name"] == defaults.one("ServiceAccount")["metadata"]["name"]


def test_namespaced_install_keeps_namespaced_grants_in_the_listed_namespaces(rendered: dict[str, Rendered]) -> None:
    where, cluster_scoped = _needed()
    namespaced = rendered["namespaced"]
    cluster_granted = grants(namespaced.all("ClusterRole"))
    wanted_cluster = cluster_scoped | NAMESPACE_SCANNING
    assert cluster_granted == wanted_cluster, _report(
        wanted_cluster - cluster_granted, cluster_granted - wanted_cluster, where
    )
    wanted_in_namespace = set(where) - cluster_scoped
    for role in namespaced.all("Role"):
        granted = grants([role])
        assert granted == wanted_in_namespace, _report(
            wanted_in_namespace - granted, granted - wanted_in_namespace, where
        )


def test_no_wildcards_and_secrets_are_only_read_by_name(rendered: dict[str, Rendered]) -> None:
    for value_set, one in rendered.items():
        for role in one.all("ClusterRole") + one.all("Role"):
            for rule in role["rules"]:
                for key in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[key], f"{value_set}: wildcard in {rule}"
                assert not rule.get("nonResourceURLs"), f"{value_set}: {rule}"
                if "secrets" in rule["resources"]:
                    # Preflight reads the one Secret a job names, and each job's Ray token Secret is
                    # created (and read back when there); list/watch would expose them all.
                    assert rule["verbs"] == ["get", "create"], f"{value_set}: {rule}"
                    assert rule["resources"] == ["secrets"]
