"""Pairwise-similarity counts: Table 4's first row, their growth in N, hybrids, every mechanism."""

from __future__ import annotations

import pytest
import timm
import torch
from torch import nn

import cbtlab.models  # noqa: F401  (registers the presets with timm)
from cbtlab.analysis import count_pairwise_similarities
from cbtlab.attention import ATTENTION_REGISTRY, create_attention

# Table 4, "# pairwise similarities" (millions) on ImageNet-1K at 224 px; N = 197, m = 64, p = 64.
TABLE_4 = {
    "cbt_tiny_patch16_224": (36 * (197 * 64 + 64 * 65 // 2), 0.53),
    "cbt_small_patch16_224": (72 * (197 * 64 + 64 * 65 // 2), 1.1),
    "tost_conv_tiny_patch16_224": (36 * 197 * 64, 0.45),
    "tost_conv_small_patch16_224": (72 * 197 * 64, 0.91),
    "crate_conv_tiny_patch16_224": (36 * 197**2, 1.4),
    "crate_conv_small_patch16_224": (72 * 197**2, 2.8),
}


@pytest.mark.parametrize("name", sorted(TABLE_4))
def test_table_4_first_row(name: str) -> None:
    exact, paper = TABLE_4[name]
    count = count_pairwise_similarities(timm.create_model(name), 224)
    assert count == exact
    # The paper prints two significant figures (1.06M as 1.1M).
    assert float(f"{count / 1e6:.2g}") == paper


def test_table_4_spelled_out() -> None:
    """The integers of the README's table, independent of the formulas above."""
    counts = {n: count_pairwise_similarities(timm.create_model(n), 224) for n in TABLE_4}
    assert counts == {
        "cbt_tiny_patch16_224": 528_768,
        "cbt_small_patch16_224": 1_057_536,
        "tost_conv_tiny_patch16_224": 453_888,
        "tost_conv_small_patch16_224": 907_776,
        "crate_conv_tiny_patch16_224": 1_397_124,
        "crate_conv_small_patch16_224": 2_794_248,
    }


def test_contraction_counts_the_distinct_pairs_of_the_gram() -> None:
    def count(contraction: str) -> int:
        model = timm.create_model("cbt_tiny_patch16_224", contraction=contraction)
        return count_pairwise_similarities(model, 224)

    assert count("softmax") == count("exact") == count("none") + 36 * 64 * 65 // 2
    assert count("none") == 36 * 197 * 64


def _attention_counts(name: str, img_size: tuple[int, int]) -> dict[str, int]:
    model = timm.create_model(name, img_size=img_size)
    return count_pairwise_similarities(model, img_size, by_module=True)


def test_cbsa_is_affine_in_tokens_and_mssa_quadratic() -> None:
    """Patch grids 10 x 12, 10 x 20, 10 x 28 (N = 121, 201, 281): equal steps of 80 tokens give
    equal steps in CBSA's count (fixed m = 64), and steps growing by 2 K 80^2 in MSSA's."""
    sizes = [(160, 16 * w) for w in (12, 20, 28)]
    cbt = [_attention_counts("cbt_tiny_patch16_224", s)["blocks.0.attn"] for s in sizes]
    crate = [_attention_counts("crate_conv_tiny_patch16_224", s)["blocks.0.attn"] for s in sizes]
    assert cbt[1] - cbt[0] == cbt[2] - cbt[1] == 3 * 64 * 80
    assert crate == [3 * n * n for n in (121, 201, 281)]
    assert (crate[2] - crate[1]) - (crate[1] - crate[0]) == 2 * 3 * 80**2


def test_hybrid_counts_each_layer_by_its_mechanism() -> None:
    n = 1 + 14 * 10  # a 224 x 160 image
    counts = _attention_counts("crate_cbt_hybrid_tiny_patch16_224", (224, 160))
    assert len(counts) == 12
    for i in range(6):
        assert counts[f"blocks.{i}.attn"] == 3 * n * n  # MSSA
    for i in range(6, 12):
        assert counts[f"blocks.{i}.attn"] == 3 * (n * 64 + 64 * 65 // 2)  # CBSA


def test_counting_leaves_the_model_untouched() -> None:
    model = timm.create_model("cbt_tiny_patch16_224")
    before = {k: v.clone() for k, v in model.state_dict().items()}
    count_pairwise_similarities(model, 448)
    assert all(p.device.type == "cpu" for p in model.parameters())
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())
    assert not any(m._forward_pre_hooks for m in model.modules())


def test_a_model_without_attention_is_refused() -> None:
    with pytest.raises(ValueError, match="pairwise_similarities"):
        count_pairwise_similarities(nn.Sequential(nn.Conv2d(3, 8, 3)), 32)


# Per layer for dim 24, 3 heads (p = 8), rep_grid 2 x 3 (m = 6), N = 25 tokens.
SMALL_LAYER = {
    "cbsa": 3 * (25 * 6 + 6 * 7 // 2),
    "mssa": 3 * 25 * 25,
    "softmax": 3 * 25 * 25,
    "linear": 3 * 25 * 8,
    "tssa": 3 * 25 * 8,
    "agent": 3 * 2 * 25 * 6,
    "linear_attention": 3 * 25 * 8,
    "qkv_agent": 3 * 2 * 25 * 6,
}


@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
def test_every_attention_counts_its_similarities(name: str) -> None:
    attn = create_attention(name, 24, 3, num_prefix_tokens=1, rep_grid=(2, 3))
    count = attn.pairwise_similarities(25)
    assert isinstance(count, int) and count > 0
    assert count == SMALL_LAYER[name]  # a new name must say what it counts
