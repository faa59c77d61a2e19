"""Least privilege: the chart grants exactly what the operator's code uses, in the right scope, and
reads of Secrets only where the admin asks for them.

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
# Preflight reads the Secret a job names: granted apart (rbac.preflightSecrets), never by default.
SECRET_READS: set[Grant] = {("", "secrets", "get")}
READ_VERBS = {"get", "list", "watch"}
OPERATOR_ROLE = "kubetune"
SECRETS_ROLE = "kubetune-preflight-secrets"


def _named(objects: list[dict], name: str) -> list[dict]:
    return [obj for obj in objects if obj["metadata"]["name"] == name]


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
    assert set(where) >= SECRET_READS, "preflight no longer reads Secrets: drop rbac.preflightSecrets"
    return dict(where), cluster_scoped


def _report(missing: set[Grant], unused: set[Grant], where: dict[Grant, list[str]]) -> str:
    lines = [f"not granted: {grant} used at {', '.join(where.get(grant, []))}" for grant in sorted(missing)]
    lines += [f"granted but never used: {grant}" for grant in sorted(unused)]
    return "\n".join(lines)


def _secret_readers(one: Rendered) -> list[str]:
    """The (Cluster)Roles that let the operator read Secrets, as kind/namespace/name."""
    return [
        f"{role['kind']}/{role['metadata'].get('namespace', '-')}/{role['metadata']['name']}"
        for role in one.all("ClusterRole") + one.all("Role")
        for rule in role["rules"]
        if "secrets" in rule["resources"] and READ_VERBS & set(rule["verbs"])
    ]


def test_cluster_wide_install_grants_exactly_what_the_operator_uses_but_secret_reads(
    rendered: dict[str, Rendered],
) -> None:
    where, _ = _needed()
    defaults = rendered["defaults"]
    granted = grants(_named(defaults.all("ClusterRole"), OPERATOR_ROLE))
    needed = set(where) - SECRET_READS
    assert granted == needed, _report(needed - granted, granted - needed, where)
    binding = defaults.one("ClusterRoleBinding")
    assert binding["roleRef"]["name"] == OPERATOR_ROLE
    assert binding["subjects"][0]["name"] == defaults.one("ServiceAccount")["metadata"]["name"]


def test_the_default_install_cannot_read_any_secret(rendered: dict[str, Rendered]) -> None:
    assert _secret_readers(rendered["defaults"]) == []
    assert not rendered["defaults"].all("Role")


def test_namespaced_install_keeps_namespaced_grants_in_the_listed_namespaces(rendered: dict[str, Rendered]) -> None:
    where, cluster_scoped = _needed()
    namespaced = rendered["namespaced"]
    cluster_granted = grants(namespaced.all("ClusterRole"))
    wanted_cluster = cluster_scoped | NAMESPACE_SCANNING
    assert cluster_granted == wanted_cluster, _report(
        wanted_cluster - cluster_granted, cluster_granted - wanted_cluster, where
    )
    wanted_in_namespace = set(where) - cluster_scoped - SECRET_READS
    for role in _named(namespaced.all("Role"), OPERATOR_ROLE):
        granted = grants([role])
        assert granted == wanted_in_namespace, _report(
            wanted_in_namespace - granted, granted - wanted_in_namespace, where
        )
    # The namespaces an admin listed to be served are the ones whose Secrets preflight may read.
    assert sorted(_secret_readers(namespaced)) == [f"Role/{ns}/{SECRETS_ROLE}" for ns in ("team-a", "team-b")]


def test_secrets_are_read_only_where_the_admin_lists_and_only_by_name(rendered: dict[str, Rendered]) -> None:
    locked = rendered["locked-down"]
    assert sorted(_secret_readers(locked)) == [f"Role/{ns}/{SECRETS_ROLE}" for ns in ("default", "vision")]
    for role in _named(locked.all("Role"), SECRETS_ROLE):
        assert grants([role]) == SECRET_READS
    bindings = _named(locked.all("RoleBinding"), SECRETS_ROLE)
    assert {b["metadata"]["namespace"] for b in bindings} == {"default", "vision"}
    assert all(
        b["roleRef"] == {"apiGroup": "rbac.authorization.k8s.io", "kind": "Role", "name": SECRETS_ROLE}
        for b in bindings
    )

    everywhere = rendered["secrets-cluster-wide"]
    assert _secret_readers(everywhere) == [f"ClusterRole/-/{SECRETS_ROLE}"]
    (binding,) = _named(everywhere.all("ClusterRoleBinding"), SECRETS_ROLE)
    assert binding["roleRef"]["name"] == SECRETS_ROLE


def test_no_wildcards_and_secrets_are_only_read_by_name(rendered: dict[str, Rendered]) -> None:
    for value_set, one in rendered.items():
        for role in one.all("ClusterRole") + one.all("Role"):
            for rule in role["rules"]:
                for key in ("apiGroups", "resources", "verbs"):
                    assert "*" not in rule[key], f"{value_set}: wildcard in {rule}"
                assert not rule.get("nonResourceURLs"), f"{value_set}: {rule}"
                if "secrets" in rule["resources"]:
                    # Preflight reads the one Secret a job names; list/watch would expose them all.
                    assert not {"list", "watch"} & set(rule["verbs"]), f"{value_set}: {rule}"
                    assert rule["resources"] == ["secrets"], f"{value_set}: {rule}"
