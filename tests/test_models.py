"""The CBT backbone and the ISTA block."""

from __future__ import annotations

import pytest
import timm
import torch
from timm.utils import reparameterize_model
from torch import nn

from cbtlab.config import ModelConfig
from cbtlab.models import ISTA, build_model
from cbtlab.models.blocks import LayerNorm
from tensor_recorder import TensorRecorder


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


def test_ista_under_autocast_casts_the_tokens_once() -> None:
    """Under bf16 autocast, with float32 tokens in (as a LayerNorm under CUDA's autocast gives
    them), ISTA converts the tokens once forward and their gradient once back; the rest runs
    in bf16 and agrees with the float32 step to bf16's precision."""
    torch.manual_seed(0)
    ista = ISTA(32, step=0.3, lambd=0.05)
    x = torch.randn(2, 40, 32, requires_grad=True)
    with TensorRecorder() as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ista(x)
        out.backward(torch.ones_like(out))
    casts = [c.shape for c in rec.calls if c.op == "aten._to_copy"]
    tokens = [shape for shape in casts if shape[0] == 80]  # (B N, d)
    assert out.dtype == torch.bfloat16
    assert tokens == [(80, 32), (80, 32)], casts  # forward in, gradient back
    torch.testing.assert_close(out.float(), ista(x), atol=0.1, rtol=0.05)


def test_reparameterize_folds_the_conv_stems_batchnorms() -> None:
    """timm's reparameterize_model folds each stem BatchNorm into its convolution (eval mode):
    the same logits without a BatchNorm pass; a model in training mode is refused."""
    torch.manual_seed(0)
    model = timm.create_model("cbt_tiny_patch16_224", img_size=128, num_classes=10)
    model(torch.randn(8, 3, 128, 128))  # training steps move the running statistics off 0 / 1
    model.eval()
    deployed = reparameterize_model(model)
    assert not any(isinstance(m, nn.BatchNorm2d) for m in deployed.modules())
    assert any(isinstance(m, nn.BatchNorm2d) for m in model.modules())  # a copy was folded
    images = torch.randn(2, 3, 128, 128)
    with torch.inference_mode():
        torch.testing.assert_close(deployed(images), model(images), atol=1e-4, rtol=1e-4)
    with pytest.raises(ValueError, match="only in eval mode"):
        reparameterize_model(model.train())


def test_block_layer_norm_runs_in_autocasts_dtype() -> None:
    """Outside autocast the blocks' LayerNorm is nn.LayerNorm's; under autocast its kernel
    takes and gives autocast's dtype, affine map included (no float32 copy of the tokens
    either way), and agrees with the float32 norm to bf16's precision, gradients included."""
    torch.manual_seed(0)
    ours, plain = LayerNorm(48, eps=1e-6), nn.LayerNorm(48, eps=1e-6)
    with torch.no_grad():
        for norm in (ours, plain):
            norm.weight.copy_(torch.linspace(0.5, 1.5, 48))
            norm.bias.copy_(torch.linspace(-0.2, 0.2, 48))
    x = torch.randn(3, 20, 48)
    assert torch.equal(ours(x), plain(x))
    tokens = x.bfloat16().requires_grad_()
    with TensorRecorder() as rec:
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = ours(tokens)
        out.backward(torch.ones_like(out))
    casts = [c.shape for c in rec.calls if c.op == "aten._to_copy"]
    norms = [c.dtypes for c in rec.calls if c.op == "aten.native_layer_norm"]
    assert out.dtype == torch.bfloat16 and tokens.grad.dtype == torch.bfloat16
    assert all(shape == (48,) for shape in casts), casts  # the affine map only
    # One dtype into the kernel, as CUDA's LayerNorm requires of a bf16 input (a float32
    # weight beside bf16 tokens runs on CPUs only, and CUDA's autocast would take float32).
    assert norms == [(torch.bfloat16,) * 3], norms
    torch.testing.assert_close(out.float(), plain(tokens.float()), atol=0.05, rtol=0.02)
    assert ours.weight.grad is not None and ours.weight.grad.dtype == torch.float32
