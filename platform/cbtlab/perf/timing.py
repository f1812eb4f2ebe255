"""Timing that survives a shared, noisy machine: every case is warmed up, then the cases run
interleaved, round after round, and each reports its median. A burst of load from another
process then hits all cases alike instead of one, so ratios between cases stay meaningful.

One call's time: on CPU, `time.perf_counter` around the call; on CUDA, a pair of CUDA events
recorded on the device's current stream before and after the call, read once the device has
synchronised (the GPU's own clock from the first to the last work of the call, idle gaps
between launches included, Python's cost after the last launch not).

Peak memory: on CUDA the allocator's own peak; on CPU, where PyTorch keeps no statistics, the
peak of the bytes held by tensors created while the function runs (`PeakMemory`, a dispatch
mode that follows every storage from allocation to release).
"""

from __future__ import annotations

import statistics
import time
import weakref
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import torch
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_flatten


@dataclass(frozen=True)
class Timing:
    """Seconds per call of one case: the median and the spread over the measured rounds."""

    median_s: float
    min_s: float
    max_s: float
    rounds: int


def _is_cuda(device: torch.device | str | None) -> bool:
    return device is not None and torch.device(device).type == "cuda"


def _sync(device: torch.device | str | None) -> None:
    if _is_cuda(device):
        torch.cuda.synchronize(device)


def _time_call(fn: Callable[[], Any], device: torch.device | str | None) -> float:
    """Seconds that one call of `fn` takes (see the module docstring)."""
    if not _is_cuda(device):
        start = time.perf_counter()
        fn()
        return time.perf_counter() - start
    stream = torch.cuda.current_stream(device)
    begin = torch.cuda.Event(enable_timing=True)
    end = torch.cuda.Event(enable_timing=True)
    begin.record(stream)
    fn()
    end.record(stream)
    torch.cuda.synchronize(device)
    return begin.elapsed_time(end) / 1e3  # elapsed_time is in milliseconds


def measure_side_by_side(
    cases: Mapping[str, Callable[[], Any]],
    *,
    warmup: int = 1,
    rounds: int = 5,
    device: torch.device | str | None = None,
) -> dict[str, Timing]:
    """Time every case `rounds` times, interleaved (case A, B, C, A, B, C, ...), after
    `warmup` untimed calls each; returns each case's median time per call. On a CUDA `device`
    each call is timed by CUDA events (see the module docstring)."""
    if rounds < 1:
        raise ValueError(f"rounds must be >= 1, got {rounds}")
    for fn in cases.values():
        for _ in range(warmup):
            fn()
    _sync(device)
    samples: dict[str, list[float]] = {name: [] for name in cases}
    for _ in range(rounds):
        for name, fn in cases.items():
            samples[name].append(_time_call(fn, device))
    return {
        name: Timing(statistics.median(ts), min(ts), max(ts), len(ts))
        for name, ts in samples.items()
    }


def first_call(
    fn: Callable[[], Any],
    device: torch.device | str | None = None,
    catch: tuple[type[BaseException], ...] = (torch.cuda.OutOfMemoryError,),
) -> str:
    """Call `fn` once, untimed (a first warm-up call; a compiled function compiles in it).
    Returns "" when it ran, or a one-line reason when it raised one of `catch` (by default:
    out of CUDA memory), after handing the memory it held back to the device."""
    try:
        fn()
        _sync(device)
        return ""
    except catch as exc:
        lines = [line.strip() for line in str(exc).splitlines() if line.strip()]
        # "backend='inductor' raised:" and the like: the next line says what was raised.
        shown = lines[:2] if lines and lines[0].endswith(":") else lines[:1]
        reason = f"{type(exc).__name__}: {' '.join(shown)}".rstrip(": ")
    if _is_cuda(device):
        torch.cuda.empty_cache()
    return reason[:160]


class PeakMemory(TorchDispatchMode):
    """Track the bytes of tensor storage allocated inside the mode and still alive; `peak` is
    the most held at once. Inputs that existed before the mode are not counted."""

    def __init__(self) -> None:
        super().__init__()
        self.live = 0
        self.peak = 0
        self._held: dict[int, int] = {}

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        out = func(*args, **(kwargs or {}))
        inputs = {
            t.untyped_storage().data_ptr()
            for t in tree_flatten((args, kwargs))[0]
            if isinstance(t, torch.Tensor) and t.device.type != "meta"
        }
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            storage = t.untyped_storage()
            key, size = storage.data_ptr(), storage.nbytes()
            if size == 0 or key in self._held or key in inputs:
                continue  # a view of, or an in-place result on, storage that exists already
            self._held[key] = size
            self.live += size
            self.peak = max(self.peak, self.live)
            weakref.finalize(storage, self._release, key)
        return out

    def _release(self, key: int) -> None:
        self.live -= self._held.pop(key, 0)


def peak_memory(fn: Callable[[], Any], device: torch.device | str | None = None) -> int:
    """Peak bytes that `fn` holds in tensors at once (see the module docstring)."""
    if device is not None and torch.device(device).type == "cuda":
        torch.cuda.synchronize(device)
        torch.cuda.reset_peak_memory_stats(device)
        before = torch.cuda.memory_allocated(device)
        fn()
        torch.cuda.synchronize(device)
        return torch.cuda.max_memory_allocated(device) - before
    with PeakMemory() as tracker:
        fn()
    return tracker.peak
