"""docs/architecture.md and the README say how the code is laid out; these tests hold them to the code.

- The import graph in docs/architecture.md (a mermaid flowchart: each node a layer of modules, each
  arrow an import) is the real one: every module sits in one layer, every arrow is an import, and every
  import across layers is an arrow (`-.->` where it only happens inside a function, when that runs).
- The module tables in docs/architecture.md ("Modules", the one place that lists them; the README points
  there) name every module of the three packages and nothing that is not there.
- No product function is over MAX_FUNCTION_LINES lines, except the declaration tables allowed below.

Other branches add modules: the failure messages say the exact line to add, and where.
"""

from __future__ import annotations

import re
import sys
from collections import defaultdict
from dataclasses import dataclass
from graphlib import CycleError, TopologicalSorter

from tests.support.code_map import PACKAGES, Import, functions, imports, modules
from tests.support.paths import REPO

ARCHITECTURE = REPO / "docs" / "architecture.md"
README = REPO / "README.md"

# What a package must never import, anywhere in it (lazily or not), and why (docs/architecture.md,
# "Packages"): the operator image has no torch or Ray, the trainer runs without Kubernetes code, and
# the product runs where the dev tools are not installed (cli.py's `demo` is the one exception).
FORBIDDEN = {
    "kubetune_operator": {"torch", "torchvision", "timm", "ray", "safetensors", "kmock", "moto"},
    "kubetune_trainer": {"kubernetes", "kopf", "kubetune_operator", "kubetune_dev", "kmock", "moto"},
}
# The contract both product packages read: pydantic and the standard library only.
CONTRACT = ("kubetune_trainer.config", "kubetune_trainer.progress_model", "kubetune_trainer.architectures")
CONTRACT_MAY_IMPORT = {"pydantic", *sys.stdlib_module_names}

MAX_FUNCTION_LINES = 60
# Functions allowed over MAX_FUNCTION_LINES: declaration tables only (a list of fields, routes or
# arguments, read top to bottom), each with the reason. Keep it short; split anything with logic in it.
DECLARATION_TABLES: dict[str, str] = {}


@dataclass(frozen=True)
class Graph:
    layer_of: dict[str, str]  # module name -> layer (node id)
    placed_twice: list[str]
    unknown: list[str]  # files a layer names that are not in its package
    edges: dict[tuple[str, str], str]  # (from layer, to layer) -> "-->" or "-.->"


NODE = re.compile(r'^\s*(\w+)\["(.*)"\]\s*$')
EDGE = re.compile(r"^\s*(\w+)\s*(-->|-\.->)\s*(\w+)\s*$")
SUBGRAPH = re.compile(r"^\s*subgraph\s+(\w+)")
FILE = re.compile(r"[\w/]+\.py")


def _mermaid() -> list[str]:
    text = ARCHITECTURE.read_text()
    blocks = re.findall(r"```mermaid\n(.*?)```", text, re.S)
    assert len(blocks) == 1, "docs/architecture.md should have one ```mermaid block: the import graph"
    return blocks[0].splitlines()


def doc_graph() -> Graph:
    known = {(m.package, m.file): m.name for m in modules()}
    layer_of: dict[str, str] = {}
    twice, unknown = [], []
    edges: dict[tuple[str, str], str] = {}
    package = ""
    for line in _mermaid():
        if subgraph := SUBGRAPH.match(line):
            package = subgraph.group(1)
        elif node := NODE.match(line):
            for file in FILE.findall(node.group(2)):
                name = known.get((package, file))
                if name is None:
                    unknown.append(f"{package}: {file} (layer {node.group(1)})")
                elif name in layer_of:
                    twice.append(f"{package}: {file}")
                else:
                    layer_of[name] = node.group(1)
        elif edge := EDGE.match(line):
            edges[(edge.group(1), edge.group(3))] = edge.group(2)
    return Graph(layer_of, twice, unknown, edges)


def real_edges(layer_of: dict[str, str]) -> dict[tuple[str, str], list[Import]]:
    """Imports between modules of ours in different layers, by (from layer, to layer)."""
    found: dict[tuple[str, str], list[Import]] = defaultdict(list)
    for imp in imports():
        if imp.source in layer_of and imp.target in layer_of and layer_of[imp.source] != layer_of[imp.target]:
            found[(layer_of[imp.source], layer_of[imp.target])].append(imp)
    return found


def test_every_module_sits_in_one_layer_of_the_import_graph() -> None:
    graph = doc_graph()
    unplaced = [
        f"{m.package}: {m.file} ({m.path.relative_to(REPO)})"
        for m in modules()
        if m.name not in graph.layer_of and not m.empty
    ]
    assert not unplaced, (
        "docs/architecture.md, the ```mermaid import graph: add each of these files to the label of the layer "
        "(node) it belongs to, inside `subgraph <package>`, then run this test again for the arrows:\n  "
        + "\n  ".join(unplaced)
    )
    assert not graph.unknown, "docs/architecture.md, import graph: no such file in the package:\n  " + "\n  ".join(
        graph.unknown
    )
    assert not graph.placed_twice, "docs/architecture.md, import graph: in two layers:\n  " + "\n  ".join(
        graph.placed_twice
    )


def test_the_arrows_of_the_import_graph_are_the_imports() -> None:
    graph = doc_graph()
    real = real_edges(graph.layer_of)
    expected = {key: "-.->" if all(i.lazy for i in found) else "-->" for key, found in real.items()}
    missing = [
        f"    {a} {arrow} {b}    %% e.g. {real[(a, b)][0].source} imports {real[(a, b)][0].target}"
        for (a, b), arrow in sorted(expected.items())
        if graph.edges.get((a, b)) != arrow
    ]
    extra = [f"    {a} {arrow} {b}" for (a, b), arrow in sorted(graph.edges.items()) if expected.get((a, b)) != arrow]
    assert not missing and not extra, (
        "docs/architecture.md, the ```mermaid import graph does not match the imports "
        "(`-->` an import at module level, `-.->` one only inside a function).\n"
        "Add these arrows (or, if the import crosses a line it should not, remove the import):\n"
        + "\n".join(missing)
        + "\nRemove these arrows (no such import):\n"
        + "\n".join(extra)
    )


def test_the_layers_stack_without_a_cycle() -> None:
    """Each layer imports only layers below it: handlers -> builders, never builders -> handlers."""
    below: dict[str, set[str]] = defaultdict(set)
    for a, b in [*doc_graph().edges, *real_edges(doc_graph().layer_of)]:
        below[a].add(b)
    try:
        TopologicalSorter(below).prepare()
    except CycleError as error:
        cycle = " -> ".join(error.args[1])
        raise AssertionError(
            f"layers import each other ({cycle}): move the import's target down a layer, or the module up"
        ) from None


def test_no_package_imports_what_its_image_or_its_users_lack() -> None:
    bad = [
        f"{i.source} imports {i.target}"
        for i in imports()
        if i.target.split(".")[0] in FORBIDDEN.get(i.source.split(".")[0], set())
        and not (i.source == "kubetune_operator.cli" and i.target == "kubetune_dev.demo" and i.lazy)
    ]
    assert not bad, "imports across a package line the docs promise is not crossed:\n  " + "\n  ".join(bad)
    contract = [
        f"{i.source} imports {i.target}"
        for i in imports()
        if i.source in CONTRACT and i.target not in CONTRACT_MAY_IMPORT | set(CONTRACT)
    ]
    assert not contract, "the contract imports pydantic and the standard library only:\n  " + "\n  ".join(contract)


def test_the_operator_imports_the_trainer_only_for_the_contract_and_the_local_commands() -> None:
    crossing = {
        (i.target, i.lazy)
        for i in imports()
        if i.source.startswith("kubetune_operator.") and i.target.startswith("kubetune_trainer")
    }
    # run --local, tune-lr, data pack
    when_run = {("kubetune_trainer.local", True), ("kubetune_trainer.tune_lr", True), ("kubetune_trainer.pack", True)}
    assert crossing <= {(name, False) for name in CONTRACT} | when_run, crossing


MODULES_SECTION = re.compile(r"^## Modules\n(.*?)^## ", re.S | re.M)
TABLE_FILE = re.compile(r"`([\w/]+\.py)`")
TABLE_HEADING = re.compile(r"^`(kubetune_\w+)/`", re.M)


def documented_modules() -> tuple[dict[str, set[str]], list[str]]:
    """The files each package's table in docs/architecture.md "## Modules" names, and names it gives that
    are not files of that package."""
    section = MODULES_SECTION.search(ARCHITECTURE.read_text())
    assert section, 'docs/architecture.md should have a "## Modules" section followed by another "## " heading'
    named: dict[str, set[str]] = defaultdict(set)
    package = ""
    for line in section.group(1).splitlines():
        if heading := TABLE_HEADING.match(line):
            package = heading.group(1)
        elif line.startswith("|") and package:
            named[package] |= set(TABLE_FILE.findall(line.split("|")[1]))
    files = {(m.package, m.file) for m in modules()}
    unknown = [f"{p}: {f}" for p, names in named.items() for f in sorted(names) if (p, f) not in files]
    return named, unknown


def test_the_module_tables_name_every_module_and_only_modules() -> None:
    named, unknown = documented_modules()
    missing = [
        f"under `{m.package}/`: | `{m.file}` | <what it holds> |  ({m.path.relative_to(REPO)})"
        for m in modules()
        if m.file not in named[m.package] and not m.empty
    ]
    assert not missing, (
        'docs/architecture.md, "## Modules": add a row (or the file to an existing row\'s first cell):\n  '
        + "\n  ".join(missing)
    )
    assert not unknown, 'docs/architecture.md, "## Modules" names files that do not exist:\n  ' + "\n  ".join(unknown)
    assert set(named) == set(PACKAGES), f"one table per package, headed `<package>/`: {sorted(named)}"


def test_the_readme_names_only_modules_that_exist_and_points_to_the_tables() -> None:
    readme = README.read_text()
    assert "docs/architecture.md#modules" in readme, "README.md should point to docs/architecture.md#modules"
    files = {m.file for m in modules()} | {f"{m.package}/{m.file}" for m in modules()}
    files |= {m.file.rsplit("/", 1)[-1] for m in modules()}
    stale = sorted(name for name in TABLE_FILE.findall(readme) if name not in files and not (REPO / name).is_file())
    assert not stale, f"README.md names .py files that are nowhere in the repository: {stale}"


def test_no_product_function_is_over_the_limit_except_declaration_tables() -> None:
    long = {f"{f.where}::{f.name}": f for f in functions() if f.lines > MAX_FUNCTION_LINES}
    over = [f"{key} ({f.lines} lines, from line {f.line})" for key, f in long.items() if key not in DECLARATION_TABLES]
    assert not over, (
        f"functions over {MAX_FUNCTION_LINES} lines: split them into steps that say what they do "
        "(or, for a pure declaration table, add it to DECLARATION_TABLES with the reason):\n  " + "\n  ".join(over)
    )
    stale = sorted(set(DECLARATION_TABLES) - set(long))
    assert not stale, f"DECLARATION_TABLES names functions that are gone or now short enough: {stale}"
