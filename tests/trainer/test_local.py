"""`kubetune run --local` fits the job to this machine: CPU when there is no GPU, CPUs capped, endpoint chosen."""

from __future__ import annotations

import pytest

from kubetune_trainer.local import local_resources, setup_logging, with_endpoint
from tests.support.digits_world import DigitsWorld


def test_gpus_asked_without_cuda_train_on_cpu_with_a_warning(
    world: DigitsWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    config = world.config("gpu-job", output="s3://results/gpu")
    config = config.model_copy(update={"scaling": config.scaling.model_copy(update={"gpus_per_worker": 1})})
    setup_logging()
    cpus, use_gpu = local_resources(config, cpus=2, cuda=False)
    assert (cpus, use_gpu) == (2.0, False)
    assert "kubetune: no CUDA GPU on this machine: training on CPU" in capsys.readouterr().err
    assert local_resources(config, cpus=2, cuda=True) == (2.0, True)


def test_workers_share_the_cpus_this_machine_has(world: DigitsWorld, capsys: pytest.CaptureFixture[str]) -> None:
    config = world.config("big-job", output="s3://results/big", workers=2, cpus_per_worker=8)
    setup_logging()
    assert local_resources(config, cpus=2, cuda=False) == (1.0, False)
    assert "2 worker(s) get 1 CPU(s) each instead of 8" in capsys.readouterr().err


def test_endpoint_flag_beats_the_manifest_which_beats_the_environment(
    world: DigitsWorld, monkeypatch: pytest.MonkeyPatch
) -> None:
    config = world.config("endpoints", output="s3://results/e")
    monkeypatch.setenv("AWS_ENDPOINT_URL", "http://from-env:9000")
    assert with_endpoint(config, None).storage.endpoint == "http://from-env:9000"
    in_spec = config.model_copy(
        update={"storage": config.storage.model_copy(update={"endpoint": "http://minio.minio:9000"})}
    )
    assert with_endpoint(in_spec, None).storage.endpoint == "http://minio.minio:9000"
    assert with_endpoint(in_spec, "http://127.0.0.1:9000").storage.endpoint == "http://127.0.0.1:9000"
