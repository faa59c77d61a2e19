"""The malformed-manifest corpus, fed to the operator: each job fails naming its field; a valid one launches.

A real API server rejects most of these with the CRD's schema before the operator sees them; the
operator's own validation is the second line (an older CRD, a schema-less install, `kubectl replace
--validate=false`), and it must hold for every case, side by side with a healthy job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import yaml

from tests.support.operator_harness import RAYJOBS, SERVICEACCOUNTS, OperatorHarness, finetunejob
from tests.support.paths import REPO

CORPUS = sorted((REPO / "tests" / "fixtures" / "invalid").glob("*.yaml"))
NAMESPACE = "corpus"


def expected_field(path: Path) -> str:
    """The field the case's `# expect: <field>` header names."""
    for line in path.read_text().splitlines():
        if line.startswith("# expect:"):
            return line.removeprefix("# expect:").strip()
    raise AssertionError(f"{path.name} has no '# expect:' line")


def load(path: Path) -> list[tuple[str, dict[str, Any]]]:
    """The case's manifests an API server would store at all (an object with a name), with namespaces."""
    cases = []
    for manifest in yaml.safe_load_all(path.read_text()):
        if not isinstance(manifest, dict) or not isinstance(manifest.get("metadata"), dict):
            continue
        if not isinstance(manifest["metadata"].get("name"), str):
            continue
        namespace = manifest["metadata"].get("namespace") or NAMESPACE
        manifest["metadata"]["namespace"] = namespace
        cases.append((namespace, manifest))
    return cases


def test_the_corpus_is_there() -> None:
    assert len(CORPUS) >= 25


@pytest.mark.asyncio
async def test_every_malformed_job_fails_naming_its_field_while_a_valid_one_launches(op: OperatorHarness) -> None:
    cases = [(path, namespace, manifest) for path in CORPUS for namespace, manifest in load(path)]
    for _, namespace, manifest in cases:
        await op.create_job(manifest, namespace)
    await op.create_job(finetunejob("healthy"), NAMESPACE)

    await op.wait_for(lambda: op.rayjob(NAMESPACE, "healthy"), timeout=30, what="the healthy job's RayJob")
    problems = []
    for path, namespace, manifest in cases:
        name = manifest["metadata"]["name"]
        job = await op.wait_for_phase(namespace, name, "Failed", timeout=30)
        failed = next(c for c in job["status"]["conditions"] if c["type"] == "Failed")
        field = expected_field(path)
        if failed["reason"] != "InvalidSpec" or field not in failed["message"]:
            problems.append(f"{path.name}: {failed['reason']}: {failed['message']} (expected {field})")
        if op.rayjob(namespace, name):
            problems.append(f"{path.name}: children were created")
    assert not problems, "\n".join(problems)

    # The status is written once the RayJob's create has returned: it may land just after the RayJob.
    await op.wait_for_phase(NAMESPACE, "healthy", "Launching")
    assert [o["metadata"]["name"] for o in op.list_objects(RAYJOBS)] == ["healthy"]
    # Only the healthy job's namespace got the shared trainer ServiceAccount.
    accounts = [(o["metadata"]["namespace"], o["metadata"]["name"]) for o in op.list_objects(SERVICEACCOUNTS)]
    assert accounts == [(NAMESPACE, "kubetune-trainer")]
