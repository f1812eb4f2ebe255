"""The worker loop's collectives under process groups that reduce only some device types.

NCCL reduces CUDA tensors alone. Its stand-in here is gloo registered under another name for the
"cuda" device type only: handed a CPU tensor, such a group raises NCCL's own error ("No backend
type associated with device type cpu"), which is what every GPU run hit at its first step.
"""

from __future__ import annotations

import contextlib
import math
import os
import socket
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import pytest
import torch
import torch.distributed as dist
import torch.multiprocessing as mp
from torch import Tensor, nn

from cbtlab.config import ExperimentConfig
from cbtlab.train import Diverged, run_training
from cbtlab.train.collectives import (
    ProcessGroupMismatch,
    all_reduce,
    group_device_types,
    reduction_device,
)

CUDA_ONLY = "cbtlab_cuda_only"  # a stand-in for NCCL: a backend for CUDA tensors alone
TINY = {
    "model.embed_dim": 24,
    "model.depth": 1,
    "model.num_heads": 3,
    "model.rep_grid": "2x2",
    "train.epochs": 1,
    "train.num_workers": 2,
    "data.batch_size": 64,
}


def _register() -> None:
    if CUDA_ONLY not in dist.Backend.backend_list:
        dist.Backend.register_backend(
            CUDA_ONLY,
            lambda store, rank, size, timeout: dist.ProcessGroupGloo(store, rank, size, timeout),
            devices=["cuda"],
        )


def _free_port() -> int:
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


@contextlib.contextmanager
def _group(backend: str, rank: int = 0, world_size: int = 1, port: int = 0) -> Iterator[None]:
    _register()
    port = port or _free_port()
    dist.init_process_group(
        backend, init_method=f"tcp://127.0.0.1:{port}", rank=rank, world_size=world_size
    )
    try:
        yield
    finally:
        dist.destroy_process_group()


def test_the_stand_in_fails_as_nccl_does_on_cpu_tensors() -> None:
    with _group(CUDA_ONLY):
        assert group_device_types() == {"cuda"}
        with pytest.raises(RuntimeError, match="No backend type associated with device type cpu"):
            dist.all_reduce(torch.ones(2))


def test_reductions_happen_where_the_group_has_a_backend() -> None:
    cpu, cuda = torch.device("cpu"), torch.device("cuda", 0)
    assert reduction_device(cpu) == cpu  # no group: nothing to reduce over
    with _group(CUDA_ONLY):
        assert reduction_device(cuda) == cuda
        with pytest.raises(ProcessGroupMismatch, match=r"reduces only \['cuda'\] tensors"):
            reduction_device(cpu)
        with pytest.raises(ProcessGroupMismatch):
            all_reduce([1.0, 2.0], cpu)
    with _group(f"cpu:gloo,cuda:{CUDA_ONLY}"):  # the mixed group: CPU tensors go to gloo
        assert reduction_device(cpu) == cpu and reduction_device(cuda) == cuda
        assert all_reduce([1.0, 2.0], cpu) == [1.0, 2.0]
        sums = torch.tensor([3.0, 4.0], dtype=torch.float64)
        assert all_reduce(sums, cpu, op="max") == [3.0, 4.0]
        assert sums.tolist() == [3.0, 4.0]  # the caller's tensor is left as it was
    with _group("gloo"):  # gloo reduces both
        assert reduction_device(cuda) == cuda


def test_a_group_that_cannot_reduce_the_training_devices_tensors_is_refused_at_once(
    digits_root: Path, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Before any data is read, rather than at the first step's reduction."""

    def no_data(*args: Any, **kwargs: Any) -> None:
        raise AssertionError("the data was opened before the process group was checked")

    monkeypatch.setattr("cbtlab.train.loop.prepare_dataset", no_data)
    cfg = ExperimentConfig().with_overrides({**TINY, "train.num_workers": 1})
    with _group(CUDA_ONLY), pytest.raises(ProcessGroupMismatch, match="trains on cpu"):
        run_training(cfg, report=lambda metrics, state: None)


class _NonFiniteAt(nn.Module):
    """The model, whose output becomes NaN from its `step`-th training forward on `rank`."""

    def __init__(self, model: nn.Module, *, rank: int, nan_rank: int, step: int) -> None:
        super().__init__()
        self.model, self.calls = model, 0
        self.poisoned = rank == nan_rank
        self.step = step

    def forward(self, images: Tensor) -> Tensor:
        out = self.model(images)
        self.calls += 1
        if self.poisoned and self.calls > self.step:
            out = out * math.nan
        return out


def _worker(rank: int, port: int, backend: str, overrides: dict, nan_step: int, queue: Any) -> None:
    os.environ.pop("CUDA_VISIBLE_DEVICES", None)
    torch.set_num_threads(1)
    seen: set[str] = set()
    reduce = dist.all_reduce

    def spy(tensor: Tensor, *args: Any, **kwargs: Any) -> Any:
        seen.add(tensor.device.type)
        return reduce(tensor, *args, **kwargs)

    dist.all_reduce = spy
    cfg = ExperimentConfig().with_overrides({**TINY, **overrides})

    def prepare(model: nn.Module) -> nn.Module:
        if nan_step >= 0:
            model = _NonFiniteAt(model, rank=rank, nan_rank=1, step=nan_step)
        return nn.parallel.DistributedDataParallel(model)

    reports: list[dict[str, float]] = []
    outcome: Any = None
    with _group(backend, rank, 2, port):
        try:
            run_training(
                cfg,
                rank=rank,
                world_size=2,
                report=lambda metrics, state: reports.append(metrics),
                prepare_model=prepare,
            )
        except Diverged as exc:
            outcome = str(exc)
        types = group_device_types()
    queue.put((rank, reports, outcome, seen, types))


def _run_two_ranks(backend: str, overrides: dict, nan_step: int = -1) -> list[tuple]:
    ctx = mp.get_context("spawn")  # never fork a process that may be connected to Ray
    queue = ctx.SimpleQueue()
    port = _free_port()
    procs = [
        ctx.Process(target=_worker, args=(rank, port, backend, overrides, nan_step, queue))
        for rank in range(2)
    ]
    for proc in procs:
        proc.start()
    for proc in procs:
        proc.join(timeout=300)
        assert proc.exitcode == 0, f"rank process exited with {proc.exitcode}"
    return sorted(queue.get() for _ in procs)


def _without_timing(report: dict[str, float]) -> dict[str, float]:
    return {k: v for k, v in report.items() if not k.startswith(("time/", "throughput/", "perf/"))}


def test_two_ranks_train_under_a_mixed_group_and_agree(digits_root: Path) -> None:
    """Every tensor the loop reduces goes to a device type the group has a backend for, and
    both ranks report the same reduced metrics (mid-epoch checkpoints' gathers included)."""
    ranks = _run_two_ranks(
        f"cpu:gloo,cuda:{CUDA_ONLY}", {"train.checkpoint_every_steps": 2, "train.epochs": 2}
    )
    (_, first, outcome0, seen0, types), (_, second, outcome1, seen1, _) = ranks
    assert outcome0 is outcome1 is None
    assert seen0 and seen0 | seen1 <= types
    epochs = [r for r in first if not r.get("checkpoint/mid_epoch")]
    assert [r["epoch"] for r in epochs] == [1, 2] and len(first) > len(epochs)
    assert [_without_timing(r) for r in first] == [_without_timing(r) for r in second]
    assert epochs[0]["val/samples"] == 360  # each rank evaluated its half, summed over ranks


def test_a_loss_that_diverges_on_one_rank_stops_both_alike(digits_root: Path) -> None:
    """Rank 1 alone turns NaN at its 4th micro-batch (index 3); both ranks stop with the same
    message naming that batch, within `DivergenceGuard.every` batches, and report no epoch."""
    ranks = _run_two_ranks("gloo", {"data.batch_size": 32}, nan_step=3)
    (_, first, outcome0, _, _), (_, second, outcome1, _, _) = ranks
    assert outcome0 == outcome1 == "non-finite training loss at epoch 0, step 3"
    assert first == second == []
