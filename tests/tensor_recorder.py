"""A dispatch mode that records every tensor the ops produce, forward and backward, and counts
the ops: for tests that bound what a computation materialises or launches."""

from __future__ import annotations

from collections import Counter

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class TensorRecorder(TorchDispatchMode):
    """Records the shape and dtype of every tensor produced by every op, and counts the ops by
    name ("aten.clone": every overload)."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: list[tuple[tuple[int, ...], torch.dtype]] = []
        self.ops: Counter[str] = Counter()

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [shape for shape, _ in self.tensors]

    def largest(self, floating_only: bool = False) -> int:
        """The most entries any recorded tensor had (floating-point ones only, if asked)."""
        return max(
            (torch.Size(shape).numel() for shape, dtype in self.tensors
             if dtype.is_floating_point or not floating_only),
            default=0,
        )  # fmt: skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        self.ops[str(func.overloadpacket)] += 1
        out = func(*args, **(kwargs or {}))
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.tensors.append((tuple(t.shape), t.dtype))
        return out
