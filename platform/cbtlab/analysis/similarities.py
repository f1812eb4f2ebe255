"""Counts of pairwise similarities, the first row of Table 4 of the CBSA paper.

Convention: a pairwise similarity is one inner product, between a token and a representative it
is compared with or between two representatives, whose value weighs a mixture. They are counted
per head and per layer, summed over the model, for one image. Per head and layer the count is
`N r + c`: each of the N tokens (CLS included) against the r representatives it is compared
with, plus the c distinct pairs among representatives in a contraction step. A similarity
matrix used twice (CBSA's A, by the aggregation and by the broadcast) counts once. Each
mechanism gives its count from the number of tokens entering it (`pairwise_similarities`):

| mechanism                            | per head            | T at 224 px (N = 197, m = 64) |
|--------------------------------------|---------------------|-------------------------------|
| `mssa`, `softmax`                    | N^2                 | 1,397,124 (paper 1.4M)        |
| `cbsa` (contraction softmax / exact) | N m + m (m + 1) / 2 | 528,768 (paper 0.53M)         |
| `cbsa` (contraction "none")          | N m                 | 453,888                       |
| `tssa`, `linear`, `linear_attention` | N p                 | 453,888 (TSSA; paper 0.45M)   |
| `agent`, `qkv_agent`                 | 2 N m               | 907,776                       |

- MSSA and softmax attention: the tokens are their own representatives, no contraction.
- CBSA: m = the layer's `num_representatives`. The contraction's Gram `Q Q^T` is symmetric and
  counted by its distinct pairs, diagonal included. Counting all m^2 entries would give 0.60M
  for CBSA-T, which does not match the paper; m (m + 1) / 2 gives its 0.53M and 1.1M.
- TSSA, the linear variant and kernel linear attention: each token against the p directions of
  its head (the channels, the principal directions, the columns of the key summary).
- Agent attention: our `agent` compares the tokens with the m agents twice, to gather
  (`softmax_r(s Q0 W^T)`) and to read back (`softmax_r(s W Q0^T)`). The paper's Agent column
  (0.52M / 1.0M) is "CBSA without the contraction step" and gives no formula; neither our
  `agent` (0.91M) nor `cbsa` with contraction "none" (N m, 0.45M) reproduces it. `qkv_agent`
  (the authors' adapted ViT layer) compares the keys and the queries with the pooled queries:
  2 N m as `agent`.

Counting runs on a copy of the model on PyTorch's meta device (as `count_flops`, CBSA in its
reference form), so it costs nothing at any resolution. The token count of every attention
layer is read from its input, so prefix tokens and the patch grid of any image size are taken
into account, and a hybrid model counts each layer by its own mechanism.
"""

from __future__ import annotations

import copy
from collections.abc import Callable
from typing import Any

import torch
from torch import nn


def count_pairwise_similarities(
    model: nn.Module, img_size: int | tuple[int, int], *, in_chans: int = 3, by_module: bool = False
) -> int | dict[str, int]:
    """Pairwise similarities of one forward pass of one image of `img_size` (see the module
    docstring), summed over every attention layer (every submodule with a
    `pairwise_similarities(num_tokens)` method).

    With `by_module`, a dict from module name (`model.named_modules()`, e.g. "blocks.0.attn")
    to its count instead of the total. Raises ValueError if the model has no such module.
    """
    h, w = (img_size, img_size) if isinstance(img_size, int) else img_size
    meta = copy.deepcopy(model).to("meta").eval()
    for module in meta.modules():
        if hasattr(module, "fused"):
            # The fused CBSA asks autocast about the tensors' device, which "meta" is not; the
            # reference form computes the same function (and the count does not depend on it).
            module.fused = False
    layers = {
        name: module
        for name, module in meta.named_modules()
        if callable(getattr(module, "pairwise_similarities", None))
    }
    if not layers:
        raise ValueError(
            f"{type(model).__name__} has no attention module with a `pairwise_similarities` "
            "method: nothing to count"
        )
    counts = dict.fromkeys(layers, 0)

    def hook_for(name: str) -> Callable[[nn.Module, tuple[Any, ...], dict[str, Any]], None]:
        def hook(module: nn.Module, args: tuple[Any, ...], kwargs: dict[str, Any]) -> None:
            x = args[0] if args else kwargs["x"]  # (B, N, d)
            counts[name] += module.pairwise_similarities(x.shape[1])

        return hook

    handles = [
        module.register_forward_pre_hook(hook_for(name), with_kwargs=True)
        for name, module in layers.items()
    ]
    try:
        with torch.no_grad():
            meta(torch.empty(1, in_chans, h, w, device="meta"))
    finally:
        for handle in handles:
            handle.remove()
    return counts if by_module else sum(counts.values())
