"""The attention family, chosen by name.

Every mechanism is an `nn.Module` with the constructor `cls(dim, num_heads, *, num_prefix_tokens,
**options)` and the call `module(x, grid_size)`, where `x` is (B, N, dim) with the prefix tokens
(CLS) first and the patch tokens after them in row-major order over `grid_size = (H, W)`.
Mechanisms with a token-to-token map also have `module.attention_map(x, grid_size, rows)`
(B, K, R, N), built only for the requested query rows; TSSA and the linear variant act per
channel / per principal direction and have none. Every mechanism has
`module.pairwise_similarities(num_tokens)`, its count of similarities for one image (Table 4;
the convention is in `cbtlab.analysis.similarities`).
Options a mechanism does not take are ignored by `create_attention`, so one model config
(representative grid, step initialisation, ...) serves every variant.

| name               | mechanism                                   | cost per head     |
|--------------------|---------------------------------------------|-------------------|
| `cbsa`             | CBSA, eq. 5-8 (options: eq. 7, no contraction) | O(N m p)       |
| `mssa`             | CRATE's subspace self-attention, eq. 9      | O(N^2 p)          |
| `softmax`          | ViT multi-head attention (q, k, v; SDPA)    | O(N^2 p)          |
| `linear`           | the linear variant, eq. 12                  | O(N p^2 + p^3)    |
| `tssa`             | ToST's token statistics attention, eq. 13   | O(N p)            |
| `agent`            | agent attention (pooled agents)             | O(N m p)          |
| `linear_attention` | kernelised linear attention (elu + 1)       | O(N p^2)          |
| `qkv_agent`        | CBSA w/o contraction on ViT's q, k, v       | O(N m p)          |
|                    | (pooled queries; the authors' adaptation)   |                   |
"""

from cbtlab.attention.cbsa import CBSA
from cbtlab.attention.family import (
    MSSA,
    TSSA,
    AgentAttention,
    KernelLinearAttention,
    LinearVariant,
    QKVAgentAttention,
    SoftmaxAttention,
)
from cbtlab.attention.registry import ATTENTION_REGISTRY, create_attention, register_attention

__all__ = [
    "ATTENTION_REGISTRY",
    "CBSA",
    "MSSA",
    "TSSA",
    "AgentAttention",
    "KernelLinearAttention",
    "LinearVariant",
    "QKVAgentAttention",
    "SoftmaxAttention",
    "create_attention",
    "register_attention",
]
