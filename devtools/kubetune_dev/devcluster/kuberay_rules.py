"""KubeRay v1.7's rules for a RayJob's end, as its controller applies them (pure; for the stand-in and tests).

- `spec_problem`: the checks of KubeRay's `ValidateRayJobSpec` about suspension and deletion (a RayJob
  failing one ends ValidationFailed, on every reconcile, so also after a spec edit): `suspend` needs
  `shutdownAfterJobFinishes`; `ttlSecondsAfterFinished` needs it too; `deletionRules` and
  `shutdownAfterJobFinishes` exclude each other, as do the rules and the legacy `onSuccess`/`onFailure`;
  each rule has exactly one condition, no (condition, policy) pair twice, and per condition the TTLs
  grow from DeleteWorkers to DeleteCluster to DeleteSelf; DeleteWorkers not with autoscaling.
- `rules_due`: which deletion rules match a finished RayJob, which of them are due at `now` and when the
  next one is (`handleDeletionRules`: a rule matches the RayJob's `jobStatus` or `jobDeploymentStatus`,
  and is due `ttlSeconds` after `status.endTime`).
"""

from __future__ import annotations

import itertools
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

# Deletion policies, gentlest first: KubeRay requires TTLs in this order for one condition.
POLICY_ORDER = ("DeleteWorkers", "DeleteCluster", "DeleteSelf")


def _condition_key(condition: Mapping[str, Any]) -> tuple[str, str] | None:
    keys = [key for key in ("jobStatus", "jobDeploymentStatus") if condition.get(key)]
    return (keys[0], str(condition[keys[0]])) if len(keys) == 1 else None


def _rules_problem(spec: Mapping[str, Any], rules: list[Mapping[str, Any]]) -> str | None:
    ttls: dict[tuple[str, str], dict[str, int]] = {}
    autoscaling = bool((spec.get("rayClusterSpec") or {}).get("enableInTreeAutoscaling"))
    for i, rule in enumerate(rules):
        condition, policy = rule.get("condition") or {}, str(rule.get("policy"))
        key = _condition_key(condition)
        if key is None:
            return f"deletionRules[{i}]: exactly one of JobStatus and JobDeploymentStatus must be set"
        if autoscaling and policy == "DeleteWorkers":
            return f"deletionRules[{i}]: DeletionPolicyType 'DeleteWorkers' not supported with autoscaling enabled"
        if policy in ttls.setdefault(key, {}):
            return f"deletionRules[{i}]: duplicate rule for DeletionPolicyType '{policy}' and {key[0]} '{key[1]}'"
        ttls[key][policy] = int(condition.get("ttlSeconds") or 0)
    for key, by_policy in ttls.items():
        ordered = [(p, by_policy[p]) for p in POLICY_ORDER if p in by_policy]
        for (before, low), (after, high) in itertools.pairwise(ordered):
            if high < low:
                return f"for {key[0]} '{key[1]}': {after} TTL ({high}) must be >= {before} TTL ({low})"
    return None


def spec_problem(spec: Mapping[str, Any]) -> str | None:
    """What KubeRay's validation says of `spec`'s suspension and deletion fields; None when it passes."""
    shutdown = bool(spec.get("shutdownAfterJobFinishes"))
    if spec.get("suspend") and not shutdown:
        return "a RayJob with shutdownAfterJobFinishes set to false is not allowed to be suspended"
    if not shutdown and int(spec.get("ttlSecondsAfterFinished") or 0) > 0:
        return "a RayJob with shutdownAfterJobFinishes set to false cannot have TTLSecondsAfterFinished"
    strategy = spec.get("deletionStrategy")
    if strategy is None:
        return None
    rules = list(strategy.get("deletionRules") or [])
    legacy = "onSuccess" in strategy or "onFailure" in strategy
    if rules and shutdown:
        return "spec.shutdownAfterJobFinishes and spec.deletionStrategy.deletionRules are mutually exclusive"
    if rules and legacy:
        return "Cannot use both legacy onSuccess/onFailure fields and deletionRules simultaneously"
    if not rules and not ("onSuccess" in strategy and "onFailure" in strategy):
        return "DeletionStrategy requires either BOTH onSuccess and onFailure, OR the deletionRules field"
    return _rules_problem(spec, rules) if rules else None


@dataclass(frozen=True)
class Due:
    """The deletion rules of a finished RayJob at one moment: the policies due now, and when the next is."""

    policies: tuple[str, ...]
    next_at: float | None


def rules_due(spec: Mapping[str, Any], status: Mapping[str, Any], *, end: float, now: float) -> Due:
    """The matching rules' policies due at `now` (the RayJob ended at `end`, epoch seconds)."""
    due: list[str] = []
    pending: list[float] = []
    for rule in (spec.get("deletionStrategy") or {}).get("deletionRules") or []:
        key = _condition_key(rule.get("condition") or {})
        if key is None or status.get(key[0]) != key[1]:
            continue
        at = end + int((rule.get("condition") or {}).get("ttlSeconds") or 0)
        if at <= now:
            due.append(str(rule.get("policy")))
        else:
            pending.append(at)
    return Due(tuple(dict.fromkeys(due)), min(pending) if pending else None)
