"""Pieces shared by the attention mechanisms: head reshapes, the subspace skeleton, the pooled
initial guess, step-size initialisation."""

from __future__ import annotations

import contextlib
import functools

import torch
import torch.nn.functional as F
from torch import Tensor, nn

STEP_INITS = ("normal", "constant", "zero")


def has_autocast(device_type: str) -> bool:
    """Whether `device_type` has an autocast ("meta", used to count FLOPs, has none).

    Dynamo in torch 2.11 (the GPU machines' release) cannot trace `is_autocast_available`, which
    2.14 does: asked in every layer, it broke a compiled CBT-T into 9 to 11 graphs there. So a
    model being compiled does not ask: its tensors are on a device that has autocast."""
    return torch.compiler.is_compiling() or torch.amp.is_autocast_available(device_type)


def autocast_dtype(device_type: str) -> torch.dtype | None:
    """Autocast's dtype where autocast is on for `device_type`, else None."""
    if has_autocast(device_type) and torch.is_autocast_enabled(device_type):
        return torch.get_autocast_dtype(device_type)
    return None


def split_heads(x: Tensor, num_heads: int) -> Tensor:
    """(B, N, K*p) -> (B, K, N, p)."""
    b, n, c = x.shape
    return x.view(b, n, num_heads, c // num_heads).transpose(1, 2)


def merge_heads(x: Tensor) -> Tensor:
    """(B, K, N, p) -> (B, N, K*p)."""
    b, k, n, p = x.shape
    return x.transpose(1, 2).reshape(b, n, k * p)


def select_rows(t: Tensor, rows: Tensor | None) -> Tensor:
    """The query tokens `rows` of (B, K, N, p), or all of them."""
    return t if rows is None else t[:, :, rows]


class SubspaceAttention(nn.Module):
    """The skeleton of the white-box mechanisms: one bias-free projection on the K subspaces
    (U = [U_1 ... U_K], called `qkv` as in the reference code) and one output map with bias
    (the paper's over-parameterisation of U^T)."""

    def __init__(self, dim: int, num_heads: int, *, num_prefix_tokens: int = 1) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide dim={dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.scale = self.head_dim**-0.5
        self.num_prefix_tokens = num_prefix_tokens
        self.qkv = nn.Linear(dim, dim, bias=False)
        self.proj = nn.Linear(dim, dim)

    def project(self, x: Tensor) -> Tensor:
        """W_k = Z U_k for every head: (B, N, d) -> (B, K, N, p)."""
        return split_heads(self.qkv(x), self.num_heads)


def init_steps(steps: Tensor, scheme: str, scale: float) -> None:
    """Initialise learnable step sizes: N(0, scale) as in the reference code, the constant
    `scale`, or zero."""
    with torch.no_grad():
        if scheme == "normal":
            steps.normal_(0.0, scale)
        elif scheme == "constant":
            steps.fill_(scale)
        elif scheme == "zero":
            steps.zero_()
        else:
            raise ValueError(f"unknown step initialisation {scheme!r}; known: {STEP_INITS}")


def window_grid(grid_size: tuple[int, int], kernel: int, stride: int) -> tuple[int, int]:
    """The output grid of k x k windows with stride s over an H x W grid (no padding)."""
    return ((grid_size[0] - kernel) // stride + 1, (grid_size[1] - kernel) // stride + 1)


def pool_grid(
    tokens: Tensor,
    grid_size: tuple[int, int],
    out: tuple[int, int],
    op: str,
    *,
    kernel: int = 0,
    stride: int = 0,
) -> Tensor:
    """Pool patch tokens laid out on an H x W grid down to a g_h x g_w grid.

    tokens: (B, K, H*W, p) -> (B, K, g_h*g_w, p). By default adaptive pooling, so g_h, g_w need
    not divide H, W (windows then differ in size by at most one token). With `kernel`, fixed
    k x k windows every `stride` (default k) tokens, which may overlap; their output grid must
    be `out`.
    """
    b, k, n, p = tokens.shape
    h, w = grid_size
    if n != h * w:
        raise ValueError(f"{n} patch tokens do not fill a {h}x{w} grid")
    if out[0] > h or out[1] > w:
        raise ValueError(f"representative grid {out[0]}x{out[1]} exceeds the {h}x{w} patch grid")
    if (
        op == "avg"
        and TilePool.fits(grid_size, out)
        and (not kernel or (kernel == h // out[0] == w // out[1] and stride in (0, kernel)))
    ):
        # Equal tiles: on the tokens as they lie (no transposed copies, forward or backward).
        return _TileMean.apply(tokens, TilePool(grid_size, out))
    if kernel:
        stride = stride or kernel
        if window_grid(grid_size, kernel, stride) != tuple(out):
            got = window_grid(grid_size, kernel, stride)
            raise ValueError(
                f"{kernel}x{kernel} windows with stride {stride} on the {h}x{w} patch grid give a "
                f"{got[0]}x{got[1]} grid, not the representative grid {out[0]}x{out[1]}"
            )
    if op == "avg":
        return _separable_mean(tokens, grid_size, out, kernel, stride)
    grid = tokens.transpose(-1, -2).reshape(b * k, p, h, w)  # (B*K, p, H, W)
    pooled = F.max_pool2d(grid, kernel, stride) if kernel else F.adaptive_max_pool2d(grid, out)
    return pooled.reshape(b, k, p, out[0] * out[1]).transpose(-1, -2)  # (B, K, m, p)


def _separable_mean(
    tokens: Tensor, grid_size: tuple[int, int], out: tuple[int, int], kernel: int, stride: int
) -> Tensor:
    """Average pooling by windows (adaptive, or k x k every `stride`) as two small matrix
    products on the tokens as they lie, over the grid's rows, then its columns: no transposed
    copies, and a backward pass of two matrix products (adaptive pooling's own backward adds
    into overlapping windows with atomics on GPUs). In the tokens' dtype, outside autocast."""
    (h, w), (gh, gw) = grid_size, out
    *lead, _, c = tokens.shape
    rows = _window_means(h, gh, kernel, stride, tokens.dtype, tokens.device)  # (g_h, H)
    cols = _window_means(w, gw, kernel, stride, tokens.dtype, tokens.device)  # (g_w, W)
    device = tokens.device.type
    # "meta" (FLOP counting) has no autocast to leave.
    no_autocast = (
        torch.autocast(device, enabled=False) if has_autocast(device) else contextlib.nullcontext()
    )
    with no_autocast:
        by_rows = rows @ tokens.reshape(*lead, h, w * c)  # (..., g_h, W c)
        pooled = cols @ by_rows.view(*lead, gh, w, c)  # (..., g_h, g_w, c)
    return pooled.view(*lead, gh * gw, c)


def _window_means(
    size: int, out: int, kernel: int, stride: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    """(out, size): row i averages window i of a line of `size` tokens; adaptive windows
    [floor(i size / out), ceil((i + 1) size / out)) as PyTorch's adaptive pooling, or
    [i stride, i stride + kernel). Built once per device and dtype in eager mode (no host to
    device copy per call); traced, it is a constant of the graph."""
    if torch.compiler.is_compiling():
        return _window_weights(size, out, kernel, stride).to(device=device, dtype=dtype)
    return _cached_window_means(size, out, kernel, stride, dtype, device)


@functools.cache
def _cached_window_means(
    size: int, out: int, kernel: int, stride: int, dtype: torch.dtype, device: torch.device
) -> Tensor:
    with torch.inference_mode(False):  # kept: it must serve autograd later too
        return _window_weights(size, out, kernel, stride).to(device=device, dtype=dtype)


def _window_weights(size: int, out: int, kernel: int, stride: int) -> Tensor:
    index = torch.arange(out)
    if kernel:
        starts, ends = index * stride, index * stride + kernel
    else:
        starts, ends = index * size // out, ((index + 1) * size + out - 1) // out
    positions = torch.arange(size)
    inside = (positions >= starts[:, None]) & (positions < ends[:, None])
    return inside.double() / inside.sum(dim=1, keepdim=True)


class TilePool:
    """Average pooling of an H x W patch grid by equal tiles to a g_h x g_w grid, on tokens
    (..., H*W, c) as they lie in memory. The sum runs in two stages, over the rows of each tile
    (whole grid rows, contiguous when the tokens are) and then over its columns: several times
    faster than one reduction over the interleaved tile dimensions."""

    def __init__(self, grid_size: tuple[int, int], out: tuple[int, int]) -> None:
        (h, w), (gh, gw) = grid_size, out
        if not self.fits(grid_size, out):
            raise ValueError(f"a {gh}x{gw} grid does not tile the {h}x{w} patch grid evenly")
        self.grid, self.out = (h, w), (gh, gw)
        self.tile = (h // gh, w // gw)
        self.count = gh * gw  # the representatives m
        self.inv_area = 1.0 / (self.tile[0] * self.tile[1])

    @staticmethod
    def fits(grid_size: tuple[int, int], out: tuple[int, int]) -> bool:
        """Whether `out` tiles the patch grid evenly (each side divides)."""
        return grid_size[0] % out[0] == 0 and grid_size[1] % out[1] == 0

    def mean(self, tokens: Tensor, out: Tensor | None = None) -> Tensor:
        """(..., H*W, c) -> (..., m, c)."""
        (gh, gw), (th, tw), w = self.out, self.tile, self.grid[1]
        rows = tokens.unflatten(-2, (gh, th, w)).sum(-3)  # (..., g_h, W, c)
        sums = rows.unflatten(-2, (gw, tw)).sum(-2).flatten(-3, -2)  # (..., m, c)
        if out is None:
            return sums.mul_(self.inv_area)
        return torch.mul(sums, self.inv_area, out=out)

    def add_back(self, grad: Tensor, into: Tensor) -> None:
        """`into += pool^T grad`: every token of a tile gets its representative's gradient over
        the tile's area. grad (..., m, c), into (..., H*W, c), in place."""
        (gh, gw), (th, tw) = self.out, self.tile
        tiles = into.unflatten(-2, (gh, th, gw, tw))
        tiles.add_(grad.unflatten(-2, (gh, 1, gw, 1)), alpha=self.inv_area)

    def spread(self, grad: Tensor, shape: torch.Size) -> Tensor:
        """pool^T grad as a new tensor of the tokens' `shape` (one pass of writes)."""
        (gh, gw), (th, tw) = self.out, self.tile
        out = grad.new_empty(shape)
        tiles = out.unflatten(-2, (gh, th, gw, tw))
        tiles.copy_((grad * self.inv_area).unflatten(-2, (gh, 1, gw, 1)).expand_as(tiles))
        return out


class _TileMean(torch.autograd.Function):
    """`TilePool.mean` with a backward pass that writes the tokens' gradient in one pass."""

    @staticmethod
    def forward(ctx, tokens: Tensor, pool: TilePool) -> Tensor:  # type: ignore[override]
        ctx.pool, ctx.shape = pool, tokens.shape
        return pool.mean(tokens)

    @staticmethod
    def backward(ctx, grad: Tensor) -> tuple[Tensor, None]:  # type: ignore[override]
        return ctx.pool.spread(grad, ctx.shape), None
