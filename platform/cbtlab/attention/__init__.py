"""The attention family, chosen by name.

Every mechanism is an `nn.Module` with the constructor `cls(dim, num_heads, *, num_prefix_tokens,
**options)` and the call `module(x, grid_size)`, where `x` is (B, N, dim) with the prefix tokens
(CLS) first and the patch tokens after them in row-major order over `grid_size = (H, W)`.
"""

from cbtlab.attention.cbsa import CBSA
from cbtlab.attention.registry import ATTENTION_REGISTRY, create_attention, register_attention

__all__ = ["ATTENTION_REGISTRY", "CBSA", "create_attention", "register_attention"]
