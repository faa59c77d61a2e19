"""The soak's job stream: each planned job on a thread of its own, submitted at its moment, suspended and
resumed or deleted by the soak as planned, sampled throughout, and recorded as it ended.

Jobs are the busy world's (tests/support/busy_world.py): test_resnet on 32 px digits 5-9 for
classification, and an SSDlite on 64 px drawn shapes (tests/support/shapes_world.py) for detection, from
random base weights. Every job may lose two drivers (`backoffLimit`) and three worker groups
(`maxRetries`): the fault budget the injectors keep to.
"""

from __future__ import annotations

import json
import threading
import time
from dataclasses import dataclass, field
from typing import Any

from kubetune_dev.devcluster.seed import split_uri
from kubetune_dev.soak.schedule import PlannedJob
from tests.support.busy_world import FTJ, NS, ProgressSampler

# The fault budget of every soak job (runPolicy), which the injectors never exceed.
BACKOFF_LIMIT = 2  # driver kills (KubeRay retries)
MAX_RETRIES = 3  # worker kills (Ray Train restarts)
SUSPENDED_FOR_S = 3.0
DETECTION = "s3://kubetune-e2e/shapes"
DETECTOR_BASE = f"{DETECTION}/base/detector.safetensors"
DETECTION_IMAGES = (48, 16)  # train, validation


@dataclass
class JobRecord:
    """What the soak saw of one job."""

    planned: PlannedJob
    submitted_at: float | None = None
    uid: str = ""  # the FineTuneJob's, as created
    ended_at: float | None = None
    final: dict[str, Any] | None = None  # the FineTuneJob at its end (None once deleted)
    acted: str = ""  # "suspended and resumed", "deleted", or why the planned action did not happen
    error: str = ""  # the job thread's own failure (a timeout, say)
    samples: list[Any] = field(default_factory=list)  # busy_world.Sample
    worker_kills: int = 0
    driver_kills: int = 0

    @property
    def name(self) -> str:
        return self.planned.name

    @property
    def phase(self) -> str:
        return str(((self.final or {}).get("status") or {}).get("phase") or "")

    @property
    def running(self) -> bool:
        return self.submitted_at is not None and self.ended_at is None


def seed_detection(world: Any) -> None:
    """Drawn shapes with COCO boxes, and random SSDlite base weights, where detection jobs read them."""
    import tempfile
    from pathlib import Path

    from tests.support.shapes_world import DETECTOR_SIZE, FINETUNE_CLASSES, make_shapes, random_detector

    bucket, prefix = split_uri(DETECTION)
    for split, count, seed in (("train", DETECTION_IMAGES[0], 20), ("val", DETECTION_IMAGES[1], 21)):
        shapes = make_shapes(FINETUNE_CLASSES, count, seed=seed, size=DETECTOR_SIZE)
        for key, body in shapes.pngs().items():
            world.s3.put_object(Bucket=bucket, Key=f"{prefix}/images/{split}/{key}", Body=body)
        annotations = json.dumps(shapes.coco()).encode()
        world.s3.put_object(Bucket=bucket, Key=f"{prefix}/annotations/{split}.json", Body=annotations)
    with tempfile.TemporaryDirectory() as folder:
        weights = random_detector(Path(folder) / "detector.safetensors", classes=len(FINETUNE_CLASSES))
        base_bucket, base_key = split_uri(DETECTOR_BASE)
        world.s3.upload_file(str(weights), base_bucket, base_key)


def manifest(world: Any, job: PlannedJob) -> dict[str, Any]:
    """The FineTuneJob of a planned job: the busy world's classification job, or its detection variant."""
    policy = {"backoffLimit": BACKOFF_LIMIT, "maxRetries": MAX_RETRIES}
    out: dict[str, Any] = world.manifest(job.name, epochs=job.epochs, workers=job.workers, run_policy=policy)
    if job.kind == "detection":
        from tests.support.shapes_world import DETECTOR, DETECTOR_SIZE

        spec = out["spec"]
        spec["task"] = "detection"
        spec["model"] = {"architecture": DETECTOR, "checkpoint": DETECTOR_BASE, "strategy": "head"}
        spec["data"] = {
            "train": f"{DETECTION}/images/train/",
            "validation": f"{DETECTION}/images/val/",
            "annotations": {
                "train": f"{DETECTION}/annotations/train.json",
                "validation": f"{DETECTION}/annotations/val.json",
            },
            "imageSize": DETECTOR_SIZE,
            "augment": "none",
        }
        spec["training"].update(batchSize=8, learningRate=0.01)
    return out


class JobStream:
    """The planned jobs, each on its thread, at most `concurrent` training at once."""

    def __init__(
        self, world: Any, jobs: tuple[PlannedJob, ...], started: float, deadline: float, concurrent: int = 2
    ) -> None:
        self.world = world
        self.records = {job.name: JobRecord(job) for job in jobs}
        self.started = started  # time.time() of the window's start
        # time.time() by which every job must have ended: one deadline for the stream, not one per wait, so
        # a loaded machine slows the soak down rather than failing a job that was still getting on.
        self.deadline = deadline
        self.slots = threading.BoundedSemaphore(concurrent)
        self.lock = threading.Lock()  # the injectors' budget bookkeeping
        self._threads = [
            threading.Thread(target=self._run, args=(r,), name=f"soak-{r.name}", daemon=True)
            for r in self.records.values()
        ]

    def start(self) -> None:
        for thread in self._threads:
            thread.start()

    def join(self, timeout: float) -> bool:
        """Until every job ended (or `timeout` seconds); whether all did."""
        deadline = time.monotonic() + timeout
        for thread in self._threads:
            thread.join(max(0.0, deadline - time.monotonic()))
        return not any(thread.is_alive() for thread in self._threads)

    def running(self) -> list[JobRecord]:
        return [record for record in self.records.values() if record.running]

    def _run(self, record: JobRecord) -> None:
        delay = self.started + record.planned.submit_at - time.time()
        if delay > 0:
            time.sleep(delay)
        with self.slots, ProgressSampler(self.world, record.name, interval=1.0) as sampler:
            try:
                record.submitted_at = time.time()
                created = retrying(lambda: self.world.submit(manifest(self.world, record.planned)))
                record.uid = str(created["metadata"]["uid"])
                record.acted = self._act(record)
                if record.planned.action != "delete" or record.acted != "deleted":
                    record.final = self.world.wait_phase(record.name, "Succeeded", "Failed", timeout=self._left())
            except Exception as exc:  # recorded: the invariants report the job's end, whatever it was
                record.error = f"{type(exc).__name__}: {str(exc)[:200]}"
            finally:
                record.ended_at = time.time()
        record.samples = list(sampler.samples)

    def _left(self) -> float:
        return max(1.0, self.deadline - time.time())

    def _act(self, record: JobRecord) -> str:
        """The planned suspend-and-resume or deletion, once the job trains (its first step reported)."""
        action = record.planned.action
        if action == "none":
            return ""
        try:
            self.world.wait_job(record.name, lambda j: _step(j) >= 1, "a first step", timeout=self._left())
        except AssertionError as exc:  # it ended first
            return f"not {action}: {exc}"
        if action == "delete":
            retrying(lambda: self.world.cluster.delete(*FTJ, NS, record.name))
            self.world.wait_gone(FTJ, record.name, timeout=120)
            return "deleted"
        retrying(lambda: self.world.cluster.patch(*FTJ, NS, record.name, {"spec": {"runPolicy": {"suspend": True}}}))
        self.world.wait_phase(record.name, "Suspended", timeout=self._left())
        time.sleep(SUSPENDED_FOR_S)
        retrying(lambda: self.world.cluster.patch(*FTJ, NS, record.name, {"spec": {"runPolicy": {"suspend": False}}}))
        return "suspended and resumed"


def _step(job: dict[str, Any] | None) -> int:
    return int((((job or {}).get("status") or {}).get("progress") or {}).get("step") or 0)


def retrying(call: Any, attempts: int = 30) -> Any:
    """The soak's own API calls ride out the API faults it injects (a restart, 500s for a while)."""
    for attempt in range(attempts):
        try:
            return call()
        except Exception:
            if attempt == attempts - 1:
                raise
            time.sleep(1.0)
    return None
