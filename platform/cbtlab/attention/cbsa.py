"""Contract-and-Broadcast Self-Attention (CBSA), eqs. 5-8 of the paper (see CBSA_MATH.md).

Per head k, with W = Z U_k the tokens projected on the head's subspace (N x p):
  Q0 = pool(W over the patch grid)                  initial guess, m = g_h * g_w representatives
  A  = softmax_r(s Q0 W^T)                           extraction weights (m x N)
  Q  = Q0 + eta_rep * A W                            representatives
  C  = softmax_r(s Q Q^T) Q                          contraction (eq. 8; eq. 7 or none optional)
  dW = eta_x * A^T C                                 broadcast back to all N tokens
The cost is O(N m p) per head: no N x N matrix is ever formed.

Three implementations compute the same function (tests hold them together):
- on CUDA, Triton kernels (`cbtlab.attention.cbsa_triton`) that never store A: the extraction is
  attention of the m representatives over the N tokens with an online softmax, the broadcast is
  attention of each token over the m representatives with their log-sum-exps as bias. The layer
  and `cbsa_mixing` take them for CUDA tensors (`CBSA.use_kernels`, `cbsa_mixing(impl=...)`).
- `forward_reference`: the equations above as written, head by head in batched form. Used to
  count FLOPs (so that counts match the paper's) and as the ground truth.
- the fused form (the default on CPUs once N >= 6 m, where it is faster), which folds the
  projections into the representatives' side so that the N-sized work is three GEMMs per
  sample on the tokens as they lie, (N, d), with no head split, transposed copies or merge:
      Qx = s Q0 U_k^T stacked over heads (K m x d)     L = Qx Z^T (K m x N),  A = softmax_r(L)
      A W_k = (A Z) U_k                                  (the m x p aggregation, from A Z: K m x d)
      out = A^T G + b,  G_k = eta_x C_k P_k^T            (P_k: head k's slice of the output map)
  A is stored once (K m x N per sample) and reused by both products and by the backward pass,
  whose two GEMM pairs are written out (`_ExtractAggregate`, `_Broadcast`) so that every
  gradient lands in the layout of the tensor it belongs to. Inside those functions the samples
  are processed in chunks whose share of A holds about `CHUNK_ELEMENTS` numbers (2 MiB in
  float32), each written into preallocated outputs, so that one chunk's A and Z stay in the
  CPU's cache: this keeps the time linear in N where the plain form slows down once its tensors
  outgrow the cache. Average pooling by equal tiles (`TilePool`) sums in two contiguous stages
  and writes its gradient in one pass; in the mechanism (`cbsa_mixing`) it runs inside the
  extraction, chunk by chunk, backward included.
"""

from __future__ import annotations

import importlib.util
from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbtlab.attention.common import (
    STEP_INITS,
    SubspaceAttention,
    TilePool,
    autocast_dtype,
    init_steps,
    merge_heads,
    pool_grid,
    window_grid,
)
from cbtlab.attention.registry import register_attention

__all__ = ["CBSA", "STEP_INITS", "cbsa_mixing", "init_steps", "pool_grid", "window_grid"]

CONTRACTIONS = ("softmax", "exact", "none")
# Entries of A per chunk of rows in the fused forms (at least one row per chunk). Measured on a
# 2-core CPU (32 MiB L3), mechanism at m = 64, batch 8 x 3 heads: 2 or 5 heads per chunk at
# 3,136 tokens run 1.1-1.25x faster than one; at 12,544 tokens one head (0.8 M entries) runs
# 1.1-1.2x faster than two or three.
CHUNK_ELEMENTS = 2**19
# The fused form runs from this many tokens per representative up. Below, the representatives'
# side (K m x d products) costs as much as the tokens' side and the reference form is faster
# (measured on CPU: 0.6-0.8x at N = 3 m, even at N = 6 m, 1.2-1.5x from N = 12 m).
FUSED_MIN_TOKENS_PER_REP = 6
# On CUDA the layer and `cbsa_mixing` run the Triton kernels (`cbsa_triton`), imported on first
# use: Triton is optional (it comes with PyTorch's Linux CUDA builds).
TRITON_INSTALLED = importlib.util.find_spec("triton") is not None
IMPLS = ("auto", "triton", "fused")


def _kernels() -> Any:
    """The kernel module, imported on first use."""
    if not TRITON_INSTALLED:
        raise RuntimeError("the CBSA kernels need Triton (pip install triton)")
    from cbtlab.attention import cbsa_triton  # Triton is heavy and optional: import on use

    return cbsa_triton


def _chunks(rows: int, row_size: int) -> list[slice]:
    """Slices of the leading dimension (samples, or samples x heads) whose rows of A, of
    `row_size` entries each, hold about `CHUNK_ELEMENTS` entries; at least one row each."""
    step = max(1, CHUNK_ELEMENTS // row_size)
    return [slice(i, min(rows, i + step)) for i in range(0, rows, step)]


def _softmax_(x: Tensor) -> Tensor:
    """Softmax over the last dimension, in place."""
    return torch.ops.aten._softmax.out(x, -1, False, out=x)


def _accumulate_bmm(out: Tensor, batch1: Tensor, batch2: Tensor, alpha: float = 1.0) -> None:
    """out += alpha batch1 @ batch2, in place. One `addmm_` per matrix: the batched `baddbmm_`
    computes into a temporary and copies it over `out`, a pass of the tokens' size."""
    for i in range(out.shape[0]):
        out[i].addmm_(batch1[i], batch2[i], alpha=alpha)


def _extract(qx: Tensor, z: Tensor, attn: Tensor, az: Tensor, scale: float) -> None:
    """attn = softmax_r(scale Qx Z^T), az = attn Z, into the given buffers (one chunk)."""
    torch.baddbmm(attn, qx, z.transpose(1, 2), beta=0, alpha=scale, out=attn)
    _softmax_(attn)
    torch.bmm(attn, z, out=az)


def _extract_backward(
    qx: Tensor,
    z: Tensor,
    attn: Tensor,
    grad_attn: Tensor | None,
    grad_az: Tensor | None,
    scale: float,
    grad_qx: Tensor,
    grad_z: Tensor,
) -> None:
    """The gradients of Qx and Z through `_extract` (one chunk), into `grad_qx` and `grad_z`.
    `grad_attn` (the broadcast's fresh buffer) is overwritten."""
    if grad_attn is None:
        grad_attn = torch.zeros_like(attn)
    if grad_az is not None:
        _accumulate_bmm(grad_attn, grad_az, z.transpose(1, 2))  # dL/dA in full
    grad = torch.ops.aten._softmax_backward_data.out(
        grad_attn, attn, -1, attn.dtype, grad_input=grad_attn
    )
    torch.baddbmm(grad_qx, grad, z, beta=0, alpha=scale, out=grad_qx)
    if grad_az is None:
        torch.baddbmm(grad_z, grad.transpose(1, 2), qx, beta=0, alpha=scale, out=grad_z)
    else:
        torch.bmm(attn.transpose(1, 2), grad_az, out=grad_z)
        _accumulate_bmm(grad_z, grad.transpose(1, 2), qx, alpha=scale)


class _ExtractAggregate(torch.autograd.Function):
    """(Qx, Z) -> (A, A Z) with A = softmax_r(Qx Z^T), batched over the leading dimension.

    Qx: (B, R, d), Z: (B, N, d) -> A: (B, R, N), A Z: (B, R, d). The backward pass takes the
    gradient of A from its other consumer (`_Broadcast`) and of A Z, and returns those of Qx
    and Z without forming anything bigger than A. Both passes run chunk by chunk (`_chunks`)
    into preallocated outputs, so that one chunk's A and Z stay in the CPU's cache."""

    @staticmethod
    def forward(ctx, qx: Tensor, z: Tensor) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        b, n, d = z.shape
        attn, az = z.new_empty(b, qx.shape[1], n), z.new_empty(b, qx.shape[1], d)
        for rows in _chunks(b, qx.shape[1] * n):
            _extract(qx[rows], z[rows], attn[rows], az[rows], 1.0)
        ctx.save_for_backward(qx, z, attn)
        ctx.set_materialize_grads(False)
        return attn, az

    @staticmethod
    def backward(ctx, grad_attn: Tensor | None, grad_az: Tensor | None) -> tuple[Tensor, Tensor]:  # type: ignore[override]
        qx, z, attn = ctx.saved_tensors
        grad_qx, grad_z = torch.empty_like(qx), torch.empty_like(z)
        for rows in _chunks(z.shape[0], attn.shape[1] * attn.shape[2]):
            _extract_backward(
                qx[rows], z[rows], attn[rows], None if grad_attn is None else grad_attn[rows],
                None if grad_az is None else grad_az[rows], 1.0, grad_qx[rows], grad_z[rows],
            )  # fmt: skip
        return grad_qx, grad_z


class _Broadcast(torch.autograd.Function):
    """out = A^T G (+ bias): (B, R, N), (B, R, c), (c,) or None -> (B, N, c); dA comes back as
    (B, R, N), the layout of A. Chunked as `_ExtractAggregate`."""

    @staticmethod
    def forward(ctx, attn: Tensor, g: Tensor, bias: Tensor | None) -> Tensor:  # type: ignore[override]
        b, _, n = attn.shape
        out = attn.new_empty(b, n, g.shape[2])
        for rows in _chunks(b, attn.shape[1] * n):
            a_t = attn[rows].transpose(1, 2)
            if bias is None:
                torch.bmm(a_t, g[rows], out=out[rows])
            else:
                torch.baddbmm(bias, a_t, g[rows], out=out[rows])
        ctx.save_for_backward(attn, g)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor, Tensor, Tensor | None]:  # type: ignore[override]
        attn, g = ctx.saved_tensors
        grad_attn, grad_g = torch.empty_like(attn), torch.empty_like(g)
        for rows in _chunks(attn.shape[0], attn.shape[1] * attn.shape[2]):
            torch.bmm(g[rows], grad_out[rows].transpose(1, 2), out=grad_attn[rows])
            torch.bmm(attn[rows], grad_out[rows], out=grad_g[rows])
        grad_bias = grad_out.sum(dim=(0, 1)) if ctx.needs_input_grad[2] else None
        return grad_attn, grad_g, grad_bias


def _softmax_contraction(q: Tensor) -> Tensor:
    return F.scaled_dot_product_attention(q, q, q)


class _Mixing(torch.autograd.Function):
    """The whole token mixing of `cbsa_mixing` in one function, chunk by chunk of rows (a row is
    one head of one sample; `_chunks`), so that each chunk's A is used while it is in the CPU's
    cache and nothing of the tokens' size is written that the result does not need. Forward,
    per chunk: pool Q0, form A (kept for the backward pass, one tensor per chunk) and A Z, the
    small middle (Q = Q0 + eta_rep A Z, C = eta_x contract(Q)), the broadcast A^T C. Backward,
    per chunk: dC = A dOut, the middle's gradient (recomputed; written out for the softmax
    contraction, by autograd on the m-sized tensors for any other), dL/dA = C dOut^T + dAZ Z^T
    in one reused buffer, the extraction's gradient, and the pooling's folded into Z's."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        z: Tensor,
        q0: Tensor | None,
        step_rep: Tensor,
        step_x: Tensor,
        pool: TilePool | None,
        contract: Callable[[Tensor], Tensor],
    ) -> Tensor:
        rows_total, n, p = z.shape
        reps = step_rep.repeat(rows_total // step_rep.numel())  # row b K + k: head k's step
        xs = step_x.repeat(rows_total // step_x.numel())
        given = q0 is not None
        if q0 is None:
            q0 = z.new_empty(rows_total, pool.count, p)
        attn, az, out = [], z.new_empty(rows_total, q0.shape[1], p), torch.empty_like(z)
        for rows in _chunks(rows_total, q0.shape[1] * n):
            if not given:
                pool.mean(z[rows], out=q0[rows])
            attn.append(z.new_empty(rows.stop - rows.start, q0.shape[1], n))
            _extract(q0[rows], z[rows], attn[-1], az[rows], p**-0.5)
            c = _mixing_middle(q0[rows], az[rows], reps[rows], xs[rows], contract)
            torch.bmm(attn[-1].transpose(1, 2), c, out=out[rows])
        ctx.pool, ctx.contract, ctx.given, ctx.heads = pool, contract, given, step_rep.numel()
        ctx.save_for_backward(z, q0, az, reps, xs, *attn)
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        z, q0, az, reps, xs, *attn = ctx.saved_tensors
        rows_total, n, p = z.shape
        grad_z, grad_q0 = torch.empty_like(z), torch.empty_like(q0)
        grad_reps, grad_xs = torch.empty_like(reps), torch.empty_like(xs)
        scratch = z.new_empty(attn[0].shape) if attn else None
        for rows, a in zip(_chunks(rows_total, q0.shape[1] * n), attn, strict=True):
            go = grad_out[rows].contiguous()  # once, not inside each product (e.g. sum()'s)
            middle = (q0[rows], az[rows], reps[rows], xs[rows])
            if ctx.contract is _softmax_contraction:
                c, grads = _softmax_middle_backward(*middle, torch.bmm(a, go))
            else:
                with torch.enable_grad():
                    leaves = [t.detach().requires_grad_() for t in middle]
                    c = _mixing_middle(*leaves, ctx.contract)
                    grads = torch.autograd.grad(c, leaves, torch.bmm(a, go))
            grad_attn = scratch[: a.shape[0]]
            torch.bmm(c.detach(), go.transpose(1, 2), out=grad_attn)
            _extract_backward(
                q0[rows], z[rows], a, grad_attn, grads[1], p**-0.5, grad_q0[rows], grad_z[rows]
            )
            grad_q0[rows] += grads[0]
            grad_reps[rows], grad_xs[rows] = grads[2], grads[3]
            if not ctx.given:
                ctx.pool.add_back(grad_q0[rows], grad_z[rows])
        return (
            grad_z,
            grad_q0 if ctx.given else None,
            grad_reps.view(-1, ctx.heads).sum(0),
            grad_xs.view(-1, ctx.heads).sum(0),
            None,
            None,
        )


def _softmax_middle_backward(
    q0: Tensor, az: Tensor, step_rep: Tensor, step_x: Tensor, grad_c: Tensor
) -> tuple[Tensor, tuple[Tensor, Tensor, Tensor, Tensor]]:
    """`_mixing_middle` with the softmax contraction, recomputed, and its gradients written
    out (autograd costs more than this arithmetic on m x m matrices): C and the gradients of
    (Q0, A Z, eta_rep, eta_x)."""
    scale = q0.shape[-1] ** -0.5
    q = torch.addcmul(q0, step_rep.view(-1, 1, 1), az)
    probs = torch.softmax(torch.bmm(q, q.transpose(1, 2)).mul_(scale), dim=-1)
    y = torch.bmm(probs, q)
    grad_x = (grad_c * y).sum(dim=(1, 2))
    grad_y = grad_c * step_x.view(-1, 1, 1)
    grad_s = torch._softmax_backward_data(torch.bmm(grad_y, q.transpose(1, 2)), probs, -1, q.dtype)
    grad_q = torch.bmm(probs.transpose(1, 2), grad_y)
    grad_q.baddbmm_(grad_s + grad_s.transpose(1, 2), q, alpha=scale)
    grad_rep = (grad_q * az).sum(dim=(1, 2))
    return y * step_x.view(-1, 1, 1), (grad_q, grad_q * step_rep.view(-1, 1, 1), grad_rep, grad_x)


def _mixing_middle(
    q0: Tensor, az: Tensor, step_rep: Tensor, step_x: Tensor, contract: Callable[[Tensor], Tensor]
) -> Tensor:
    """C = eta_x contract(Q0 + eta_rep A Z) on rows (R, m, p), with each row's steps (R,)."""
    q = q0 + step_rep.view(-1, 1, 1) * az
    return step_x.view(-1, 1, 1) * contract(q)


def cbsa_mixing(
    w: Tensor,
    step_rep: Tensor,
    step_x: Tensor,
    *,
    grid_size: tuple[int, int],
    rep_grid: tuple[int, int] = (8, 8),
    q0: Tensor | None = None,
    contract: Callable[[Tensor], Tensor] = _softmax_contraction,
    impl: str = "auto",
) -> Tensor:
    """CBSA's token mixing on projected tokens, without the projections: W (B, K, N, p) ->
    eta_x A^T C (B, K, N, p). Q0 is W's patch grid `grid_size` (N = H W, no prefix tokens)
    average-pooled to `rep_grid`, or the given `q0` (B, K, m, p).

    `impl`: "triton" runs the kernels (`cbsa_triton`, softmax contraction only), "fused" the
    CPU-tuned form with its hand-written backward pass (`_Mixing`, any `contract`), "auto" the
    kernels on CUDA tensors with the softmax contraction and the fused form otherwise.
    This is the operation to set against `scaled_dot_product_attention(q, k, v)` when
    comparing mechanisms rather than layers (`cbtlab.perf`)."""
    if impl not in IMPLS:
        raise ValueError(f"unknown impl {impl!r}; known: {', '.join(IMPLS)}")
    softmax = contract is _softmax_contraction
    if impl == "triton" and not softmax:
        raise ValueError("the CBSA kernels contract by softmax; pass impl='fused' for another")
    if impl == "triton" or (impl == "auto" and softmax and w.is_cuda and TRITON_INSTALLED):
        if q0 is None:
            q0 = pool_grid(w, grid_size, rep_grid, "avg")
        return _kernels().cbsa_mixing_kernels(w, q0, step_rep, step_x)
    b, k, n, p = w.shape
    pool = None
    if q0 is None:
        if TilePool.fits(grid_size, rep_grid):
            pool = TilePool(grid_size, rep_grid)
        else:
            q0 = pool_grid(w, grid_size, rep_grid, "avg")
    rows_q0 = None if q0 is None else q0.reshape(b * k, -1, p)
    out = _apply_in_autocast_dtype(
        _Mixing, w.reshape(b * k, n, p), rows_q0, step_rep, step_x, pool, contract
    )
    return out.view(b, k, n, p)


def _apply_in_autocast_dtype(fn: type[torch.autograd.Function], *args: Any) -> Any:
    """`fn.apply(*args)`; under autocast, with the tensors in autocast's dtype and autocast off
    inside, so that the hand-written backward meets a single dtype (autocast would leave the
    softmax in float32 and the products in bfloat16, and does not reach the backward)."""
    device = next(a for a in args if isinstance(a, Tensor)).device.type
    dtype = autocast_dtype(device)
    if dtype is None:
        return fn.apply(*args)
    with torch.autocast(device, enabled=False):
        return fn.apply(*(a.to(dtype) if isinstance(a, Tensor) else a for a in args))


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
        # The Triton kernels: None runs them on CUDA tensors (when Triton is installed), True
        # always (off CUDA only under TRITON_INTERPRET=1), False never.
        self.use_kernels: bool | None = None

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
        if not self.fused:  # the equations as written were asked for (e.g. to count FLOPs)
            return self.forward_reference(x, grid_size)
        if self.use_kernels or (self.use_kernels is None and x.is_cuda and TRITON_INSTALLED):
            return self._forward_kernels(x, grid_size)
        if x.shape[1] < FUSED_MIN_TOKENS_PER_REP * self.num_representatives:
            return self.forward_reference(x, grid_size)
        return self._forward_fused(x, grid_size)

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

    def _forward_kernels(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """The equations on the projected tokens with the kernels. The mixing's output keeps
        the projection's (B, N, K, p) memory layout, so merging the heads is a view. Q0 is
        pooled from the tokens as they lie and then projected (as in the fused form)."""
        w = self.project(x)  # (B, K, N, p), a view of (B, N, K p)
        q0 = self._initial_guess_fused(x, grid_size)
        if self.stop_grad_init:
            q0 = q0.detach()
        dw = _kernels().cbsa_mixing_kernels(
            w, q0, self.step_rep, self.step_x, scale=self.scale, contraction=self.contraction,
            beta=self.contraction_beta,
        )  # fmt: skip
        return self.proj(merge_heads(dw))

    def _forward_fused(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        b, _, d = x.shape
        k, p = self.num_heads, self.head_dim
        u = self.qkv.weight.view(k, p, d)  # U_k^T, one (p x d) block per head
        q0 = self._initial_guess_fused(x, grid_size)  # (B, K, m, p)
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

    def _initial_guess_fused(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        """Q0 without projecting all N tokens: average pooling commutes with the projection,
        so the (few) pooled tokens are projected instead (by the projection layer itself, so
        that autocast casts its weight once per step). Max pooling does not commute; it
        projects the tokens first, as the reference form does."""
        if self.rep_queries is not None:
            return self.initial_guess(x, grid_size)  # only the batch size is read
        if self.rep_pool == "max":
            return self.initial_guess(self.project(x), grid_size)
        pooled = self._pool(x.unsqueeze(1), grid_size)  # (B, 1, m, d)
        return self.project(pooled[:, 0])  # (B, K, m, p)

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
