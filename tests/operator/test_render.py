"""`kubetune render` prints what the operator creates: the same builders, the same objects."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest
import yaml

from kubetune_operator.cli import main as kubetune
from kubetune_operator.pod_additions import JOB_UID_LABEL
from tests.support.operator_harness import (
    FAST_SETTINGS,
    NETWORKPOLICIES,
    SECRETS,
    SERVICEACCOUNTS,
    OperatorHarness,
    finetunejob,
)

# Set by the API server or only knowable once the job exists there.
SERVER_FIELDS = ("uid", "creationTimestamp", "resourceVersion", "generation", "ownerReferences")
JOB_OBJECTS = (("Secret", "{}-ray-token"), ("NetworkPolicy", "{}-ray"), ("RayJob", "{}"))


def comparable(obj: dict[str, Any]) -> dict[str, Any]:
    obj = json.loads(json.dumps(obj))
    owned = bool(obj["metadata"].get("ownerReferences"))
    for key in SERVER_FIELDS:
        obj["metadata"].pop(key, None)
    if obj["kind"] == "Secret":
        # The operator's holds the token it drew; render's holds none, and a note saying so.
        assert bool(obj.pop("data", None)) != bool(obj["metadata"].pop("annotations", None))
    if obj["kind"] == "RayJob":
        # The run name is the job's uid once it has one (so a resumed run finds its checkpoints).
        (head,) = obj["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
        for env in head["env"]:
            if env["name"] == "KUBETUNE_TRAINER_CONFIG":
                env["value"] = json.loads(env["value"])
                env["value"].pop("runName")
        # The progress token's audience names the job by its uid too (so a namesake's token is refused).
        cluster = obj["spec"]["rayClusterSpec"]
        for group in (cluster["headGroupSpec"], *cluster["workerGroupSpecs"]):
            # So does the pods' job-uid label: known at launch only, render shows the job's name alone.
            labels = group["template"]["metadata"]["labels"]
            assert bool(labels.pop(JOB_UID_LABEL, None)) == owned
            for volume in group["template"]["spec"]["volumes"]:
                for source in volume.get("projected", {}).get("sources", []):
                    source["serviceAccountToken"].pop("audience")
    return obj


def render(path: Path, capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    code = kubetune(["render", str(path), *args])
    out = capsys.readouterr().out
    assert code == 0
    return [doc for doc in yaml.safe_load_all(out) if doc]


@pytest.mark.asyncio
async def test_render_prints_exactly_what_the_operator_creates(
    op: OperatorHarness, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # learningRate auto: the range test chooses the rate, in the trainer (the config carries none).
    manifest = finetunejob(
        "flowers", runPolicy={"queueName": "gpu", "backoffLimit": 1}, training={"learningRate": "auto"}
    )
    path = tmp_path / "job.yaml"
    path.write_text(yaml.safe_dump(manifest))
    rendered = render(path, capsys, "--image", FAST_SETTINGS.trainer_image)
    assert [obj["kind"] for obj in rendered] == ["ServiceAccount", "Secret", "NetworkPolicy", "RayJob"]

    await op.create_job(manifest)
    rayjob = await op.wait_for(lambda: op.rayjob("default", "flowers"), what="the RayJob")
    created = [
        op.get(SERVICEACCOUNTS, "default", "kubetune-trainer"),
        op.get(SECRETS, "default", "flowers-ray-token"),
        op.get(NETWORKPOLICIES, "default", "flowers-ray"),
        rayjob,
    ]
    assert [comparable(obj) for obj in rendered] == [comparable(obj) for obj in created if obj]
    (head,) = comparable(rayjob)["spec"]["rayClusterSpec"]["headGroupSpec"]["template"]["spec"]["containers"]
    (config,) = [env["value"] for env in head["env"] if env["name"] == "KUBETUNE_TRAINER_CONFIG"]
    assert config["training"]["learningRate"] is None


def test_render_of_several_jobs_and_of_an_invalid_one(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "jobs.yaml"
    path.write_text(yaml.safe_dump_all([finetunejob("one"), finetunejob("two")]))
    names = [(obj["kind"], obj["metadata"]["name"]) for obj in render(path, capsys)]
    # The namespace's shared ServiceAccount once, then each job's Ray token Secret, NetworkPolicy and RayJob.
    assert names == [
        ("ServiceAccount", "kubetune-trainer"),
        *[(kind, name.format(job)) for job in ("one", "two") for kind, name in JOB_OBJECTS],
    ]

    bad = finetunejob("bad", training={"epochs": 0})
    path.write_text(yaml.safe_dump(bad))
    assert kubetune(["render", str(path)]) == 1
    captured = capsys.readouterr()
    assert "spec.training.epochs" in captured.err
    assert captured.out == ""
