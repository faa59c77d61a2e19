"""Where the repository is, whatever the working directory the tests run from."""

from __future__ import annotations

import shutil
from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The manifest `make demo` applies: the e2e tests run the job a new user runs first.
DEMO_MANIFEST = REPO / "examples" / "demo-finetunejob.yaml"


def find_kubectl() -> str | None:
    """The real kubectl: `make tools`'s copy in .tools/, else one on PATH."""
    local = REPO / ".tools" / "bin" / "kubectl"
    return str(local) if local.exists() else shutil.which("kubectl")
