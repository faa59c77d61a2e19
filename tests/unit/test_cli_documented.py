"""Every `kubetune` command line the README and docs/ show works as typed, through the console script.

The lines are read from the documents themselves (code blocks and inline code), so a new one is tested as
soon as it is written. Placeholders become real files: `job.yaml`/`other.yaml` a valid example (an invalid
one for `run --local`, which would otherwise train here), `URL` an address; `data pack` gets a tiny
ImageFolder or COCO set at its SRC, with s3:// locations made folders of the test's own (it needs no
S3 to show its arguments work); `[optional]` parts are tried with and without. `kubetune demo` lines (but `--help`) run the whole demo, so here they are only parsed,
and tests/e2e/test_demo_cli.py runs each of them through the console script (slow).
"""

from __future__ import annotations

import io
import itertools
import json
import re
import shlex
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest
import yaml
from PIL import Image

from kubetune_operator.cli import parser
from tests.support.paths import REPO

KUBETUNE = Path(sys.executable).with_name("kubetune")
DOCUMENTS = [REPO / "README.md", *sorted((REPO / "docs").glob("*.md"))]
SUBCOMMANDS = ("validate", "render", "run", "tune-lr", "data", "demo", "crd")
# The demo lines tests/e2e/test_demo_cli.py runs through the console script (with --workdir where it must
# not touch the checkout's .demo/).
RUN_BY_THE_DEMO_TESTS = {"kubetune demo", "kubetune demo --keep-running"}
COMMAND = re.compile(rf"kubetune (?:{'|'.join(SUBCOMMANDS)})\b[^`#\n]*")


def documented_lines() -> set[str]:
    """`kubetune ...` as the documents show it to be typed: in code blocks and inline code."""
    found: set[str] = set()
    for document in DOCUMENTS:
        text = document.read_text()
        blocks = re.findall(r"^```[^\n]*\n(.*?)^```", text, re.S | re.M)
        typed = [line.removeprefix("$ ") for block in blocks for line in block.splitlines()]
        spans = re.findall(r"`([^`\n]+)`", re.sub(r"^```.*?^```", "", text, flags=re.S | re.M))
        for piece in [*typed, *spans]:
            if match := COMMAND.match(piece):
                found.add(match.group(0).strip())
    return {line for line in found if line.split()[1] in ("demo", "crd") or len(line.split()) > 2}


def expansions(line: str) -> list[str]:
    """The line with each `[optional part]` left out and put in."""
    optional = re.findall(r"\s*\[([^\]]+)\]", line)
    bare = re.sub(r"\s*\[[^\]]+\]", "", line)
    out = []
    for chosen in itertools.product((False, True), repeat=len(optional)):
        out.append(" ".join([bare, *(part for part, keep in zip(optional, chosen, strict=True) if keep)]))
    return out


LINES = sorted({expanded for line in documented_lines() for expanded in expansions(line)})


def test_the_documents_show_each_subcommand_with_its_flags() -> None:
    assert {
        "kubetune validate job.yaml",
        "kubetune render job.yaml",
        "kubetune run job.yaml --local",
        "kubetune run job.yaml --local --s3-endpoint URL",
        "kubetune tune-lr job.yaml --local",
        "kubetune data pack photos/ s3://datasets/flowers-wds",
        "kubetune demo",
        "kubetune demo --keep-running",
        "kubetune demo --help",
    } <= set(LINES), LINES


def runs_the_demo(line: str) -> bool:
    return line.split()[1] == "demo" and "--help" not in line.split()


@pytest.mark.parametrize("line", LINES)
def test_each_documented_line_parses(line: str) -> None:
    try:
        parser().parse_args(shlex.split(line)[1:])
    except SystemExit as exited:  # a usage error exits 2; --help exits 0
        assert exited.code == 0 and "--help" in line, line


@pytest.mark.parametrize("line", [line for line in LINES if runs_the_demo(line)])
def test_each_documented_demo_line_is_run_by_the_demo_tests(line: str) -> None:
    assert line in RUN_BY_THE_DEMO_TESTS


PACK_PATHS = ("--validation", "--annotations", "--validation-annotations")


def tiny_png() -> bytes:
    buffer = io.BytesIO()
    Image.new("RGB", (8, 8), (200, 30, 30)).save(buffer, format="PNG")
    return buffer.getvalue()


def packable(args: list[str], folder: Path) -> list[str]:
    """`data pack` arguments with every location a folder or file under `folder` (s3://b/k → s3/b/k), and
    SRC (and --validation) holding two images: class folders, or the images of a COCO file at --annotations."""
    places = {2, 3} | {n + 1 for n, arg in enumerate(args) if arg in PACK_PATHS}
    out = [str(folder / arg.replace("s3://", "s3/")) if n in places else arg for n, arg in enumerate(args)]
    options = dict(zip(args, out[1:], strict=False))
    for images, coco in ((out[2], options.get("--annotations")), (options.get("--validation"), None)):
        if images is None:
            continue
        for name in ("a/0.png", "b/1.png"):
            (Path(images) / name).parent.mkdir(parents=True, exist_ok=True)
            (Path(images) / name).write_bytes(tiny_png())
        if coco is not None:
            entries = [{"id": 1, "file_name": "a/0.png", "width": 8, "height": 8}]
            boxes = [{"id": 1, "image_id": 1, "category_id": 1, "bbox": [1, 1, 4, 4]}]
            Path(coco).parent.mkdir(parents=True, exist_ok=True)
            Path(coco).write_text(
                json.dumps({"images": entries, "annotations": boxes, "categories": [{"id": 1, "name": "red"}]})
            )
    return out


def prepared(line: str, folder: Path) -> list[str]:
    """The line's arguments with its placeholders made real, in `folder`."""
    if line.split()[1] == "data":
        return packable(shlex.split(line)[1:], folder)
    example = yaml.safe_load((REPO / "examples" / "classification-head.yaml").read_text())
    if line.split()[1] in ("run", "tune-lr"):  # valid, it would train: invalid, it parses and stops at validation
        example["spec"].setdefault("training", {})["epochs"] = 0
    for name in ("job.yaml", "other.yaml"):
        (folder / name).write_text(yaml.safe_dump(example))
    args = [{"URL": "http://127.0.0.1:9"}.get(arg, arg) for arg in shlex.split(line)[1:]]
    # A file of the repository (examples/…), as from the repository's root.
    return [str(REPO / arg) if arg.startswith("examples/") else arg for arg in args]


# Each `data pack` line imports torch, seconds a line: the fast suite runs the README's, the slow one the rest.
FAST_PACK_LINE = "kubetune data pack photos/ s3://datasets/flowers-wds"


def console_lines() -> list[Any]:
    return [
        pytest.param(line, marks=pytest.mark.slow) if line.split()[1] == "data" and line != FAST_PACK_LINE else line
        for line in LINES
        if not runs_the_demo(line)
    ]


@pytest.mark.parametrize("line", console_lines())
def test_each_documented_line_works_through_the_console_script(line: str, tmp_path: Path) -> None:
    done = subprocess.run(
        [str(KUBETUNE), *prepared(line, tmp_path)], cwd=tmp_path, capture_output=True, text=True, timeout=120
    )
    if "--help" in line.split():
        assert done.returncode == 0 and done.stdout.startswith("usage: kubetune"), done.stderr
    elif line.split()[1] in ("run", "tune-lr"):
        assert done.returncode == 1, done.stderr
        assert "spec.training.epochs: must be >= 1 (got 0)" in done.stderr
    elif line.split()[1] == "data":
        assert done.returncode == 0, done.stderr
        assert "format: " in done.stdout and yaml.safe_load(done.stdout)["data"]["train"].startswith("s3://")
    else:
        assert done.returncode == 0, done.stderr
        assert done.stdout


@pytest.mark.parametrize("subcommand", SUBCOMMANDS)
def test_each_subcommand_has_help(subcommand: str) -> None:
    done = subprocess.run([str(KUBETUNE), subcommand, "--help"], capture_output=True, text=True, timeout=60)
    assert done.returncode == 0, done.stderr
    assert done.stdout.startswith(f"usage: kubetune {subcommand}")


def test_demo_help_lists_its_options() -> None:
    done = subprocess.run([str(KUBETUNE), "demo", "--help"], capture_output=True, text=True, timeout=60)
    for option in ("--manifest FILE", "--workdir DIR", "--keep-running", "--timeout SECONDS"):
        assert option in done.stdout


def test_demo_without_the_dev_tools_says_how_to_get_them() -> None:
    """A `pip install kubetune` has no kubetune_dev: the demo names what is missing and the way to it."""
    code = "import sys; sys.modules['kubetune_dev'] = None; from kubetune_operator.cli import main; sys.exit(main())"
    done = subprocess.run(
        [sys.executable, "-c", code, "demo", "--keep-running"], capture_output=True, text=True, timeout=60
    )
    assert done.returncode == 2
    assert "kubetune_dev is not installed" in done.stderr
    assert "make setup" in done.stderr and "pip install -e '.[trainer,demo]' -e ./devtools" in done.stderr


@pytest.mark.parametrize("value", ["0", "-5", "soon", "inf"])
def test_demo_refuses_a_timeout_that_is_not_a_positive_number(value: str) -> None:
    with pytest.raises(SystemExit) as exited:
        parser().parse_args(["demo", "--timeout", value])
    assert exited.value.code == 2
