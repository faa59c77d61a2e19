"""`kubetune validate` (and the CLI around it): precise, one-line errors; exit 0 only when all is valid."""

from __future__ import annotations

import io
import re
import subprocess
import sys
from pathlib import Path

import pytest
import yaml
from pydantic import ValidationError

from kubetune_operator.cli import main
from kubetune_operator.crd import render_crd
from kubetune_operator.messages import format_validation_error
from kubetune_operator.spec import FineTuneJob
from tests.support.paths import REPO

EXAMPLES = sorted((REPO / "examples").glob("*.yaml"))
CORPUS = sorted((REPO / "tests" / "fixtures" / "invalid").glob("*.yaml"))
KUBETUNE = Path(sys.executable).with_name("kubetune")

VALID = """\
apiVersion: kubetune.dev/v1alpha1
kind: FineTuneJob
metadata:
  name: {name}
spec:
  model:
    architecture: resnet18
    checkpoint: s3://models/base/resnet18.safetensors
  data:
    train: s3://datasets/flowers/train/
  training:
    epochs: {epochs}
    learningRate: 1e-3
  output:
    path: s3://runs/{name}/
"""


def validate(capsys: pytest.CaptureFixture[str], *args: str) -> tuple[int, list[str]]:
    code = main(["validate", *args])
    return code, capsys.readouterr().out.splitlines()


def expected_path(path: Path) -> str:
    first = path.read_text().splitlines()[0]
    match = re.fullmatch(r"# expect: (\S+)", first)
    assert match, f"{path.name} must start with '# expect: <field path>'"
    return match.group(1)


def error_parts(line: str) -> tuple[str, int, str, str]:
    """FILE:LINE: PATH: MESSAGE."""
    match = re.fullmatch(r'(.+?):(\d+): ((?:[^\s:"]|"[^"]*")+): (.+)', line)
    assert match, line
    return match.group(1), int(match.group(2)), match.group(3), match.group(4)


def test_the_corpus_is_big_and_names_are_unique() -> None:
    assert len(CORPUS) >= 30
    names = [yaml.safe_load(p.read_text())["metadata"]["name"] for p in CORPUS]
    faulty_names = {"name-too-long", "name-uppercase", "name-starts-with-digit"}
    plain = [n for p, n in zip(CORPUS, names, strict=True) if p.stem not in faulty_names]
    assert len(plain) == len(set(plain))


@pytest.mark.parametrize("path", CORPUS, ids=lambda p: p.stem)
def test_each_malformed_manifest_is_rejected_naming_its_field(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, lines = validate(capsys, str(path))
    assert code == 1
    expect = expected_path(path)
    hits = [error_parts(line) for line in lines if error_parts(line)[2].startswith(expect)]
    assert hits, f"no error names {expect}: {lines}"
    file_lines = path.read_text().splitlines()
    for source, number, field, message in hits:
        assert source == str(path)
        assert len(message) < 400, "long values are cut short"
        # The line is the field's own, or that of the nearest enclosing field the file has.
        segments = [s.strip('"') for s in re.split(r"[.\[\]]+", field) if s and not s.isdigit()]
        at_top = len(segments) == 1 and number == 3  # a missing top-level field: the document's first line
        assert at_top or any(f"{s}:" in file_lines[number - 1] for s in segments), (number, file_lines[number - 1])


@pytest.mark.parametrize("path", EXAMPLES, ids=lambda p: p.stem)
def test_each_example_is_valid(capsys: pytest.CaptureFixture[str], path: Path) -> None:
    code, lines = validate(capsys, str(path))
    name = yaml.safe_load(path.read_text())["metadata"]["name"]
    assert (code, lines) == (0, [f"{path}: {name} valid"])


def test_a_password_in_a_url_is_never_echoed(capsys: pytest.CaptureFixture[str]) -> None:
    code, lines = validate(capsys, str(REPO / "tests" / "fixtures" / "invalid" / "mlflow-uri-with-credentials.yaml"))
    assert code == 1 and "secret" not in "\n".join(lines) and "'https://***@mlflow.example.com'" in lines[0]


def test_the_agreed_error_format() -> None:
    body = yaml.safe_load(VALID.format(name="neg", epochs=-3).replace("1e-3", "0.001"))
    with pytest.raises(ValidationError) as caught:
        FineTuneJob.from_body(body)
    assert format_validation_error(caught.value, "job.yaml") == [
        "job.yaml: spec.training.epochs: must be >= 1 (got -3)"
    ]


def test_many_files_many_documents(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    good = tmp_path / "good.yaml"
    good.write_text(
        VALID.format(name="one", epochs=3) + "---\n# nothing here\n---\n" + VALID.format(name="two", epochs=4)
    )
    mixed = tmp_path / "mixed.yaml"
    mixed.write_text(VALID.format(name="fine", epochs=3) + "---\n" + VALID.format(name="broken", epochs=0))
    code, lines = validate(capsys, str(good), str(mixed))
    assert code == 1
    assert lines == [
        f"{good}: one valid",
        f"{good}: two valid",
        f"{mixed}:28: spec.training.epochs: must be >= 1 (got 0)",
        f"{mixed}: fine valid",
    ]


def test_all_valid_exits_zero(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "job.yaml"
    path.write_text(VALID.format(name="fine", epochs=3))
    assert validate(capsys, str(path), *map(str, EXAMPLES))[0] == 0


def test_stdin(capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(sys, "stdin", io.StringIO(VALID.format(name="piped", epochs=2)))
    assert validate(capsys, "-") == (0, ["<stdin>: piped valid"])


def test_yaml_syntax_errors_give_line_and_column(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "broken.yaml"
    path.write_text("apiVersion: kubetune.dev/v1alpha1\nkind: FineTuneJob\nspec:\n  model: [resnet\n  data: x\n")
    code, lines = validate(capsys, str(path))
    assert code == 1
    (line,) = lines
    assert re.fullmatch(rf"{re.escape(str(path))}:\d+:\d+: invalid YAML: .+", line), line


def test_duplicate_keys_are_errors(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "dup.yaml"
    path.write_text(VALID.format(name="dup", epochs=3).replace("    learningRate: 1e-3\n", "    epochs: 5\n"))
    code, lines = validate(capsys, str(path))
    assert code == 1
    assert lines == [f"{path}:13: spec.training.epochs: duplicate key (first at line 12); only one may be given"]


def test_other_kinds_are_named(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "deploy.yaml"
    path.write_text("apiVersion: apps/v1\nkind: Deployment\nmetadata:\n  name: web\n")
    code, lines = validate(capsys, str(path))
    assert code == 1
    assert lines == [
        f"{path}:1: kind: apps/v1 Deployment is not a FineTuneJob (kubetune.dev/v1alpha1); kubetune validates FineTuneJobs only"
    ]


def test_a_list_document_is_an_error(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "list.yaml"
    path.write_text("- a\n- b\n")
    assert validate(capsys, str(path)) == (1, [f"{path}:1: (document): must be a FineTuneJob mapping (got a list)"])


def test_missing_and_empty_files(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    empty = tmp_path / "empty.yaml"
    empty.write_text("# just a comment\n")
    code, lines = validate(capsys, str(tmp_path / "nope.yaml"), str(empty))
    assert code == 1
    assert lines == [
        f"{tmp_path / 'nope.yaml'}: cannot read: No such file or directory",
        f"{empty}: no FineTuneJob in it (the file has no YAML documents)",
    ]


def test_every_error_of_a_document_is_reported(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "many.yaml"
    text = VALID.format(name="many", epochs=0).replace("resnet18.safetensors", "resnet18.ckpt")
    path.write_text(text + "  resources:\n    workers: 0\n    gpusPerWorker: 10000\n    gpuType: h100\n")
    code, lines = validate(capsys, str(path))
    fields = [error_parts(line)[2] for line in lines]
    assert code == 1
    assert fields == [
        "spec.model.checkpoint",
        "spec.training.epochs",
        "spec.resources.workers",
        "spec.resources.gpusPerWorker",
        "spec.resources.gpuType",
    ]
    assert lines[-1].endswith(
        "unknown field (allowed: workers, gpusPerWorker, cpusPerWorker, memoryPerWorker, nodeSelector, "
        "tolerations, priorityClassName, cacheSize)"
    )


def test_typos_get_a_suggestion(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "typo.yaml"
    path.write_text(VALID.format(name="typo", epochs=3).replace("learningRate", "learning_rate"))
    _, lines = validate(capsys, str(path))
    assert "spec.training.learning_rate: unknown field; did you mean learningRate? (allowed: " in lines[0]


def test_huge_values_are_cut_short(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    path = tmp_path / "huge.yaml"
    huge = "http://" + "x" * 1000 + ".safetensors"
    path.write_text(VALID.format(name="huge", epochs=3).replace("s3://models/base/resnet18.safetensors", huge))
    _, (line,) = validate(capsys, str(path))
    assert "(got 'http://xxxxx" in line and "…', 1019 characters)" in line
    assert len(line) < 350


def test_run_needs_local(capsys: pytest.CaptureFixture[str]) -> None:
    example = str(EXAMPLES[0])
    assert main(["run", example]) == 2
    err = capsys.readouterr().err
    assert f"kubetune run {example} --local" in err and f"kubectl apply -f {example}" in err


def test_run_refuses_an_invalid_job_before_training(capsys: pytest.CaptureFixture[str]) -> None:
    path = REPO / "tests" / "fixtures" / "invalid" / "epochs-negative.yaml"
    assert main(["run", str(path), "--local"]) == 1
    assert "spec.training.epochs: must be >= 1 (got -3)" in capsys.readouterr().err


def test_crd_prints_the_generated_crd(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["crd"]) == 0
    assert capsys.readouterr().out == render_crd()


def test_console_script_exit_status() -> None:
    broken = (REPO / "tests" / "fixtures" / "invalid" / "gpus-absurd.yaml").read_text()
    done = subprocess.run(
        [str(KUBETUNE), "validate", "-", str(EXAMPLES[0])], input=broken, capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 1
    assert "<stdin>:16: spec.resources.gpusPerWorker: must be <= 16 (got 10000)" in done.stdout


def test_render_prints_what_the_operator_creates(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(REPO / "examples" / "classification-head.yaml"), "--image", "reg.example/t:1"]) == 0
    docs = list(yaml.safe_load_all(capsys.readouterr().out))
    assert [(d["kind"], d["metadata"]["name"], d["metadata"]["namespace"]) for d in docs] == [
        ("ServiceAccount", "kubetune-trainer", "default"),  # shared by the namespace's jobs
        ("Secret", "flowers-resnet50-head-ray-token", "default"),  # without the token, drawn at launch
        ("NetworkPolicy", "flowers-resnet50-head-ray", "default"),
        ("RayJob", "flowers-resnet50-head", "default"),
    ]
    assert "reg.example/t:1" in yaml.safe_dump(docs[3])


def test_render_refuses_an_invalid_job(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["render", str(REPO / "tests" / "fixtures" / "invalid" / "workers-zero.yaml")]) == 1
    captured = capsys.readouterr()
    assert (
        captured.out == ""
        and "spec.resources.workers: must be a number of workers from 1 to 256, or {min: N, max: M}" in captured.err
    )


def test_a_kubectl_list_is_validated_item_by_item(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    # What `kubectl get ftj -o yaml` prints: a v1 List of stored objects, with status and server metadata.
    stored = yaml.safe_load(VALID.format(name="stored", epochs=3).replace("1e-3", "0.001"))
    stored["metadata"].update(uid="9a1f", generation=2, creationTimestamp="2025-03-01T09:59:00Z")
    stored["status"] = {"phase": "Running", "progress": {"epoch": 2, "percent": 20.0}}
    broken = yaml.safe_load(VALID.format(name="broken", epochs=3).replace("1e-3", "0.001"))
    broken["spec"]["resources"] = {"workers": 0}
    path = tmp_path / "list.yaml"
    path.write_text(yaml.safe_dump({"apiVersion": "v1", "kind": "List", "items": [stored, broken]}, sort_keys=False))
    code, lines = validate(capsys, str(path))
    assert code == 1
    assert lines[0].endswith(
        ": spec.resources.workers: must be a number of workers from 1 to 256, or {min: N, max: M} with 1 <= N <= M <= 256 (got 0)"
    )
    assert "workers: 0" in path.read_text().splitlines()[error_parts(lines[0])[1] - 1]
    assert lines[1] == f"{path}: stored valid"


def test_an_alias_bomb_is_refused_without_expanding_it(capsys: pytest.CaptureFixture[str], tmp_path: Path) -> None:
    levels = ["a0: &a0 [x, x, x, x, x, x, x, x, x, x]"]
    levels += [f"a{i}: &a{i} [{', '.join([f'*a{i - 1}'] * 10)}]" for i in range(1, 10)]
    path = tmp_path / "bomb.yaml"
    path.write_text("\n".join(levels) + "\n")
    assert validate(capsys, str(path)) == (
        1,
        [f"{path}: invalid YAML: more than 100000 values once aliases are expanded"],
    )
