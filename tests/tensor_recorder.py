"""A dispatch mode that records every tensor the ops allocate, forward and backward, and every op
called: for tests that bound what a computation materialises, converts or launches."""

from __future__ import annotations

from collections import Counter
from typing import NamedTuple

import torch
from torch.utils._python_dispatch import TorchDispatchMode


class Call(NamedTuple):
    """One op call: its name ("aten.clone", every overload), the shape and dtype of its first
    tensor argument (empty and None if it had none) and the dtypes of all of them."""

    op: str
    shape: tuple[int, ...]
    dtype: torch.dtype | None
    dtypes: tuple[torch.dtype, ...]


class TensorRecorder(TorchDispatchMode):
    """Records the shape and dtype of every tensor produced by every op (views and in-place
    results aside), and every call."""

    def __init__(self) -> None:
        super().__init__()
        self.tensors: list[tuple[tuple[int, ...], torch.dtype]] = []
        self.calls: list[Call] = []

    @property
    def shapes(self) -> list[tuple[int, ...]]:
        return [shape for shape, _ in self.tensors]

    @property
    def ops(self) -> Counter[str]:
        return Counter(call.op for call in self.calls)

    def largest(self, floating_only: bool = False) -> int:
        """The most entries any recorded tensor had (floating-point ones only, if asked)."""
        return max(
            (torch.Size(shape).numel() for shape, dtype in self.tensors
             if dtype.is_floating_point or not floating_only),
            default=0,
        )  # fmt: skip

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):  # type: ignore[no-untyped-def]
        tensors = [a for a in args if isinstance(a, torch.Tensor)]
        shape, dtype = (tuple(tensors[0].shape), tensors[0].dtype) if tensors else ((), None)
        dtypes = tuple(t.dtype for t in tensors)
        self.calls.append(Call(str(func.overloadpacket), shape, dtype, dtypes))
        out = func(*args, **(kwargs or {}))
        if any(r.alias_info is not None for r in func._schema.returns):
            return out  # a view or an in-place op's result: no new memory
        for t in out if isinstance(out, (tuple, list)) else (out,):
            if isinstance(t, torch.Tensor):
                self.tensors.append((tuple(t.shape), t.dtype))
        return out
