"""The worker loop's collectives, on tensors that its process group can reduce.

Every reduction happens on the training device when the process group has a backend for it,
else on the CPU when the group has one for that, else `ProcessGroupMismatch` is raised before
training starts (`reduction_device`). Object collectives (`gather_objects`) are left to torch.
Without a process group every function is the identity on one rank.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.distributed as dist
from torch import Tensor

_OPS = {"sum": dist.ReduceOp.SUM, "max": dist.ReduceOp.MAX, "min": dist.ReduceOp.MIN}


class ProcessGroupMismatch(RuntimeError):
    """The process group has no backend for the training device's tensors, nor for the CPU's."""


def distributed() -> bool:
    """Whether a default process group exists in this process."""
    return dist.is_available() and dist.is_initialized()


def group_device_types() -> set[str]:
    """The device types the default process group reduces tensors of ("cuda" for NCCL)."""
    config = str(dist.get_backend_config())  # e.g. "cuda:nccl" or "cpu:gloo,cuda:gloo"
    return {part.split(":", 1)[0].strip() for part in config.split(",") if ":" in part}


def reduction_device(device: torch.device) -> torch.device:
    """Where the loop's reductions happen for training on `device` (see the module docstring)."""
    if not distributed():
        return device
    types = group_device_types()
    if device.type in types:
        return device
    if "cpu" in types:
        return torch.device("cpu")
    raise ProcessGroupMismatch(
        f"the process group ({dist.get_backend_config()}) reduces only {sorted(types)} tensors, "
        f"and this rank trains on {device}: train on a device of that type (Ray Train: "
        "train.use_gpu), or make the group with a backend for the CPU too (e.g. gloo, or "
        "'cpu:gloo,cuda:nccl')"
    )


def all_reduce_(tensor: Tensor, op: str = "sum") -> Tensor:
    """Reduce `tensor` over all ranks; returns the result on the group's reduction device for
    the tensor (the tensor itself, reduced in place, when it already lives there)."""
    if not distributed():
        return tensor
    where = reduction_device(tensor.device)
    moved = tensor.to(where)
    dist.all_reduce(moved, op=_OPS[op])
    return moved


def all_reduce(values: list[float] | Tensor, device: torch.device, op: str = "sum") -> list[float]:
    """Sum (or max, min) per-rank numbers over all ranks and read them on the host: one
    host-device round trip for the whole list. `device` is the training device."""
    if isinstance(values, Tensor):  # a copy: the caller's tensor stays as it was
        tensor = values.detach().to(torch.float64, copy=True)
    else:
        tensor = torch.tensor(values, dtype=torch.float64)
    tensor = tensor.to(reduction_device(device))
    return all_reduce_(tensor, op).tolist()


def gather_objects(obj: Any, world_size: int) -> list[Any]:
    """Every rank's picklable `obj`, in rank order."""
    if not distributed():
        return [obj]
    out: list[Any] = [None] * world_size
    dist.all_gather_object(out, obj)
    return out
