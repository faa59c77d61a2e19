"""`kubetune demo`: the whole loop on this machine, start to finish.

Starts the embedded stand-ins for a cluster (a Kubernetes API with the FineTuneJob CRD, S3, KubeRay —
see `kubetune_operator.devcluster`), runs the real operator against them, seeds S3 with base weights
(a tiny timm model trained on digits 0-4, cached) and digits 5-9, applies
`examples/demo-finetunejob.yaml` through the Kubernetes API and follows the job's status the way
`kubectl get ftj -w` would, until it succeeds. Then it prints where the model and its training curves
are. `--keep-running` leaves every endpoint up (Ctrl-C ends it).
"""

from __future__ import annotations

import argparse
import logging
import shutil
import sys
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any, TextIO

import yaml

FTJ = ("kubetune.dev", "v1alpha1", "finetunejobs")
DEFAULT_MANIFEST = Path("examples") / "demo-finetunejob.yaml"
TERMINAL = ("Succeeded", "Failed")


def parse_args(argv: Sequence[str] | None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(prog="kubetune demo", description=__doc__.split("\n\n")[0] if __doc__ else None)
    parser.add_argument(
        "--manifest", type=Path, default=None, help=f"the FineTuneJob to run (default: {DEFAULT_MANIFEST})"
    )
    parser.add_argument(
        "--workdir", type=Path, default=Path(".demo"), help="where logs and results go (default: .demo)"
    )
    parser.add_argument("--keep-running", action="store_true", help="leave the endpoints up after the job ends")
    parser.add_argument("--timeout", type=float, default=900, help="give up after this many seconds (default: 900)")
    return parser.parse_args(argv)


def find_manifest(given: Path | None) -> Path:
    from kubetune_operator.devcluster.cluster import find_file

    if given is not None:
        return given
    found = find_file(DEFAULT_MANIFEST)
    if found is None:
        raise SystemExit(f"kubetune demo: {DEFAULT_MANIFEST} not found (run it from the repository)")
    return found


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


def follow(cluster: Any, namespace: str, name: str, timeout: float, out: TextIO) -> dict[str, Any]:
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


def log_to_file(log_file: Path) -> Callable[[], None]:
    """Send the operator's and the stand-ins' logs to a file (the console shows the demo); returns an undo."""
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

    def undo() -> None:
        root.removeHandler(handler)
        handler.close()
        root.setLevel(previous)
        for name, level in quiet.items():
            logging.getLogger(name).setLevel(level)

    return undo


def download_results(cluster: Any, job: dict[str, Any], workdir: Path) -> dict[str, str]:
    """Fetch the exported model card and training curves from the job's output prefix."""
    from kubetune_operator.devcluster.seed import split_uri

    bucket, prefix = split_uri(job["spec"]["output"]["path"])
    s3 = cluster.s3()
    found: dict[str, str] = {}
    for name in ("training-curves.png", "model.json", "history.json"):
        target = workdir / name
        try:
            s3.download_file(bucket, f"{prefix.rstrip('/')}/{name}".lstrip("/"), str(target))
        except Exception as exc:  # a missing export is reported, not fatal
            logging.getLogger(__name__).warning("could not download %s: %s", name, exc)
            continue
        found[name] = str(target)
    return found


def final_accuracy(job: dict[str, Any], files: dict[str, str]) -> float | None:
    if "model.json" in files:
        card = yaml.safe_load(Path(files["model.json"]).read_text()) or {}
        metrics = card.get("metrics") or card.get("finalMetrics") or {}
        for key in ("valAccuracy", "val_accuracy", "accuracy"):
            if isinstance(metrics.get(key), int | float):
                return float(metrics[key])
    value = ((job.get("status") or {}).get("progress") or {}).get("metrics", {}).get("valAccuracy")
    return float(value) if isinstance(value, int | float) else None


def kubectl_hint(kubeconfig: Path, name: str) -> str:
    local = Path(".tools") / "bin" / "kubectl"
    kubectl = str(local) if local.exists() else (shutil.which("kubectl") or "kubectl")
    return (
        f"kubectl: export KUBECONFIG={kubeconfig.resolve()}\n"
        f"         {kubectl} get ftj    |  {kubectl} describe ftj {name}  |  {kubectl} get rayjobs"
    )


OnFinished = Callable[[Any, dict[str, Any]], None]


def run(args: argparse.Namespace, out: TextIO, on_finished: OnFinished | None = None) -> int:
    """The demo; `on_finished(cluster, job)` runs after a successful job, while everything is still up."""
    manifest_path = find_manifest(args.manifest)
    manifest = yaml.safe_load(manifest_path.read_text())
    workdir: Path = args.workdir
    workdir.mkdir(parents=True, exist_ok=True)
    stop_logging = log_to_file(workdir / "demo.log")
    try:
        return _run(args, out, on_finished, manifest_path, manifest, workdir)
    finally:
        stop_logging()


def _run(
    args: argparse.Namespace,
    out: TextIO,
    on_finished: OnFinished | None,
    manifest_path: Path,
    manifest: dict[str, Any],
    workdir: Path,
) -> int:
    from kubetune_operator.devcluster.cluster import DevCluster
    from kubetune_operator.devcluster.seed import seed_demo

    meta = manifest["metadata"]
    namespace, name = meta.get("namespace") or "default", meta["name"]
    started = time.monotonic()

    print("kubetune demo: starting an embedded Kubernetes API, S3 and a KubeRay stand-in on 127.0.0.1", file=out)
    cluster_dir = workdir / "cluster"
    shutil.rmtree(cluster_dir, ignore_errors=True)
    with DevCluster(workdir=cluster_dir, namespace=namespace) as cluster:
        cluster.use_env()
        operator = cluster.start_operator()
        print(f"metrics: {operator.metrics_url}", file=out, flush=True)
        print(kubectl_hint(cluster.kubeconfig_path, name), file=out)
        print(
            f"logs: {(workdir / 'demo.log').resolve()} (operator), {cluster_dir.resolve()}/rayjobs (training)", file=out
        )

        manifest["spec"].setdefault("storage", {})["endpoint"] = cluster.s3_url
        print(
            "seeding S3: base weights (digits 0-4; trained once, then cached) and digits 5-9 ...", file=out, flush=True
        )
        seeded = seed_demo(cluster.s3(), manifest["spec"])
        print(f"seeded: {seeded['train']} training and {seeded['validation']} validation images", file=out)

        cluster.apply(manifest)
        print(f"applied {manifest_path} as FineTuneJob {namespace}/{name}\n", file=out, flush=True)
        job = follow(cluster, namespace, name, args.timeout, out)
        status = job.get("status") or {}
        elapsed = time.monotonic() - started
        print(file=out)
        if status.get("phase") != "Succeeded":
            print(f"the job {status.get('phase')}: {status.get('message')}", file=out)
            print(f"training log: {cluster.workdir / 'rayjobs' / namespace / name}", file=out)
            return 1
        files = download_results(cluster, job, workdir)
        accuracy = final_accuracy(job, files)
        print(f"model: {status.get('model') or job['spec']['output']['path']}", file=out)
        print(f"final validation accuracy: {number(accuracy, '.3f')}", file=out)
        if "training-curves.png" in files:
            print(f"training curves: {Path(files['training-curves.png']).resolve()}", file=out)
        print(f"done in {duration(elapsed)}", file=out, flush=True)
        if on_finished is not None:
            on_finished(cluster, job)
        if args.keep_running:
            print(
                f"\nendpoints stay up (Ctrl-C ends): API {cluster.api_url}, S3 {cluster.s3_url}", file=out, flush=True
            )
            try:
                while True:
                    time.sleep(3600)
            except KeyboardInterrupt:
                pass
    return 0


def main(argv: Sequence[str] | None = None) -> int:
    args = parse_args(argv)
    try:
        return run(args, sys.stdout)
    except KeyboardInterrupt:
        return 130
    except (TimeoutError, RuntimeError) as exc:
        print(f"kubetune demo: {exc}", file=sys.stderr)
        return 1


if __name__ == "__main__":
    raise SystemExit(main())
