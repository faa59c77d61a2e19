"""Which modules a `kubetune run` imported, in every process it started (the driver and its Ray processes).

`probe_env(folder)` is the environment to run it with: a `sitecustomize.py` first on PYTHONPATH, which at
each process's exit writes the names in `sys.modules` to `<folder>/modules/<pid>.txt`; `imported(folder)`
reads them back. Used to show an optional extra (MLflow, ONNX) is not imported when a job does not ask.
"""

from __future__ import annotations

import os
from pathlib import Path

MODULES_DIR_ENV = "KUBETUNE_TEST_MODULES_DIR"
PROBE = f"""import atexit, os, sys
def _write():
    folder = os.environ.get("{MODULES_DIR_ENV}")
    if folder:
        with open(os.path.join(folder, f"{{os.getpid()}}.txt"), "w") as f:
            f.write("\\n".join(sorted(sys.modules)))
atexit.register(_write)
"""


def probe_env(folder: Path) -> dict[str, str]:
    (folder / "site").mkdir(parents=True, exist_ok=True)
    (folder / "modules").mkdir(exist_ok=True)
    (folder / "site" / "sitecustomize.py").write_text(PROBE)
    path = os.pathsep.join(p for p in (str(folder / "site"), os.environ.get("PYTHONPATH", "")) if p)
    return {"PYTHONPATH": path, MODULES_DIR_ENV: str(folder / "modules")}


def imported(folder: Path) -> dict[str, set[str]]:
    """Each process's imported module names, by the file it wrote (`<pid>.txt`)."""
    return {path.name: set(path.read_text().split()) for path in (folder / "modules").glob("*.txt")}
