"""Contract-and-Broadcast Self-Attention (CBSA), eqs. 5-8 of the paper (see CBSA_MATH.md).

Per head k, with W = Z U_k the tokens projected on the head's subspace (N x p):
  Q0 = pool(W over the patch grid)                  initial guess, m = g_h * g_w representatives
  A  = softmax_r(s Q0 W^T)                           extraction weights (m x N)
  Q  = Q0 + eta_rep * A W                            representatives
  C  = softmax_r(s Q Q^T) Q                          contraction (eq. 8; eq. 7 or none optional)
  dW = eta_x * A^T C                                 broadcast back to all N tokens
The cost is O(N m p) per head: no N x N matrix is ever formed.

Two implementations compute the same function (tests hold them together):
- `forward_reference`: the equations above as written, head by head in batched form. Used to
  count FLOPs (so that counts match the paper's) and as the ground truth.
- the fused form (the default once N >= 6 m, where it is faster), which folds the projections
  into the representatives' side so that the N-sized work is three GEMMs per sample on the
  tokens as they lie, (N, d), with no head split, transposed copies or merge:
      Qx = s Q0 U_k^T stacked over heads (K m x d)     L = Qx Z^T (K m x N),  A = softmax_r(L)
      A W_k = (A Z) U_k                                  (the m x p aggregation, from A Z: K m x d)
      out = A^T G + b,  G_k = eta_x C_k P_k^T            (P_k: head k's slice of the output map)
  A is stored once (K m x N per sample) and reused by both products and by the backward pass,
  whose two GEMM pairs are written out (`_ExtractAggregate`, `_Broadcast`) so that every
  gradient lands in the layout of the tensor it belongs to. Samples are processed in chunks of
  about `CHUNK_TOKENS` tokens, so that one chunk's A and Z stay in the CPU's cache: this keeps
  the time linear in N where the plain form slows down once its tensors outgrow the cache.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

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

__all__ = ["CBSA", "STEP_INITS", "cbsa_mixing", "init_steps", "pool_grid", "window_grid"]

CONTRACTIONS = ("softmax", "exact", "none")
# Tokens per chunk of samples in the fused form (at least one sample per chunk).
CHUNK_TOKENS = 4096
# The fused form runs from this many tokens per representative up. Below, the representatives'
# side (K m x d products) costs as much as the tokens' side and the reference form is faster
# (measured on CPU: 0.6-0.8x at N = 3 m, even at N = 6 m, 1.2-1.5x from N = 12 m).
FUSED_MIN_TOKENS_PER_REP = 6


class _ExtractAggregate(torch.autograd.Function):
    """(Qx, Z) -> (A, A Z) with A = softmax_r(Qx Z^T); batched over samples.

    Qx: (B, R, d), Z: (B, N, d) -> A: (B, R, N), A Z: (B, R, d). The backward pass takes the
    gradient of A from its other consumer (`_Broadcast`) and of A Z, and returns those of Qx
    and Z without forming anything bigger than A."""

    @staticmethod
    def forward(ctx, qx: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        attn = torch.softmax(torch.bmm(qx, z.transpose(1, 2)), dim=-1)
        ctx.save_for_backward(qx, z, attn)
        return attn, torch.bmm(attn, z)

    @staticmethod
    def backward(ctx, grad_attn: Tensor | None, grad_az: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        qx, z, attn = ctx.saved_tensors
        # dL/dA in full: the broadcast's share plus dAZ Z^T.
        if grad_attn is None:
            grad = torch.bmm(grad_az, z.transpose(1, 2))
        else:
            grad = torch.baddbmm(grad_attn, grad_az, z.transpose(1, 2))
        grad = torch._softmax_backward_data(grad, attn, -1, attn.dtype)
        grad_qx = torch.bmm(grad, z)
        grad_z = torch.baddbmm(torch.bmm(attn.transpose(1, 2), grad_az), grad.transpose(1, 2), qx)
        return grad_qx, grad_z


class _Broadcast(torch.autograd.Function):
    """out = A^T G (+ bias): (B, R, N), (B, R, c), (c,) or None -> (B, N, c); dA comes back as
    (B, R, N), the layout of A."""

    @staticmethod
    def forward(ctx, attn: Tensor, g: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        ctx.save_for_backward(attn, g)
        if bias is None:
            return torch.bmm(attn.transpose(1, 2), g)
        return torch.baddbmm(bias, attn.transpose(1, 2), g)

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:  # type: ignore[override]
        attn, g = ctx.saved_tensors
        grad_attn = torch.bmm(g, grad_out.transpose(1, 2))
        grad_g = torch.bmm(attn, grad_out)
        grad_bias = grad_out.sum(dim=(0, 1)) if ctx.needs_input_grad[2] else None
        return grad_attn, grad_g, grad_bias


def cbsa_mixing(
    w: Tensor,
    q0: Tensor,
    step_rep: Tensor,
    step_x: Tensor,
    contract: Callable[[Tensor], Tensor] = lambda q: F.scaled_dot_product_attention(q, q, q),
) -> Tensor:
    """CBSA's token mixing on projected tokens, without the projections: W (B, K, N, p) and
    Q0 (B, K, m, p) -> eta_x A^T C (B, K, N, p), with the fused backward pass of the layer.

    This is the operation to set against `scaled_dot_product_attention(q, k, v)` when
    comparing mechanisms rather than layers (`cbtlab.perf`)."""
    b, k, n, p = w.shape
    chunk = max(1, CHUNK_TOKENS // n)
    if b > chunk:
        parts = zip(w.split(chunk), q0.split(chunk), strict=True)
        return torch.cat([cbsa_mixing(wp, qp, step_rep, step_x, contract) for wp, qp in parts])
    m = q0.shape[2]
    qx, z = (q0 * p**-0.5).reshape(b * k, m, p), w.reshape(b * k, n, p)
    attn, aw = _apply_in_autocast_dtype(_ExtractAggregate, qx, z)
    q = q0 + step_rep.view(1, k, 1, 1) * aw.view(b, k, m, p)
    c = step_x.view(1, k, 1, 1) * contract(q)
    return _apply_in_autocast_dtype(_Broadcast, attn, c.reshape(b * k, m, p), None).view(b, k, n, p)


def _apply_in_autocast_dtype(fn: type[torch.autograd.Function], *args: Tensor | None) -> Any:
    """`fn.apply(*args)`; under autocast, with the tensors in autocast's dtype and autocast off
    inside, so that the hand-written backward meets a single dtype (autocast would leave the
    softmax in float32 and the products in bfloat16, and does not reach the backward)."""
    device = next(a for a in args if a is not None).device.type
    if not torch.is_autocast_enabled(device):
        return fn.apply(*args)
    dtype = torch.get_autocast_dtype(device)
    with torch.autocast(device, enabled=False):
        return fn.apply(*(a if a is None else a.to(dtype) for a in args))


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
        # The fused form (default) or the equations as written; same function, see the top.
        self.fused = True

    @property
    def num_representatives(self) -> int:
        return self.rep_grid[0] * self.rep_grid[1]

    def pairwise_similarities(self, num_tokens: int) -> int:
        """Similarities of one image over all heads (`cbtlab.analysis.similarities`): per head,
        N m token-representative products for the extraction (A is formed once and reused by
        the aggregation and the broadcast) plus the m (m + 1) / 2 distinct pairs of the
        contraction's symmetric Gram Q Q^T (eq. 7 and 8; none without contraction)."""
        m = self.num_representatives
        contraction = 0 if self.contraction == "none" else m * (m + 1) // 2
        return self.num_heads * (num_tokens * m + contraction)

    def forward(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        if not self.fused or x.shape[1] < FUSED_MIN_TOKENS_PER_REP * self.num_representatives:
            return self.forward_reference(x, grid_size)
        chunk = max(1, CHUNK_TOKENS // x.shape[1])
        if x.shape[0] <= chunk:
            return self._forward_fused(x, grid_size)
        return torch.cat([self._forward_fused(part, grid_size) for part in x.split(chunk)])

    def forward_reference(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """The equations as written (see the module docstring); same result as `forward`."""
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

    def _forward_fused(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        b, _, d = x.shape
        k, p = self.num_heads, self.head_dim
        u = self.qkv.weight.view(k, p, d)  # U_k^T, one (p x d) block per head
        q0 = self._initial_guess_fused(x, grid_size, u)  # (B, K, m, p)
        if self.stop_grad_init:
            q0 = q0.detach()
        m = q0.shape[2]
        qx = ((q0 * self.scale) @ u).reshape(b, k * m, d)  # (B, K m, d)
        attn, az = _apply_in_autocast_dtype(_ExtractAggregate, qx, x)  # (B, K m, N), (B, K m, d)
        aw = az.view(b, k, m, d) @ u.transpose(1, 2)  # A W_k: (B, K, m, p)
        q = q0 + self.step_rep.view(1, k, 1, 1) * aw
        c = self.step_x.view(1, k, 1, 1) * self.contract(q)  # (B, K, m, p)
        # G_k = eta_x C_k P_k^T with P_k = proj.weight[:, k p : (k + 1) p].
        g = c @ self.proj.weight.view(d, k, p).permute(1, 2, 0)  # (B, K, m, d)
        return _apply_in_autocast_dtype(_Broadcast, attn, g.reshape(b, k * m, d), self.proj.bias)

    def _initial_guess_fused(self, x: Tensor, grid_size: tuple[int, int], u: Tensor) -> Tensor:
        """Q0 without projecting all N tokens: average pooling commutes with the projection,
        so the (few) pooled tokens are projected instead. Max pooling does not commute; it
        projects the tokens first, as the reference form does."""
        if self.rep_queries is not None:
            return self.initial_guess(x, grid_size)  # only the batch size is read
        if self.rep_pool == "max":
            return self.initial_guess(self.project(x), grid_size)
        pooled = self._pool(x.unsqueeze(1), grid_size)  # (B, 1, m, d)
        return pooled @ u.transpose(1, 2)  # (B, K, m, p)

    def _extract(self, q0: Tensor, w: Tensor) -> Tensor:
        return torch.softmax((q0 * self.scale) @ w.transpose(-1, -2), dim=-1)

    def extraction(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """The extraction matrix A of every head: (B, K, m, N)."""
        w = self.project(x)
        return self._extract(self.initial_guess(w, grid_size), w)

    def representatives(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """The representatives Q of every head after the extraction step (eq. 5) and before the
        contraction, `Q = Q0 + eta_rep A W`: (B, K, m, p). The arithmetic of
        `forward_reference`, for analysis (e.g. their coding rate, Fig. 6)."""
        w = self.project(x)  # (B, K, N, p)
        q0 = self.initial_guess(w, grid_size)  # (B, K, m, p)
        attn = self._extract(q0, w)  # (B, K, m, N)
        return q0 + self.step_rep.view(1, -1, 1, 1) * (attn @ w)

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
        return self._pool(w, grid_size)

    def _pool(self, tokens: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """Pool the patch grid of tokens (B, K, N, c) to the representatives (B, K, m, c)."""
        if self.legacy_pool:
            grid_tokens = tokens[:, :, : grid_size[0] * grid_size[1]]
        else:
            grid_tokens = tokens[:, :, self.num_prefix_tokens :]
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
