"""A checkpoint restores exactly what training had: weights, optimizer, schedule, RNG and history."""

from __future__ import annotations

import random
from pathlib import Path

import numpy as np
import pytest
import torch

from kubetune_trainer.checkpoint import (
    check_identity,
    restore_checkpoint,
    rng_state,
    set_rng_state,
    take_snapshot,
    write_checkpoint,
)
from kubetune_trainer.errors import ConfigError
from kubetune_trainer.model import apply_strategy, create_model, param_groups


def training_objects(seed: int) -> tuple[torch.nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    torch.manual_seed(seed)
    model = create_model("test_resnet", 5)
    plan = apply_strategy(model, "partial", 1)
    optimizer = torch.optim.AdamW(param_groups(model, plan, 0.01, 0.05))
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0 / (1 + step))
    return model, optimizer, scheduler


def steps(model: torch.nn.Module, optimizer: torch.optim.Optimizer, scheduler: object, n: int) -> None:
    for _ in range(n):
        loss = model(torch.randn(4, 3, 32, 32)).logsumexp(1).mean()
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        scheduler.step()  # type: ignore[attr-defined]


def test_restore_continues_exactly_where_training_stopped(tmp_path: Path) -> None:
    model, optimizer, scheduler = training_objects(seed=0)
    steps(model, optimizer, scheduler, 3)
    progress = {"epoch": 1, "step": 3, "history": [{"epoch": 1, "valAccuracy": 0.5}], "architecture": "test_resnet"}
    write_checkpoint(
        tmp_path, rank=0, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, progress=progress
    )
    python_draw = random.random()  # the batches below use torch's generator only
    steps(model, optimizer, scheduler, 2)
    expected = {k: v.clone() for k, v in model.state_dict().items()}

    restored, restored_optimizer, restored_scheduler = training_objects(seed=99)
    got = restore_checkpoint(
        tmp_path, rank=0, model=restored, optimizer=restored_optimizer, scheduler=restored_scheduler, scaler=None
    )
    assert got == progress
    assert restored_scheduler.last_epoch == 3
    assert random.random() == python_draw
    # Same weights, optimizer moments, schedule and batches: the next two steps match bit for bit.
    steps(restored, restored_optimizer, restored_scheduler, 2)
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in expected.items())


def test_checkpoints_of_another_model_are_not_resumed() -> None:
    saved = {"architecture": "resnet50", "classNames": ["a", "b"], "strategy": "head", "trainableLayers": None}
    check_identity(saved, dict(saved), "s3://r/c/epoch-0001")
    with pytest.raises(
        ConfigError,
        match=r"output.path: the checkpoints at s3://r/c/epoch-0001 belong to a run with another classNames",
    ):
        check_identity(saved, {**saved, "classNames": ["a", "b", "c"]}, "s3://r/c/epoch-0001")


def test_a_snapshot_is_what_training_had_when_taken_not_when_written(tmp_path: Path) -> None:
    """The next step may run while the upload thread writes the snapshot: the files hold the step's state."""
    model, optimizer, scheduler = training_objects(seed=0)
    steps(model, optimizer, scheduler, 2)
    snapshot = take_snapshot(
        rank=0, model=model, optimizer=optimizer, scheduler=scheduler, scaler=None, progress={"epoch": 0, "step": 2}
    )
    at_snapshot = {k: v.clone() for k, v in model.state_dict().items()}
    steps(model, optimizer, scheduler, 3)  # training goes on before the snapshot is written

    snapshot.write(tmp_path)

    restored, restored_optimizer, restored_scheduler = training_objects(seed=99)
    restore_checkpoint(
        tmp_path, rank=0, model=restored, optimizer=restored_optimizer, scheduler=restored_scheduler, scaler=None
    )
    assert all(torch.equal(v, restored.state_dict()[k]) for k, v in at_snapshot.items())
    assert restored_scheduler.last_epoch == 2


def test_checkpoints_staged_by_a_killed_worker_are_removed_when_a_worker_starts(tmp_path: Path) -> None:
    """A worker killed between staging a checkpoint and its upload leaves the folder; the next worker on the
    node removes it, and never one of a process that still runs (this one's)."""
    import os
    import subprocess
    import sys

    from kubetune_trainer.checkpoint import STAGING_PREFIX, remove_stale_staging

    code = (
        "import os, signal, tempfile;"
        f"d = tempfile.mkdtemp(prefix='{STAGING_PREFIX}' + str(os.getpid()) + '-', dir={str(tmp_path)!r});"
        "open(os.path.join(d, 'model.safetensors'), 'wb').write(b'x' * 1024);"
        "os.kill(os.getpid(), signal.SIGKILL)"
    )
    subprocess.run([sys.executable, "-c", code], check=False)
    left = list(tmp_path.glob(f"{STAGING_PREFIX}*"))
    assert len(left) == 1, "the killed process left its staging folder"
    mine = tmp_path / f"{STAGING_PREFIX}{os.getpid()}-abc"
    mine.mkdir()

    removed = remove_stale_staging(tmp_path)

    assert removed == left and not left[0].exists()
    assert mine.exists(), "a running process's checkpoint in staging is not touched"


def test_a_resumed_run_draws_the_same_random_numbers_from_python_numpy_and_torch(tmp_path: Path) -> None:
    """The generators a checkpoint saves (numpy's draws timm's Mixup) come back exactly, through the file."""

    def draws() -> tuple[float, float, float]:
        return random.random(), float(np.random.random()), float(torch.rand(1))

    saved = tmp_path / "rng.pt"
    torch.save(rng_state(), saved)
    expected = draws()
    draws()
    set_rng_state(torch.load(saved, map_location="cpu", weights_only=True))
    assert draws() == expected
