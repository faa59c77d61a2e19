"""Elastic workers (`resources.workers: {min, max}`): what `kubetune render` makes of them (KubeRay's
autoscaling worker group, valid for KubeRay's own schema), what the trainer is told (Ray Train's
`(min, max)`), and how the worker count a run reports reaches status.progress and the metrics."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from kubetune_operator.builders import build_rayjob
from kubetune_operator.cli import main
from kubetune_operator.metrics import OperatorMetrics
from kubetune_operator.pod_security import container_security_context
from kubetune_operator.progress import progress_patch
from kubetune_operator.settings import OperatorSettings
from kubetune_operator.spec import FineTuneJob
from kubetune_operator.trainer_config import trainer_config
from kubetune_trainer.progress_model import ProgressUpdate
from tests.support.paths import REPO
from tests.support.rayjob_schema import assert_valid_rayjob

EXAMPLE = REPO / "examples" / "elastic-spot.yaml"
TOKEN_PATH = "/var/run/secrets/kubernetes.io/serviceaccount"


def rendered_rayjob(capsys: pytest.CaptureFixture[str], path: str) -> dict[str, Any]:
    assert main(["render", path]) == 0
    documents = list(yaml.safe_load_all(capsys.readouterr().out))
    (rayjob,) = [d for d in documents if d and d.get("kind") == "RayJob"]
    return rayjob


def example(workers: Any) -> FineTuneJob:
    manifest = yaml.safe_load(EXAMPLE.read_text())
    manifest["spec"]["resources"]["workers"] = workers
    return FineTuneJob.from_body(manifest)


def test_render_gives_an_elastic_job_an_autoscaling_worker_group_kuberay_accepts(
    capsys: pytest.CaptureFixture[str],
) -> None:
    rayjob = rendered_rayjob(capsys, "examples/elastic-spot.yaml")
    assert_valid_rayjob(rayjob)
    cluster = rayjob["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (2, 2, 8)
    assert cluster["enableInTreeAutoscaling"] is True
    # The autoscaler sidecar is as restricted as the Ray containers, and alone has an API token.
    options = cluster["autoscalerOptions"]
    assert options["securityContext"] == container_security_context()
    (mount,) = options["volumeMounts"]
    assert mount["mountPath"] == TOKEN_PATH and mount["readOnly"] is True
    head = cluster["headGroupSpec"]["template"]["spec"]
    assert head["automountServiceAccountToken"] is False
    assert mount["name"] in {volume["name"] for volume in head["volumes"]}
    for container in head["containers"]:
        assert TOKEN_PATH not in {m["mountPath"] for m in container.get("volumeMounts", [])}


@pytest.mark.parametrize("workers", [3, {"min": 3, "max": 3}])
def test_a_fixed_worker_count_keeps_a_fixed_group_without_the_autoscaler(workers: Any) -> None:
    rayjob = build_rayjob(example(workers), OperatorSettings())
    assert_valid_rayjob(rayjob)
    cluster = rayjob["spec"]["rayClusterSpec"]
    (group,) = cluster["workerGroupSpecs"]
    assert (group["replicas"], group["minReplicas"], group["maxReplicas"]) == (3, 3, 3)
    assert cluster["enableInTreeAutoscaling"] is False
    assert "autoscalerOptions" not in cluster
    assert trainer_config(example(workers)).scaling.num_workers() == 3


def test_the_trainer_is_told_min_and_max_and_how_often_to_look_for_more() -> None:
    scaling = trainer_config(example({"min": 2, "max": 8, "resizeIntervalSeconds": 30})).scaling
    assert scaling.num_workers() == (2, 8)
    assert scaling.workers == 2  # the reference count of the global batch
    assert scaling.resize_interval_s == 30.0


def test_workers_refuse_what_ray_train_could_not_run_naming_the_field(capsys: pytest.CaptureFixture[str]) -> None:
    cases = {
        "workers-min-above-max.yaml": "spec.resources.workers: must be a number of workers from 1 to 256, or "
        "{min: N, max: M} with 1 <= N <= M <= 256: min (4) is more than max (2)",
        "workers-range-without-max.yaml": "spec.resources.workers.max: required",
        "workers-elastic-batch-too-small.yaml": "spec.training.batchSize: with elastic workers the global batch",
    }
    for name, message in cases.items():
        assert main(["validate", str(REPO / "tests" / "fixtures" / "invalid" / name)]) == 1
        assert message in capsys.readouterr().out, name


def update(step: int, workers: int) -> ProgressUpdate:
    return ProgressUpdate(epoch=2, total_epochs=4, step=step, total_steps=40, percent=step * 2.5, workers=workers)


def test_status_shows_the_worker_count_even_from_workers_restarted_behind_the_furthest_step() -> None:
    now = datetime(2026, 1, 1, tzinfo=UTC)
    current = progress_patch(None, update(15, 1), now)
    assert current is not None and current["workers"] == 1
    # Grown to 2: the new workers resume from the checkpoint at step 12 and say so first.
    grown = progress_patch(current, update(12, 2), now)
    assert grown is not None and grown["workers"] == 2 and grown["step"] == 15


def test_the_worker_count_is_a_gauge_per_job() -> None:
    metrics = OperatorMetrics(process_collectors=False)
    metrics.observe_progress("ml", "elastic", {"epoch": 1, "workers": 2})
    assert metrics.registry.get_sample_value("kubetune_job_workers", {"namespace": "ml", "name": "elastic"}) == 2
