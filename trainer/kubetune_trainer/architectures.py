"""The model names a FineTuneJob may ask for, known without torch or timm (the operator's image has neither).

`architectures.txt` beside this module lists every timm model name and every torchvision detection model
name of the versions the trainer image ships; `python -m kubetune_trainer.architectures` writes it from the
installed timm and torchvision (at build time, like the CRD), and a test keeps it equal to them. The spec
model checks `model.architecture` against it, so `kubetune validate` and the operator refuse a misspelt
name before any Ray cluster exists, naming the close matches.
"""

from __future__ import annotations

import difflib
import sys
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


def render() -> str:
    """The data file for the installed timm and torchvision."""
    import timm
    import torchvision

    detection = torchvision.models.list_models(module=torchvision.models.detection)
    return "\n".join(
        [
            f"{TIMM_HEADER} {timm.__version__}",
            *sorted(timm.list_models()),
            f"{DETECTION_HEADER} {torchvision.__version__}",
            *sorted(detection),
            "",
        ]
    )


def main(argv: list[str] | None = None) -> int:
    """Write the data file next to this module (or check it with --check)."""
    args = sys.argv[1:] if argv is None else argv
    path = resources.files(__package__).joinpath(DATA_FILE)
    text = render()
    if "--check" in args:
        return 0 if path.read_text() == text else 1
    with resources.as_file(path) as target:
        target.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
