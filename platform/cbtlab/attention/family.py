"""The rest of the unified family (CBSA_MATH.md), each a choice of representatives.

All share the attention interface of `cbtlab.attention`: `cls(dim, num_heads, *,
num_prefix_tokens, **options)` and `module(x, grid_size)` on (B, N, dim) tokens.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbtlab.attention.common import (
    SubspaceAttention,
    init_steps,
    merge_heads,
    pool_grid,
    select_rows,
)
from cbtlab.attention.registry import register_attention


@register_attention("mssa")
class MSSA(SubspaceAttention):
    """CRATE's multi-head subspace self-attention (eq. 9): the tokens are their own
    representatives, `dW = softmax_r(s W W^T) W`. Cost O(N^2 p) per head."""

    def forward(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        w = self.project(x)  # (B, K, N, p)
        return self.proj(merge_heads(F.scaled_dot_product_attention(w, w, w)))

    def pairwise_similarities(self, num_tokens: int) -> int:
        """Similarities of one image over all heads (`cbtlab.analysis.similarities`): every
        token against every token, its own representatives, N^2 per head."""
        return self.num_heads * num_tokens * num_tokens

    def attention_map(
        self, x: Tensor, grid_size: tuple[int, int], rows: Tensor | None = None
    ) -> Tensor:
        """softmax_r(s W W^T) for the query tokens `rows`: (B, K, R, N)."""
        w = self.project(x)
        return torch.softmax(self.scale * select_rows(w, rows) @ w.transpose(-1, -2), dim=-1)


@register_attention("softmax")
class SoftmaxAttention(nn.Module):
    """Standard multi-head self-attention as in timm's ViT: separate q, k, v (one fused
    `Linear(d, 3d)`), PyTorch's scaled_dot_product_attention, an output projection."""

    def __init__(
        self, dim: int, num_heads: int, *, num_prefix_tokens: int = 1, qkv_bias: bool = True
    ) -> None:
        super().__init__()
        if dim % num_heads:
            raise ValueError(f"num_heads={num_heads} does not divide dim={dim}")
        self.num_heads = num_heads
        self.head_dim = dim // num_heads
        self.num_prefix_tokens = num_prefix_tokens
        self.qkv = nn.Linear(dim, 3 * dim, bias=qkv_bias)
        self.proj = nn.Linear(dim, dim)

    def _qkv(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        b, n, c = x.shape
        qkv = self.qkv(x).view(b, n, 3, self.num_heads, c // self.num_heads)
        q, k, v = qkv.permute(2, 0, 3, 1, 4).unbind(0)  # 3 x (B, K, N, p)
        return q, k, v

    def forward(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        return self.proj(merge_heads(F.scaled_dot_product_attention(*self._qkv(x))))

    def pairwise_similarities(self, num_tokens: int) -> int:
        """Similarities of one image over all heads (`cbtlab.analysis.similarities`): every
        query against every key, N^2 per head."""
        return self.num_heads * num_tokens * num_tokens

    def attention_map(
        self, x: Tensor, grid_size: tuple[int, int], rows: Tensor | None = None
    ) -> Tensor:
        """softmax_r(q k^T / sqrt(p)) for the query tokens `rows`: (B, K, R, N)."""
        q, k, _ = self._qkv(x)
        return torch.softmax(
            select_rows(q, rows) @ k.transpose(-1, -2) * q.shape[-1] ** -0.5, dim=-1
        )


@register_attention("linear")
class LinearVariant(SubspaceAttention):
    """The linear variant of eq. 12: representatives are the principal directions of each head's
    tokens, so `dW = eta * W (I_p + beta W^T W)^-1`, i.e. each eigen-direction of the p x p second
    moment is shrunk by 1 / (1 + beta * lambda). `beta = p / (N eps^2)`, the coding-rate
    constant of a p-dimensional subspace; `eta` is learnable per head. Cost O(N p^2 + p^3)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_prefix_tokens: int = 1,
        eps: float = 0.5,
        step_init: str = "normal",
        step_scale: float = 1.0,
    ) -> None:
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens)
        self.eps = eps
        self.step = nn.Parameter(torch.empty(num_heads))
        init_steps(self.step, step_init, step_scale)

    def forward(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        w = self.project(x)  # (B, K, N, p)
        n, p = w.shape[-2], w.shape[-1]
        beta = p / (n * self.eps**2)
        eye = torch.eye(p, dtype=w.dtype, device=w.device)
        gram = eye + beta * (w.transpose(-1, -2) @ w)  # (B, K, p, p), SPD
        # W G^-1 = (G^-1 W^T)^T since G is symmetric.
        shrunk = torch.cholesky_solve(w.transpose(-1, -2), torch.linalg.cholesky(gram))
        dw = self.step.view(1, -1, 1, 1) * shrunk.transpose(-1, -2)  # (B, K, N, p)
        return self.proj(merge_heads(dw))

    def pairwise_similarities(self, num_tokens: int) -> int:
        """Similarities of one image over all heads (`cbtlab.analysis.similarities`): every
        token against the p principal directions of its head, N p per head."""
        return self.num_heads * num_tokens * self.head_dim


@register_attention("tssa")
class TSSA(SubspaceAttention):
    """ToST's token statistics self-attention (eq. 13), as in the authors' code: each token's
    membership of the K heads is a softmax over heads of its normalised energy in each
    (temperature per head); each channel is scaled by `1 / (1 + its membership-weighted second
    moment)`. Cost O(N p) per head."""

    def __init__(self, dim: int, num_heads: int, *, num_prefix_tokens: int = 1) -> None:
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens)
        self.temp = nn.Parameter(torch.ones(num_heads, 1))

    def no_weight_decay(self) -> set[str]:
        return {"temp"}

    def forward(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        w = self.project(x)  # (B, K, N, p)
        energy = F.normalize(w, dim=-2).square().sum(-1)  # (B, K, N)
        pi = torch.softmax(energy * self.temp, dim=1)  # membership over heads
        weights = pi / (pi.sum(-1, keepdim=True) + 1e-8)  # (B, K, N)
        # In w's dtype: under autocast, `w.square()` would square in float32 only for the
        # product to round it back, and the float32 memberships would carry the token-sized
        # output into float32 (three passes there, and a conversion for the projection).
        # Outside autocast these are the plain expressions.
        moments = (weights.unsqueeze(-2).to(w.dtype) @ (w * w)).squeeze(-2)  # (B, K, p)
        dw = (w * (-pi).unsqueeze(-1).to(w.dtype)) / (1 + moments.unsqueeze(-2))
        return self.proj(merge_heads(dw))

    def pairwise_similarities(self, num_tokens: int) -> int:
        """Similarities of one image over all heads (`cbtlab.analysis.similarities`): every
        token against the p channels of its head, N p per head."""
        return self.num_heads * num_tokens * self.head_dim


@register_attention("agent")
class AgentAttention(SubspaceAttention):
    """Agent attention in the unified form: m pooled agents Q0 gather `A W` from the tokens,
    and each token reads them back by its own softmax over agents:
    `dW = softmax_r(s W Q0^T) (A W)`, with `A = softmax_r(s Q0 W^T)`. No contraction.
    Cost O(N m p) per head."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_prefix_tokens: int = 1,
        rep_grid: tuple[int, int] = (8, 8),
        rep_pool: str = "avg",
    ) -> None:
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens)
        self.rep_grid = (int(rep_grid[0]), int(rep_grid[1]))
        self.rep_pool = rep_pool

    def _agents(self, x: Tensor, grid_size: tuple[int, int]) -> tuple[Tensor, Tensor]:
        w = self.project(x)  # (B, K, N, p)
        patches = w[:, :, self.num_prefix_tokens :]
        return w, pool_grid(patches, grid_size, self.rep_grid, self.rep_pool)  # Q0: (B, K, m, p)

    def forward(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        w, agents = self._agents(x, grid_size)
        gathered = F.scaled_dot_product_attention(agents, w, w)  # A W: (B, K, m, p)
        return self.proj(merge_heads(F.scaled_dot_product_attention(w, agents, gathered)))

    @property
    def num_representatives(self) -> int:
        return self.rep_grid[0] * self.rep_grid[1]

    def pairwise_similarities(self, num_tokens: int) -> int:
        """Similarities of one image over all heads (`cbtlab.analysis.similarities`): the
        tokens meet the m agents twice, once to gather (`s Q0 W^T`) and once to read back
        (`s W Q0^T`, a separate softmax), 2 N m per head. Not the paper's Agent column."""
        return self.num_heads * 2 * num_tokens * self.num_representatives

    def attention_map(
        self, x: Tensor, grid_size: tuple[int, int], rows: Tensor | None = None
    ) -> Tensor:
        """The effective token-to-token map `softmax_r(s W Q0^T) A`: (B, K, R, N)."""
        w, agents = self._agents(x, grid_size)
        gather = torch.softmax(self.scale * agents @ w.transpose(-1, -2), dim=-1)  # (B, K, m, N)
        read = torch.softmax(self.scale * select_rows(w, rows) @ agents.transpose(-1, -2), dim=-1)
        return read @ gather


@register_attention("linear_attention")
class KernelLinearAttention(SoftmaxAttention):
    """Black-box linear attention (Katharopoulos et al., 2020): ViT's projections with the
    feature map elu(x) + 1 in place of the softmax,
    `out_i = phi(q_i)^T (sum_j phi(k_j) v_j^T) / (phi(q_i)^T sum_j phi(k_j))`. O(N p^2)."""

    def _features(self, x: Tensor) -> tuple[Tensor, Tensor, Tensor]:
        q, k, v = self._qkv(x)
        return F.elu(q) + 1, F.elu(k) + 1, v

    def forward(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        q, k, v = self._features(x)
        kv = k.transpose(-1, -2) @ v  # (B, K, p, p)
        norm = q @ k.sum(-2, keepdim=True).transpose(-1, -2)  # (B, K, N, 1)
        return self.proj(merge_heads((q @ kv) / (norm + 1e-6)))

    def pairwise_similarities(self, num_tokens: int) -> int:
        """Similarities of one image over all heads (`cbtlab.analysis.similarities`): every
        query against the p columns of the key summary `phi(K)^T V`, N p per head."""
        return self.num_heads * num_tokens * self.head_dim

    def attention_map(
        self, x: Tensor, grid_size: tuple[int, int], rows: Tensor | None = None
    ) -> Tensor:
        """The implicit map `phi(q) phi(k)^T`, row-normalised, for `rows`: (B, K, R, N)."""
        q, k, _ = self._features(x)
        sim = select_rows(q, rows) @ k.transpose(-1, -2)
        return sim / (sim.sum(-1, keepdim=True) + 1e-6)


@register_attention("qkv_agent")
class QKVAgentAttention(SoftmaxAttention):
    """CBSA without the contraction step on a ViT's own projections, the layer of the authors'
    ViT adaptation (`CBSA_finetune_vit/attention.py`): the m representatives are the queries
    pooled over the patch grid, `Q0 = pool(q)`; they gather the values, `A V` with
    `A = softmax_r(s Q0 K^T)`, and every token reads them back by its query,
    `out = softmax_r(s q Q0^T) (A V)` (s = p^-1/2). ViT's q, k, v (one `Linear(d, 3d)` with
    bias) and output projection, so a pretrained ViT's attention maps onto it whole
    (`cbtlab.models.adapt`). Agent attention's form with q, k, v kept apart. O(N m p)."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        num_prefix_tokens: int = 1,
        qkv_bias: bool = True,
        rep_grid: tuple[int, int] = (8, 8),
        rep_pool: str = "avg",
    ) -> None:
        super().__init__(dim, num_heads, num_prefix_tokens=num_prefix_tokens, qkv_bias=qkv_bias)
        self.rep_grid = (int(rep_grid[0]), int(rep_grid[1]))
        self.rep_pool = rep_pool

    def _reps(self, x: Tensor, grid_size: tuple[int, int]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
        """(q, k, v, Q0): the tokens' projections (B, K, N, p), the pooled queries (B, K, m, p)."""
        q, k, v = self._qkv(x)
        patches = q[:, :, self.num_prefix_tokens :]
        return q, k, v, pool_grid(patches, grid_size, self.rep_grid, self.rep_pool)

    def forward(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        q, k, v, reps = self._reps(x, grid_size)
        gathered = F.scaled_dot_product_attention(reps, k, v)  # A V: (B, K, m, p)
        return self.proj(merge_heads(F.scaled_dot_product_attention(q, reps, gathered)))

    @property
    def num_representatives(self) -> int:
        return self.rep_grid[0] * self.rep_grid[1]

    def pairwise_similarities(self, num_tokens: int) -> int:
        """Similarities of one image over all heads (`cbtlab.analysis.similarities`): the keys
        meet the m representatives to gather, the queries meet them to read back, 2 N m per
        head (as `agent`)."""
        return self.num_heads * 2 * num_tokens * self.num_representatives

    def attention_map(
        self, x: Tensor, grid_size: tuple[int, int], rows: Tensor | None = None
    ) -> Tensor:
        """The effective token-to-token map `softmax_r(s q Q0^T) A`: (B, K, R, N)."""
        q, k, _, reps = self._reps(x, grid_size)
        scale = q.shape[-1] ** -0.5
        gather = torch.softmax(scale * reps @ k.transpose(-1, -2), dim=-1)  # (B, K, m, N)
        read = torch.softmax(scale * select_rows(q, rows) @ reps.transpose(-1, -2), dim=-1)
        return read @ gather
