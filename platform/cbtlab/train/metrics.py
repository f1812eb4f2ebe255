"""One rank's training-epoch bookkeeping: sums for the metrics, time spent waiting for data,
peak memory; and the reductions over ranks that turn them into an epoch's metrics.

Names: `train/loss`, `train/top1`, `train/top5` (over the epoch's training batches, as trained
on), `perf/images_per_s` (all ranks together: the sum of the ranks' rates),
`perf/images_per_s_per_worker` (their mean), `perf/data_wait_fraction` (the mean over ranks of
the time blocked on the loader over the epoch's training time), `perf/peak_mem_mb` (the largest
over ranks: CUDA's max allocated during the epoch on a GPU, else the process's peak resident
set size since it started, `ru_maxrss`).
"""

from __future__ import annotations

import resource
import sys
import time
from collections.abc import Iterable, Iterator
from typing import Any, TypeVar

import torch
import torch.distributed as dist
from torch import Tensor

T = TypeVar("T")


def all_reduce(values: list[float], op: str = "sum") -> list[float]:
    """Sum (or max) per-rank values over all ranks (identity without a process group)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        reduce_op = dist.ReduceOp.MAX if op == "max" else dist.ReduceOp.SUM
        dist.all_reduce(tensor, op=reduce_op)
    return tensor.tolist()


def topk_correct(logits: Tensor, labels: Tensor, k: int) -> float:
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == labels[:, None]).any(dim=-1).sum().item()


def peak_memory_mb(device: torch.device) -> float:
    """CUDA: max allocated since the last reset; else the process's peak RSS so far."""
    if device.type == "cuda":
        return torch.cuda.max_memory_allocated(device) / 2**20
    peak = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    # Linux reports KiB, macOS bytes.
    return peak / 2**20 if sys.platform == "darwin" else peak / 2**10


class EpochMeter:
    """Sums of one rank's training epoch. `sums` (loss, top-1, top-5, samples) survive a
    mid-epoch checkpoint; timings count this process's share only."""

    SUMS = ("loss", "top1", "top5", "count")

    def __init__(self, device: torch.device) -> None:
        self.device = device
        self.sums = dict.fromkeys(self.SUMS, 0.0)
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
        n = labels.numel()
        self.sums["loss"] += loss.item() * n
        self.sums["top1"] += (logits.argmax(-1) == labels).sum().item()
        self.sums["top5"] += topk_correct(logits, labels, 5)
        self.sums["count"] += n
        self.images += n

    def state(self) -> dict[str, float]:
        return dict(self.sums)

    def load(self, sums: dict[str, float]) -> None:
        self.sums = {key: float(sums[key]) for key in self.SUMS}

    def metrics(self, *, world_size: int, corrupt: int) -> dict[str, Any]:
        """The epoch's train/, throughput/, time/, perf/ and data/ metrics, reduced over ranks
        (a collective: every rank calls it)."""
        elapsed = time.perf_counter() - self.start
        loss, top1, top5, count, images, rate, wait, corrupt_sum = all_reduce(
            [
                *self.sums.values(),
                self.images,
                self.images / elapsed,
                self.wait / elapsed,
                corrupt,
            ]
        )
        (peak,) = all_reduce([peak_memory_mb(self.device)], op="max")
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
