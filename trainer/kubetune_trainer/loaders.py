"""The workers' DataLoaders: a seeded, sharded training order and an exact validation shard.

Training shuffles with a `DistributedSampler` across workers (a seeded `RandomSampler` alone), reseeded
per epoch so that an epoch has the same order whether or not the run was resumed before it. Validation
gives each worker every world-size-th image, so every image is evaluated exactly once (a
DistributedSampler would pad with repeats).
"""

from __future__ import annotations

import math
from typing import Any

import torch
from torch.utils.data import DataLoader, DistributedSampler, RandomSampler, Subset


def train_loader(
    dataset: Any, batch_size: int, seed: int, workers: int, cuda: bool, collate_fn: Any = None
) -> tuple[DataLoader[Any], Any]:
    """This worker's training loader and its sampler (for `set_epoch`)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    world, rank = ctx.get_world_size(), ctx.get_world_rank()
    sampler: Any
    if world > 1:
        sampler = DistributedSampler(dataset, num_replicas=world, rank=rank, shuffle=True, seed=seed)
    else:
        sampler = RandomSampler(dataset, generator=torch.Generator())
    per_worker = math.ceil(len(dataset) / world)
    loader = DataLoader(
        dataset,
        batch_size=batch_size,
        sampler=sampler,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=workers > 0,
        collate_fn=collate_fn,
        # A last batch of one image breaks BatchNorm in training mode.
        drop_last=per_worker > batch_size,
    )
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False), sampler


def eval_loader(dataset: Any, batch_size: int, workers: int, cuda: bool, collate_fn: Any = None) -> DataLoader[Any]:
    """This worker's shard of the validation set, every image of it exactly once across workers."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    shard = Subset(dataset, list(range(ctx.get_world_rank(), len(dataset), ctx.get_world_size())))
    loader = DataLoader(
        shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=cuda, collate_fn=collate_fn
    )
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)


def set_epoch(sampler: Any, seed: int, epoch: int) -> None:
    """The training order of `epoch` (0-based): the same whether or not the run was resumed before it."""
    if isinstance(sampler, DistributedSampler):
        sampler.set_epoch(epoch)
    elif isinstance(sampler, RandomSampler) and sampler.generator is not None:
        sampler.generator.manual_seed(seed * 1000 + epoch)
