"""One rank's training-epoch bookkeeping: sums for the metrics, time spent waiting for data,
peak memory; and the reductions over ranks that turn them into an epoch's metrics.

Names: `train/loss`, `train/top1`, `train/top5` (over the epoch's training batches, as trained
on), `perf/images_per_s` (all ranks together: the sum of the ranks' rates),
`perf/images_per_s_per_worker` (their mean), `perf/data_wait_fraction` (the mean over ranks of
the time blocked on the loader over the epoch's training time), `perf/peak_mem_mb` (the largest
over ranks: CUDA's max allocated during the epoch on a GPU, else the process's peak resident
set size since it started, `ru_maxrss`).

Nothing here waits for the device during an epoch: sums stay on the training device and are
read on the host at logging points (the epoch's end, a mid-epoch checkpoint); the divergence
test reads one flag every `DivergenceGuard.every` micro-batches.
"""

from __future__ import annotations

import math
import resource
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
from torch import Tensor

from cbtlab.analysis import correct_counts
from cbtlab.train.collectives import all_reduce, all_reduce_

T = TypeVar("T")


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset; else the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class EpochMeter:
    """Sums of one rank's training epoch, kept on the training device. `sums` (loss, top-1,
    top-5, samples) survive a mid-epoch checkpoint; timings count this process's share only."""

    SUMS = ("loss", "top1", "top5", "count")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        # (loss x samples, top-1 hits, top-5 hits): float64, so that sums over an ImageNet
        # epoch stay exact in the counts and the loss sums in the order the batches came.
        self.totals = torch.zeros(3, dtype=torch.float64, device=device)
        self.count = 0
        self.images = 0  # trained on in this process (not restored from a checkpoint)
        self.wait = 0.0
        if device.type == "cuda":
            torch.cuda.reset_peak_memory_stats(device)
        self.start = time.perf_counter()

    def restart_clock(self) -> None:
        """Start timing now (after skipping to a mid-epoch position)."""
        self.wait = 0.0
        self.start = time.perf_counter()

    def timed(self, batches: Iterable[T]) -> Iterator[T]:
        """The batches, counting the time spent waiting for each as data wait."""
        source = iter(batches)
        while True:
            start = time.perf_counter()
            try:
                batch = next(source)
            except StopIteration:
                return
            self.wait += time.perf_counter() - start
            yield batch

    def add(self, loss: Tensor, logits: Tensor, labels: Tensor) -> None:
        """Count a batch: device work only (no host sync)."""
        n = labels.numel()
        batch = torch.cat([loss.detach().double().reshape(1) * n, correct_counts(logits, labels)])
        self.totals += batch
        self.count += n
        self.images += n

    def state(self) -> dict[str, float]:
        """The sums, read on the host (a sync: call it at logging points only)."""
        loss, top1, top5 = self.totals.tolist()
        return {"loss": loss, "top1": top1, "top5": top5, "count": float(self.count)}

    def load(self, sums: dict[str, float]) -> None:
        values = [float(sums[key]) for key in ("loss", "top1", "top5")]
        self.totals = torch.tensor(values, dtype=torch.float64, device=self.device)
        self.count = int(sums["count"])

    def metrics(self, *, world_size: int, corrupt: int) -> dict[str, Any]:
        """The epoch's train/, throughput/, time/, perf/ and data/ metrics, reduced over ranks
        (a collective: every rank calls it)."""
        elapsed = time.perf_counter() - self.start
        host = [self.count, self.images, self.images / elapsed, self.wait / elapsed, corrupt]
        on_device = torch.cat(
            [self.totals, torch.tensor(host, dtype=torch.float64).to(self.device)]
        )
        loss, top1, top5, count, images, rate, wait, corrupt_sum = all_reduce(
            on_device, self.device
        )
        (peak,) = all_reduce([peak_memory_mb(self.device)], self.device, op="max")
        return {
            "train/loss": loss / count,
            "train/top1": top1 / count,
            "train/top5": top5 / count,
            "throughput/train_img_s": images / elapsed,
            "time/train_epoch_s": elapsed,
            "data/corrupt_samples": corrupt_sum,
            "perf/images_per_s": rate,
            "perf/images_per_s_per_worker": rate / world_size,
            "perf/data_wait_fraction": wait / world_size,
            "perf/peak_mem_mb": peak,
        }


class DivergenceGuard:
    """Finds a non-finite training loss on any rank without a host sync per step.

    `observe` records, on the device, the first micro-batch of the epoch whose loss was not
    finite; `check` (a collective) takes the earliest such batch over all ranks and raises
    `on_diverged(step)` on every rank alike. The loop checks every `every` micro-batches, before
    any checkpoint and at the epoch's end: a divergence stops every rank at most `every - 1`
    micro-batches after it happened, and never reaches a checkpoint.
    """

    NONE = math.inf

    def __init__(self, device: torch.device, every: int = 8) -> None:
        self.device = device
        self.every = every
        self.first = torch.full((), self.NONE, dtype=torch.float64, device=device)

    def observe(self, loss: Tensor, step: int) -> None:
        bad = ~torch.isfinite(loss.detach())
        self.first = torch.minimum(self.first, torch.where(bad, float(step), self.NONE))

    def due(self, step: int) -> bool:
        """Whether the loop checks after micro-batch `step` (counted from 0)."""
        return (step + 1) % self.every == 0

    def first_bad_step(self) -> int | None:
        """The earliest non-finite micro-batch over all ranks (a collective), or None."""
        first = all_reduce_(self.first.clone(), op="min").item()
        return None if math.isinf(first) else int(first)
