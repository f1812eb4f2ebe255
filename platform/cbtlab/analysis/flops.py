"""FLOP counts of a model's forward pass.

Convention: FLOPs = 2 x multiply-adds of every matmul, linear and convolution, attention's
matmuls included (PyTorch's `FlopCounterMode`; the CPU flash-attention kernel, which it does not
know, is counted with the same formula as the GPU kernels). Elementwise ops, softmax, norms and
pooling are not counted. Papers that quote "FLOPs" often mean multiply-adds (fvcore): divide
by 2 to compare. Counting runs on a copy of the model on PyTorch's meta device, so it costs no
compute and works at any resolution. Layers with a fused implementation (CBSA) are counted in
their reference form, the equations as the paper writes them, so that counts compare with the
paper's whatever the implementation executes.
"""

from __future__ import annotations

import copy
from typing import Any

import torch
from torch import nn
from torch.utils.flop_counter import FlopCounterMode

aten = torch.ops.aten


def _sdpa_flops(
    query_shape: Any, key_shape: Any, value_shape: Any, *args: Any, **kwargs: Any
) -> int:
    """2 x (B H Nq Nk d) for Q K^T plus 2 x (B H Nq Nk dv) for the product with V."""
    b, h, nq, d = query_shape
    nk, dv = key_shape[-2], value_shape[-1]
    return 2 * b * h * nq * nk * (d + dv)


_CUSTOM = {aten._scaled_dot_product_flash_attention_for_cpu: _sdpa_flops}


def count_flops(
    model: nn.Module, img_size: int | tuple[int, int], *, in_chans: int = 3, by_module: bool = False
) -> int | dict[str, int]:
    """FLOPs of one forward pass of one image of `img_size` (see the module docstring).

    With `by_module`, a dict from module name (as `FlopCounterMode` reports it, e.g.
    "Global", "CBTransformer.blocks.0.attn") to FLOPs instead of the total.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    meta = copy.deepcopy(model).to("meta").eval()
    for module in meta.modules():
        if hasattr(module, "fused"):
            module.fused = False
    counter = FlopCounterMode(display=False, custom_mapping=_CUSTOM)
    with counter, torch.no_grad():
        meta(torch.empty(1, in_chans, h, w, device="meta"))
    if by_module:
        return {name: sum(ops.values()) for name, ops in counter.get_flop_counts().items()}
    return counter.get_total_flops()
