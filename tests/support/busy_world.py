"""A busy dev cluster: several small FineTuneJobs at once, each with its own trouble, one operator for all.

The fault tests (test_faults.py) and the progress test (test_progress_e2e.py) assert on what the
scenarios (scenarios.py) saw. A scenario is a function run on its own thread: it submits its job,
injects its fault at the right moment, waits for the outcome and records facts; a test waits for its
scenario (`world.outcome(fn)`) and asserts on the facts. Jobs run concurrently because each costs
about a minute of Ray start-up whatever it trains; `MAX_TRAINING` (KUBETUNE_E2E_MAX_TRAINING) caps
how many train at once, as each is a Ray cluster of its own (1-2 GB).

The operator is `python -m kubetune_operator`, a process of its own, so the crash in `steady` is a
real SIGKILL; every job running at that moment lives through it. The jobs fine-tune test_resnet on
32px digits 5-9 (the demo's data and base weights), one CPU worker each.
"""

from __future__ import annotations

import contextlib
import copy
import json
import os
import re
import signal
import threading
import time
import traceback
import urllib.request
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from kubetune_dev.devcluster.cluster import DevCluster
from kubetune_dev.devcluster.processes import descendants_of
from kubetune_dev.devcluster.s3 import DEMO_CREDENTIALS
from kubetune_dev.devcluster.seed import seed_demo, split_uri
from kubetune_trainer.callbacks import STEP_CALLBACKS_ENV
from tests.support.trainer_faults import HOLD_FOR_RESIZE, MARK_MID_EPOCH_2

NS = "default"
BUCKET = "kubetune-e2e"
FTJ = ("kubetune.dev", "v1alpha1", "finetunejobs")
RAYJOBS = ("ray.io", "v1", "rayjobs")
RAYCLUSTERS = ("ray.io", "v1", "rayclusters")
SERVICEACCOUNTS = ("", "v1", "serviceaccounts")
TERMINAL = ("Succeeded", "Failed")
SECRET = "e2e-s3"
MAX_TRAINING = int(os.environ.get("KUBETUNE_E2E_MAX_TRAINING", "3"))
TIMEOUT = float(os.environ.get("KUBETUNE_E2E_TIMEOUT", "600"))
BASE = {
    "checkpoint": f"s3://{BUCKET}/base/test_resnet-digits-0-4.safetensors",
    "train": f"s3://{BUCKET}/digits-5-9/train/",
    "validation": f"s3://{BUCKET}/digits-5-9/val/",
}
DENIED_CHECKPOINT = f"s3://{BUCKET}/denied/test_resnet-digits-0-4.safetensors"
# Ray Train's record of the checkpoints it committed, in the run's folder (ray.train.v2 constants).
CHECKPOINT_MANAGER_SNAPSHOT = "checkpoint_manager_snapshot.json"
# The trainer's line when a run resumes (printed by the worker; the driver's console repeats it).
RESUMED = re.compile(r"resumed from (s3://\S+) after epoch (\d+)")


def status_of(job: dict[str, Any] | None) -> dict[str, Any]:
    return dict((job or {}).get("status") or {})


def progress_of(job: dict[str, Any] | None) -> dict[str, Any]:
    return dict(status_of(job).get("progress") or {})


def condition(job: dict[str, Any] | None, type_: str) -> dict[str, Any]:
    return next((dict(c) for c in status_of(job).get("conditions") or [] if c.get("type") == type_), {})


def alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    try:
        return Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()[0] != "Z"
    except OSError:
        return False


@dataclass
class Sample:
    """The job as a poll saw it: when, its phase, its status.progress."""

    at: float  # time.time()
    phase: str | None
    progress: dict[str, Any]


ScenarioFn = Callable[["World", dict[str, Any]], None]


@dataclass
class Scenario:
    """A scenario function (its name is the job's), the facts it records, and how it ended."""

    name: str
    run: ScenarioFn
    facts: dict[str, Any] = field(default_factory=dict)
    error: BaseException | None = None
    done: threading.Event = field(default_factory=threading.Event)
    thread: threading.Thread | None = None


class ScenarioFailedError(AssertionError):
    pass


class World:
    """One DevCluster, its S3 seeded once, one operator process, and the scenarios running on it."""

    def __init__(self, cluster: DevCluster) -> None:
        self.cluster = cluster
        self.s3 = cluster.s3()
        self.scenarios: dict[str, Scenario] = {}
        self.training = threading.BoundedSemaphore(MAX_TRAINING)
        self.closing = threading.Event()
        self.operator_up = threading.Event()
        self._lock = threading.Lock()
        # The progress port and the URL trainers report to (the soak puts a proxy between them); free
        # port and that port when empty.
        self.progress_port = 0
        self.progress_url = ""

    # --- setup ----------------------------------------------------------------------------------

    def setup(self) -> None:
        # The Ray drivers inherit this process's environment (S3 credentials), as the demo's do; the pause on
        # demand and the elastic holds are installed for every job and act only where a job's podTemplate
        # sets MARK_ENV or ELASTIC_MARKS_ENV.
        both = f"{MARK_MID_EPOCH_2[STEP_CALLBACKS_ENV]},{HOLD_FOR_RESIZE[STEP_CALLBACKS_ENV]}"
        self.cluster.use_env({**MARK_MID_EPOCH_2, STEP_CALLBACKS_ENV: both})
        spec = {
            "model": {"checkpoint": BASE["checkpoint"], "architecture": "test_resnet"},
            "data": {"train": BASE["train"], "validation": BASE["validation"], "imageSize": 32},
            "output": {"path": f"s3://{BUCKET}/runs/"},
        }
        seed_demo(self.s3, spec)
        bucket, key = split_uri(BASE["checkpoint"])
        denied_bucket, denied_key = split_uri(DENIED_CHECKPOINT)
        self.s3.copy_object(Bucket=denied_bucket, Key=denied_key, CopySource={"Bucket": bucket, "Key": key})
        self.cluster.create_secret(SECRET, DEMO_CREDENTIALS, namespace=NS)
        self.start_operator(progress_port=self.progress_port)

    def start_operator(self, metrics_port: int = 0, progress_port: int = 0) -> None:
        self.cluster.start_operator_process(
            metrics_port=metrics_port, progress_port=progress_port, progress_url=self.progress_url
        )
        deadline = time.monotonic() + 60
        while True:  # up once it serves metrics (kopf's startup handlers ran, so it has logged in)
            try:
                urllib.request.urlopen(self.cluster.operator_process_metrics_url, timeout=2).read()
                self.operator_up.set()
                return
            except OSError:
                proc = self.cluster.operator_process
                if proc is None or proc.poll() is not None or time.monotonic() > deadline:
                    raise RuntimeError(f"the operator did not start:\n{self.operator_log()}") from None
                time.sleep(0.2)

    def crash_operator(self, down_seconds: float) -> tuple[float, float]:
        """SIGKILL the operator, leave it down a while, start it again on the same ports: (killed, up) times."""
        metrics_port, progress_port = self.cluster.operator_process_ports
        self.operator_up.clear()
        self.cluster.stop_operator_process(signal.SIGKILL)
        killed = time.time()
        time.sleep(down_seconds)
        self.start_operator(metrics_port, progress_port)
        return killed, time.time()

    def close(self) -> None:
        self.closing.set()

    # --- scenarios ------------------------------------------------------------------------------

    def start(self, *runs: ScenarioFn) -> None:
        """Start these scenarios (each once, by function), in this order."""
        with self._lock:
            for run in runs:
                name = run.__name__
                if name in self.scenarios:
                    continue
                scenario = Scenario(name, run)
                scenario.thread = threading.Thread(
                    target=self._run, args=(scenario,), name=f"scenario-{name}", daemon=True
                )
                self.scenarios[name] = scenario
                scenario.thread.start()

    def _run(self, scenario: Scenario) -> None:
        try:
            scenario.run(self, scenario.facts)
        except BaseException as exc:  # handed to the test that asks for this scenario
            scenario.error = exc
        finally:
            scenario.done.set()

    def outcome(self, run: ScenarioFn, timeout: float = TIMEOUT) -> dict[str, Any]:
        """The facts a scenario recorded (started now if it was not); its failure, with diagnostics."""
        self.start(run)
        name = run.__name__
        scenario = self.scenarios[name]
        if not scenario.done.wait(timeout):
            raise ScenarioFailedError(f"scenario {name} still runs after {timeout:.0f}s\n{self.diagnostics(name)}")
        if scenario.error is not None:
            tb = "".join(traceback.format_exception(scenario.error))
            raise ScenarioFailedError(f"scenario {name} failed:\n{tb}\n{self.diagnostics(name)}") from scenario.error
        return scenario.facts

    @contextlib.contextmanager
    def training_slot(self) -> Iterator[None]:
        """One of MAX_TRAINING places for a job that starts Ray Train (each is a Ray cluster of its own)."""
        while not self.training.acquire(timeout=1.0):
            if self.closing.is_set():
                raise RuntimeError("the world is closing")
        try:
            yield
        finally:
            self.training.release()

    # --- jobs -----------------------------------------------------------------------------------

    def manifest(
        self,
        name: str,
        *,
        epochs: int,
        batch_size: int = 32,
        checkpoint: str | None = None,
        credentials_secret: str | None = None,
        run_policy: dict[str, Any] | None = None,
        env: dict[str, str] | None = None,
        workers: int | dict[str, int] = 1,
        checkpoint_every: str = "epoch",
    ) -> dict[str, Any]:
        storage: dict[str, Any] = {"endpoint": self.cluster.s3_url, "region": "us-east-1"}
        if credentials_secret:
            storage["credentialsSecret"] = credentials_secret
        return {
            "apiVersion": "kubetune.dev/v1alpha1",
            "kind": "FineTuneJob",
            "metadata": {"name": name, "namespace": NS},
            "spec": {
                "model": {
                    "architecture": "test_resnet",
                    "checkpoint": checkpoint or BASE["checkpoint"],
                    "numClasses": 5,
                    "strategy": "full",
                },
                "data": {
                    "train": BASE["train"],
                    "validation": BASE["validation"],
                    "imageSize": 32,
                    "augment": "none",
                },
                "training": {
                    "epochs": epochs,
                    "batchSize": batch_size,
                    "learningRate": 3.0e-3,
                    "warmupEpochs": 1,
                    "precision": "fp32",
                    "checkpointEvery": checkpoint_every,
                },
                "resources": {"workers": workers, "gpusPerWorker": 0, "cpusPerWorker": 1, "memoryPerWorker": "2Gi"},
                "output": {"path": self.output(name)},
                "storage": storage,
                "runPolicy": run_policy or {},
                **(
                    {"podTemplate": {"container": {"env": [{"name": k, "value": v} for k, v in env.items()]}}}
                    if env
                    else {}
                ),
            },
        }

    @staticmethod
    def output(name: str) -> str:
        return f"s3://{BUCKET}/runs/{name}/"

    def submit(self, manifest: dict[str, Any]) -> dict[str, Any]:
        """Create the job through the API (as kubectl create would); the object as created."""
        return self.cluster.create(copy.deepcopy(manifest))

    def job(self, name: str) -> dict[str, Any] | None:
        return self.cluster.get(*FTJ, NS, name)

    def wait_job(
        self, name: str, condition: Callable[[dict[str, Any] | None], bool], what: str, timeout: float = TIMEOUT
    ) -> dict[str, Any] | None:
        """Poll the job until `condition`; fails fast when the job ends first without meeting it."""
        deadline = time.monotonic() + timeout
        while not self.closing.is_set():
            job = self.job(name)
            if condition(job):
                return job
            phase = status_of(job).get("phase")
            if phase in TERMINAL:
                raise AssertionError(f"{name} ended {phase} before {what}: {status_of(job).get('message')}")
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: no {what} within {timeout:.0f}s; status: {status_of(job)}")
            time.sleep(0.3)
        raise RuntimeError("the world is closing")

    def wait_phase(self, name: str, *phases: str, timeout: float = TIMEOUT) -> dict[str, Any]:
        deadline = time.monotonic() + timeout
        while not self.closing.is_set():
            job = self.job(name)
            if status_of(job).get("phase") in phases:
                assert job is not None
                return job
            if time.monotonic() > deadline:
                raise TimeoutError(f"{name}: not {' or '.join(phases)} within {timeout:.0f}s; status: {status_of(job)}")
            time.sleep(0.3)
        raise RuntimeError("the world is closing")

    def wait_gone(self, what: tuple[str, str, str], name: str, timeout: float = 60) -> bool:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.cluster.get(*what, NS, name) is None:
                return True
            time.sleep(0.3)
        return False

    def history(self, name: str) -> list[dict[str, Any]]:
        bucket, prefix = split_uri(self.output(name))
        body = self.s3.get_object(Bucket=bucket, Key=f"{prefix}history.json")["Body"].read()
        return list(json.loads(body))

    def committed_epoch(self, name: str) -> int:
        """The newest epoch's checkpoint Ray Train has committed for the job's run (0: none yet).

        A worker's `ray.train.report` returns (and the trainer announces the checkpoint) before Ray Train's
        controller has registered it; a worker lost in between resumes from the one before. What a
        restarted worker group or a new driver resumes from is what the controller recorded in its
        snapshot next to the run's checkpoints.
        """
        key = self.run_folder(name) + CHECKPOINT_MANAGER_SNAPSHOT
        bucket, _ = split_uri(self.output(name))
        try:
            body = self.s3.get_object(Bucket=bucket, Key=key)["Body"].read().decode()
        except self.s3.exceptions.NoSuchKey:
            return 0
        return max((int(epoch) for epoch in re.findall(r"\bepoch-(\d+)", body)), default=0)

    def run_folder(self, name: str) -> str:
        """The key prefix of the job's run under its output (checkpoints/<run name>/, config.run_name: the
        namespace, name and run-shaping digest of the job, as the operator's trainer_config makes it)."""
        job = self.job(name)
        assert job is not None, f"no job {name}"
        from kubetune_operator.spec import FineTuneJob
        from kubetune_operator.trainer_config import job_run_name

        _, prefix = split_uri(self.output(name))
        return f"{prefix}checkpoints/{job_run_name(FineTuneJob.model_validate(job))}/"

    def weights(self, name: str) -> dict[str, Any]:
        """The job's exported model.safetensors, as tensors."""
        from safetensors.torch import load

        bucket, prefix = split_uri(self.output(name))
        return load(self.s3.get_object(Bucket=bucket, Key=f"{prefix}model.safetensors")["Body"].read())

    def events(self, name: str) -> list[dict[str, Any]]:
        """The Events about the job."""
        return [
            e for e in self.cluster.list("", "v1", "events", NS) if (e.get("involvedObject") or {}).get("name") == name
        ]

    def driver_logs(self, name: str) -> list[str]:
        """Each attempt's driver log, oldest first (a suspended and resumed job has two)."""
        root = self.cluster.workdir / "rayjobs" / NS / name
        attempts = sorted(root.glob("attempt-*"), key=lambda p: int(p.name.rsplit("-", 1)[1]))
        return [(a / "driver.log").read_text(errors="replace") if (a / "driver.log").exists() else "" for a in attempts]

    def rayjob_versions(self, name: str) -> list[tuple[str, dict[str, Any]]]:
        return self.cluster.api.history("ray.io", "rayjobs", NS, name)

    def ray_processes(self, name: str) -> list[int]:
        """Pids of the job's Ray cluster now: the head (`ray start`) and everything it started."""
        assert self.cluster.kuberay is not None
        ctl = self.cluster.kuberay.controller(NS, name)
        head = ctl.run.head if ctl is not None and ctl.run is not None else None
        if head is None or head.pid is None:
            return []
        return [head.pid, *(p.pid for p in descendants_of(head.pid))]

    @staticmethod
    def survivors(pids: list[int], grace: float = 15.0) -> list[int]:
        """Those of `pids` still alive after up to `grace` seconds (a SIGKILLed group takes a moment to go)."""
        deadline = time.monotonic() + grace
        while (running := [pid for pid in pids if alive(pid)]) and time.monotonic() < deadline:
            time.sleep(0.3)
        return running

    def rayclusters_of(self, name: str) -> list[str]:
        return [
            rc["metadata"]["name"]
            for rc in self.cluster.list(*RAYCLUSTERS, NS)
            if (rc["metadata"].get("labels") or {}).get("ray.io/originated-from-cr-name") == name
        ]

    def operator_log(self, lines: int = 40) -> str:
        path = self.cluster.workdir / "operator.log"
        text = path.read_text(errors="replace") if path.exists() else ""
        return "\n".join(text.splitlines()[-lines:])

    def diagnostics(self, name: str) -> str:
        job = self.job(name)
        logs = self.driver_logs(name)
        tail = "\n".join(logs[-1].splitlines()[-40:]) if logs else "(no driver log)"
        return (
            f"--- {name} status: {json.dumps(status_of(job), indent=1)[:4000]}\n"
            f"--- {name} driver log (attempt {len(logs)}), last lines:\n{tail}\n"
            f"--- operator log, last lines:\n{self.operator_log()}"
        )


class ProgressSampler:
    """Polls a job on a thread and keeps every distinct (phase, status.progress) it sees."""

    def __init__(self, world: World, name: str, interval: float = 0.25) -> None:
        self.world = world
        self.name = name
        self.interval = interval
        self.samples: list[Sample] = []
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._poll, name=f"sampler-{name}", daemon=True)

    def __enter__(self) -> ProgressSampler:
        self._thread.start()
        return self

    def __exit__(self, *_: object) -> None:
        self._stop.set()
        self._thread.join(5)

    def _poll(self) -> None:
        while not self._stop.is_set():
            with contextlib.suppress(Exception):  # an API hiccup loses one sample, not the scenario
                job = self.world.job(self.name)
                sample = Sample(time.time(), status_of(job).get("phase"), progress_of(job))
                last = self.samples[-1] if self.samples else None
                if last is None or (last.phase, last.progress) != (sample.phase, sample.progress):
                    self.samples.append(sample)
            self._stop.wait(self.interval)
