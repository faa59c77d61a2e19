"""The chaos soak's short variant, as `make soak` runs it (`python -m kubetune_dev.soak`, from the
repository root): two jobs for a 60-second window (about two minutes with the drain: a killed driver
restarts its run) while the operator is killed during a status write and a driver, a worker and S3 fail;
every invariant must hold. Each fault waits for its target (a status write, a training job), so a shorter
window still injects all four; it only brings the second job and the faults closer together.

The 20-minute soak with every fault kind is `make soak` (not part of `make test`); soak/results.md
holds its latest figures.
"""

from __future__ import annotations

import os
import re
import subprocess
import sys
from pathlib import Path

import pytest

from tests.support.paths import REPO

pytestmark = pytest.mark.slow

FAULTS = "operator-kill-status-write,driver-kill,worker-kill,s3-503"


def test_a_short_soak_with_faults_passes_every_invariant_and_writes_its_results(tmp_path: Path) -> None:
    results = tmp_path / "results.md"
    argv = ["--minutes", "1", "--jobs", "2", "--seed", "23", "--faults", FAULTS, "--results", str(results)]
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(str(REPO / p) for p in ("operator", "trainer", "devtools", "."))}
    done = subprocess.run(
        [sys.executable, "-m", "kubetune_dev.soak", *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=840,
    )
    text = results.read_text() if results.exists() else ""
    assert done.returncode == 0, f"{done.stdout[-3000:]}\n{done.stderr[-5000:]}\n{text}"
    assert "**PASSED**" in text and "**FAIL**" not in text, text
    # The command to repeat it, and the faults that really hit (at least the operator kill and S3's 503s).
    assert f"--minutes 1 --jobs 2 --seed 23 --faults {FAULTS}`" in text
    injected = re.search(r"Faults: (\d+) injected of (\d+) planned", text)
    assert injected and int(injected[1]) >= 2, text
    assert re.search(r"\| operator-kill-status-write \| 1 \| 1 \|", text), text
    # Every invariant was checked for both jobs, and the cluster-wide ones once.
    for check in ("final phase", "one RayJob per attempt", "history.json", "final progress = history", "model reloads"):
        assert len(re.findall(rf"^\| {re.escape(check)} \| soak-0[01] \| pass \|", text, re.M)) == 2, (check, text)
    assert re.search(r"^\| no orphans \| cluster \| pass \|", text, re.M), text
    assert re.search(r"^\| operator RSS flat \| operator \| pass \|", text, re.M), text
