"""Segmentation decoders (cbtlab.models.segmenter) and their metrics (cbtlab.analysis.segmentation):
shapes and gradients for every attention, counts with the decoder's share, hand-computed IoUs,
sliding windows."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

from cbtlab.analysis import count_flops, count_pairwise_similarities
from cbtlab.analysis.segmentation import (
    VOID,
    ConfusionMatrix,
    add_projection_noise,
    sliding_window_logits,
    window_starts,
)
from cbtlab.attention import ATTENTION_REGISTRY
from cbtlab.models import CBTransformer, build_segmenter, create_segmenter
from cbtlab.models.segmenter import decoder_share


def tiny_encoder(img: int = 32) -> CBTransformer:
    return CBTransformer(
        img_size=img, patch_size=4, in_chans=3, num_classes=0, embed_dim=24, depth=1,
        num_heads=2, attention="softmax", block="mlp", attn_options={"rep_grid": (2, 2)},
    )  # fmt: skip


@pytest.mark.parametrize("attention", sorted(ATTENTION_REGISTRY))
def test_every_decoder_attention_gives_masks_and_gradients(attention: str) -> None:
    torch.manual_seed(0)
    model = build_segmenter(
        tiny_encoder(), num_classes=5, decoder_attention=attention, decoder_depth=2,
        attn_options={"rep_grid": (2, 2)},
    )  # fmt: skip
    logits = model(torch.randn(2, 3, 32, 32))
    assert logits.shape == (2, 5, 32, 32)
    assert torch.isfinite(logits).all()
    logits.square().mean().backward()
    # every parameter, the encoder's included (DDP refuses unused ones)
    missing = [n for n, p in model.named_parameters() if p.requires_grad and p.grad is None]
    assert not missing, missing


def test_only_the_softmax_decoder_has_a_feed_forward_module_by_default() -> None:
    for attention, ffn in (("softmax", True), ("mssa", False), ("cbsa", False)):
        model = build_segmenter(tiny_encoder(), num_classes=3, decoder_attention=attention)
        assert all((layer.mlp is not None) == ffn for layer in model.decoder.layers)
    forced = build_segmenter(tiny_encoder(), num_classes=3, decoder_attention="cbsa", ffn=True)
    assert forced.decoder.layers[0].mlp is not None


def test_named_segmenters_build_on_timm_vits_at_any_multiple_of_the_patch() -> None:
    model = create_segmenter(
        "seg_cbsa_vit_tiny", num_classes=7, img_size=64, decoder_depth=1,
        attn_options={"rep_grid": (2, 2)},
    )  # fmt: skip
    assert model(torch.randn(1, 3, 64, 96)).shape == (1, 7, 64, 96)
    with pytest.raises(ValueError, match=r"unknown segmenter 'seg_nope'.*seg_cbsa_vit_tiny"):
        create_segmenter("seg_nope")
    with pytest.raises(ValueError, match="multiple of the patch size 16"):
        model(torch.randn(1, 3, 64, 70))


def test_counts_report_the_decoders_share() -> None:
    cbsa = build_segmenter(
        tiny_encoder(), num_classes=4, decoder_attention="cbsa", attn_options={"rep_grid": (2, 2)}
    )
    mssa = build_segmenter(tiny_encoder(), num_classes=4, decoder_attention="mssa")
    for model in (cbsa, mssa):
        flops = count_flops(model, 32, by_module=True)
        share = decoder_share(flops)
        assert 0 < share < flops["Global"]
    sims = {
        name: decoder_share(count_pairwise_similarities(m, 32, by_module=True))
        for name, m in (("cbsa", cbsa), ("mssa", mssa))
    }
    # 4 class tokens + 64 patches per layer; heads 2; depth 2. MSSA: N^2 per head.
    assert sims["mssa"] == 2 * 2 * 68**2
    assert sims["cbsa"] == 2 * 2 * (68 * 4 + 4 * 5 // 2)


def test_confusion_matrix_against_hand_computed_ious() -> None:
    target = torch.tensor([[0, 0, 1, 1], [2, 2, VOID, 1]])
    pred = torch.tensor([[0, 1, 1, 1], [2, 0, 2, 2]])
    cm = ConfusionMatrix(4)
    cm.update(pred, target)
    # class 0: TP 1, FN 1 (0->1), FP 1 (2->0): 1/3; class 1: TP 2, FN 1, FP 1: 2/4;
    # class 2: TP 1, FN 1, FP 1 (1->2): 1/3; class 3: absent -> NaN. VOID is not scored.
    ious = cm.class_iou()
    assert torch.allclose(ious[:3], torch.tensor([1 / 3, 0.5, 1 / 3], dtype=torch.float64))
    assert math.isnan(ious[3])
    assert cm.miou() == pytest.approx((1 / 3 + 0.5 + 1 / 3) / 3)
    assert cm.pixel_accuracy() == pytest.approx(4 / 7)
    metrics = cm.metrics()
    assert metrics["val/miou"] == cm.miou() and "val/iou/002" in metrics
    # all-reduce over two "ranks" holding the same counts doubles them, IoUs unchanged
    cm.reduce(lambda t: (t * 2).tolist())
    assert int(cm.matrix.sum()) == 14 and cm.miou() == pytest.approx((1 / 3 + 0.5 + 1 / 3) / 3)


def test_confusion_matrix_refuses_labels_outside_the_classes() -> None:
    cm = ConfusionMatrix(3)
    with pytest.raises(ValueError, match="label 7 is outside the 3 classes"):
        cm.update(torch.zeros(2, 2, dtype=torch.long), torch.tensor([[0, 7], [1, VOID]]))


def test_sliding_window_equals_full_image_inference_when_the_window_covers_it() -> None:
    torch.manual_seed(0)
    model = build_segmenter(tiny_encoder(), num_classes=3, decoder_attention="mssa").eval()
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        full = model(images)
    slid = sliding_window_logits(model, images, window=32, stride=16, num_classes=3)
    torch.testing.assert_close(slid, full)


def test_sliding_windows_overlap_cover_and_average() -> None:
    assert window_starts(10, 4, 3) == [0, 3, 6]
    assert window_starts(11, 4, 3) == [0, 3, 6, 7]
    assert window_starts(3, 4, 2) == [0]
    # a pointwise model: every window gives the same logits at a pixel, so averages are exact
    conv = nn.Conv2d(3, 2, 1)
    images = torch.randn(1, 3, 20, 13)
    slid = sliding_window_logits(conv, images, window=8, stride=5, num_classes=2)
    torch.testing.assert_close(slid, conv(images).detach())


def test_projection_noise_scales_with_the_weights_rms() -> None:
    model = build_segmenter(tiny_encoder(), num_classes=3, decoder_attention="cbsa")
    before = [layer.qkv.weight.clone() for layer in model.decoder.attention_layers()]
    add_projection_noise(model.decoder.attention_layers(), 0.0, torch.Generator().manual_seed(0))
    for layer, weight in zip(model.decoder.attention_layers(), before, strict=True):
        torch.testing.assert_close(layer.qkv.weight, weight)
    add_projection_noise(model.decoder.attention_layers(), 0.5, torch.Generator().manual_seed(0))
    for layer, weight in zip(model.decoder.attention_layers(), before, strict=True):
        change = (layer.qkv.weight - weight).square().mean().sqrt()
        rms = weight.square().mean().sqrt()
        assert 0.3 * rms < change < 0.7 * rms
