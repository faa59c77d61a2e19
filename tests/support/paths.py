"""Where the repository is, whatever the working directory the tests run from."""

from __future__ import annotations

from pathlib import Path

REPO = Path(__file__).resolve().parents[2]
# The manifest `make demo` applies: the e2e tests run the job a new user runs first.
DEMO_MANIFEST = REPO / "examples" / "demo-finetunejob.yaml"
