"""The workers' DataLoaders: a seeded training order that can start mid-epoch at any worker count, and an
exact validation shard.

An epoch's training order is a function of the seed and the epoch alone (`EpochOrder`): one seeded
permutation of the training set, padded to a multiple of the reference worker count (`workers.min`) as
torch's DistributedSampler pads. Step `k` of the epoch trains on the global batch
`order[k * G : (k + 1) * G]`, with `G = batchSize * workers.min` whatever the number of workers: `w`
workers split it in `w` near-equal contiguous shares (the global batch policy of elastic training,
docs/trainer.md). After `s` steps the workers have consumed exactly the order's first `s * G` images,
so a run resumed mid-epoch — with as many workers or another number of them — skips those
(`set_epoch(epoch, skip)`) without reading them and continues with the very global batches it would
have had: every image of the epoch once, none twice.

Each image's random augmentation is a function of the seed, the epoch and the image (`SeededSamples`):
the same with or without a resume, whichever loader process decodes it, and whatever the worker count.
Only the training step's own randomness (dropout, a detector's sampling) comes from the worker's
generators, which a checkpoint saves and a resume restores.

Validation gives each worker every world-size-th image, so every image is evaluated exactly once (a
DistributedSampler would pad with repeats).
"""

from __future__ import annotations

import hashlib
import math
import random
from collections import deque
from collections.abc import Callable, Iterator
from typing import Any

import numpy as np
import torch
from torch.utils.data import DataLoader, Dataset, Sampler, Subset

from kubetune_trainer.errors import ConfigError

# Mixes (seed, epoch, image) into one generator seed.
_MIX_A, _MIX_B, _SEED_MOD = 1_000_003, 1_000_000_007, 2**63 - 1


def sample_seed(seed: int, epoch: int, index: int) -> int:
    return ((seed * _MIX_A + epoch) * _MIX_B + index) % _SEED_MOD


def coverage_hashes(key: str) -> tuple[int, int]:
    """Two 24-bit hashes of a sample's key. An epoch's accounting sums them over the images it trained
    (`loop.Epoch`): with the count, the sums tell whether the epoch trained a given set of keys exactly once
    (a repeat and a skip would have to cancel in both sums). 24 bits keep the sums exact in float64 up to
    2**29 images."""
    raw = hashlib.blake2b(key.encode(), digest_size=6).digest()
    return int.from_bytes(raw[:3], "big"), int.from_bytes(raw[3:], "big")


def share(total: int, rank: int, world: int) -> tuple[int, int]:
    """(start, count) of `rank`'s contiguous share of `total` images split among `world` workers: the
    first `total % world` ranks take one more."""
    base, extra = divmod(total, world)
    return rank * base + min(rank, extra), base + (1 if rank < extra else 0)


class EpochOrder(Sampler[list[tuple[int, int]]]):
    """This worker's batches of an epoch's seeded order, from `skip` images of it on; each batch is a
    list of (epoch, index), its share of one step's global batch.

    `reference` is the worker count the global batch is defined at (`workers.min`): `batch_size` images
    per worker there. A whole epoch is as many steps at any worker count.
    """

    def __init__(self, size: int, *, seed: int, batch_size: int, reference: int, rank: int, world: int) -> None:
        self.size, self.seed, self.batch_size = size, seed, batch_size
        self.reference, self.rank, self.world = reference, rank, world
        self.epoch, self.skip = 0, 0
        # The sample indices of each batch handed to the loader, oldest first: the loop takes one per batch
        # it trains (`Epoch.train`'s accounting), so what it counts is what it trained.
        self.handed: deque[list[int]] = deque()
        if self.step_size < world:
            raise ConfigError(
                f"data.train: a step's {self.step_size} images cannot give each of {world} workers one "
                "(more training images, a larger training.batchSize or fewer workers)"
            )

    @property
    def padded(self) -> int:
        """The epoch's order padded to a multiple of the reference workers."""
        return math.ceil(self.size / self.reference) * self.reference

    @property
    def per_worker(self) -> int:
        """Images per reference worker in a whole epoch."""
        return self.padded // self.reference

    @property
    def steps(self) -> int:
        """Optimizer steps in a whole epoch: a last partial global batch is dropped (one image would break
        BatchNorm), unless the epoch is one short batch."""
        return self.per_worker // self.batch_size if self.per_worker > self.batch_size else 1

    @property
    def step_size(self) -> int:
        """Images of one step's global batch, over all workers."""
        return self.batch_size * self.reference if self.per_worker > self.batch_size else self.padded

    def set_epoch(self, epoch: int, skip: int = 0) -> None:
        """Epoch `epoch` (0-based), without the first `skip` images of its order (consumed before a resume)."""
        self.epoch, self.skip = epoch, max(0, min(skip, self.padded))
        self.handed.clear()

    @property
    def first_step(self) -> int:
        return min(self.steps, math.ceil(self.skip / self.step_size))

    def order(self) -> list[int]:
        generator = torch.Generator().manual_seed(self.seed + self.epoch)
        order = torch.randperm(self.size, generator=generator).tolist()
        while len(order) < self.padded:
            order += order[: self.padded - len(order)]
        return order

    def loss_weight(self, count: int) -> float:
        """What this worker's mean batch loss is weighted by so that the workers' gradients, averaged by
        DDP, weigh every image of the global batch alike (1 when the shares are equal)."""
        return count * self.world / self.step_size

    def batches(self) -> Iterator[list[tuple[int, int]]]:
        order = self.order()
        start, count = share(self.step_size, self.rank, self.world)
        for step in range(self.first_step, self.steps):
            begin = step * self.step_size + start
            yield [(self.epoch, index) for index in order[begin : begin + count]]

    def arrange(self, batches: Iterator[list[tuple[int, int]]]) -> Iterator[list[tuple[int, int]]]:
        """The batches as the loader gets them (stream mode fetches their images first: `stream.StreamOrder`)."""
        return batches

    def __iter__(self) -> Iterator[list[tuple[int, int]]]:
        for batch in self.arrange(self.batches()):
            self.handed.append([index for _, index in batch])
            yield batch

    def __len__(self) -> int:
        return self.steps - self.first_step


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
    dataset: Any,
    batch_size: int,
    seed: int,
    workers: int,
    cuda: bool,
    collate_fn: Any = None,
    *,
    reference: int | None = None,
    make_order: Callable[..., EpochOrder] = EpochOrder,
) -> tuple[DataLoader[Any], EpochOrder]:
    """This worker's training loader and its order (for `set_epoch`); `reference`: the worker count the
    global batch is defined at (the current one when omitted)."""
    import ray.train
    import ray.train.torch

    ctx = ray.train.get_context()
    world = ctx.get_world_size()
    order = make_order(
        len(dataset),
        seed=seed,
        batch_size=batch_size,
        reference=reference or world,
        rank=ctx.get_world_rank(),
        world=world,
    )
    loader = DataLoader(
        SeededSamples(dataset, seed),
        batch_sampler=order,
        num_workers=workers,
        pin_memory=cuda,
        persistent_workers=workers > 0,
        collate_fn=collate_fn,
        # Its own generator (for the loader processes' seeds): the workers' generators are the step's alone.
        generator=torch.Generator(),
    )
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False), order


def steps_per_epoch(order: EpochOrder) -> int:
    """Global batches in a whole epoch, at any worker count (optimizer steps without accumulation)."""
    return order.steps


def eval_loader(
    dataset: Any,
    batch_size: int,
    workers: int,
    cuda: bool,
    collate_fn: Any = None,
    batches: Sampler[list[int]] | None = None,
) -> DataLoader[Any]:
    """This worker's shard of the validation set, every image of it exactly once across workers (`batches`:
    its batches given, as stream mode's `stream.StreamEval`)."""
    import ray.train
    import ray.train.torch

    if batches is not None:
        loader = DataLoader(dataset, batch_sampler=batches, num_workers=workers, pin_memory=cuda, collate_fn=collate_fn)
        return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)
    ctx = ray.train.get_context()
    shard = Subset(dataset, list(range(ctx.get_world_rank(), len(dataset), ctx.get_world_size())))
    loader = DataLoader(
        shard, batch_size=batch_size, shuffle=False, num_workers=workers, pin_memory=cuda, collate_fn=collate_fn
    )
    return ray.train.torch.prepare_data_loader(loader, add_dist_sampler=False)
