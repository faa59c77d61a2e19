"""A run that cannot work ends at once, before Ray starts, with exit 1 and one line naming the URI or field."""

from __future__ import annotations

import pickle
import threading
import time
from pathlib import Path
from typing import Any

import pytest

from kubetune_trainer.local import run_local
from kubetune_trainer.storage import S3Store, S3Uri
from tests.support.digits_world import HI_TRAIN, DigitsWorld

PLACEHOLDER = "s3://models/placeholder/weights.safetensors"
# How late `late_prepare` fails: Ray Train's controller is up by then, its worker group starting.
LATE_S = 4.0


class CreatesFile:
    def __init__(self, path: Path) -> None:
        self.path = path

    def __reduce__(self) -> tuple[object, tuple[str, str]]:
        return (open, (str(self.path), "w"))


def fails_with(capsys: pytest.CaptureFixture[str], code: int, *parts: str) -> None:
    err = capsys.readouterr().err.strip().splitlines()
    assert code == 1
    assert err[-1].startswith("kubetune: error: "), err
    for part in parts:
        assert part in err[-1], err[-1]


def test_missing_base_weights_name_the_uri(digits: DigitsWorld, capsys: pytest.CaptureFixture[str]) -> None:
    config = digits.config("missing-weights", checkpoint="s3://models/nope/resnet.safetensors", output="s3://results/x")
    code = run_local(config, s3_endpoint=digits.endpoint)
    fails_with(capsys, code, "no such object: s3://models/nope/resnet.safetensors")


def test_missing_bucket_names_the_bucket(digits: DigitsWorld, capsys: pytest.CaptureFixture[str]) -> None:
    config = digits.config("missing-bucket", checkpoint="s3://no-such-bucket/w.safetensors", output="s3://results/x")
    code = run_local(config, s3_endpoint=digits.endpoint)
    fails_with(capsys, code, "bucket 'no-such-bucket' does not exist", "s3://no-such-bucket/w.safetensors")


def test_missing_output_bucket_fails_before_training(digits: DigitsWorld, capsys: pytest.CaptureFixture[str]) -> None:
    digits.put(PLACEHOLDER, b"never read: the run stops before")
    config = digits.config("missing-output", checkpoint=PLACEHOLDER, output="s3://no-results-bucket/run")
    code = run_local(config, s3_endpoint=digits.endpoint)
    fails_with(capsys, code, "bucket 'no-results-bucket' does not exist", "s3://no-results-bucket/run")


def test_malicious_pickle_is_refused_and_never_runs(
    digits: DigitsWorld, tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    victim = tmp_path / "created-by-pickle"
    digits.put("s3://models/evil/weights.pt", pickle.dumps({"state_dict": CreatesFile(victim)}))
    config = digits.config("evil", checkpoint="s3://models/evil/weights.pt", output="s3://results/evil")

    code = run_local(config, s3_endpoint=digits.endpoint)

    fails_with(capsys, code, "refused to load s3://models/evil/weights.pt: it is a pickle that needs code")
    assert not victim.exists()


def test_class_count_mismatch_names_the_field(digits: DigitsWorld, capsys: pytest.CaptureFixture[str]) -> None:
    digits.put(PLACEHOLDER, b"never read: the run stops before")
    manifest_config = digits.config("mismatch", checkpoint=PLACEHOLDER, output="s3://results/mismatch")
    config = manifest_config.model_copy(update={"model": manifest_config.model.model_copy(update={"num_classes": 7})})
    code = run_local(config, s3_endpoint=digits.endpoint)
    fails_with(capsys, code, f"model.numClasses: 7 does not match the 5 class folders under {HI_TRAIN}/")


def test_storage_errors_name_the_uri(world: DigitsWorld) -> None:
    store = S3Store(world.endpoint, "us-east-1")
    with pytest.raises(Exception, match=r"no such object: s3://models/absent.bin"):
        store.head(S3Uri.parse("s3://models/absent.bin"))
    with pytest.raises(Exception, match=r"bucket 'absent-bucket' does not exist.*s3://absent-bucket/a/b"):
        store.get_bytes(S3Uri.parse("s3://absent-bucket/a/b"))


@pytest.mark.slow
def test_cli_reports_one_line_and_exit_code(digits: DigitsWorld) -> None:
    manifest = digits.job("cli-missing", checkpoint="s3://models/absent/w.safetensors", output="s3://results/cli")
    run = digits.kubetune_run(manifest, timeout=120)
    assert run.returncode == 1, run.stderr
    last = run.stderr.strip().splitlines()[-1]
    assert last.startswith("kubetune: error: no such object: s3://models/absent/w.safetensors"), run.stderr


def test_trainer_entrypoint_rejects_a_bad_config_file(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from kubetune_trainer.__main__ import main

    path = tmp_path / "trainer-config.json"
    path.write_text('{"jobName": "x", "runName": "x", "model": {"architecture": "resnet50"}}')
    assert main(["--config", str(path)]) == 2
    err = capsys.readouterr().err
    assert f"kubetune: error: {path}: model.checkpoint: Field required" in err
    assert main(["--config", str(tmp_path / "absent.json")]) == 2


def test_trainer_entrypoint_reads_the_config_from_its_env_variable(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """The RayJob's entrypoint has no --config: the config is KUBETUNE_TRAINER_CONFIG on the head."""
    from kubetune_trainer.__main__ import main

    monkeypatch.delenv("KUBETUNE_TRAINER_CONFIG", raising=False)
    assert main([]) == 2
    assert "no trainer config: pass --config FILE or set KUBETUNE_TRAINER_CONFIG" in capsys.readouterr().err
    monkeypatch.setenv("KUBETUNE_TRAINER_CONFIG", '{"jobName": "x", "runName": "x"')
    assert main([]) == 2
    assert "kubetune: error: $KUBETUNE_TRAINER_CONFIG: Invalid JSON" in capsys.readouterr().err
    monkeypatch.setenv("KUBETUNE_TRAINER_CONFIG", '{"jobName": "x", "runName": "x", "model": {"architecture": "r"}}')
    assert main([]) == 2
    assert "kubetune: error: $KUBETUNE_TRAINER_CONFIG: model.checkpoint: Field required" in capsys.readouterr().err


@pytest.mark.slow
def test_cluster_preparation_runs_as_a_ray_task(pretrained: DigitsWorld, tmp_path: Path) -> None:
    """On a cluster the node is prepared by a Ray task; its verdicts reach the driver as TrainerErrors. Beside
    Ray Train's start-up (a node that can host a worker is up) the verdict is the same, and a failure ends
    the training run with the node's error."""
    import ray

    from kubetune_trainer.errors import TrainerError
    from kubetune_trainer.local import with_endpoint
    from kubetune_trainer.run import (
        Placement,
        Preparing,
        await_node,
        check_inputs,
        prepare,
        prepare_in_cluster,
        prepare_node,
        store_for,
        train,
    )

    def late_prepare(*wires: Any) -> dict[str, Any]:  # pickled by value: Ray's workers cannot import tests
        """`run.prepare_node`, a few seconds late: after the driver has handed the training to Ray Train."""
        from kubetune_trainer.run import prepare_node

        time.sleep(LATE_S)
        return prepare_node(*wires)

    victim = tmp_path / "created-by-pickle"
    pretrained.put("s3://models/evil/cluster.pt", pickle.dumps({"model": CreatesFile(victim)}))
    good = with_endpoint(pretrained.config("cluster-good", output="s3://results/cluster"), pretrained.endpoint)
    evil = with_endpoint(
        pretrained.config("cluster-evil", checkpoint="s3://models/evil/cluster.pt", output="s3://results/cluster"),
        pretrained.endpoint,
    )
    ray.init(address="local", num_cpus=1, include_dashboard=False, log_to_driver=False)
    try:
        prepared = prepare(good, check_inputs(good, store_for(good)), here=False, cpus=1)
        with pytest.raises(TrainerError, match=r"refused to load s3://models/evil/cluster.pt"):
            prepare(evil, check_inputs(evil, store_for(evil)), here=False, cpus=1)
        beside = prepare_in_cluster(good, check_inputs(good, store_for(good)), cpus=1, gpus=0)
        assert isinstance(beside, Preparing)
        assert beside.wait().data_config == prepared.data_config
        # A preparation that fails once Ray Train has started: the run ends with its error, not retried.
        inputs = check_inputs(evil, store_for(evil))
        late = ray.remote(late_prepare).options(num_cpus=0, max_retries=0)
        evil_beside = Preparing(inputs, Placement(False), late.remote(evil.wire(), inputs.task.wire(), inputs.weights))
        threading.Thread(target=await_node, args=(evil, evil_beside), daemon=True).start()
        with pytest.raises(TrainerError, match=r"refused to load s3://models/evil/cluster.pt"):
            train(evil, evil_beside, cpus_per_worker=1, use_gpu=False)
        # One that failed before the driver handed the training over to Ray Train: the same error.
        early = ray.remote(prepare_node).options(num_cpus=0, max_retries=0)
        evil_early = Preparing(inputs, Placement(False), early.remote(evil.wire(), inputs.task.wire(), inputs.weights))
        await_node(evil, evil_early)
        assert evil_early.failure is not None
        with pytest.raises(TrainerError, match=r"refused to load s3://models/evil/cluster.pt"):
            train(evil, evil_early, cpus_per_worker=1, use_gpu=False)
    finally:
        ray.shutdown()
    assert prepared.data_config["input_size"] == [3, 32, 32]
    assert sorted(prepared.weights_report.dropped_keys) == ["fc.bias", "fc.weight"]
    assert len(prepared.task.images.class_names) == 5 and not prepared.task.images.corrupt
    assert not victim.exists()
