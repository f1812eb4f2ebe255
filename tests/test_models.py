"""The CBT backbone and the ISTA block."""

from __future__ import annotations

import pytest
import torch

from cbtlab.config import ModelConfig
from cbtlab.models import ISTA, build_model


def test_ista_is_one_proximal_step() -> None:
    torch.manual_seed(0)
    ista = ISTA(8, step=0.1, lambd=0.1)
    z = torch.randn(3, 5, 8)
    d = ista.weight
    expected = torch.relu(z + 0.1 * (z @ d - z @ d.T @ d) - 0.1 * 0.1)
    torch.testing.assert_close(ista(z), expected)


@pytest.mark.parametrize("global_pool", ["token", "avg"])
@pytest.mark.parametrize("rep_grid", [(1, 1), (2, 4), (4, 4)])
def test_cbt_forward_backward(rep_grid: tuple[int, int], global_pool: str) -> None:
    torch.manual_seed(0)
    cfg = ModelConfig(
        embed_dim=24, depth=2, num_heads=3, rep_grid=rep_grid, global_pool=global_pool
    )
    cfg.validate()
    model = build_model(cfg)
    assert all(block.attn.rep_grid == rep_grid for block in model.blocks)
    x = torch.randn(4, 1, 16, 16)
    logits = model(x)
    assert logits.shape == (4, 10)
    assert torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    unused = {"cls_token"} if global_pool == "avg" else set()
    for name, param in model.named_parameters():
        if name in unused:
            continue
        assert param.grad is not None and param.grad.abs().sum() > 0, name
    features = model.forward_features(x)
    assert features.shape == (4, 1 + 64, 24)
    assert model.forward_head(features, pre_logits=True).shape == (4, 24)


def test_other_input_sizes_resample_the_position_embedding() -> None:
    torch.manual_seed(0)
    model = build_model(ModelConfig(embed_dim=24, depth=1, num_heads=3)).eval()
    assert model._pos_embed((8, 8)) is model.pos_embed
    resampled = model._pos_embed((12, 6))  # non-square grid
    assert resampled.shape == (1, 1 + 72, 24)
    torch.testing.assert_close(resampled[:, 0], model.pos_embed[:, 0])  # CLS position kept
    assert model(torch.randn(2, 1, 24, 12)).shape == (2, 10)
    with pytest.raises(ValueError, match="not a multiple of patch size"):
        model(torch.randn(1, 1, 15, 16))


def test_ista_two_product_form_equals_the_reference() -> None:
    """(Z - Z D^T) D = Z D - Z D^T D: output and gradients match the three-product form."""
    torch.manual_seed(0)
    ista = ISTA(12, step=0.3, lambd=0.2).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64, requires_grad=True)
    results = []
    for fused in (False, True):
        ista.fused = fused
        ista.zero_grad()
        x.grad = None
        out = ista(x)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        results.append((out.detach(), x.grad.clone(), ista.weight.grad.clone()))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want)
