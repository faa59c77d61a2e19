"""A run that cannot work ends at once, before Ray starts, with exit 1 and one line naming the URI or field."""

from __future__ import annotations

import pickle
from pathlib import Path

import pytest
from digits_world import HI_TRAIN, DigitsWorld

from kubetune_trainer.local import run_local
from kubetune_trainer.storage import S3Store, S3Uri


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


def test_missing_output_bucket_fails_before_training(
    pretrained: DigitsWorld, capsys: pytest.CaptureFixture[str]
) -> None:
    config = pretrained.config("missing-output", output="s3://no-results-bucket/run")
    code = run_local(config, s3_endpoint=pretrained.endpoint)
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


def test_class_count_mismatch_names_the_field(pretrained: DigitsWorld, capsys: pytest.CaptureFixture[str]) -> None:
    manifest_config = pretrained.config("mismatch", output="s3://results/mismatch")
    config = manifest_config.model_copy(update={"model": manifest_config.model.model_copy(update={"num_classes": 7})})
    code = run_local(config, s3_endpoint=pretrained.endpoint)
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
