"""Streaming WebDataset shards to the ranks of a data-parallel run.

Training: every epoch the shard order is shuffled with (seed, epoch), rank r takes shards
r, r + world, ...; samples pass through a seeded shuffle buffer. Every rank yields the same
number of full batches (the smallest rank's count), so no rank waits at the end of an epoch
for a collective the others never join. Validation: each shard goes to exactly one rank and
is read whole, so every sample is evaluated exactly once across ranks.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator
from itertools import islice
from typing import Any

import torch
import webdataset as wds
from torch import Tensor

from cbtlab.data.shards import ShardInfo, ShardSet

Batch = tuple[Tensor, Tensor]


def _rank_shards(shards: list[ShardInfo], rank: int, world_size: int) -> list[ShardInfo]:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")
    if len(shards) < world_size:
        raise ValueError(
            f"{len(shards)} shards cannot give each of {world_size} ranks at least one; "
            "write smaller shards or use fewer workers"
        )
    return shards[rank::world_size]


def epoch_assignment(
    shardset: ShardSet, *, world_size: int, epoch: int, seed: int
) -> list[list[ShardInfo]]:
    """The shards of each rank for one training epoch (the same on every rank)."""
    order = list(shardset.shards)
    random.Random(f"{seed}:{epoch}").shuffle(order)
    return [_rank_shards(order, r, world_size) for r in range(world_size)]


class TrainEpoch:
    """One epoch of training batches for one rank; `len()` is the same on every rank."""

    def __init__(
        self,
        shardset: ShardSet,
        *,
        rank: int,
        world_size: int,
        epoch: int,
        seed: int,
        batch_size: int,
        shuffle_buffer: int,
        transform: Callable[[Any], Tensor],
    ) -> None:
        assignment = epoch_assignment(shardset, world_size=world_size, epoch=epoch, seed=seed)
        per_rank = [sum(s.num_samples for s in shards) for shards in assignment]
        self.steps = min(per_rank) // batch_size
        if self.steps == 0:
            raise ValueError(
                f"a rank holds only {min(per_rank)} training samples this epoch, fewer than one "
                f"batch of {batch_size}; lower data.batch_size or the number of workers"
            )
        self.urls = [s.path for s in assignment[rank]]
        self.rng = random.Random(f"{seed}:{epoch}:{rank}")
        self.batch_size = batch_size
        self.shuffle_buffer = shuffle_buffer
        self.transform = transform
        self.image_ext = shardset.image_ext
        self.decoder = _decoder(shardset)

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        pipeline = wds.DataPipeline(
            wds.SimpleShardList(self.urls),
            wds.tarfile_to_samples(),
            wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=self.rng),
            wds.decode(self.decoder),
            wds.to_tuple(self.image_ext, "cls"),
            wds.map_tuple(self.transform, int),
            wds.batched(self.batch_size, partial=False, collation_fn=_collate),
        )
        return islice(iter(pipeline), self.steps)


def eval_batches(
    shardset: ShardSet,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    transform: Callable[[Any], Tensor],
) -> Iterator[Batch]:
    """This rank's share of an evaluation split, every sample once, the last batch partial."""
    urls = [s.path for s in _rank_shards(list(shardset.shards), rank, world_size)]
    pipeline = wds.DataPipeline(
        wds.SimpleShardList(urls),
        wds.tarfile_to_samples(),
        wds.decode(_decoder(shardset)),
        wds.to_tuple(shardset.image_ext, "cls"),
        wds.map_tuple(transform, int),
        wds.batched(batch_size, partial=True, collation_fn=_collate),
    )
    return iter(pipeline)


def _decoder(shardset: ShardSet) -> str:
    """webdataset's PIL decoder: greyscale ("pill") for one-channel datasets, else RGB."""
    return "pill" if shardset.extra.get("channels", 3) == 1 else "pil"


def _collate(samples: list[tuple[Tensor, int]]) -> Batch:
    images, labels = zip(*samples, strict=True)
    return torch.stack(images), torch.tensor(labels, dtype=torch.long)
