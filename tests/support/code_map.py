"""The product's code as data, read with `ast` (nothing is imported): its modules, what each imports, and
its functions with their lengths. tests/unit/test_architecture.py holds them against docs/architecture.md
and the README."""

from __future__ import annotations

import ast
from dataclasses import dataclass
from functools import cache
from pathlib import Path

from tests.support.paths import REPO

# Each package of ours, and the folder that holds it.
PACKAGES = {"kubetune_operator": "operator", "kubetune_trainer": "trainer", "kubetune_dev": "devtools"}


@dataclass(frozen=True)
class Module:
    """One .py file of a package: `name` as Python imports it, `file` relative to the package's folder
    (`reconcile.py`, `tasks/base.py`), as the docs write it."""

    package: str
    name: str
    file: str
    path: Path

    @property
    def empty(self) -> bool:
        return not self.path.read_text().strip()


@dataclass(frozen=True)
class Import:
    """`source` imports `target` (a module, or a third-party top-level name); `lazy` when every such import
    is inside a function body, so it happens only when that function runs."""

    source: str
    target: str
    lazy: bool


@dataclass(frozen=True)
class Function:
    where: str  # repository-relative path
    name: str  # qualified: Class.method, outer.inner
    line: int
    lines: int


@cache
def modules() -> tuple[Module, ...]:
    found = []
    for package, folder in PACKAGES.items():
        root = REPO / folder / package
        for path in sorted(root.rglob("*.py")):
            file = path.relative_to(root).as_posix()
            parts = [package, *path.relative_to(root).with_suffix("").parts]
            if parts[-1] == "__init__":
                parts.pop()
            found.append(Module(package, ".".join(parts), file, path))
    return tuple(found)


def by_name() -> dict[str, Module]:
    return {module.name: module for module in modules()}


def _resolve(module: Module, node: ast.ImportFrom) -> list[str]:
    """The modules a `from X import a, b` names: X.a where that is a module of ours, else X."""
    base = node.module or ""
    if node.level:
        package = module.name.split(".")
        if module.path.name != "__init__.py":
            package.pop()
        package = package[: len(package) - node.level + 1]
        base = ".".join([*package, *([node.module] if node.module else [])])
    ours = by_name()
    return [f"{base}.{alias.name}" if f"{base}.{alias.name}" in ours else base for alias in node.names]


def _imports_in(module: Module, node: ast.AST, inside_function: bool) -> list[tuple[str, bool]]:
    found: list[tuple[str, bool]] = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.Import):
            found += [(alias.name, inside_function) for alias in child.names]
        elif isinstance(child, ast.ImportFrom):
            found += [(name, inside_function) for name in _resolve(module, child)]
        in_function = inside_function or isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef)
        found += _imports_in(module, child, in_function)
    return found


def _owner(target: str) -> str:
    """A module of ours for an import of ours (its longest known prefix), else the top-level name."""
    ours = by_name()
    parts = target.split(".")
    for end in range(len(parts), 0, -1):
        if ".".join(parts[:end]) in ours:
            return ".".join(parts[:end])
    return parts[0]


@cache
def imports() -> tuple[Import, ...]:
    """Every import of every module, one per (source, target), `__future__` left out."""
    found: dict[tuple[str, str], bool] = {}
    for module in modules():
        for target, lazy in _imports_in(module, ast.parse(module.path.read_text()), False):
            key = (module.name, _owner(target))
            if key[1] != "__future__" and key[1] != module.name:
                found[key] = found.get(key, True) and lazy
    return tuple(Import(source, target, lazy) for (source, target), lazy in sorted(found.items()))


def functions() -> list[Function]:
    """Every function and method, nested ones included, with its length from `def` to its last line."""
    found = []
    for module in modules():
        where = module.path.relative_to(REPO).as_posix()
        found += _functions_in(ast.parse(module.path.read_text()), where, "")
    return found


def _functions_in(node: ast.AST, where: str, prefix: str) -> list[Function]:
    found = []
    for child in ast.iter_child_nodes(node):
        if isinstance(child, ast.FunctionDef | ast.AsyncFunctionDef | ast.ClassDef):
            name = prefix + child.name
            if not isinstance(child, ast.ClassDef):
                first = min([child.lineno, *(d.lineno for d in child.decorator_list)])
                found.append(Function(where, name, first, (child.end_lineno or child.lineno) - first + 1))
            found += _functions_in(child, where, name + ".")
        else:
            found += _functions_in(child, where, prefix)
    return found
