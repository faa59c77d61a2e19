"""`kubetune demo`: the whole loop on this machine, start to finish.

Starts the embedded stand-ins for a cluster (a Kubernetes API with the FineTuneJob CRD, S3, KubeRay —
see `kubetune_dev.devcluster`), runs the real operator against them, seeds S3 with base weights
(a tiny timm model trained on digits 0-4, cached) and digits 5-9, applies
`examples/demo-finetunejob.yaml` through the Kubernetes API and follows the job's status the way
`kubectl get ftj -w` would, until it succeeds. Then it prints where the model and its training curves
are. `--keep-running` leaves every endpoint up until Ctrl-C.

Ctrl-C (SIGINT) or SIGTERM at any point stops everything the demo started — the job's Ray cluster and
driver, the operator, S3, the API — says what it stopped, and exits 130 or 143. The command line is
`kubetune_operator.cli`'s; this module gets its options as `DemoOptions`.
"""

from __future__ import annotations

import contextlib
import json
import logging
import shutil
import signal
import sys
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from pathlib import Path
from types import FrameType
from typing import Any, TextIO

import yaml

from kubetune_dev.devcluster.cluster import DevCluster, find_file
from kubetune_dev.devcluster.processes import ProcInfo, adopt_orphans, kill_descendants
from kubetune_dev.devcluster.seed import seed_demo, split_uri

FTJ = ("kubetune.dev", "v1alpha1", "finetunejobs")
DEFAULT_MANIFEST = Path("examples") / "demo-finetunejob.yaml"
TERMINAL = ("Succeeded", "Failed")
STOP_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@dataclass(frozen=True)
class DemoOptions:
    """What `kubetune demo` was asked to do: its flags, parsed (and defaulted) by `kubetune_operator.cli`."""

    workdir: Path
    timeout: float
    manifest: Path | None = None  # None: examples/demo-finetunejob.yaml of this checkout
    keep_running: bool = False


class Interrupted(BaseException):
    """SIGINT or SIGTERM arrived: stop everything and exit. A BaseException, like KeyboardInterrupt, so
    no `except Exception` on the way swallows it."""

    def __init__(self, signum: int) -> None:
        super().__init__(signal.Signals(signum).name)
        self.signum = signum


def find_manifest(given: Path | None) -> Path:
    if given is not None:
        return given
    found = find_file(DEFAULT_MANIFEST)
    if found is None:
        raise RuntimeError(f"{DEFAULT_MANIFEST} not found (run it from the repository, or pass --manifest)")
    return found


def read_manifest(path: Path) -> dict[str, Any]:
    try:
        manifest = yaml.safe_load(path.read_text())
    except (OSError, yaml.YAMLError) as exc:
        raise RuntimeError(f"cannot read the FineTuneJob in {path}: {exc}") from None
    if not isinstance(manifest, dict) or not isinstance(manifest.get("metadata"), dict):
        raise RuntimeError(f"{path} holds no FineTuneJob")
    return manifest


# -- the live table ---------------------------------------------------------------------------------------


def bar(percent: float, width: int = 20) -> str:
    filled = round(max(0.0, min(percent, 100.0)) / 100 * width)
    return "[" + "#" * filled + "-" * (width - filled) + f"] {percent:5.1f}%"


def duration(seconds: Any) -> str:
    if not isinstance(seconds, int | float) or seconds < 0:
        return "-"
    s = int(seconds)
    return f"{s // 60}m{s % 60:02d}s" if s >= 60 else f"{s}s"


def number(value: Any, fmt: str) -> str:
    return format(value, fmt) if isinstance(value, int | float) else "-"


COLUMNS = "{:<14} {:<10} {:<29} {:<7} {:<8} {:<8} {:<8}"
HEADER = COLUMNS.format("NAME", "PHASE", "PROGRESS", "EPOCH", "LOSS", "VAL-ACC", "ETA")


def status_row(job: dict[str, Any]) -> str:
    """One line of live status, read from the FineTuneJob (as `kubectl get ftj -w` shows it)."""
    status = job.get("status") or {}
    progress = status.get("progress") or {}
    metrics = progress.get("metrics") or {}
    epoch = progress.get("epoch")
    total = progress.get("totalEpochs") or (job.get("spec") or {}).get("training", {}).get("epochs")
    return COLUMNS.format(
        job["metadata"]["name"][:14],
        status.get("phase") or "Pending",
        bar(float(progress.get("percent") or 0)),
        f"{epoch}/{total}" if epoch is not None else "-",
        number(metrics.get("trainLoss"), ".4f"),
        number(metrics.get("valAccuracy"), ".3f"),
        duration(progress.get("etaSeconds")),
    )


def follow(cluster: DevCluster, namespace: str, name: str, timeout: float, out: TextIO) -> dict[str, Any]:
    """Print a status row whenever it changes, until the job is Succeeded or Failed (or time runs out)."""
    print(HEADER, file=out, flush=True)
    deadline = time.monotonic() + timeout
    last_row = ""
    job: dict[str, Any] = {}
    while time.monotonic() < deadline:
        job = cluster.get(*FTJ, namespace, name) or {}
        if not job:
            raise RuntimeError(f"FineTuneJob {namespace}/{name} disappeared")
        row = status_row(job)
        if row != last_row:
            print(row, file=out, flush=True)
            last_row = row
        if (job.get("status") or {}).get("phase") in TERMINAL:
            return job
        time.sleep(1.0)
    raise TimeoutError(f"the job did not finish within {timeout:.0f}s (last: {last_row.strip()})")


# -- logs, results, hints ------------------------------------------------------------------------------------


@contextlib.contextmanager
def logs_to_file(log_file: Path) -> Iterator[None]:
    """Send the operator's and the stand-ins' logs to a file while the demo runs (the console shows the demo)."""
    log_file.parent.mkdir(parents=True, exist_ok=True)
    handler = logging.FileHandler(log_file)
    handler.setFormatter(logging.Formatter("%(asctime)s %(name)s %(levelname)s %(message)s"))
    root = logging.getLogger()
    quiet = {name: logging.getLogger(name).level for name in ("botocore", "urllib3", "aiohttp.access", "werkzeug")}
    previous = root.level
    root.addHandler(handler)
    root.setLevel(logging.INFO)
    for name in quiet:
        logging.getLogger(name).setLevel(logging.WARNING)
    try:
        yield
    finally:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(previous)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)


def download_results(cluster: DevCluster, job: dict[str, Any], workdir: Path) -> dict[str, Path]:
    """Fetch the exported model card, training curves and evaluation report from the job's output prefix."""
    bucket, prefix = split_uri(job["spec"]["output"]["path"])
    s3 = cluster.s3()
    found: dict[str, Path] = {}
    for name in ("training-curves.png", "model.json", "history.json", "report.html", "evaluation.json"):
        target = workdir / name
        try:
            s3.download_file(bucket, f"{prefix.rstrip('/')}/{name}".lstrip("/"), str(target))
        except Exception as exc:  # a missing export is reported, not fatal
            logging.getLogger(__name__).warning("could not download %s: %s", name, exc)
            continue
        found[name] = target
    return found


def final_accuracy(job: dict[str, Any], files: dict[str, Path]) -> float | None:
    """The exported epoch's validation accuracy (model.json's `metrics`), else the status's latest."""
    card = json.loads(files["model.json"].read_text()) if "model.json" in files else {}
    for metrics in (card.get("metrics") or {}, ((job.get("status") or {}).get("progress") or {}).get("metrics") or {}):
        if isinstance(metrics.get("valAccuracy"), int | float):
            return float(metrics["valAccuracy"])
    return None


def kubectl_hint(kubeconfig: Path, name: str) -> str:
    local = find_file(Path(".tools") / "bin" / "kubectl")
    kubectl = str(local) if local is not None else (shutil.which("kubectl") or "kubectl")
    return (
        f"kubectl: export KUBECONFIG={kubeconfig}\n"
        f"         {kubectl} get ftj    |  {kubectl} describe ftj {name}  |  {kubectl} get rayjobs"
    )


# -- the demo ------------------------------------------------------------------------------------------------

OnFinished = Callable[[DevCluster, dict[str, Any]], None]


def run(options: DemoOptions, out: TextIO, on_finished: OnFinished | None = None) -> int:
    """The demo; `on_finished(cluster, job)` runs after a successful job, while everything is still up."""
    manifest_path = find_manifest(options.manifest)
    manifest = read_manifest(manifest_path)
    workdir = options.workdir.resolve()  # printed, and handed to the stand-ins: absolute
    workdir.mkdir(parents=True, exist_ok=True)
    with logs_to_file(workdir / "demo.log"):
        return _run(options, out, on_finished, manifest_path, manifest, workdir)


def _run(
    options: DemoOptions,
    out: TextIO,
    on_finished: OnFinished | None,
    manifest_path: Path,
    manifest: dict[str, Any],
    workdir: Path,
) -> int:
    meta = manifest["metadata"]
    namespace, name = meta.get("namespace") or "default", meta["name"]
    started = time.monotonic()

    print("kubetune demo: starting an embedded Kubernetes API, S3 and a KubeRay stand-in on 127.0.0.1", file=out)
    cluster_dir = workdir / "cluster"
    shutil.rmtree(cluster_dir, ignore_errors=True)
    cluster = DevCluster(workdir=cluster_dir, namespace=namespace)
    try:
        cluster.start()
        cluster.use_env()
        operator = cluster.start_operator()
        print(f"metrics: {operator.metrics_url}", file=out, flush=True)
        print(kubectl_hint(cluster.kubeconfig_path, name), file=out)
        print(f"logs: {workdir / 'demo.log'} (operator), {cluster.workdir / 'rayjobs'} (training)", file=out)

        manifest["spec"].setdefault("storage", {})["endpoint"] = cluster.s3_url
        print("seeding S3: base weights (digits 0-4; trained once, then cached) and digits 5-9 ...", file=out)
        out.flush()
        seeded = seed_demo(cluster.s3(), manifest["spec"])
        print(f"seeded: {seeded['train']} training and {seeded['validation']} validation images", file=out)

        cluster.apply(manifest)
        print(f"applied {manifest_path} as FineTuneJob {namespace}/{name}\n", file=out, flush=True)
        job = follow(cluster, namespace, name, options.timeout, out)
        code = report(cluster, job, workdir, time.monotonic() - started, out)
        if code == 0 and on_finished is not None:
            on_finished(cluster, job)
        if options.keep_running:
            print(
                f"\nendpoints stay up (Ctrl-C ends): API {cluster.api_url}, S3 {cluster.s3_url}", file=out, flush=True
            )
            with contextlib.suppress(Interrupted):  # the way a kept-running demo ends: not a failure
                while True:
                    time.sleep(3600)
        return code
    finally:
        stop(cluster, out)


def report(cluster: DevCluster, job: dict[str, Any], workdir: Path, elapsed: float, out: TextIO) -> int:
    """Print how the job ended and where its results are; 0 if it succeeded."""
    meta, status = job["metadata"], job.get("status") or {}
    print(file=out)
    if status.get("phase") != "Succeeded":
        print(f"the job {status.get('phase')}: {status.get('message')}", file=out)
        print(f"training log: {cluster.workdir / 'rayjobs' / meta['namespace'] / meta['name']}", file=out)
        return 1
    files = download_results(cluster, job, workdir)
    model = status.get("model") or {}
    print(f"model: {model.get('uri') or job['spec']['output']['path']}", file=out)
    exported = f" (epoch {model['bestEpoch']}, the best by {model.get('selectBy')})" if model.get("bestEpoch") else ""
    print(f"validation accuracy: {number(final_accuracy(job, files), '.3f')}{exported}", file=out)
    if "training-curves.png" in files:
        print(f"training curves: {files['training-curves.png']}", file=out)
    if "report.html" in files:  # open it in a browser: one self-contained page
        print(f"evaluation report: {files['report.html']}", file=out)
    print(f"done in {duration(elapsed)}", file=out, flush=True)
    return 0


def stop(cluster: DevCluster, out: TextIO) -> None:
    """Stop the cluster and say what was stopped, and what is kept."""
    print("\nkubetune demo: stopping everything it started ...", file=out, flush=True)
    with signals_held(out):
        stopped = cluster.stop()
    for line in stopped:
        print(f"  stopped {line}", file=out)
    print(f"kept: logs, results and the kubeconfig in {cluster.workdir.parent}", file=out, flush=True)


# -- signals -------------------------------------------------------------------------------------------------


def _raise_interrupted(signum: int, frame: FrameType | None) -> None:
    raise Interrupted(signum)


@contextlib.contextmanager
def stop_signals_handled_by(handler: Callable[[int, FrameType | None], None]) -> Iterator[None]:
    """SIGINT and SIGTERM go to `handler` inside the block, to what they went to before after it."""
    previous = {sig: signal.signal(sig, handler) for sig in STOP_SIGNALS}
    try:
        yield
    finally:
        for sig, before in previous.items():
            signal.signal(sig, before)


def signals_raise() -> contextlib.AbstractContextManager[None]:
    """SIGINT and SIGTERM raise `Interrupted` in the main thread while the demo runs.

    Set explicitly, whatever this process inherited: a shell starts background jobs with SIGINT ignored,
    and Python keeps it ignored then; SIGTERM's default ends the process without any clean-up at all, so
    the Ray processes (in sessions of their own) would stay behind.
    """
    return stop_signals_handled_by(_raise_interrupted)


def signals_held(out: TextIO) -> contextlib.AbstractContextManager[None]:
    """While stopping (a few seconds), a second Ctrl-C says so instead of cutting the clean-up short."""

    def held(signum: int, frame: FrameType | None) -> None:
        print(f"kubetune demo: {signal.Signals(signum).name}: still stopping ...", file=out, flush=True)

    return stop_signals_handled_by(held)


def main(options: DemoOptions, out: TextIO = sys.stdout) -> int:
    """`kubetune demo`: run it; on SIGINT/SIGTERM stop everything, leave no process behind, exit 128+signal.

    For a process of its own (the console script): it adopts and, at the end, kills every descendant of
    the process. Embedding callers (tests) use `run`.
    """
    adopt_orphans()
    try:
        with signals_raise():
            return run(options, out)
    except Interrupted as interrupted:
        return 128 + interrupted.signum
    except (TimeoutError, RuntimeError) as exc:
        print(f"kubetune demo: {exc}", file=sys.stderr)
        return 1
    finally:
        strays = kill_descendants()
        if strays:
            print(f"kubetune demo: killed {len(strays)} stray processes: {describe(strays)}", file=out, flush=True)


def describe(procs: list[ProcInfo]) -> str:
    return ", ".join(f"{proc.pid} ({proc.cmdline[:60]})" for proc in procs)
