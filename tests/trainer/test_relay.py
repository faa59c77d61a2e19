"""The driver's relay: updates carry the checkpoint Ray committed and the worker failures Ray saw."""

from __future__ import annotations

import logging

import pytest

from kubetune_trainer.progress_model import ProgressUpdate
from kubetune_trainer.relay import CHECKPOINT_EVENT, EVENT, FAILURE_EVENT, RunProgress

RUN = "s3://results/job/checkpoints/uid"


def update(epoch: int, step: int, latest: str | None = None) -> dict[str, object]:
    wire = ProgressUpdate(
        epoch=epoch, total_epochs=3, step=step, total_steps=30, percent=step / 0.3, latest_checkpoint=latest
    ).wire()
    return dict(wire)


def test_latest_checkpoint_names_only_what_ray_committed() -> None:
    progress = RunProgress(max_failures=3)

    # A resumed worker names the checkpoint it resumed from: committed by definition, shown as it is.
    shown = progress.handle(update(1, 10, latest=f"{RUN}/epoch-0001"))
    assert shown is not None and shown.latest_checkpoint == f"{RUN}/epoch-0001"
    # Epoch 2's checkpoint counts once the controller registered it; the update is shown again with it.
    shown = progress.handle({EVENT: CHECKPOINT_EVENT, "uri": f"{RUN}/epoch-0002"})
    assert shown is not None and (shown.epoch, shown.latest_checkpoint) == (1, f"{RUN}/epoch-0002")
    shown = progress.handle(update(3, 25, latest=f"{RUN}/epoch-0001"))
    assert shown is not None and shown.latest_checkpoint == f"{RUN}/epoch-0002"
    assert shown.worker_failures == 0


def test_worker_failures_are_counted_and_told(caplog: pytest.LogCaptureFixture) -> None:
    progress = RunProgress(max_failures=1)
    assert progress.handle({EVENT: FAILURE_EVENT, "ranks": [1], "reason": "boom"}) is None  # nothing to show yet
    progress.handle(update(2, 20))

    with caplog.at_level(logging.WARNING, logger="kubetune_trainer.relay"):
        shown = progress.handle({EVENT: FAILURE_EVENT, "ranks": [0, 1], "reason": "ActorDiedError: killed"})

    assert shown is not None and (shown.epoch, shown.step, shown.worker_failures) == (2, 20, 2)
    assert "worker failure 2 (rank 0, 1): ActorDiedError: killed; no restarts left" in caplog.text
    # A later update of the restarted workers keeps the count.
    later = progress.handle(update(1, 12))
    assert later is not None and later.worker_failures == 2
