"""Coding rates (eq. 1, 2 of the paper; CBSA_MATH.md).

R(X)  = 1/2 logdet(I + alpha X^T X),  alpha = p / (N eps^2)   for N tokens of width p (rows of X)
Rc(Z | U) = sum_k R(Z U_k)                                       the compression term

`squared_eps=False` gives the reference code's measurement, alpha = p / (N eps) (its eps = 0.01):
say which one a figure uses. Everything is batched over leading dimensions and computed through a
Cholesky factor of the smaller Gram matrix (p x p or N x N: the two logdets are equal), in
float64 unless told otherwise.
"""

from __future__ import annotations

import torch
from torch import Tensor


def coding_rate(
    x: Tensor, eps: float = 0.5, *, squared_eps: bool = True, dtype: torch.dtype = torch.float64
) -> Tensor:
    """R of the rows of `x` (..., N, p) -> (...)."""
    x = x.to(dtype)
    n, p = x.shape[-2], x.shape[-1]
    alpha = p / (n * (eps**2 if squared_eps else eps))
    gram = x.transpose(-1, -2) @ x if p <= n else x @ x.transpose(-1, -2)
    eye = torch.eye(gram.shape[-1], dtype=dtype, device=x.device)
    chol = torch.linalg.cholesky(eye + alpha * gram)
    return torch.log(torch.diagonal(chol, dim1=-2, dim2=-1)).sum(-1)  # 1/2 logdet


def subspace_bases(qkv_weight: Tensor, num_heads: int) -> Tensor:
    """The K bases U_k (K, d, p) of a white-box attention layer from its projection weight
    (K*p, d), as `nn.Linear` stores it."""
    kp, d = qkv_weight.shape
    return qkv_weight.reshape(num_heads, kp // num_heads, d).transpose(-1, -2)


def compression_term(
    z: Tensor,
    bases: Tensor,
    eps: float = 0.5,
    *,
    normalize: bool = False,
    squared_eps: bool = True,
) -> Tensor:
    """Rc(Z | U) = sum_k R(Z U_k) for tokens `z` (..., N, d) and bases (K, d, p) -> (...).

    With `normalize`, every token is scaled to unit length first (the paper's second panel)."""
    z = z.to(torch.float64)
    if normalize:
        z = z / z.norm(dim=-1, keepdim=True).clamp_min(1e-12)
    projected = z.unsqueeze(-3) @ bases.to(torch.float64)  # (..., K, N, p)
    return coding_rate(projected, eps, squared_eps=squared_eps).sum(-1)
