"""The resumable training state: what each epoch's checkpoint holds, and how it travels to and from S3.

A checkpoint is a folder, `<output.path>/checkpoints/<run name>/epoch-NNNN/`:

    model.safetensors     the weights (rank 0), loadable on their own
    training_state.pt     optimizer, scheduler and grad-scaler state (rank 0; tensors and numbers only)
    progress.json         epochs done, global step, the history so far, and what the run is (rank 0)
    rng-rank<R>.pt        each worker's random-number generator state

Every file is read without unpickling code (safetensors, JSON, `torch.load(weights_only=True)`), even
though the trainer wrote them: the bucket is not trusted more than the base weights are. For the same
reason a download keeps every file inside its folder (a key with a ".." segment fails the run, naming
it) and progress.json is read only up to MAX_PROGRESS_BYTES. Ray Train
merges the workers' files into one folder; the upload goes through boto3 (multipart, parallel) rather
than Ray's default pyarrow copy, and Ray keeps the bookkeeping (run snapshot, `checkpointsToKeep`).
"""

from __future__ import annotations

import json
import random
import tempfile
from collections.abc import Callable, Mapping
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import load_model, save_model
from torch import nn

from kubetune_trainer.errors import CheckpointError, ConfigError
from kubetune_trainer.storage import MAX_READ_BYTES, S3Store, S3Uri

MODEL_FILE = "model.safetensors"
STATE_FILE = "training_state.pt"
PROGRESS_FILE = "progress.json"
# What must match for a checkpoint to be resumed by this run.
IDENTITY_KEYS = ("architecture", "classNames", "strategy", "trainableLayers")
# progress.json holds one short history entry per epoch (at most 1,000): a few hundred KiB at most.
MAX_PROGRESS_BYTES = MAX_READ_BYTES
# Files of one checkpoint: a handful, plus one RNG state per worker.
MAX_CHECKPOINT_FILES = 100_000


def checkpoint_dir_name(epoch: int) -> str:
    """The folder of the checkpoint taken after `epoch` epochs (1-based): epoch-0003."""
    return f"epoch-{epoch:04d}"


def rng_file(rank: int) -> str:
    return f"rng-rank{rank}.pt"


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside a DistributedDataParallel wrapper, or the model itself."""
    inner = getattr(model, "module", None)
    return inner if isinstance(inner, nn.Module) else model


def rng_state() -> dict[str, Any]:
    state: dict[str, Any] = {"python": random.getstate(), "torch": torch.get_rng_state()}
    if torch.cuda.is_available() and torch.cuda.is_initialized():
        state["cuda"] = torch.cuda.get_rng_state_all()
    return state


def set_rng_state(state: Mapping[str, Any]) -> None:
    version, internal, gauss = state["python"]
    random.setstate((version, tuple(internal), gauss))
    torch.set_rng_state(state["torch"])
    if "cuda" in state and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])


def write_checkpoint(
    folder: Path,
    *,
    rank: int,
    model: nn.Module,
    optimizer: torch.optim.Optimizer,
    scheduler: Any,
    scaler: torch.amp.GradScaler | None,
    progress: Mapping[str, Any],
) -> None:
    """This worker's part of the checkpoint: everything on rank 0, its RNG state on every rank."""
    folder.mkdir(parents=True, exist_ok=True)
    torch.save(rng_state(), folder / rng_file(rank))
    if rank != 0:
        return
    save_model(unwrap(model), str(folder / MODEL_FILE), metadata={"format": "pt"})
    state = {
        "optimizer": optimizer.state_dict(),
        "scheduler": scheduler.state_dict(),
        "scaler": scaler.state_dict() if scaler is not None and scaler.is_enabled() else None,
    }
    torch.save(state, folder / STATE_FILE)
    (folder / PROGRESS_FILE).write_text(json.dumps(dict(progress), indent=2))


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
) -> dict[str, Any]:
    """Load a checkpoint folder into the live objects; returns its progress.json."""
    load_model(unwrap(model), str(folder / MODEL_FILE))
    state = torch.load(folder / STATE_FILE, map_location="cpu", weights_only=True)
    optimizer.load_state_dict(state["optimizer"])
    scheduler.load_state_dict(state["scheduler"])
    if scaler is not None and state.get("scaler") is not None:
        scaler.load_state_dict(state["scaler"])
    rng = folder / rng_file(rank)
    if rng.is_file():  # absent when the number of workers changed; the seeded generators then apply
        set_rng_state(torch.load(rng, map_location="cpu", weights_only=True))
    return read_progress(folder)


def s3_uploader(store: S3Store) -> Callable[[Any, str], Any]:
    """A `checkpoint_upload_fn` for ray.train.report: boto3 uploads into the run's storage folder."""

    def upload(checkpoint: Any, dir_name: str) -> Any:
        import ray.train

        storage = ray.train.get_context().get_storage()
        target = f"{storage.experiment_fs_path}/{dir_name}"
        store.upload_dir(Path(checkpoint.path), S3Uri.from_fs_path(target))
        return ray.train.Checkpoint(path=target, filesystem=storage.storage_filesystem)

    return upload


def download_checkpoint(store: S3Store, checkpoint: Any, into: Path | None = None) -> Path:
    """A Ray checkpoint on S3 (filesystem path "bucket/key") into a local folder, through boto3."""
    folder = into or Path(tempfile.mkdtemp(prefix="kubetune-restore-"))
    store.download_dir(S3Uri.from_fs_path(checkpoint.path), folder, MAX_CHECKPOINT_FILES)
    return folder
