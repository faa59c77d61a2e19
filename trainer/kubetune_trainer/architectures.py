"""The model names a FineTuneJob may ask for, known without torch or timm (the operator's image has neither).

`architectures.txt` beside this module lists every timm model name and every torchvision detection model
name of the versions the trainer image ships; `python -m kubetune_trainer.write_architectures` writes it from the
installed timm and torchvision (at build time, like the CRD), and a test keeps it equal to them. The spec
model checks `model.architecture` against it, so `kubetune validate` and the operator refuse a misspelt
name before any Ray cluster exists, naming the close matches.
"""

from __future__ import annotations

import difflib
from functools import cache
from importlib import resources

DATA_FILE = "architectures.txt"
TIMM_HEADER = "# timm"
DETECTION_HEADER = "# torchvision.models.detection"


@cache
def _sections() -> dict[str, frozenset[str]]:
    text = resources.files(__package__).joinpath(DATA_FILE).read_text()
    sections: dict[str, set[str]] = {}
    current: set[str] | None = None
    for line in text.splitlines():
        if line.startswith("# "):  # "# <source> <version>"
            current = sections.setdefault(line.split(" ")[1], set())
        elif line and current is not None:
            current.add(line)
    return {key: frozenset(names) for key, names in sections.items()}


def timm_models() -> frozenset[str]:
    return _sections()[TIMM_HEADER.removeprefix("# ")]


def detection_models() -> frozenset[str]:
    return _sections()[DETECTION_HEADER.removeprefix("# ")]


def close_matches(name: str, known: frozenset[str], n: int = 5) -> list[str]:
    """The known names most like `name` (difflib), best first."""
    return difflib.get_close_matches(name, sorted(known), n=n, cutoff=0.6)
