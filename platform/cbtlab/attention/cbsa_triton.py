"""CBSA's token mixing as Triton kernels, for GPUs (`cbsa_mixing` and the `CBSA` layer dispatch
here on CUDA; `cbtlab.attention.cbsa` holds the CPU forms and the equations).

Per head, with W (N x p) the projected tokens, Q0 (m x p) the initial guess and s = p ** -0.5:
  A = softmax_r(s Q0 W^T) (m x N),  AW = A W,  C = eta_x contract(Q0 + eta_rep AW),  out = A^T C.
A is never stored. Four kernels make up the forward and backward passes:
- `_extract_kernel`: attention of the m representatives over the N tokens with an online softmax
  (as flash attention does), giving AW and each row's log-sum-exp L. N is split over several
  programs when there are few (rows x representative blocks) to fill the GPU; their partial
  results are merged (`_merge_splits`).
- `_broadcast_kernel`: per block of tokens, out_j = sum_i exp(s q0_i . w_j - L_i) C_i over all m
  representatives: attention over m keys with bias -L and no normalisation. Q0, L and C are
  small and stay on chip.
- backward, with dOut given: dC = A dOut (`_reps_grad_kernel`, mode 0); the middle (m x p) in
  torch (`_middle_backward`), giving dQ0, dAW and the steps' gradients; then with
  dA_ij = C_i . dOut_j + dAW_i . W_j and D_i = sum_j A_ij dA_ij = C_i . dC_i + dAW_i . AW_i (no
  pass over N needed), dS = A * (dA - D):
  dQ0 += s dS W (`_reps_grad_kernel`, mode 1, a reduction over N per representative block) and
  dW = s dS^T Q0 + A^T dAW (`_tokens_grad_kernel`, a reduction over m per token block).
  Three passes over N in all, each recomputing A from Q0, W and L.
The kernels read and write the token tensors through their strides, so W may be the head-split
view of the projection's output (B, N, K p) and the output takes W's layout: merging the heads
back is then a view, not a copy. Products run in the inputs' dtype with float32 accumulation
(fp32 inputs in IEEE precision unless `torch.backends.cuda.matmul.allow_tf32`); AW, L, dC and the
middle are float32.

Each kernel is a custom op (`torch.ops.cbtlab.cbsa_*`, `torch.library`) with a fake
implementation, so `torch.compile` traces around it; the autograd wiring (`_KernelMixing`) is an
`autograd.Function` over those ops. On a CPU the kernels run only under Triton's interpreter
(`TRITON_INTERPRET=1` set before this module is imported), which the tests use at small sizes.
"""

from __future__ import annotations

import functools
import math
import os
from collections.abc import Callable
from dataclasses import dataclass
from typing import NamedTuple

import torch
import triton
import triton.language as tl
from torch import Tensor

from cbtlab.attention.common import autocast_dtype

__all__ = ["INTERPRETED", "cbsa_mixing_kernels", "kernels_run_on"]

LOG2E = 1.4426950408889634
# Read when this module is imported, as Triton reads it when the kernels are defined.
INTERPRETED = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
CONTRACTIONS = ("softmax", "exact", "none")


@dataclass(frozen=True)
class Tiling:
    """Block sizes and how N is split over programs. `chunk_align` must be a multiple of every
    BLOCK_N the kernels may use; a split covers at least `min_chunk` tokens; `programs` is how
    many programs a launch aims at (splits are added until the grid has about that many)."""

    block_m: int
    chunk_align: int
    min_chunk: int
    programs: int


@functools.cache
def _tiling(device: torch.device) -> Tiling:
    if device.type == "cuda":
        sms = torch.cuda.get_device_properties(device).multi_processor_count
        return Tiling(block_m=64, chunk_align=max(BLOCK_NS), min_chunk=512, programs=2 * sms)
    # The interpreter: small blocks, and splits even at small N so that tests exercise them.
    return Tiling(block_m=16, chunk_align=max(BLOCK_NS), min_chunk=32, programs=8)


TILING_OVERRIDE: Tiling | None = None  # tests set this to force other block sizes or splits


def kernels_run_on(device: torch.device) -> bool:
    """Whether the kernels can run on tensors of `device`: CUDA, or anything under the
    interpreter."""
    return device.type == "cuda" or INTERPRETED


# Token block sizes the kernels are tuned over (a chunk of a split holds whole blocks).
BLOCK_NS = (16,) if INTERPRETED else (64, 128)


def _configs() -> list[triton.Config]:
    """Autotuning candidates on a GPU, over the token block, warps and pipeline stages (one
    config under the interpreter, which does not time anything)."""
    if INTERPRETED:
        return [triton.Config({"BLOCK_N": BLOCK_NS[0]}, num_warps=1)]
    return [
        triton.Config({"BLOCK_N": block_n}, num_warps=warps, num_stages=stages)
        for block_n in BLOCK_NS
        for warps in (4, 8)
        for stages in (2, 3)
    ]


# Triton's interpreter multiplies bfloat16 blocks as their raw 16-bit integers (Triton 3.8): under
# it the products' operands are widened to float32 first; after any rounding the kernel itself
# does, so the interpreted kernels still round where the compiled ones do.
_WIDEN_DOT_OPERANDS = tl.constexpr(INTERPRETED)


@triton.jit
def _dot(a, b, acc, PREC: tl.constexpr):
    if _WIDEN_DOT_OPERANDS:
        a, b = a.to(tl.float32), b.to(tl.float32)
    return tl.dot(a, b, acc, input_precision=PREC)


@triton.jit
def _tokens(BASE, b, k, s_b, s_k, s_n, s_p, offs_n, offs_p):
    """Pointers to a (tokens, channels) tile of row (b, k) of a strided (B, K, N, P) tensor."""
    return BASE + b * s_b + k * s_k + offs_n[:, None] * s_n + offs_p[None, :] * s_p


# ---------------------------------------------------------------------------------------------
# Kernels. Programs index rows (b, k) of the (B, K, ...) tensors; Q0, L, C, dAW and D are
# contiguous (B K, M, P) / (B K, M); the token tensors (W, dOut, out, dW) are strided.


@triton.jit
def _extract_kernel(
    W, Q0, ACC, MAX, SUM,
    sw_b, sw_k, sw_n, sw_p,
    K, N, M, P, CHUNK, SPLITS, scale2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per (representative block, row, split): the online-softmax attention of Q0's block over
    the split's tokens. Writes the unnormalised sum ACC, the running maximum MAX and the sum of
    exponentials SUM (base 2, relative to MAX) of the split."""
    pid_m, row, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, k = (row // K).to(tl.int64), row % K  # 64-bit: b's offset may pass 2^31
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    mask_m, mask_p = offs_m < M, offs_p < P
    q = tl.load(
        Q0 + (row * M + offs_m[:, None]) * P + offs_p[None, :],
        mask=mask_m[:, None] & mask_p[None, :],
        other=0.0,
    )
    run_max = tl.full([BLOCK_M], float("-inf"), tl.float32)
    run_sum = tl.zeros([BLOCK_M], tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_P], tl.float32)
    start = split * CHUNK
    stop = tl.minimum(start + CHUNK, N)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_n = offs_n < stop
        mask_tok = mask_n[:, None] & mask_p[None, :]
        w = tl.load(_tokens(W, b, k, sw_b, sw_k, sw_n, sw_p, offs_n, offs_p), mask_tok, other=0.0)
        s = _dot(q, tl.trans(w), None, PREC) * scale2
        s = tl.where(mask_n[None, :], s, float("-inf"))
        new_max = tl.maximum(run_max, tl.max(s, 1))
        alpha = tl.exp2(run_max - new_max)
        probs = tl.exp2(s - new_max[:, None])
        run_sum = run_sum * alpha + tl.sum(probs, 1)
        acc = _dot(probs.to(w.dtype), w, acc * alpha[:, None], PREC)
        run_max = new_max
    part = (row * SPLITS + split) * M + offs_m
    tl.store(ACC + part[:, None] * P + offs_p[None, :], acc, mask=mask_m[:, None] & mask_p[None, :])
    tl.store(MAX + part, run_max, mask=mask_m)
    tl.store(SUM + part, run_sum, mask=mask_m)


@triton.jit
def _broadcast_kernel(
    W, Q0, LSE, C, OUT,
    sw_b, sw_k, sw_n, sw_p, so_b, so_k, so_n, so_p,
    K, N, M, P, scale2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per (token block, row): out_j = sum_i 2^(s2 q0_i . w_j - L_i) C_i over every
    representative i (L in base 2)."""
    pid_n, row = tl.program_id(0), tl.program_id(1)
    b, k = (row // K).to(tl.int64), row % K  # 64-bit: b's offset may pass 2^31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    mask_n, mask_p = offs_n < N, offs_p < P
    mask_tok = mask_n[:, None] & mask_p[None, :]
    w = tl.load(_tokens(W, b, k, sw_b, sw_k, sw_n, sw_p, offs_n, offs_p), mask_tok, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_P], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        small = (row * M + offs_m[:, None]) * P + offs_p[None, :]
        mask_small = mask_m[:, None] & mask_p[None, :]
        q = tl.load(Q0 + small, mask=mask_small, other=0.0)
        c = tl.load(C + small, mask=mask_small, other=0.0)
        lse = tl.load(LSE + row * M + offs_m, mask=mask_m, other=float("inf"))
        s = _dot(w, tl.trans(q), None, PREC) * scale2
        a = tl.exp2(s - lse[None, :])
        acc = _dot(a.to(c.dtype), c, acc, PREC)
    out = _tokens(OUT, b, k, so_b, so_k, so_n, so_p, offs_n, offs_p)
    tl.store(out, acc.to(OUT.dtype.element_ty), mask=mask_tok)


@triton.jit
def _reps_grad_kernel(
    W, Q0, LSE, DOUT, C, DAW, DELTA, PART,
    sw_b, sw_k, sw_n, sw_p, sd_b, sd_k, sd_n, sd_p,
    K, N, M, P, CHUNK, SPLITS, scale2,
    MODE: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per (representative block, row, split), a reduction over the split's tokens into PART:
    MODE 0: sum_j A_ij dOut_j (dC); MODE 1: sum_j dS_ij W_j (dQ0 / s), with
    dS_ij = A_ij (C_i . dOut_j + dAW_i . W_j - D_i)."""
    pid_m, row, split = tl.program_id(0), tl.program_id(1), tl.program_id(2)
    b, k = (row // K).to(tl.int64), row % K  # 64-bit: b's offset may pass 2^31
    offs_m = pid_m * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_p = tl.arange(0, BLOCK_P)
    mask_m, mask_p = offs_m < M, offs_p < P
    small = (row * M + offs_m[:, None]) * P + offs_p[None, :]
    mask_small = mask_m[:, None] & mask_p[None, :]
    q = tl.load(Q0 + small, mask=mask_small, other=0.0)
    lse = tl.load(LSE + row * M + offs_m, mask=mask_m, other=float("inf"))
    if MODE == 1:
        c = tl.load(C + small, mask=mask_small, other=0.0)
        daw = tl.load(DAW + small, mask=mask_small, other=0.0)
        delta = tl.load(DELTA + row * M + offs_m, mask=mask_m, other=0.0)
    acc = tl.zeros([BLOCK_M, BLOCK_P], tl.float32)
    start = split * CHUNK
    stop = tl.minimum(start + CHUNK, N)
    for n0 in range(start, stop, BLOCK_N):
        offs_n = n0 + tl.arange(0, BLOCK_N)
        mask_tok = (offs_n < stop)[:, None] & mask_p[None, :]
        w = tl.load(_tokens(W, b, k, sw_b, sw_k, sw_n, sw_p, offs_n, offs_p), mask_tok, other=0.0)
        do = tl.load(
            _tokens(DOUT, b, k, sd_b, sd_k, sd_n, sd_p, offs_n, offs_p), mask_tok, other=0.0
        )
        s = _dot(q, tl.trans(w), None, PREC) * scale2
        a = tl.where((offs_n < stop)[None, :], tl.exp2(s - lse[:, None]), 0.0)
        if MODE == 0:
            acc = _dot(a.to(do.dtype), do, acc, PREC)
        else:
            da = _dot(c, tl.trans(do), None, PREC)
            da = _dot(daw, tl.trans(w), da, PREC)
            ds = a * (da - delta[:, None])
            acc = _dot(ds.to(w.dtype), w, acc, PREC)
    part = (row * SPLITS + split) * M + offs_m
    tl.store(PART + part[:, None] * P + offs_p[None, :], acc, mask=mask_small)


@triton.jit
def _tokens_grad_kernel(
    W, Q0, LSE, DOUT, C, DAW, DELTA, DW,
    sw_b, sw_k, sw_n, sw_p, sd_b, sd_k, sd_n, sd_p, sg_b, sg_k, sg_n, sg_p,
    K, N, M, P, scale, scale2,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, BLOCK_P: tl.constexpr, PREC: tl.constexpr,
):  # fmt: skip
    """Per (token block, row): dW_j = s sum_i dS_ij Q0_i + sum_i A_ij dAW_i over every
    representative i."""
    pid_n, row = tl.program_id(0), tl.program_id(1)
    b, k = (row // K).to(tl.int64), row % K  # 64-bit: b's offset may pass 2^31
    offs_n = pid_n * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_p = tl.arange(0, BLOCK_P)
    mask_tok = (offs_n < N)[:, None] & (offs_p < P)[None, :]
    w = tl.load(_tokens(W, b, k, sw_b, sw_k, sw_n, sw_p, offs_n, offs_p), mask_tok, other=0.0)
    do = tl.load(_tokens(DOUT, b, k, sd_b, sd_k, sd_n, sd_p, offs_n, offs_p), mask_tok, other=0.0)
    acc = tl.zeros([BLOCK_N, BLOCK_P], tl.float32)
    for m0 in range(0, M, BLOCK_M):
        offs_m = m0 + tl.arange(0, BLOCK_M)
        mask_m = offs_m < M
        small = (row * M + offs_m[:, None]) * P + offs_p[None, :]
        mask_small = mask_m[:, None] & (offs_p < P)[None, :]
        q = tl.load(Q0 + small, mask=mask_small, other=0.0)
        c = tl.load(C + small, mask=mask_small, other=0.0)
        daw = tl.load(DAW + small, mask=mask_small, other=0.0)
        lse = tl.load(LSE + row * M + offs_m, mask=mask_m, other=float("inf"))
        delta = tl.load(DELTA + row * M + offs_m, mask=mask_m, other=0.0)
        s = _dot(w, tl.trans(q), None, PREC) * scale2
        a = tl.exp2(s - lse[None, :])  # (tokens, reps); 0 for masked representatives
        da = _dot(do, tl.trans(c), None, PREC)
        da = _dot(w, tl.trans(daw), da, PREC)
        ds = a * (da - delta[None, :]) * scale
        acc = _dot(ds.to(q.dtype), q, acc, PREC)
        acc = _dot(a.to(daw.dtype), daw, acc, PREC)
    grad_w = _tokens(DW, b, k, sg_b, sg_k, sg_n, sg_p, offs_n, offs_p)
    tl.store(grad_w, acc.to(DW.dtype.element_ty), mask=mask_tok)


_extract_tuned = triton.autotune(_configs(), key=["M", "P", "CHUNK"])(_extract_kernel)
_broadcast_tuned = triton.autotune(_configs(), key=["M", "P", "N"])(_broadcast_kernel)
_reps_grad_tuned = triton.autotune(_configs(), key=["M", "P", "CHUNK", "MODE"])(_reps_grad_kernel)
_tokens_grad_tuned = triton.autotune(_configs(), key=["M", "P", "N"])(_tokens_grad_kernel)


# ---------------------------------------------------------------------------------------------
# Launch helpers.


@dataclass(frozen=True)
class _Launch:
    """What every launch over (B, K, N, P) tokens and M representatives shares."""

    batch: int
    heads: int
    tokens: int
    reps: int
    width: int
    block_p: int
    precision: str
    tiling: Tiling

    @classmethod
    def of(cls, w: Tensor, q0: Tensor) -> _Launch:
        b, k, n, p = w.shape
        if q0.shape != (b, k, q0.shape[2], p):
            raise ValueError(f"q0 {tuple(q0.shape)} does not match the tokens {tuple(w.shape)}")
        tf32 = w.dtype == torch.float32 and torch.backends.cuda.matmul.allow_tf32
        precision = "tf32" if tf32 or w.dtype != torch.float32 else "ieee"
        tiling = TILING_OVERRIDE or _tiling(w.device)
        return cls(b, k, n, q0.shape[2], p, max(16, triton.next_power_of_2(p)), precision, tiling)

    @property
    def rows(self) -> int:
        return self.batch * self.heads

    @property
    def block_m(self) -> int:
        return max(16, min(self.tiling.block_m, triton.next_power_of_2(self.reps)))

    def splits(self) -> tuple[int, int]:
        """(splits, chunk): N cut into `splits` chunks of `chunk` tokens (a multiple of
        `chunk_align`), enough to give the launch about `tiling.programs` programs."""
        t = self.tiling
        programs = self.rows * triton.cdiv(self.reps, self.block_m)
        wanted = max(1, math.ceil(t.programs / programs))
        splits = max(1, min(wanted, self.tokens // t.min_chunk))
        chunk = triton.cdiv(triton.cdiv(self.tokens, splits), t.chunk_align) * t.chunk_align
        return triton.cdiv(self.tokens, chunk), chunk

    def constants(self) -> dict[str, int | str]:
        return {"BLOCK_M": self.block_m, "BLOCK_P": self.block_p, "PREC": self.precision}


def _sizes(launch: _Launch) -> tuple[int, int, int, int]:
    return launch.heads, launch.tokens, launch.reps, launch.width


def _token_blocks(launch: _Launch) -> Callable[[dict[str, int]], tuple[int, int]]:
    """The grid of the kernels with one program per (token block, row)."""
    return lambda meta: (triton.cdiv(launch.tokens, meta["BLOCK_N"]), launch.rows)


def _merge_splits(acc: Tensor, run_max: Tensor, run_sum: Tensor) -> tuple[Tensor, Tensor]:
    """Merge the splits' online softmax results (rows, S, M, ...) into AW (rows, M, P) and the
    log-sum-exp (rows, M), base 2."""
    total_max = run_max.amax(dim=1, keepdim=True)
    weight = torch.exp2(run_max - total_max)  # (rows, S, M)
    total = (run_sum * weight).sum(dim=1)  # (rows, M)
    aw = (acc * weight.unsqueeze(-1)).sum(dim=1) / total.unsqueeze(-1)
    return aw, total_max.squeeze(1) + torch.log2(total)


# ---------------------------------------------------------------------------------------------
# Custom ops: one per kernel launch (plus the small merges), opaque to torch.compile. Eager code
# calls the implementations directly (`_ops`): a custom op's dispatch costs tens of microseconds
# of Python per call, as much as a kernel's GPU time at image sizes.


def _cbsa_extract(w: Tensor, q0: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    """(W (B, K, N, P), Q0 (B, K, M, P)) -> (AW (B, K, M, P), L (B, K, M)), float32; L is the
    base-2 log-sum-exp of s Q0 W^T / ln 2 per representative."""
    launch = _Launch.of(w, q0)
    splits, chunk = launch.splits()
    rows, m, p = launch.rows, launch.reps, launch.width
    acc = w.new_empty(rows, splits, m, p, dtype=torch.float32)
    run_max = w.new_empty(rows, splits, m, dtype=torch.float32)
    run_sum = torch.empty_like(run_max)
    grid = (triton.cdiv(m, launch.block_m), rows, splits)
    _extract_tuned[grid](
        w, q0.contiguous(), acc, run_max, run_sum, *w.stride(), *_sizes(launch), chunk, splits,
        scale * LOG2E, **launch.constants(),
    )  # fmt: skip
    aw, lse = _merge_splits(acc, run_max, run_sum)
    return aw.view(q0.shape), lse.view(q0.shape[:3])


cbsa_extract = torch.library.custom_op("cbtlab::cbsa_extract", _cbsa_extract, mutates_args=())


@cbsa_extract.register_fake
def _cbsa_extract_fake(w: Tensor, q0: Tensor, scale: float) -> tuple[Tensor, Tensor]:
    return q0.new_empty(q0.shape, dtype=torch.float32), q0.new_empty(
        q0.shape[:3], dtype=torch.float32
    )


def _cbsa_broadcast(w: Tensor, q0: Tensor, lse: Tensor, c: Tensor, scale: float) -> Tensor:
    """out = A^T C (B, K, N, P) in W's dtype and memory layout, A recomputed from Q0, W, L."""
    launch = _Launch.of(w, q0)
    out = torch.empty_like(w)
    _broadcast_tuned[_token_blocks(launch)](
        w, q0.contiguous(), lse.contiguous(), c.to(w.dtype).contiguous(), out, *w.stride(),
        *out.stride(), *_sizes(launch), scale * LOG2E, **launch.constants(),
    )  # fmt: skip
    return out


cbsa_broadcast = torch.library.custom_op("cbtlab::cbsa_broadcast", _cbsa_broadcast, mutates_args=())


@cbsa_broadcast.register_fake
def _cbsa_broadcast_fake(w: Tensor, q0: Tensor, lse: Tensor, c: Tensor, scale: float) -> Tensor:
    return torch.empty_like(w)


def _cbsa_reps_grad(w: Tensor, q0: Tensor, lse: Tensor, grad_out: Tensor, scale: float) -> Tensor:
    """dC = A dOut (B, K, M, P), float32."""
    launch = _Launch.of(w, q0)
    return _reduce_over_tokens(launch, 0, w, q0, lse, grad_out, None, None, None, scale)


cbsa_reps_grad = torch.library.custom_op("cbtlab::cbsa_reps_grad", _cbsa_reps_grad, mutates_args=())


@cbsa_reps_grad.register_fake
def _cbsa_reps_grad_fake(
    w: Tensor, q0: Tensor, lse: Tensor, grad_out: Tensor, scale: float
) -> Tensor:
    return q0.new_empty(q0.shape, dtype=torch.float32)


def _cbsa_inputs_grad(
    w: Tensor,
    q0: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    c: Tensor,
    grad_aw: Tensor,
    delta: Tensor,
    scale: float,
) -> tuple[Tensor, Tensor]:
    """The gradients of W (W's dtype and layout) and Q0 (float32) through A, given dOut, C, dAW
    and D (see the module docstring)."""
    launch = _Launch.of(w, q0)
    c, grad_aw = c.to(w.dtype).contiguous(), grad_aw.to(w.dtype).contiguous()
    delta = delta.contiguous()
    grad_q0 = _reduce_over_tokens(launch, 1, w, q0, lse, grad_out, c, grad_aw, delta, scale)
    grad_q0 = grad_q0 * scale
    grad_w = torch.empty_like(w)
    _tokens_grad_tuned[_token_blocks(launch)](
        w, q0.contiguous(), lse.contiguous(), grad_out, c, grad_aw, delta, grad_w, *w.stride(),
        *grad_out.stride(), *grad_w.stride(), *_sizes(launch), scale, scale * LOG2E,
        **launch.constants(),
    )  # fmt: skip
    return grad_w, grad_q0


cbsa_inputs_grad = torch.library.custom_op(
    "cbtlab::cbsa_inputs_grad", _cbsa_inputs_grad, mutates_args=()
)


@cbsa_inputs_grad.register_fake
def _cbsa_inputs_grad_fake(w: Tensor, q0: Tensor, *_: object) -> tuple[Tensor, Tensor]:
    return torch.empty_like(w), q0.new_empty(q0.shape, dtype=torch.float32)


def _reduce_over_tokens(
    launch: _Launch,
    mode: int,
    w: Tensor,
    q0: Tensor,
    lse: Tensor,
    grad_out: Tensor,
    c: Tensor | None,
    grad_aw: Tensor | None,
    delta: Tensor | None,
    scale: float,
) -> Tensor:
    """`_reps_grad_kernel` over the splits of N, summed: (B, K, M, P) float32."""
    splits, chunk = launch.splits()
    rows, m, p = launch.rows, launch.reps, launch.width
    part = w.new_empty(rows, splits, m, p, dtype=torch.float32)
    unused = lse  # a placeholder pointer for the inputs mode 0 does not read
    grid = (triton.cdiv(m, launch.block_m), rows, splits)
    _reps_grad_tuned[grid](
        w, q0.contiguous(), lse.contiguous(), grad_out, unused if c is None else c,
        unused if grad_aw is None else grad_aw, unused if delta is None else delta, part,
        *w.stride(), *grad_out.stride(), *_sizes(launch), chunk, splits, scale * LOG2E,
        MODE=mode, **launch.constants(),
    )  # fmt: skip
    return part.sum(dim=1).view(q0.shape)


# ---------------------------------------------------------------------------------------------
# The middle (m x p per head, float32, in torch) and the autograd wiring.


def _contract(q: Tensor, contraction: str, beta: float) -> Tensor:
    if contraction == "softmax":
        probs = torch.softmax(q @ q.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1)
        return probs @ q
    if contraction == "exact":
        eye = torch.eye(q.shape[-2], dtype=q.dtype, device=q.device)
        chol = torch.linalg.cholesky(eye + beta * (q @ q.transpose(-1, -2)))
        return torch.cholesky_solve(q, chol)
    return q


def _contract_with_grad(
    q: Tensor, grad: Tensor, contraction: str, beta: float
) -> tuple[Tensor, Tensor]:
    """`_contract` at q and its gradient for the upstream `grad`, sharing the softmax or the
    Cholesky factor; written out (autograd is not available inside the backward pass of a
    compiled graph)."""
    if contraction == "softmax":
        scale = q.shape[-1] ** -0.5
        probs = torch.softmax(q @ q.transpose(-1, -2) * scale, dim=-1)
        grad_probs = grad @ q.transpose(-1, -2)
        grad_logits = probs * (grad_probs - (probs * grad_probs).sum(-1, keepdim=True))
        sym = grad_logits + grad_logits.transpose(-1, -2)
        return probs @ q, probs.transpose(-1, -2) @ grad + scale * (sym @ q)
    if contraction == "exact":
        # X = G^-1 Q with G = I + beta Q Q^T (symmetric): Y = G^-1 dX,
        # dQ = Y - beta (Y X^T + X Y^T) Q.
        eye = torch.eye(q.shape[-2], dtype=q.dtype, device=q.device)
        chol = torch.linalg.cholesky(eye + beta * (q @ q.transpose(-1, -2)))
        x = torch.cholesky_solve(q, chol)
        y = torch.cholesky_solve(grad, chol)
        return x, y - beta * ((y @ x.transpose(-1, -2) + x @ y.transpose(-1, -2)) @ q)
    return q, grad


def _heads(step: Tensor) -> Tensor:
    return step.float().view(1, -1, 1, 1)


class _Ops(NamedTuple):
    extract: Callable[..., tuple[Tensor, Tensor]]
    broadcast: Callable[..., Tensor]
    reps_grad: Callable[..., Tensor]
    inputs_grad: Callable[..., tuple[Tensor, Tensor]]


_EAGER_OPS = _Ops(_cbsa_extract, _cbsa_broadcast, _cbsa_reps_grad, _cbsa_inputs_grad)
_TRACED_OPS = _Ops(cbsa_extract, cbsa_broadcast, cbsa_reps_grad, cbsa_inputs_grad)


def _ops(w: Tensor) -> _Ops:
    """The registered custom ops while torch.compile traces or for a tensor subclass (fake
    tensors, say: shape propagation or an op census without a GPU), their implementations
    (no dispatcher round trip) for plain tensors."""
    traced = torch.compiler.is_compiling() or type(w) is not torch.Tensor
    return _TRACED_OPS if traced else _EAGER_OPS


class _KernelMixing(torch.autograd.Function):
    """(W, Q0, eta_rep, eta_x) -> eta_x A^T contract(Q0 + eta_rep A W), with the kernels."""

    @staticmethod
    def forward(  # type: ignore[override]
        ctx,
        w: Tensor,
        q0: Tensor,
        step_rep: Tensor,
        step_x: Tensor,
        scale: float,
        contraction: str,
        beta: float,
    ) -> Tensor:
        aw, lse = _ops(w).extract(w, q0, scale)
        q = q0.float() + _heads(step_rep) * aw
        c = _heads(step_x) * _contract(q, contraction, beta)
        out = _ops(w).broadcast(w, q0, lse, c, scale)
        ctx.save_for_backward(w, q0, step_rep, step_x, aw, lse)
        ctx.scale, ctx.contraction, ctx.beta = scale, contraction, beta
        return out

    @staticmethod
    def backward(ctx, grad_out: Tensor) -> tuple[Tensor | None, ...]:  # type: ignore[override]
        w, q0, step_rep, step_x, aw, lse = ctx.saved_tensors
        grad_c = _ops(w).reps_grad(w, q0, lse, grad_out, ctx.scale)
        q = q0.float() + _heads(step_rep) * aw
        upstream = _heads(step_x) * grad_c
        contracted, grad_q = _contract_with_grad(q, upstream, ctx.contraction, ctx.beta)
        c = _heads(step_x) * contracted
        grad_aw = _heads(step_rep) * grad_q
        delta = (c * grad_c).sum(-1) + (grad_aw * aw).sum(-1)
        grad_w, grad_q0 = _ops(w).inputs_grad(w, q0, lse, grad_out, c, grad_aw, delta, ctx.scale)
        per_head = (0, 2, 3)
        return (
            grad_w,
            (grad_q0 + grad_q).to(q0.dtype),
            (grad_q * aw).sum(per_head).to(step_rep.dtype),
            (grad_c * contracted).sum(per_head).to(step_x.dtype),
            None,
            None,
            None,
        )


def cbsa_mixing_kernels(
    w: Tensor,
    q0: Tensor,
    step_rep: Tensor,
    step_x: Tensor,
    *,
    scale: float | None = None,
    contraction: str = "softmax",
    beta: float = 1.0,
) -> Tensor:
    """CBSA's token mixing with the kernels: W (B, K, N, p), Q0 (B, K, m, p), steps (K,) ->
    eta_x A^T contract(Q0 + eta_rep A W), (B, K, N, p) in W's dtype and memory layout.
    `scale` defaults to p ** -0.5. Under autocast the tokens and Q0 run in autocast's dtype.
    Gradients reach W, Q0 and the steps (detach Q0 for the paper's stop-gradient)."""
    if contraction not in CONTRACTIONS:
        raise ValueError(f"unknown contraction {contraction!r}; known: {CONTRACTIONS}")
    if not kernels_run_on(w.device):
        raise RuntimeError(
            f"the CBSA kernels run on CUDA tensors (or under TRITON_INTERPRET=1), not on {w.device}"
        )
    if w.dim() != 4 or q0.dim() != 4:
        raise ValueError(f"expected W (B, K, N, p) and Q0 (B, K, m, p), got {w.shape}, {q0.shape}")
    scale = w.shape[-1] ** -0.5 if scale is None else float(scale)
    device = w.device.type
    dtype = autocast_dtype(device)
    # Q0 is made contiguous once here (a model's Q0 is a head view of the pooled projection):
    # each kernel and the middle's matmuls would otherwise copy it again, 12 small launches a
    # layer between forward and backward.
    if dtype is not None:
        with torch.autocast(device, enabled=False):
            return _KernelMixing.apply(
                w.to(dtype), q0.to(dtype).contiguous(), step_rep, step_x, scale, contraction, beta
            )
    return _KernelMixing.apply(
        w, q0.to(w.dtype).contiguous(), step_rep, step_x, scale, contraction, beta
    )
