"""Streaming WebDataset shards to the ranks of a data-parallel run and their loader workers.

Streams. An epoch's shard order is shuffled with (seed, epoch); rank r of R takes shards
r, r + R, ...; loader worker w of its W takes every W-th of those. Each (rank, worker) stream
reads its tars in order (reading the next shard ahead: a local one through the kernel, a remote
one downloaded in the background, remote.py's `ReadAhead`), shuffles samples
in a buffer seeded by (seed, epoch, rank, worker), decodes them, applies the transform (the
global random/NumPy/torch generators seeded from the same four) and forms its own batches; the
rank takes its workers' batches round-robin, in order. An epoch's batches on a rank are thus a
function of (seed, epoch, rank) and W, never of timing, so a mid-epoch resume could rebuild the
epoch and skip k batches. `loader_workers=0` runs the one stream in the training process: the
batches of one worker.

Workers. The streams run in the processes of a `WorkerPool` (workers.py: torch's DataLoader with
persistent workers, each epoch's streams sent to them as a job), which a run keeps from epoch to
epoch; an epoch given no pool (or a busy one) starts workers for itself alone. Shards are read
by webdataset's tar reader (`tar_file_iterator`).

Equal batches. Each stream's batch quota comes from the card's per-shard counts: a rank yields
`steps` = the smallest, over ranks, of the full batches its streams hold, spread over its
streams as evenly as their samples allow. Every rank runs the same number of steps, so none
waits at the end of an epoch for a collective the others never join. W is lowered (to at least
one) when there are fewer than R x W shards, so that every stream holds a shard.

Transforms. The workers apply a `SplitTransform`'s (transforms.py) per-image part (crop,
resize, flip) and collate uint8 batches in the (N, H, W, C) memory order the crops come in; the
batch is then moved to `device` when one is given and normalised there by the per-batch part,
which also makes it contiguous. Any other transform runs whole in the workers, and its batches
are only moved. Either way a batch comes out of the epoch ready to use.

Corrupt samples. A sample whose image or label fails to decode, or whose image bytes differ from
the manifest's sha256 (checksums.py; policy `checksums`), is skipped and counted (the count
travels with the batches; `corrupt_samples` after an epoch). A training stream that skipped so
many that it runs short of its quota reads its shards again (a top-up pass, the shuffle going
on), so every rank still yields exactly `steps` batches and needs no extra collective; the price
is that a few samples are seen twice in that epoch. A pass that decodes nothing raises.

Validation. Each shard goes to exactly one (rank, worker) stream and is read whole, the last
batch of each stream partial, so every decodable sample is evaluated exactly once across ranks.
Ranks may get unequal numbers of batches (evaluation sums over ranks once, at the end); a rank
beyond the shard count evaluates nothing.

Errors. A shard that cannot be opened or read, or that holds another number of samples than its
card says, raises `ShardReadError` naming it: never a silently short epoch.
"""

from __future__ import annotations

import contextlib
import functools
import hashlib
import io
import logging
import random
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from typing import IO, Any

import numpy as np
import torch
import webdataset as wds
from PIL import Image
from torch import Tensor
from webdataset.tariterators import base_plus_ext, tar_file_iterator

from cbtlab.data.checksums import ChecksumError, ShardChecksums, shard_checksums
from cbtlab.data.remote import ReadAhead, close_early, explain, open_url, prefetch
from cbtlab.data.shards import ShardInfo, ShardSet
from cbtlab.data.transforms import SplitTransform
from cbtlab.data.workers import CountedBatch, WorkerPool

log = logging.getLogger(__name__)

Batch = tuple[Tensor, Tensor]
# Corrupt samples logged (with key and shard) per stream before going quiet.
LOGGED_CORRUPT = 3
# A sample's entry holding its shard's manifest checksums ({key: sha256}), when checked.
CHECKSUMS = "__checksums__"


class ShardReadError(OSError):
    """A shard could not be opened or read, or disagrees with its card; the message names it."""


@dataclass(frozen=True)
class Stream:
    """The shards one (rank, worker) reads, and its batch quota (None: all, last partial)."""

    shards: tuple[ShardInfo, ...]
    batches: int | None = None


@dataclass(frozen=True)
class EpochPlan:
    """Every rank's streams (`streams[rank][worker]`) and the training batches per rank."""

    streams: tuple[tuple[Stream, ...], ...]
    steps: int = 0


def usable_workers(num_shards: int, world_size: int, workers: int) -> int:
    """Training streams per rank: `workers` (at least one), fewer if some would get no shard."""
    return max(1, min(workers, num_shards // world_size))


def plan_train_epoch(
    shardset: ShardSet, *, world_size: int, workers: int, epoch: int, seed: int, batch_size: int
) -> EpochPlan:
    """The streams of one training epoch, the same on every rank (see the module docstring)."""
    shards = list(shardset.shards)
    if len(shards) < world_size:
        raise ValueError(
            f"the {shardset.split} split's {len(shards)} shards cannot give each of {world_size} "
            "ranks at least one; write smaller shards or use fewer workers"
        )
    random.Random(f"{seed}:{epoch}").shuffle(shards)
    count = usable_workers(len(shards), world_size, workers)
    slots = [
        [tuple(shards[rank::world_size][w::count]) for w in range(count)]
        for rank in range(world_size)
    ]
    caps = [[sum(s.num_samples for s in slot) // batch_size for slot in rank] for rank in slots]
    steps = min(sum(rank_caps) for rank_caps in caps)
    if steps == 0:
        smallest = min(sum(s.num_samples for s in slot) for rank in slots for slot in rank)
        raise ValueError(
            f"a stream ({world_size} ranks x {count} loader workers) holds only {smallest} "
            f"training samples this epoch, fewer than one batch of {batch_size}; lower "
            "data.batch_size, data.loader_workers or the number of workers"
        )
    streams = tuple(
        tuple(
            Stream(slot, quota)
            for slot, quota in zip(rank_slots, _spread(steps, rank_caps), strict=True)
        )
        for rank_slots, rank_caps in zip(slots, caps, strict=True)
    )
    return EpochPlan(streams, steps)


def plan_eval(shardset: ShardSet, *, world_size: int, workers: int) -> EpochPlan:
    """Every shard to exactly one (rank, worker) stream, read whole."""
    streams = []
    for rank in range(world_size):
        mine = shardset.shards[rank::world_size]
        count = min(max(1, workers), len(mine))
        streams.append(tuple(Stream(tuple(mine[w::count])) for w in range(count)))
    return EpochPlan(tuple(streams))


def _spread(total: int, caps: list[int]) -> list[int]:
    """`total` batches over streams holding at most `caps`, as evenly as they allow."""
    quotas = [0] * len(caps)
    while total:
        for i, cap in enumerate(caps):
            if total and quotas[i] < cap:
                quotas[i] += 1
                total -= 1
    return quotas


class _Epoch:
    """One rank's epoch: iterating yields (images, labels); `corrupt_samples` then counts the
    samples skipped while reading it."""

    def __init__(
        self,
        shardset: ShardSet,
        streams: tuple[Stream, ...],
        *,
        batch_size: int,
        transform: Callable[[Any], Tensor],
        loader_workers: int,
        decode_size: int | None,
        pin_memory: bool,
        device: torch.device | str | None = None,
        shuffle_buffer: int = 0,
        seed_key: str | None = None,
        pool: WorkerPool | None = None,
        checksums: str = "skip",
    ) -> None:
        split = isinstance(transform, SplitTransform)
        self.streams = _RankStreams(
            streams,
            batch_size=batch_size,
            transform=transform.per_image if split else transform,
            image_ext=shardset.image_ext,
            mode="L" if shardset.extra.get("channels", 3) == 1 else "RGB",
            decode_size=decode_size,
            shuffle_buffer=shuffle_buffer,
            seed_key=seed_key,
            checksums=shard_checksums(shardset, checksums),
        )
        self.per_batch = transform.per_batch if split else None
        self.loader_workers = loader_workers
        self.device = None if device is None else torch.device(device)
        # Pinned host memory only serves copies to an accelerator.
        self.pin_memory = pin_memory and self.device is not None and self.device.type != "cpu"
        self.pool = pool
        self.corrupt_samples = 0

    def __iter__(self) -> Iterator[Batch]:
        self.corrupt_samples = 0
        count = len(self.streams.streams)
        if count == 0:
            return
        if self.loader_workers == 0:
            yield from self._batches(self._in_process())
            return
        pool, own = self.pool, False
        if pool is None or pool.busy:  # one made for this epoch (forked now, stopped after)
            pool, own = WorkerPool(), True
        try:
            batches = pool.run(self.streams.stream, count, self._images, pin_memory=self.pin_memory)
            yield from self._batches(batches)
        finally:
            if own:
                pool.close()

    def _in_process(self) -> Iterator[CountedBatch]:
        for images, labels, skipped in self.streams.stream(0):
            yield (self._images(images) if len(labels) else images), labels, skipped

    def _batches(self, source: Iterable[CountedBatch]) -> Iterator[Batch]:
        for images, labels, skipped in source:
            self.corrupt_samples += skipped
            if len(labels):
                yield images, self._to_device(labels)

    def _images(self, images: Tensor) -> Tensor:
        """A collated batch moved to `device` (if given), then normalised (split transforms):
        the uint8 batch is what crosses to the device, and the device does the float work."""
        images = self._to_device(images)
        return images if self.per_batch is None else self.per_batch(images)

    def _to_device(self, tensor: Tensor) -> Tensor:
        if self.device is None:
            return tensor
        if self.pin_memory and not tensor.is_pinned():  # workers' batches come pinned
            tensor = tensor.pin_memory()
        return tensor.to(self.device, non_blocking=self.pin_memory)


class TrainEpoch(_Epoch):
    """One epoch of training batches for one rank; `len()` is the same on every rank. With
    `device`, batches arrive there (copied without blocking when `pin_memory`); a split
    transform's batches are normalised there. With `loader_workers`, the epoch runs in `pool`'s
    worker processes (kept for the next epoch), or in workers started for it alone.
    `checksums`: what a sample whose bytes differ from the manifest's sha256 does, "skip"
    (counted as corrupt), "stop" (raises `ChecksumError`) or "off" (not checked; checksums.py)."""

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
        loader_workers: int = 0,
        decode_size: int | None = None,
        pin_memory: bool = False,
        device: torch.device | str | None = None,
        pool: WorkerPool | None = None,
        checksums: str = "skip",
    ) -> None:
        _check_rank(rank, world_size)
        self.plan = plan_train_epoch(
            shardset,
            world_size=world_size,
            workers=max(1, loader_workers),
            epoch=epoch,
            seed=seed,
            batch_size=batch_size,
        )
        self.steps = self.plan.steps
        self.rank = rank
        super().__init__(
            shardset,
            self.plan.streams[rank],
            batch_size=batch_size,
            transform=transform,
            loader_workers=loader_workers,
            decode_size=decode_size,
            pin_memory=pin_memory,
            device=device,
            shuffle_buffer=shuffle_buffer,
            seed_key=f"{seed}:{epoch}:{rank}",
            pool=pool,
            checksums=checksums,
        )

    def __len__(self) -> int:
        return self.steps

    def __iter__(self) -> Iterator[Batch]:
        made = 0
        for batch in super().__iter__():
            made += 1
            yield batch
        if made != self.steps:  # the streams' quotas add up to `steps`; a guard, not a path
            raise RuntimeError(f"rank {self.rank} got {made} of its {self.steps} planned batches")


def eval_batches(
    shardset: ShardSet,
    *,
    rank: int,
    world_size: int,
    batch_size: int,
    transform: Callable[[Any], Tensor],
    loader_workers: int = 0,
    decode_size: int | None = None,
    pin_memory: bool = False,
    device: torch.device | str | None = None,
    pool: WorkerPool | None = None,
    checksums: str = "skip",
) -> _Epoch:
    """This rank's share of an evaluation split, every sample once, each stream's last batch
    partial; iterate it (once per evaluation), then read its `corrupt_samples`. `device`,
    `pool` and `checksums` as in `TrainEpoch`."""
    _check_rank(rank, world_size)
    plan = plan_eval(shardset, world_size=world_size, workers=loader_workers)
    return _Epoch(
        shardset,
        plan.streams[rank],
        batch_size=batch_size,
        transform=transform,
        loader_workers=loader_workers,
        decode_size=decode_size,
        pin_memory=pin_memory,
        device=device,
        pool=pool,
        checksums=checksums,
    )


def _check_rank(rank: int, world_size: int) -> None:
    if not 0 <= rank < world_size:
        raise ValueError(f"rank {rank} is outside a world of size {world_size}")


class _RankStreams:
    """A rank's streams: loader worker w (or the training process, without workers) runs
    `stream(w)` and yields its `CountedBatch`es."""

    def __init__(
        self,
        streams: tuple[Stream, ...],
        *,
        batch_size: int,
        transform: Callable[[Any], Tensor],
        image_ext: str,
        mode: str,
        decode_size: int | None,
        shuffle_buffer: int,
        seed_key: str | None,
        checksums: ShardChecksums | None = None,
    ) -> None:
        self.streams = streams
        self.batch_size = batch_size
        self.transform = transform
        self.image_ext = image_ext
        self.mode = mode
        self.decode_size = decode_size
        self.shuffle_buffer = shuffle_buffer
        self.seed_key = seed_key
        self.checksums = checksums

    def stream(self, worker: int) -> Iterator[CountedBatch]:
        stream = self.streams[worker]
        if stream.batches == 0:
            return
        rng = None
        if self.seed_key is not None:
            # Worker 0 keeps the single-stream key of earlier versions: same digits batches.
            key = f"{self.seed_key}:{worker}" if worker else self.seed_key
            _seed_global_generators(key)  # the transforms' randomness
            rng = random.Random(key)
        made = skipped = 0
        corrupt: set[tuple[str, str]] = set()  # counted once, though a top-up meets them again
        pending: list[tuple[Tensor, int]] = []
        while True:
            decoded = 0
            reading = _read_shards(stream.shards, self.checksums)
            samples: Iterator[dict[str, Any]] = reading
            if rng is not None:
                samples = wds.shuffle(self.shuffle_buffer, initial=self.shuffle_buffer, rng=rng)(
                    samples
                )
            # Closed on leaving (quota reached, an error): stops a shard's download.
            with contextlib.closing(reading):
                for sample in samples:
                    item = self._decode(sample, logged=len(corrupt) < LOGGED_CORRUPT)
                    if item is None:
                        where = (sample["__url__"], sample["__key__"])
                        if where not in corrupt:
                            corrupt.add(where)
                            skipped += 1
                        continue
                    decoded += 1
                    pending.append((self.transform(item[0]), item[1]))
                    if len(pending) == self.batch_size:
                        yield (*_collate(pending), skipped)
                        made, skipped, pending = made + 1, 0, []
                        if made == stream.batches:
                            return
            if stream.batches is None:
                if pending or skipped:
                    yield (*_collate(pending), skipped)
                return
            if decoded == 0:
                raise ValueError(
                    f"no sample of {', '.join(s.path for s in stream.shards)} decodes; "
                    "the shards are corrupt"
                )
            log.warning(
                "a stream ran %d batches short of its %d after skipping corrupt samples; "
                "reading its shards again to fill them",
                stream.batches - made,
                stream.batches,
            )

    def _decode(self, sample: dict[str, Any], *, logged: bool) -> tuple[Image.Image, int] | None:
        """The sample's image in `mode` and its label; None (and a log line) if either fails,
        or if its bytes differ from the manifest's checksum (under "stop": raises)."""
        expected = sample.get(CHECKSUMS)
        if self.checksums is not None and expected is not None and self.image_ext in sample:
            reason = self.checksums.mismatch(sample["__key__"], sample[self.image_ext], expected)
            if reason is not None:
                key, url = sample["__key__"], sample["__url__"]
                if self.checksums.policy == "stop":
                    raise ChecksumError(f"sample {key} of shard {url} is corrupt: {reason}")
                if logged:
                    log.warning("skipping corrupt sample %s in %s: %s", key, url, reason)
                return None
        try:
            image = Image.open(io.BytesIO(sample[self.image_ext]))
            if self.decode_size and image.format == "JPEG":
                # libjpeg's DCT scaling: both sides stay >= decode_size (see transforms.py).
                image.draft(self.mode, (self.decode_size, self.decode_size))
            image.load()
            if image.mode != self.mode:
                image = image.convert(self.mode)
            return image, int(sample["cls"])
        except Exception as exc:  # any decoder failure means a corrupt sample
            if logged:
                key, url = sample["__key__"], sample["__url__"]
                log.warning("skipping corrupt sample %s in %s: %r", key, url, exc)
            return None


def _seed_global_generators(key: str) -> None:
    value = int.from_bytes(hashlib.sha256(key.encode()).digest()[:8], "little")
    random.seed(value)
    np.random.seed(value % 2**32)
    torch.manual_seed(value)


def _read_shards(
    shards: Sequence[ShardInfo], checksums: ShardChecksums | None = None
) -> Iterator[dict[str, Any]]:
    """The samples of `shards` in order, each shard read ahead (from the disk, or downloaded)
    while its predecessor is decoded; a local first shard while the stream starts. Closing
    the iterator early stops the download of the next shard. With `checksums`, each sample
    carries its shard's manifest checksums (`CHECKSUMS`)."""
    if shards:
        prefetch(shards[0].path)
    with ReadAhead() as ahead:
        for i, shard in enumerate(shards):
            then = shards[i + 1].path if i + 1 < len(shards) else None
            yield from _read_shard(shard, functools.partial(ahead.open, then=then), checksums)


def _read_shard(
    shard: ShardInfo,
    open_shard: Callable[[str], IO[bytes]] = open_url,
    checksums: ShardChecksums | None = None,
) -> Iterator[dict[str, Any]]:
    """The samples of one tar shard ({"__key__", "__url__", ext: bytes, ...}), checked against
    its card's count when read to the end. With `checksums`, the shard's rows of the manifest
    are read as it is opened (and only its rows), and each sample carries them (`CHECKSUMS`),
    for `_decode` to check."""
    url = shard.path
    expected = None
    if checksums is not None:
        try:
            expected = checksums.expected(shard)
        except ChecksumError:
            raise
        except Exception as exc:
            raise ShardReadError(
                f"cannot read the checksums of shard {url} from {checksums.manifest}: {exc}"
            ) from exc
    try:
        stream = open_shard(url)
    except Exception as exc:
        raise ShardReadError(f"cannot open shard {url}: {explain(url, exc)}") from exc
    count, finished = 0, False
    try:
        for sample in _group(_tar_members(stream), url):
            count += 1
            if expected is not None:
                sample[CHECKSUMS] = expected
            yield sample
        finished = True
    except Exception as exc:
        raise ShardReadError(f"cannot read shard {url} (after {count} samples): {exc}") from exc
    finally:
        _close(stream, url, early=not finished)
    if count != shard.num_samples:
        raise ShardReadError(
            f"shard {url} holds {count} samples, its dataset card says {shard.num_samples}"
        )


def _tar_members(stream: IO[bytes]) -> Iterator[tuple[str, bytes]]:
    """(name, bytes) of a tar stream's files in order (webdataset's reader: Python's tarfile in
    stream mode, any compression; directories, links and `__meta__` names skipped). A stream cut
    inside a member raises; one cut at a member's end is caught by the count against the card."""
    return ((member["fname"], member["data"]) for member in tar_file_iterator(stream))


def _group(members: Iterable[tuple[str, bytes]], url: str) -> Iterator[dict[str, Any]]:
    """Consecutive tar members with the same key (the name up to its first dot) as one sample."""
    sample: dict[str, Any] = {}
    for name, data in members:
        key, ext = base_plus_ext(name)
        if key is None:
            continue
        if key != sample.get("__key__"):
            if sample:
                yield sample
            sample = {"__key__": key, "__url__": url}
        sample[ext.lower()] = data
    if sample:
        yield sample


def _close(stream: IO[bytes], url: str, *, early: bool) -> None:
    if early:  # stopped early (quota reached, or an error)
        close_early(stream)
        return
    try:
        stream.close()  # a pipe reports its command's exit status here
    except Exception as exc:
        raise ShardReadError(f"cannot read shard {url}: {exc}") from exc


def _collate(samples: list[tuple[Tensor, int]]) -> Batch:
    """The images stacked, and their labels. Images kept (H, W, C) in memory, as the
    transforms leave them (transforms.py), stay so: stacking them into (N, C, H, W) order would
    be a transposing copy, slower than the rest of collating; the batch's normalisation, on the
    accelerator in training, makes it contiguous instead."""
    if not samples:
        return torch.empty(0), torch.empty(0, dtype=torch.long)
    images, labels = zip(*samples, strict=True)
    if images[0].dim() == 3 and images[0].permute(1, 2, 0).is_contiguous():
        stacked = torch.stack([image.permute(1, 2, 0) for image in images]).permute(0, 3, 1, 2)
    else:
        stacked = torch.stack(images)
    return stacked, torch.tensor(labels, dtype=torch.long)
