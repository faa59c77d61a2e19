"""`pip install kubetune` gets the product only: the operator and the trainer, not the dev cluster or the demo.

The wheel is built from a copy of the whole checkout (devtools/ included, as a user's `pip install .` or a
release build would see it) and its files listed; a fresh virtualenv with the wheel alone (its base
dependencies from the package index, no torch) must run the operator's command line (slow).
"""

from __future__ import annotations

import ast
import email
import os
import shutil
import subprocess
import sys
import venv
import zipfile
from pathlib import Path

import pytest
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from tests.support.paths import REPO

# What the product needs and the dev tools add: none of it may come with a plain install.
DEV_ONLY = {"kmock", "moto", "scikit-learn", "torch", "ray", "timm", "pytest"}
NOT_COPIED = (".venv", ".tools", ".git", ".demo", ".cache", "*.egg-info", "__pycache__", "build", "dist", ".*_cache")


def built_wheel(folder: Path) -> Path:
    """The kubetune wheel, built (without dependencies or build isolation) from a copy of the checkout."""
    source = folder / "kubetune"
    shutil.copytree(REPO, source, ignore=shutil.ignore_patterns(*NOT_COPIED))
    subprocess.run(
        [sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--no-build-isolation", "-w", str(folder), "."],
        cwd=source,
        check=True,
        capture_output=True,
        timeout=300,
    )
    (wheel,) = folder.glob("kubetune-*.whl")
    return wheel


@pytest.fixture(scope="module")
def wheel(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return built_wheel(tmp_path_factory.mktemp("wheel"))


def test_the_wheel_holds_the_operator_and_the_trainer_and_nothing_of_the_dev_tools(wheel: Path) -> None:
    names = zipfile.ZipFile(wheel).namelist()
    top = {name.split("/")[0] for name in names}
    assert top == {"kubetune_operator", "kubetune_trainer", wheel.name.split("-py")[0] + ".dist-info"}, top
    assert not [name for name in names if "devcluster" in name or "kubetune_dev" in name or "demo" in name]
    assert "kubetune_operator/cli.py" in names and "kubetune_trainer/run.py" in names
    # The model names validation checks against, for an operator image without timm or torchvision.
    assert "kubetune_trainer/architectures.txt" in names
    # The console script is the CLI's; `kubetune demo` imports kubetune_dev only when run.
    entry_points = zipfile.ZipFile(wheel).read(next(n for n in names if n.endswith("entry_points.txt"))).decode()
    assert "kubetune = kubetune_operator.cli:main" in entry_points


def test_a_plain_install_requires_none_of_the_dev_tools_dependencies(wheel: Path) -> None:
    archive = zipfile.ZipFile(wheel)
    metadata = email.message_from_bytes(archive.read(next(n for n in archive.namelist() if n.endswith("METADATA"))))
    requirements = [Requirement(text) for text in metadata.get_all("Requires-Dist") or []]
    base = {canonicalize_name(r.name) for r in requirements if r.marker is None}
    assert base and not base & DEV_ONLY, base
    demo = {canonicalize_name(r.name) for r in requirements if r.marker and r.marker.evaluate({"extra": "demo"})}
    assert {"kmock", "moto", "scikit-learn"} <= demo, "the demo extra brings what kubetune-dev needs"


@pytest.mark.slow
def test_the_operator_wheel_alone_runs_in_a_fresh_virtualenv(wheel: Path, tmp_path: Path) -> None:
    env_dir = tmp_path / "venv"
    venv.create(env_dir, with_pip=True)
    python = env_dir / "bin" / "python"
    clean = {"PATH": f"{env_dir / 'bin'}:/usr/bin:/bin", "HOME": str(tmp_path), "PIP_DISABLE_PIP_VERSION_CHECK": "1"}
    # pip's own settings (index, find-links) kept; the checkout's import path is not.
    without_checkout = {key: value for key, value in os.environ.items() if key != "PYTHONPATH"}
    installed = subprocess.run(
        [str(python), "-m", "pip", "install", "-q", str(wheel)],
        capture_output=True,
        text=True,
        timeout=600,
        env=without_checkout,
    )
    assert installed.returncode == 0, installed.stderr

    def run(*args: str) -> subprocess.CompletedProcess[str]:
        return subprocess.run([*args], capture_output=True, text=True, timeout=120, env=clean, cwd=tmp_path)

    helped = run(str(python), "-m", "kubetune_operator", "--help")
    assert helped.returncode == 0 and helped.stdout.startswith("usage: python -m kubetune_operator"), helped.stderr
    listed = run(str(python), "-m", "pip", "list", "--format=freeze")
    have = {canonicalize_name(line.split("==")[0]) for line in listed.stdout.splitlines()}
    assert not have & DEV_ONLY, have & DEV_ONLY
    assert run(str(python), "-c", "import kubetune_dev").returncode != 0
    # Without timm, model names are still checked: from the list shipped in the wheel.
    misspelt = REPO / "tests" / "fixtures" / "invalid" / "architecture-misspelt.yaml"
    checked = run(str(env_dir / "bin" / "kubetune"), "validate", str(misspelt))
    assert checked.returncode == 1 and "close matches: convnext_tiny" in checked.stdout, checked.stderr
    # The console script is there, and `kubetune demo` says where the demo comes from.
    demo = run(str(env_dir / "bin" / "kubetune"), "demo")
    assert demo.returncode == 2 and "kubetune_dev is not installed" in demo.stderr and "make setup" in demo.stderr


def _dev_tools_imports(node: ast.AST, where: str = "<module>") -> list[str]:
    """Where (the enclosing function, or <module>) each import of kubetune_dev under `node` is."""
    found = []
    for child in ast.iter_child_nodes(node):
        names = [a.name for a in child.names] if isinstance(child, ast.Import) else []
        names += [child.module or ""] if isinstance(child, ast.ImportFrom) else []
        if any(name.split(".")[0] == "kubetune_dev" for name in names):
            found.append(where)
        inside = child.name if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef) else where
        found += _dev_tools_imports(child, inside)
    return found


def test_the_product_imports_the_dev_tools_only_when_kubetune_demo_runs() -> None:
    """Only `cmd_demo` in cli.py imports kubetune_dev, when it runs: `kubetune validate` and the rest work
    where the dev tools are not installed."""
    found = {
        (path.relative_to(REPO).as_posix(), where)
        for path in sorted([*(REPO / "operator").rglob("*.py"), *(REPO / "trainer").rglob("*.py")])
        for where in _dev_tools_imports(ast.parse(path.read_text()))
    }
    assert found == {("operator/kubetune_operator/cli.py", "cmd_demo")}
