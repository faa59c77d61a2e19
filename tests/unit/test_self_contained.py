"""The repository is self-contained: a clone with nothing beside it builds, tests and runs the demo.

`.ci/run` proves it end to end (lint and the whole suite from a copy alone in a temporary folder); these
checks catch the usual way it breaks, in seconds: a file that names a folder beside the checkout or a
path of one machine, and a link in the documents that points outside the repository or nowhere.
They walk the tree as `.ci/run` copies it (no git needed), less what .gitignore leaves out.
"""

from __future__ import annotations

import re
from collections.abc import Iterator
from pathlib import Path

import pytest

from tests.support.paths import REPO

# What .gitignore leaves out of a clone (and so of .ci/run's copy).
IGNORED = {
    ".git",
    ".venv",
    ".tools",
    "__pycache__",
    ".pytest_cache",
    ".mypy_cache",
    ".ruff_cache",
    "build",
    "dist",
    ".demo",
    ".cache",
    ".whl",
    ".gl",
    "out",
    "artifacts",
}
TEXT = {".py", ".md", ".yaml", ".yml", ".toml", ".json", ".txt", ".tpl", ".cfg", ".ini", ".sh"}
TEXT_NAMES = {"Makefile", "Dockerfile", "run", ".dockerignore", ".helmignore", ".gitignore"}
# The folder beside the checkout, and an absolute path of the machine the project is developed on (not a
# folder of that name inside a path); built from parts, so this file does not name them itself.
OUTSIDE = re.compile(r"\.\./" + "shared" + r"|(^|[\s\"'`(=:])/" + "work" + "/")
LINK = re.compile(r"\]\(([^)\s]+)\)")


def repository_files() -> Iterator[Path]:
    stack = [REPO]
    while stack:
        folder = stack.pop()
        for path in folder.iterdir():
            if path.name in IGNORED or path.name.endswith(".egg-info") or path.is_symlink():
                continue
            if path.is_dir():
                stack.append(path)
            elif path.suffix in TEXT or path.name in TEXT_NAMES:
                yield path


def test_no_file_names_a_folder_beside_the_checkout_or_a_path_of_this_machine() -> None:
    found = [
        f"{path.relative_to(REPO)}:{number}: {line.strip()[:120]}"
        for path in repository_files()
        for number, line in enumerate(path.read_text(errors="replace").splitlines(), 1)
        if OUTSIDE.search(line)
    ]
    assert not found, "files that reach outside the repository:\n  " + "\n  ".join(found)


@pytest.mark.parametrize(
    "document", sorted(p.relative_to(REPO).as_posix() for p in repository_files() if p.suffix == ".md")
)
def test_each_relative_link_of_a_document_points_to_a_file_of_the_repository(document: str) -> None:
    path = REPO / document
    bad = []
    for target in LINK.findall(path.read_text()):
        if re.match(r"^[a-z][a-z0-9+.-]*:", target) or target.startswith("#"):
            continue  # a URL, or a heading of the same page
        resolved = (path.parent / target.split("#")[0]).resolve()
        if not resolved.is_relative_to(REPO.resolve()) or not resolved.exists():
            bad.append(target)
    assert not bad, f"{document}: links that point outside the repository or to nothing: {bad}"
