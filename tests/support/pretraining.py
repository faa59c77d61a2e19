"""Plain torch training, no Ray and no kubetune: how the tests make the base weights a job starts from."""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Iterator
from typing import TYPE_CHECKING

if TYPE_CHECKING:
    import torch


@contextlib.contextmanager
def torch_threads(count: int) -> Iterator[None]:
    """torch's intra-op threads set to `count` inside the block (on a shared machine, fewer run faster)."""
    import torch

    before = torch.get_num_threads()
    torch.set_num_threads(count)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def train_plainly(
    model: torch.nn.Module,
    batch_loss: Callable[[list[int]], torch.Tensor],
    samples: int,
    *,
    epochs: int,
    batch: int,
    learning_rate: float,
    weight_decay: float,
    seed: int,
    drop_last: bool = False,
) -> None:
    """AdamW with a one-cycle schedule, over `samples` in a seeded order each epoch; `batch_loss(indices)` is
    the loss of the batch of those samples."""
    import torch

    optimizer = torch.optim.AdamW(model.parameters(), lr=learning_rate, weight_decay=weight_decay)
    per_epoch = samples // batch if drop_last else (samples + batch - 1) // batch
    schedule = torch.optim.lr_scheduler.OneCycleLR(
        optimizer, max_lr=learning_rate, total_steps=epochs * per_epoch, pct_start=0.1
    )
    generator = torch.Generator().manual_seed(seed)
    model.train()
    for _ in range(epochs):
        order = torch.randperm(samples, generator=generator).tolist()
        for start in range(0, per_epoch * batch, batch):
            loss = batch_loss(order[start : start + batch])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
