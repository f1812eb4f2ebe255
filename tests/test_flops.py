"""FLOP counts: attention's matmuls counted (also on the CPU kernel), linear cost for CBSA."""

from __future__ import annotations

import timm

import cbtlab.models  # noqa: F401  (registers the presets with timm)
from cbtlab.analysis import count_flops


def test_vit_tiny_matches_the_analytic_count() -> None:
    d, n, layers, hidden = 192, 197, 12, 768
    macs = 196 * 3 * 16 * 16 * d  # patch embedding
    per_layer = n * d * 3 * d + 2 * n * n * d + n * d * d + 2 * n * d * hidden
    macs += layers * per_layer + d * 1000
    assert count_flops(timm.create_model("sdpa_vit_tiny_patch16_224"), 224) == 2 * macs


def test_cbt_cost_is_affine_in_tokens_and_mssa_is_not() -> None:
    """Patch grids 16 x 16, 16 x 32, 16 x 48: equal steps in N give equal steps in CBSA's cost
    (fixed m = 64), growing steps in MSSA's."""

    def attention_flops(name: str, width: int) -> int:
        model = timm.create_model(name, img_size=(256, 16 * width), depth=1)
        counts = count_flops(model, (256, 16 * width), by_module=True)
        return next(v for k, v in counts.items() if k.endswith("blocks.0.attn"))

    cbt = [attention_flops("cbt_tiny_patch16_224", w) for w in (16, 32, 48)]
    crate = [attention_flops("crate_conv_tiny_patch16_224", w) for w in (16, 32, 48)]
    assert cbt[2] - cbt[1] == cbt[1] - cbt[0] > 0
    assert crate[2] - crate[1] > 1.5 * (crate[1] - crate[0])


def test_counting_leaves_the_model_untouched() -> None:
    model = timm.create_model("cbt_tiny_patch16_224")
    count_flops(model, 448)
    assert next(model.parameters()).device.type == "cpu"
