"""`make demo` as a user runs it: the console script `kubetune demo`, from the repository root, on defaults.

- The live table moves while the job runs, the final row carries the last epoch's figures, and
  `status.progress` and the operator's /metrics show the job's progress while it runs (issue #13: a token
  path relative to the demo's folder kept every update from the operator, and nothing noticed).
- The same run is the end-to-end test of the whole path (operator -> RayJob -> KubeRay stand-in -> Ray
  Train -> S3, and back into status): while it runs, a real kubectl with the printed kubeconfig sees the
  job, and its Ray cluster runs with token auth behind the job's NetworkPolicy (both owned by the job, so
  deleting it takes them along); at the end, the demo printed where the model, the curves and the report
  are, and history.json has one entry per epoch. One full run serves all of it: each costs minutes.
- Ctrl-C (SIGINT to the demo's process group, as a terminal sends it) or SIGTERM mid-job stops the demo,
  which says what it stopped and leaves no process behind: every process the demo started carries a marker
  in its environment (children inherit it, re-parented or not), and none may be left.

Slow: each runs the real demo (about 1.5 minutes to the end, under half a minute to the first Running row).
"""

from __future__ import annotations

import json
import os
import queue
import re
import signal
import subprocess
import sys
import threading
import time
import urllib.request
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
import yaml
from prometheus_client.parser import text_string_to_metric_families

from tests.support.paths import REPO, find_kubectl

KUBETUNE = Path(sys.executable).with_name("kubetune")
JOB = "digits-demo"
JOB_URL = f"/apis/kubetune.dev/v1alpha1/namespaces/default/finetunejobs/{JOB}"
RAYJOB_URL = f"/apis/ray.io/v1/namespaces/default/rayjobs/{JOB}"
# What the operator creates beside the RayJob to guard its Ray cluster, each owned by the job.
GUARD_URLS = (
    f"/api/v1/namespaces/default/secrets/{JOB}-ray-token",
    f"/apis/networking.k8s.io/v1/namespaces/default/networkpolicies/{JOB}-ray",
)
EPOCHS = 4  # examples/demo-finetunejob.yaml
MARK = "KUBETUNE_DEMO_TEST_MARK"
ROW = re.compile(r"^digits-demo\s+(\w+)\s+\[[#-]+\]\s+([\d.]+)%\s+(\S+)\s+(\S+)\s+(\S+)\s+(\S+)\s*$")


@dataclass
class Demo:
    """`kubetune demo ARGS` running from the repository root, its output read line by line."""

    proc: subprocess.Popen[str]
    mark: str
    lines: list[str] = field(default_factory=list)
    _queue: queue.Queue[str | None] = field(default_factory=queue.Queue)

    def __post_init__(self) -> None:
        threading.Thread(target=self._read, daemon=True).start()

    def _read(self) -> None:
        assert self.proc.stdout is not None
        for line in self.proc.stdout:
            self._queue.put(line.rstrip("\n"))
        self._queue.put(None)

    def next_line(self, timeout: float) -> str | None:
        """The next line of output; None at its end (or after `timeout` seconds of silence)."""
        try:
            line = self._queue.get(timeout=timeout)
        except queue.Empty:
            return None
        if line is not None:
            self.lines.append(line)
        return line

    def wait_for_line(self, pattern: str, timeout: float = 600) -> re.Match[str]:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            line = self.next_line(timeout=1.0)
            if line is not None and (found := re.search(pattern, line)):
                return found
            if line is None and self.proc.poll() is not None and self._queue.empty():
                break
        raise AssertionError(f"no line matching {pattern!r} in the demo's output:\n{self.output}")

    def finish(self, timeout: float = 600) -> int:
        code = self.proc.wait(timeout)
        while self.next_line(timeout=5) is not None:
            pass
        return code

    @property
    def output(self) -> str:
        return "\n".join(self.lines)


@pytest.fixture()
def start_demo() -> Iterator[Any]:
    started: list[Demo] = []

    def start(*args: str) -> Demo:
        mark = uuid.uuid4().hex
        proc = subprocess.Popen(
            [str(KUBETUNE), "demo", *args],
            cwd=REPO,
            env={**os.environ, MARK: mark, "PYTHONUNBUFFERED": "1"},
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            start_new_session=True,  # a process group of its own, as a shell's foreground job has
        )
        started.append(Demo(proc, mark))
        return started[-1]

    yield start
    for demo in started:  # a failed test must not leave a demo running either
        if demo.proc.poll() is None:
            os.killpg(demo.proc.pid, signal.SIGKILL)
            demo.proc.wait()
        for pid in marked_processes(demo.mark):
            os.kill(pid, signal.SIGKILL)


def marked_processes(mark: str) -> list[int]:
    """Live processes whose environment carries `mark` (the demo's and every descendant's)."""
    needle = f"{MARK}={mark}".encode()
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            state = (entry / "stat").read_text().rsplit(")", 1)[1].split()[0]
            environ = (entry / "environ").read_bytes()
        except OSError:
            continue
        if state not in ("Z", "X") and needle in environ.split(b"\0"):
            found.append(int(entry.name))
    return found


def describe(pids: list[int]) -> str:
    out = []
    for pid in pids:
        try:
            cmdline = Path(f"/proc/{pid}/cmdline").read_bytes().replace(b"\0", b" ").decode()
            out.append(f"{pid}: {cmdline[:120]}")
        except OSError:
            out.append(f"{pid}: (gone)")
    return "\n".join(out)


def rows(lines: list[str]) -> list[tuple[str, float, str, str, str, str]]:
    """The live table's rows: (phase, percent, epoch, loss, val-acc, eta)."""
    return [(m[1], float(m[2]), m[3], m[4], m[5], m[6]) for line in lines if (m := ROW.match(line))]


def get_json(url: str) -> Any:
    with urllib.request.urlopen(url, timeout=5) as response:
        return json.loads(response.read())


def job_epoch_series(metrics_url: str) -> list[float]:
    with urllib.request.urlopen(metrics_url, timeout=5) as response:
        text = response.read().decode()
    return [
        sample.value
        for family in text_string_to_metric_families(text)
        if family.name == "kubetune_job_epoch"
        for sample in family.samples
        if sample.labels.get("name") == JOB
    ]


def check_while_running(api: str, kubeconfig: Path, job: dict[str, Any]) -> None:
    """What a user can look at while the demo's job runs: kubectl, and the guarded Ray cluster."""
    kubectl = find_kubectl()
    if kubectl is not None:  # `make test` has it in .tools/; test_kubectl.py covers the client itself
        got = subprocess.run(
            [kubectl, f"--kubeconfig={kubeconfig}", "get", "ftj", JOB], capture_output=True, text=True, timeout=30
        )
        assert got.returncode == 0 and JOB in got.stdout, got.stderr
    # The run's Ray cluster runs with token auth (the stand-in's head and the driver with the Secret's
    # token), behind the job's NetworkPolicy; both go with the job (owned by it).
    rayjob = get_json(api + RAYJOB_URL)
    assert rayjob["spec"]["rayClusterSpec"]["authOptions"] == {"mode": "token", "secretName": f"{JOB}-ray-token"}
    for url in GUARD_URLS:
        owners = get_json(api + url)["metadata"]["ownerReferences"]
        assert owners[0]["uid"] == job["metadata"]["uid"], (url, owners)


def check_printed_results(output: str, lines: list[str]) -> None:
    """The end of the demo: where the metrics were (printed early), the model, curves and report are."""
    metrics_line = next(i for i, line in enumerate(lines) if line.startswith("metrics: "))
    applied_line = next(i for i, line in enumerate(lines) if line.startswith("applied "))
    assert metrics_line < applied_line  # printed before the job starts
    assert re.search(r"^model: s3://\S+", output, re.M), output
    accuracy = re.search(r"^validation accuracy: ([0-9.]+)", output, re.M)
    assert accuracy and float(accuracy[1]) > 0.8, output
    curves = re.search(r"^training curves: (.+)$", output, re.M)
    assert curves and Path(curves[1]).read_bytes().startswith(b"\x89PNG"), output
    # The demo's job has no test set: its report judges the validation images, and says so.
    report = re.search(r"^evaluation report: (.+)$", output, re.M)
    assert report, output
    page = Path(report[1]).read_text()
    assert page.startswith("<!DOCTYPE html>") and "Results on the validation set" in page
    # history.json (downloaded beside them) has exactly one entry per epoch.
    history = json.loads((Path(report[1]).parent / "history.json").read_text())
    assert [entry["epoch"] for entry in history] == list(range(1, EPOCHS + 1)), history


@pytest.mark.slow
def test_make_demo_shows_progress_in_the_table_the_status_and_the_metrics(start_demo: Any) -> None:
    demo = start_demo()  # `make demo` is exactly this: .venv/bin/kubetune demo, from the repository root
    metrics_url = demo.wait_for_line(r"^metrics: (http://\S+)$", timeout=120)[1]
    kubeconfig = Path(demo.wait_for_line(r"export KUBECONFIG=(\S+)$")[1])
    assert kubeconfig == REPO / ".demo" / "cluster" / "kubeconfig"  # the default folder, absolute
    api = yaml.safe_load(kubeconfig.read_text())["clusters"][0]["cluster"]["server"]

    # While it runs: what `kubectl get ftj digits-demo -o jsonpath='{.status.progress}'` and a Prometheus
    # scrape would show, about once a second.
    progress_while_running: list[dict[str, Any]] = []
    epochs_scraped: list[float] = []
    checked_while_running = False
    while demo.proc.poll() is None:
        line = demo.next_line(timeout=1.0)
        if line is not None and line.startswith("done in"):
            break
        try:
            job = get_json(api + JOB_URL)
            status = job.get("status") or {}
            epochs_scraped += job_epoch_series(metrics_url)
            if status.get("phase") == "Running" and not checked_while_running:
                check_while_running(api, kubeconfig, job)
                checked_while_running = True
        except OSError:  # not created yet, or the demo is stopping
            continue
        if status.get("phase") == "Running" and status.get("progress"):
            progress_while_running.append(status["progress"])
    code = demo.finish()
    assert code == 0, demo.output

    assert checked_while_running, f"the job was never seen Running:\n{demo.output}"
    assert progress_while_running, f"status.progress stayed empty while the job ran:\n{demo.output}"
    assert any(p.get("epoch") for p in progress_while_running), progress_while_running
    assert epochs_scraped and max(epochs_scraped) >= 1, "the operator's /metrics never showed kubetune_job_epoch"

    table = rows(demo.lines)
    running = [row for row in table if row[0] == "Running"]
    assert any(0 < percent < 100 and epoch != "-" and loss != "-" for _, percent, epoch, loss, _, _ in running), (
        f"the live table did not move while Running:\n{demo.output}"
    )
    assert any(eta != "-" for *_, eta in running), demo.output
    phase, percent, epoch, loss, accuracy, _ = table[-1]
    assert (phase, percent, epoch) == ("Succeeded", 100.0, f"{EPOCHS}/{EPOCHS}"), demo.output
    assert float(loss) > 0 and float(accuracy) > 0.8, demo.output
    check_printed_results(demo.output, demo.lines)
    # The finished job's Ray cluster was stopped by the stand-in itself, not left to the final sweep.
    assert "stray" not in demo.output, demo.output
    assert not marked_processes(demo.mark), describe(marked_processes(demo.mark))


@pytest.mark.slow
@pytest.mark.parametrize(
    ("sig", "args"),
    [
        # Ctrl-C at a terminal: SIGINT to the foreground process group.
        pytest.param(signal.SIGINT, (), id="ctrl-c"),
        # `kill PID` (or a CI timeout) to a demo started with the README's --keep-running.
        pytest.param(signal.SIGTERM, ("--keep-running",), id="sigterm"),
    ],
)
def test_a_signal_mid_job_stops_the_demo_and_leaves_no_process(
    start_demo: Any, tmp_path: Path, sig: signal.Signals, args: tuple[str, ...]
) -> None:
    demo = start_demo("--workdir", str(tmp_path / "demo"), *args)
    demo.wait_for_line(r"^digits-demo\s+Running\s")  # the driver and its Ray cluster are up
    running = marked_processes(demo.mark)
    assert len(running) > 1, f"mid-job, the demo runs processes besides itself: {describe(running)}"

    if sig == signal.SIGINT:
        os.killpg(demo.proc.pid, sig)
    else:
        demo.proc.send_signal(sig)
    code = demo.finish(timeout=120)

    assert code == 128 + sig, demo.output
    assert "done in" not in demo.output, "it stopped instead of running the job to its end"
    stopped = demo.output[demo.output.index("stopping everything it started") :]
    assert re.search(r"stopped RayJob default/digits-demo: its driver and Ray cluster \(\d+ processes\)", stopped), (
        demo.output
    )
    assert "stopped the operator" in stopped and "stopped S3" in stopped, demo.output
    assert "stray" not in stopped, f"the stand-ins left processes to the final sweep:\n{demo.output}"
    left = marked_processes(demo.mark)
    assert not left, f"left behind:\n{describe(left)}\n\n{demo.output}"
