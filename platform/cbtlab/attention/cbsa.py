"""Contract-and-Broadcast Self-Attention (CBSA), eqs. 5-8 of the paper (see CBSA_MATH.md).

Per head k, with W = Z U_k the tokens projected on the head's subspace (N x p):
  Q0 = pool(W over the patch grid)                  initial guess, m = g_h * g_w representatives
  A  = softmax_r(s Q0 W^T)                           extraction weights (m x N)
  Q  = Q0 + eta_rep * A W                            representatives
  C  = softmax_r(s Q Q^T) Q                          contraction (eq. 8; eq. 7 or none optional)
  dW = eta_x * A^T C                                 broadcast back to all N tokens
The cost is O(N m p) per head: no N x N matrix is ever formed.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbtlab.attention.common import (
    STEP_INITS,
    SubspaceAttention,
    init_steps,
    merge_heads,
    pool_grid,
    window_grid,
)
from cbtlab.attention.registry import register_attention

__all__ = ["CBSA", "STEP_INITS", "init_steps", "pool_grid", "window_grid"]

CONTRACTIONS = ("softmax", "exact", "none")


@register_attention("cbsa")
class CBSA(SubspaceAttention):
    """CBSA with a pooled initial guess, softmax contraction and learnable per-head steps.

    Args:
        dim: token width d.
        num_heads: K, the number of subspaces; head width p = d / K.
        num_prefix_tokens: tokens before the patch grid (CLS); they are attended to but not pooled.
        rep_grid: (g_h, g_w), the representatives' grid; m = g_h * g_w.
        rep_pool: "avg" or "max" pooling for the initial guess.
        rep_pool_kernel, rep_pool_stride: fixed (possibly overlapping) pooling windows instead
            of adaptive pooling; their output grid must equal `rep_grid`.
        stop_grad_init: detach Q0 (the paper) or not (the reference code).
        contraction: "softmax" (eq. 8), "exact" (eq. 7, `(I + beta Q Q^T)^-1 Q`) or "none".
        contraction_beta: beta of the exact contraction.
        step_init, step_scale: initialisation of eta_rep and eta_x (see `init_steps`).
        rep_init: "pool" (Q0 pooled from the tokens) or "learned" (Q0 a learned, input-independent
            m x p matrix per head, Appendix A).
        legacy_pool: reproduce the reference code's pooling, which pools the first H*W tokens
            (the CLS token and all patches but the last) as if they were the patch grid. Only for
            loading the released checkpoints exactly.
    """

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_prefix_tokens: int = 1,
        rep_grid: tuple[int, int] = (8, 8),
        rep_pool: str = "avg",
        rep_pool_kernel: int = 0,
        rep_pool_stride: int = 0,
        stop_grad_init: bool = False,
        contraction: str = "softmax",
        contraction_beta: float = 1.0,
        step_init: str = "normal",
        step_scale: float = 1.0,
        rep_init: str = "pool",
        legacy_pool: bool = False,
    ) -> None:
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens)
        if contraction not in CONTRACTIONS:
            raise ValueError(f"unknown contraction {contraction!r}; known: {CONTRACTIONS}")
        if rep_pool not in ("avg", "max"):
            raise ValueError(f"unknown rep_pool {rep_pool!r}; known: avg, max")
        if rep_init not in ("pool", "learned"):
            raise ValueError(f"unknown rep_init {rep_init!r}; known: pool, learned")
        self.rep_grid = (int(rep_grid[0]), int(rep_grid[1]))
        self.rep_pool = rep_pool
        self.rep_pool_kernel = rep_pool_kernel
        self.rep_pool_stride = rep_pool_stride
        self.stop_grad_init = stop_grad_init
        self.contraction = contraction
        self.contraction_beta = contraction_beta
        self.legacy_pool = legacy_pool
        self.register_parameter("rep_queries", None)
        if rep_init == "learned":
            m = self.rep_grid[0] * self.rep_grid[1]
            self.rep_queries = nn.Parameter(torch.randn(num_heads, m, self.head_dim) * 0.02)
        self.step_rep = nn.Parameter(torch.empty(num_heads))
        self.step_x = nn.Parameter(torch.empty(num_heads))
        init_steps(self.step_rep, step_init, step_scale)
        init_steps(self.step_x, step_init, step_scale)

    @property
    def num_representatives(self) -> int:
        return self.rep_grid[0] * self.rep_grid[1]

    def forward(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        k = self.num_heads
        w = self.project(x)  # (B, K, N, p)
        q0 = self.initial_guess(w, grid_size)  # (B, K, m, p)
        if self.stop_grad_init:
            q0 = q0.detach()
        attn = self._extract(q0, w)  # (B, K, m, N)
        q = q0 + self.step_rep.view(1, k, 1, 1) * (attn @ w)  # (B, K, m, p)
        c = self.contract(q)  # (B, K, m, p)
        dw = self.step_x.view(1, k, 1, 1) * (attn.transpose(-1, -2) @ c)  # (B, K, N, p)
        return self.proj(merge_heads(dw))

    def _extract(self, q0: Tensor, w: Tensor) -> Tensor:
        return torch.softmax((q0 * self.scale) @ w.transpose(-1, -2), dim=-1)

    def extraction(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """The extraction matrix A of every head: (B, K, m, N)."""
        w = self.project(x)
        return self._extract(self.initial_guess(w, grid_size), w)

    def attention_map(
        self, x: Tensor, grid_size: tuple[int, int], rows: Tensor | None = None
    ) -> Tensor:
        """The effective token-to-token map `A^T A`, only for the query tokens `rows`
        (default all): (B, K, R, N). Row i weighs how much token i draws from every token
        through the shared representatives."""
        attn = self.extraction(x, grid_size)  # (B, K, m, N)
        picked = attn if rows is None else attn[..., rows]
        return picked.transpose(-1, -2) @ attn

    def initial_guess(self, w: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """Q0 from the projected tokens w (B, K, N, p): pooled patch grid or learned queries."""
        if self.rep_queries is not None:
            return self.rep_queries.unsqueeze(0).expand(w.shape[0], -1, -1, -1)
        if self.legacy_pool:
            grid_tokens = w[:, :, : grid_size[0] * grid_size[1]]
        else:
            grid_tokens = w[:, :, self.num_prefix_tokens :]
        return pool_grid(
            grid_tokens,
            grid_size,
            self.rep_grid,
            self.rep_pool,
            kernel=self.rep_pool_kernel,
            stride=self.rep_pool_stride,
        )

    def contract(self, q: Tensor) -> Tensor:
        """The contraction step on the m representatives of every head: (B, K, m, p)."""
        if self.contraction == "softmax":
            # softmax_r(s Q Q^T) Q; SDPA's default scale is p ** -0.5 = s.
            return F.scaled_dot_product_attention(q, q, q)
        if self.contraction == "exact":
            m = q.shape[-2]
            eye = torch.eye(m, dtype=q.dtype, device=q.device)
            gram = eye + self.contraction_beta * (q @ q.transpose(-1, -2))  # (B, K, m, m), SPD
            return torch.cholesky_solve(q, torch.linalg.cholesky(gram))
        return q
