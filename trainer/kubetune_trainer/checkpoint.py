"""The resumable training state: what a checkpoint holds, and how it travels to and from S3.

A checkpoint is a folder, `<output.path>/checkpoints/<run name>/epoch-NNNN/` after epoch NNNN, or
`epoch-NNNN-step-SSSSSSSS/` at global step SSSSSSSS during the epoch after epoch NNNN (time-based and
preemption checkpoints):

    model.safetensors     the weights (rank 0), loadable on their own
    ema.safetensors       with training.emaDecay: the weights' moving average (rank 0), the weights that are
                          validated, ranked and exported (`exported_file`)
    training_state.pt     optimizer, scheduler and grad-scaler state (rank 0; tensors and numbers only)
    progress.json         epochs done, global step, the history so far, what the run is, and where in the
                          current epoch it stands (rank 0)
    rng-rank<R>.pt        each worker's random-number generator states (Python, numpy, torch)

Saving is in two parts so that a step never waits for S3 (`take_snapshot`, `SnapshotUploads`): the
training thread copies what the next step would change (trainable weights, buffers, optimizer state,
RNG) off the live tensors, and Ray Train's upload thread (`ray.train.report(checkpoint_upload_mode=
ASYNC)`) writes the files and uploads them.

Every file is read without unpickling code (safetensors, JSON, `torch.load(weights_only=True)`), even
though the trainer wrote them: the bucket is not trusted more than the base weights are. For the same
reason a download keeps every file inside its folder (a key with a ".." segment fails the run, naming
it) and progress.json is read only up to MAX_PROGRESS_BYTES. Ray Train
merges the workers' files into one folder; the upload goes through boto3 (multipart, parallel) rather
than Ray's default pyarrow copy, and Ray keeps the bookkeeping (run snapshot, `checkpointsToKeep`).
"""

from __future__ import annotations

import atexit
import json
import os
import random
import shutil
import tempfile
import threading
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from safetensors.torch import _remove_duplicate_names, load_model, save_file
from torch import nn

from kubetune_trainer.errors import CheckpointError, ConfigError
from kubetune_trainer.storage import MAX_READ_BYTES, S3Store, S3Uri

MODEL_FILE = "model.safetensors"
EMA_FILE = "ema.safetensors"
STATE_FILE = "training_state.pt"
PROGRESS_FILE = "progress.json"
# What must match for a checkpoint to be resumed by this run.
IDENTITY_KEYS = ("architecture", "classNames", "strategy", "trainableLayers")
# progress.json holds one short history entry per epoch (at most 1,000): a few hundred KiB at most.
MAX_PROGRESS_BYTES = MAX_READ_BYTES
# Files of one checkpoint: a handful, plus one RNG state per worker.
MAX_CHECKPOINT_FILES = 100_000


def checkpoint_dir_name(epoch: int, step: int | None = None) -> str:
    """The folder of the checkpoint taken after `epoch` epochs (epoch-0003), or at global step `step` of the
    epoch after those (epoch-0003-step-00001234): names sort in the order the checkpoints were taken."""
    return f"epoch-{epoch:04d}" if step is None else f"epoch-{epoch:04d}-step-{step:08d}"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper, or the model itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def exported_file(ema: bool) -> str:
    """The file of a checkpoint whose weights are validated and exported: the moving average's with
    training.emaDecay (`ema`), the trained weights' otherwise."""
    return EMA_FILE if ema else MODEL_FILE


def rng_state() -> dict[str, Any]:
    """The process's generators; numpy's (timm's Mixup draws from it) as plain numbers and a tensor, which
    `torch.load(weights_only=True)` reads back without unpickling."""
    kind, keys, position, has_gauss, gauss = np.random.get_state(legacy=True)
    state: dict[str, Any] = {
        "python": random.getstate(),
        "numpy": [
            str(kind),
            torch.from_numpy(np.asarray(keys, dtype=np.int64)),
            int(position),
            int(has_gauss),
            float(gauss),
        ],
        "torch": torch.get_rng_state(),
    }
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    kind, keys, position, has_gauss, cached = state["numpy"]
    np.random.set_state((str(kind), keys.numpy().astype(np.uint32), int(position), int(has_gauss), float(cached)))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def _cpu_copy(value: Any) -> Any:
    """`value` with every tensor copied to the CPU (a new tensor even when it is there already)."""
    if isinstance(value, torch.Tensor):
        return value.detach().to("cpu", copy=True)
    if isinstance(value, dict):
        return {key: _cpu_copy(item) for key, item in value.items()}
    if isinstance(value, list | tuple):
        return type(value)(_cpu_copy(item) for item in value)
    return value


def model_snapshot(model: nn.Module, *, all_change: bool = False) -> tuple[dict[str, torch.Tensor], dict[str, str]]:
    """The weights as `save_model` writes them (shared tensors once, named in the metadata), copied where
    training changes them: trainable parameters and all buffers. Frozen parameters never change (the
    optimizer does not hold them), so they are written from the live tensors; a moving average changes
    every one (`all_change`)."""
    inner = unwrap(model)
    frozen = set() if all_change else {name for name, param in inner.named_parameters() if not param.requires_grad}
    state = inner.state_dict()
    metadata = {"format": "pt"}
    for kept, removed in _remove_duplicate_names(state).items():
        for name in removed:
            metadata.setdefault(name, kept)
            del state[name]
    return {name: tensor if name in frozen else _cpu_copy(tensor) for name, tensor in state.items()}, metadata


# Each checkpoint is staged in a folder of its own under the temp folder until Ray Train's upload thread has
# sent it (and a restored one is downloaded into one until it is loaded). A worker stopped in between (a driver killed, a job suspended or deleted, a preemption past its
# grace period) leaves the folder behind, so each is named after its process: the process removes its own
# at exit, and a worker starting on the node removes those of processes that are gone.
STAGING_PREFIX = "kubetune-ckpt-"
_staging_cleanup_registered = False


def staging_folder() -> Path:
    """A new folder to stage one checkpoint in (removed after its upload, or with its process)."""
    global _staging_cleanup_registered
    if not _staging_cleanup_registered:
        atexit.register(remove_staging, os.getpid())
        _staging_cleanup_registered = True
    return Path(tempfile.mkdtemp(prefix=f"{STAGING_PREFIX}{os.getpid()}-"))


def remove_staging(pid: int, parent: Path | None = None) -> None:
    """Remove the staging folders of process `pid`."""
    for folder in Path(parent or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}{pid}-*"):
        shutil.rmtree(folder, ignore_errors=True)


def remove_stale_staging(parent: Path | None = None) -> list[Path]:
    """Remove the staging folders of processes that no longer run; the folders removed."""
    removed = []
    for folder in Path(parent or tempfile.gettempdir()).glob(f"{STAGING_PREFIX}*-*"):
        pid = folder.name.removeprefix(STAGING_PREFIX).split("-", 1)[0]
        if pid.isdigit() and not _alive(int(pid)):
            shutil.rmtree(folder, ignore_errors=True)
            removed.append(folder)
    return removed


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:  # another user's process: alive, and not ours to judge
        return True
    return True


@dataclass
class Snapshot:
    """One worker's part of a checkpoint, taken off the live training state (`take_snapshot`): the next
    step may run while another thread writes it (`write`)."""

    rank: int
    rng: dict[str, Any]
    progress: dict[str, Any] | None = None
    weights: dict[str, torch.Tensor] = field(default_factory=dict)
    weights_metadata: dict[str, str] = field(default_factory=dict)
    ema: tuple[dict[str, torch.Tensor], dict[str, str]] | None = None  # the moving average's weights, metadata
    training_state: dict[str, Any] = field(default_factory=dict)

    def write(self, folder: Path) -> None:
        """The checkpoint files of this worker into `folder` (everything on rank 0, its RNG on every rank)."""
        folder.mkdir(parents=True, exist_ok=True)
        torch.save(self.rng, folder / rng_file(self.rank))
        if self.progress is None:
            return
        weights = {name: tensor.to("cpu").contiguous() for name, tensor in self.weights.items()}
        save_file(weights, str(folder / MODEL_FILE), metadata=self.weights_metadata)
        if self.ema is not None:
            average, metadata = self.ema
            save_file({name: t.contiguous() for name, t in average.items()}, str(folder / EMA_FILE), metadata=metadata)
        torch.save(self.training_state, folder / STATE_FILE)
        (folder / PROGRESS_FILE).write_text(json.dumps(self.progress, indent=2))


def take_snapshot(
    *,
    rank: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    progress: Mapping[str, Any],
    ema: nn.Module | None = None,
) -> Snapshot:
    """What `write_checkpoint` would write, copied now: the part of saving a training step waits for."""
    snapshot = Snapshot(rank=rank, rng=rng_state())
    if rank != 0:
        return snapshot
    snapshot.weights, snapshot.weights_metadata = model_snapshot(model)
    if ema is not None:
        snapshot.ema = model_snapshot(ema, all_change=True)
    snapshot.training_state = {
        "optimizer": _cpu_copy(optimizer.state_dict()),
        "scheduler": _cpu_copy(scheduler.state_dict()),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
    }
    snapshot.progress = json.loads(json.dumps(dict(progress)))
    return snapshot


def write_checkpoint(folder: Path, **state: Any) -> None:
    """This worker's part of a checkpoint written at once (`take_snapshot`'s arguments)."""
    take_snapshot(**state).write(folder)


class SnapshotUploads:
    """Snapshots on their way to S3 in Ray Train's upload thread: how many (`busy`), and waiting for them
    (`wait`). `uploader` is the `checkpoint_upload_fn` that writes and uploads one snapshot (`send`)."""

    def __init__(self, store: S3Store) -> None:
        self.store = store
        self._pending = 0
        self._changed = threading.Condition()

    def busy(self) -> bool:
        with self._changed:
            return self._pending > 0

    def wait(self, at_most: int = 0) -> None:
        """Until no more than `at_most` snapshots are still being written or uploaded."""
        with self._changed:
            self._changed.wait_for(lambda: self._pending <= at_most)

    def begin(self) -> None:
        """A snapshot is on its way (`send` will say when it has arrived)."""
        with self._changed:
            self._pending += 1

    def send(self, snapshot: Snapshot, local: Path, target: S3Uri) -> None:
        """Write `snapshot` into the folder `local`, upload it to `target`, and remove the folder."""
        try:
            snapshot.write(local)
            self.store.upload_dir(local, target)
        finally:
            shutil.rmtree(local, ignore_errors=True)
            with self._changed:
                self._pending -= 1
                self._changed.notify_all()

    def uploader(self, snapshot: Snapshot) -> Callable[[Any, str], Any]:
        self.begin()

        def upload(checkpoint: Any, dir_name: str) -> Any:
            import ray.train

            storage = ray.train.get_context().get_storage()
            target = f"{storage.experiment_fs_path}/{dir_name}"
            self.send(snapshot, Path(checkpoint.path), S3Uri.from_fs_path(target))
            return ray.train.Checkpoint(path=target, filesystem=storage.storage_filesystem)

        return upload


def read_progress(folder: Path) -> dict[str, Any]:
    """The checkpoint's progress.json; CheckpointError when it is too big or not a JSON object."""
    path = folder / PROGRESS_FILE
    if path.stat().st_size > MAX_PROGRESS_BYTES:
        raise CheckpointError(f"{path.name} of the checkpoint is larger than the {MAX_PROGRESS_BYTES:,} bytes allowed")
    try:
        progress = json.loads(path.read_text())
    except (ValueError, RecursionError) as error:
        raise CheckpointError(f"{path.name} of the checkpoint is not JSON: {str(error)[:200]}") from None
    if not isinstance(progress, dict):
        raise CheckpointError(f"{path.name} of the checkpoint is not a JSON object")
    return progress


def check_identity(progress: Mapping[str, Any], expected: Mapping[str, Any], where: str) -> None:
    """Refuse to resume a checkpoint of another model or dataset (e.g. an output.path reused)."""
    for key in IDENTITY_KEYS:
        if key in expected and progress.get(key) != expected[key]:
            raise ConfigError(
                f"output.path: the checkpoints at {where} belong to a run with another {key} "
                f"({progress.get(key)!r}, this job has {expected[key]!r}); use a new output.path or delete them"
            )


def restore_checkpoint(
    folder: Path,
    *,
    rank: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    ema: nn.Module | None = None,
) -> dict[str, Any]:
    """Load a checkpoint folder into the live objects (the moving average `ema` too, when the run keeps
    one); returns its progress.json."""
    load_model(unwrap(model), str(folder / MODEL_FILE))
    if ema is not None:
        if not (folder / EMA_FILE).is_file():
            raise CheckpointError(f"the checkpoint has no {EMA_FILE}, which training.emaDecay needs to resume")
        load_model(ema, str(folder / EMA_FILE))
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    rng = folder / rng_file(rank)
    if rng.is_file():  # absent when the number of workers changed; the seeded generators then apply
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    return read_progress(folder)


def download_checkpoint(store: S3Store, checkpoint: Any, into: Path | None = None) -> Path:
    """A Ray checkpoint on S3 (filesystem path "bucket/key") into a local folder, through boto3."""
    folder = into or Path(tempfile.mkdtemp(prefix="kubetune-restore-"))
    store.download_dir(S3Uri.from_fs_path(checkpoint.path), folder, MAX_CHECKPOINT_FILES)
    return folder
