"""Writes `architectures.txt` (see architectures.py) from the installed timm and torchvision.

`python -m kubetune_trainer.write_architectures` (`--check`: exit 1 when the file differs). A module of its
own, so the operator, which reads the file, never imports timm or torch.
"""

from __future__ import annotations

import sys
from importlib import resources

from kubetune_trainer.architectures import DATA_FILE, DETECTION_HEADER, TIMM_HEADER


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
    path = resources.files("kubetune_trainer").joinpath(DATA_FILE)
    text = render()
    if "--check" in args:
        return 0 if path.read_text() == text else 1
    with resources.as_file(path) as target:
        target.write_text(text)
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
