"""Transformer building blocks: the ISTA sparse-coding layer, the MLP, and the block."""

from __future__ import annotations

import math
from typing import Any

import torch
import torch.nn.functional as F
from timm.layers.fast_norm import fast_layer_norm
from torch import Tensor, nn

from cbtlab.attention import create_attention
from cbtlab.attention.common import autocast_dtype

BLOCK_TYPES = ("ista", "mlp")


class ISTA(nn.Module):
    """One proximal step of sparse coding over a learnable dictionary D (d x d), as in CRATE:
    `relu(Z + step * (Z D - Z D^T D) - step * lambd)`.

    The default form computes the same step as `(Z - Z D^T) D` with two GEMMs instead of the
    reference code's three, the shift and the step folded into one `addmm`. `fused = False`
    runs the three-product form, which FLOP counting uses so that counts match the paper's.
    """

    def __init__(self, dim: int, *, step: float = 0.1, lambd: float = 0.1) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.empty(dim, dim))
        nn.init.kaiming_uniform_(self.weight, a=math.sqrt(5))
        self.step = step
        self.lambd = lambd
        self.fused = True

    def forward(self, x: Tensor) -> Tensor:
        if not self.fused:
            return self.forward_reference(x)
        flat = x.reshape(-1, x.shape[-1])
        dtype = autocast_dtype(flat.device.type)
        if dtype is not None:
            # Once into autocast's dtype, so that every product and sum below runs in it:
            # left to autocast, `flat - Z D^T` would come back in float32 and both of addmm's
            # token-sized operands would be cast again (two more round trips, and their
            # gradients' casts back, in every layer).
            flat = flat.to(dtype)
        # F.linear takes the weight itself, whose autocast copy is cached; `weight.t()` is a
        # view, cast anew at every call.
        residual = flat - F.linear(flat, self.weight)  # Z - Z D^T
        shifted = flat - self.step * self.lambd
        out = torch.addmm(shifted, residual, self.weight, alpha=self.step)
        return torch.relu(out).view_as(x)

    def forward_reference(self, x: Tensor) -> Tensor:
        x_dt = x @ self.weight.t()  # Z D^T
        grad = x @ self.weight - x_dt @ self.weight  # Z D - Z D^T D
        return torch.relu(x + self.step * grad - self.step * self.lambd)


class LayerNorm(nn.LayerNorm):
    """`nn.LayerNorm` that, under autocast, normalises in autocast's dtype (statistics still
    accumulate in float32 inside the kernel) through timm's `fast_layer_norm`, as apex does.
    Autocast would run it in float32: a copy of the tokens into float32 before it and, since
    every consumer here is a product, a copy back after it, with both again in the backward
    pass. Outside autocast it is `nn.LayerNorm`."""

    def forward(self, x: Tensor) -> Tensor:
        if autocast_dtype(x.device.type) is not None:
            return fast_layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)
        return F.layer_norm(x, self.normalized_shape, self.weight, self.bias, self.eps)


class MLP(nn.Module):
    """ViT's feed-forward layer: Linear, GELU, Linear."""

    def __init__(self, dim: int, hidden: int) -> None:
        super().__init__()
        self.fc1 = nn.Linear(dim, hidden)
        self.act = nn.GELU()
        self.fc2 = nn.Linear(hidden, dim)

    def forward(self, x: Tensor) -> Tensor:
        return self.fc2(self.act(self.fc1(x)))


class Block(nn.Module):
    """`Z = Z + Attn(LN(Z))`, then either `Z = ISTA(LN(Z))` (CRATE/CBT: no residual around
    ISTA) or `Z = Z + MLP(LN(Z))` (ViT). `norm_eps`: the LayerNorms' epsilon (timm's ViTs use
    1e-6, PyTorch's default is 1e-5)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        attention: str,
        attn_options: dict[str, Any],
        block: str = "ista",
        ista_step: float = 0.1,
        ista_lambda: float = 0.1,
        mlp_ratio: float = 4.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        if block not in BLOCK_TYPES:
            raise ValueError(f"unknown block type {block!r}; known: {', '.join(BLOCK_TYPES)}")
        self.residual_mlp = block == "mlp"
        self.norm1 = LayerNorm(dim, eps=norm_eps)
        self.attn = create_attention(attention, dim, num_heads, **attn_options)
        self.norm2 = LayerNorm(dim, eps=norm_eps)
        self.mlp: nn.Module = (
            MLP(dim, int(dim * mlp_ratio))
            if self.residual_mlp
            else ISTA(dim, step=ista_step, lambd=ista_lambda)
        )

    def forward(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        x = x + self.attn(self.norm1(x), grid_size)
        out = self.mlp(self.norm2(x))
        return x + out if self.residual_mlp else out
