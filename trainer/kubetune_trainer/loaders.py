"""The workers' DataLoaders: a seeded training order that can start mid-epoch, and an exact validation shard.

An epoch's training order is a function of the seed and the epoch alone (`EpochOrder`): one seeded
permutation of the training set, padded to a multiple of the workers as torch's DistributedSampler
pads, dealt out round-robin. After `s` steps of `b` images on `w` workers the workers have consumed
exactly its first `s * b * w` images, so a run resumed mid-epoch skips those (`set_epoch(epoch, skip)`)
without reading them, and continues with the very batches it would have had.

Each image's random augmentation is a function of the seed, the epoch and the image (`SeededSamples`):
the same with or without a resume, whichever loader process decodes it, and whatever the worker count.
Only the training step's own randomness (dropout, a detector's sampling) comes from the worker's
generators, which a checkpoint saves and a resume restores.

Validation gives each worker every world-size-th image, so every image is evaluated exactly once (a
DistributedSampler would pad with repeats).
"""

from __future__ import annotations

import math
import random
from collections.abc import Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

# Mixes (seed, epoch, image) into one generator seed.
_MIX_A, _MIX_B, _SEED_MOD = 1_000_003, 1_000_000_007, 2**63 - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * _MIX_A + epoch) * _MIX_B + index) % _SEED_MOD


class EpochOrder(Sampler[tuple[int, int]]):
    """This worker's share of an epoch's seeded order, from `skip` images of it on; yields (epoch, index)."""

    def __init__(self, size: int, *, seed: int, rank: int, world: int) -> None:
        self.size, self.seed, self.rank, self.world = size, seed, rank, world
        self.epoch, self.skip = 0, 0

    @property
    def padded(self) -> int:
        """The epoch's order padded to a multiple of the workers (every worker gets as many images)."""
        return math.ceil(self.size / self.world) * self.world

    @property
    def per_worker(self) -> int:
        """Images per worker in a whole epoch."""
        return self.padded // self.world

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Epoch `epoch` (0-based), without the first `skip` images of its order (consumed before a resume)."""
        self.epoch, self.skip = epoch, max(0, min(skip, self.padded))

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        while len(order) < self.padded:
            order += order[: self.padded - len(order)]
        return order[self.skip :][self.rank :: self.world]

    def __iter__(self) -> Iterator[tuple[int, int]]:
        return ((self.epoch, index) for index in self.order())

    def __len__(self) -> int:
        return max(0, math.ceil((self.padded - self.skip - self.rank) / self.world))


class SeededSamples(Dataset[Any]):
    """`dataset` read by (epoch, index) keys, each image's randomness seeded by the seed, epoch and index.

    The process's own generators are left as they were, so the training step's randomness does not
    depend on which images this process decoded.
    """

    def __init__(self, dataset: Any, seed: int) -> None:
        self.dataset = dataset
        self.seed = seed

    def __len__(self) -> int:
        return len(self.dataset)

    def __getitem__(self, key: tuple[int, int]) -> Any:
        epoch, index = key
        seed = sample_seed(self.seed, epoch, index)
        python, numpy, torch_cpu = random.getstate(), np.random.get_state(), torch.get_rng_state()
        random.seed(seed)
        np.random.seed(seed % 2**32)
        torch.default_generator.manual_seed(seed)
        try:
            return self.dataset[index]
        finally:
            random.setstate(python)
            np.random.set_state(numpy)
            torch.set_rng_state(torch_cpu)


def train_loader(
    dataset: Any, batch_size: int, seed: int, workers: int, cuda: bool, collate_fn: Any = None
) -> tuple[DataLoader[Any], EpochOrder]:
    """This worker's training loader and its order (for `set_epoch`)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    order = EpochOrder(len(dataset), seed=seed, rank=ctx.get_world_rank(), world=ctx.get_world_size())
    loader = DataLoader(
        SeededSamples(dataset, seed),
        batch_size=batch_size,
        sampler=order,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=workers > 0,
        collate_fn=collate_fn,
        # A last batch of one image breaks BatchNorm in training mode.
        drop_last=order.per_worker > batch_size,
        # Its own generator (for the loader processes' seeds): the workers' generators are the step's alone.
        generator=torch.Generator(),
    )
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False), order


def steps_per_epoch(order: EpochOrder, batch_size: int) -> int:
    """Optimizer steps in a whole epoch (the loader drops a last partial batch when a worker has more)."""
    if order.per_worker > batch_size:
        return order.per_worker // batch_size
    return 1


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
