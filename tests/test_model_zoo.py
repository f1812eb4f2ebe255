"""The timm-registered presets: parameter counts, the registry contract, reference checkpoints."""

from __future__ import annotations

import math

import pytest
import timm
import torch
import torch.nn.functional as F

from cbtlab.attention import ATTENTION_REGISTRY
from cbtlab.models import from_reference
from cbtlab.models.zoo import MODEL_NAMES

# Millions of parameters: the reference code's counts (CBT, CRATE-in-CBT, ToST), the original
# CRATE-B/L (22.8 M / 77.6 M) and timm's ViTs.
PARAMS_M = {
    "cbt_tiny_patch16_224": 1.79,
    "cbt_small_patch16_224": 6.67,
    "cbt_base_patch16_224": 25.69,
    "cbt_large_patch16_224": 83.05,
    "crate_conv_tiny_patch16_224": 1.79,
    "crate_conv_small_patch16_224": 6.67,
    "tost_conv_tiny_patch16_224": 1.79,
    "tost_conv_small_patch16_224": 6.67,
    "crate_base_patch16_224": 22.80,
    "crate_large_patch16_224": 77.64,
    "sdpa_vit_tiny_patch16_224": 5.72,
    "sdpa_vit_base_patch16_224": 86.57,
}


@pytest.mark.parametrize(("name", "millions"), sorted(PARAMS_M.items()))
def test_parameter_counts(name: str, millions: float) -> None:
    with torch.device("meta"):
        model = timm.create_model(name)
    count = sum(p.numel() for p in model.parameters())
    assert round(count / 1e6, 2) == millions


def test_timm_matches_our_vit_count() -> None:
    with torch.device("meta"):
        ours = timm.create_model("sdpa_vit_small_patch16_224")
        theirs = timm.create_model("vit_small_patch16_224")
    assert sum(p.numel() for p in ours.parameters()) == sum(p.numel() for p in theirs.parameters())


TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5, "rep_grid": (2, 2)}


def _check(model: torch.nn.Module, x: torch.Tensor) -> None:
    logits = model(x)
    assert logits.shape == (x.shape[0], 5) and torch.isfinite(logits).all()
    logits.logsumexp(-1).sum().backward()
    for pname, param in model.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, pname


@pytest.mark.parametrize("name", [n for n in MODEL_NAMES if "_tiny_" in n or "crate_base" in n])
def test_every_family(name: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(name, img_size=64, **TINY)
    _check(model, torch.randn(2, 3, 64, 48))  # non-square input, resampled positions


@pytest.mark.parametrize("attention", sorted(ATTENTION_REGISTRY))
def test_every_attention_in_the_cbt_skeleton(attention: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model("cbt_tiny_patch16_224", img_size=64, attention=attention, **TINY)
    _check(model, torch.randn(2, 3, 64, 64))


def test_hybrid_puts_mssa_first_and_cbsa_second() -> None:
    model = timm.create_model("crate_cbt_hybrid_small_patch16_224", img_size=64, depth=4)
    kinds = [type(block.attn).__name__ for block in model.blocks]
    assert kinds == ["MSSA", "MSSA", "CBSA", "CBSA"]


def test_pretrained_download_is_refused_with_the_way_out() -> None:
    with pytest.raises(ValueError, match="from_reference"):
        timm.create_model("cbt_tiny_patch16_224", pretrained=True)


# --- Reference checkpoints -------------------------------------------------------------------
# A forward pass written from the reference code's description, directly on a state dict in its
# layout: the conv-BN stem, PreNorm blocks, CBSA pooling w[:, :-1] as a sqrt(N) grid to 8 x 8.


def _reference_forward(sd: dict, x: torch.Tensor, kind: str, heads: int) -> torch.Tensor:
    convs = sorted(
        int(k.split(".")[2])
        for k in sd
        if k.startswith("to_patch_embedding") and k.endswith("0.weight")
    )
    for j, i in enumerate(convs):
        p = f"to_patch_embedding.proj.{i}"
        x = F.conv2d(x, sd[f"{p}.0.weight"], stride=2, padding=1)
        stats = sd[f"{p}.1.running_mean"], sd[f"{p}.1.running_var"]
        x = F.batch_norm(x, *stats, sd[f"{p}.1.weight"], sd[f"{p}.1.bias"], training=False)
        if j < len(convs) - 1:
            x = F.gelu(x)
    x = x.flatten(2).transpose(1, 2)
    b = x.shape[0]
    x = torch.cat([sd["cls_token"].expand(b, -1, -1), x], 1) + sd["pos_embedding"]
    layers = 1 + max(int(k.split(".")[2]) for k in sd if k.startswith("transformer.layers"))

    def ln(t, prefix):
        return F.layer_norm(t, t.shape[-1:], sd[f"{prefix}.weight"], sd[f"{prefix}.bias"])

    def split(t):
        return t.reshape(b, t.shape[1], heads, -1).permute(0, 2, 1, 3)

    for i in range(layers):
        p = f"transformer.layers.{i}"
        z = ln(x, f"{p}.0.norm")
        n, c = z.shape[1], z.shape[2]
        scale = (c // heads) ** -0.5
        if kind == "cbsa":
            w = z @ sd[f"{p}.0.fn.proj.weight"].T
            side = int(math.sqrt(n))
            grid = w[:, :-1].reshape(b, side, side, c).permute(0, 3, 1, 2)
            rep = F.adaptive_avg_pool2d(grid, (8, 8)).reshape(b, c, -1).permute(0, 2, 1)
            w, rep = split(w), split(rep)
            attn = torch.softmax(rep @ w.transpose(-1, -2) * scale, -1)
            rep = rep + sd[f"{p}.0.fn.step_rep"] * (attn @ w)
            delta = torch.softmax(rep @ rep.transpose(-1, -2) * scale, -1) @ rep
            out = sd[f"{p}.0.fn.step_x"] * (attn.transpose(-1, -2) @ delta)
        elif kind == "mssa":
            w = split(z @ sd[f"{p}.0.fn.qkv.weight"].T)
            out = torch.softmax(w @ w.transpose(-1, -2) * scale, -1) @ w
        else:  # tssa
            w = split(z @ sd[f"{p}.0.fn.qkv.weight"].T)
            pi = torch.softmax((F.normalize(w, dim=-2) ** 2).sum(-1) * sd[f"{p}.0.fn.temp"], dim=1)
            dots = (pi / (pi.sum(-1, keepdim=True) + 1e-8)).unsqueeze(-2) @ (w**2)
            out = -(w * pi.unsqueeze(-1)) * (1.0 / (1 + dots))
        out = out.permute(0, 2, 1, 3).reshape(b, n, c)
        x = x + out @ sd[f"{p}.0.fn.to_out.weight"].T + sd[f"{p}.0.fn.to_out.bias"]
        z = ln(x, f"{p}.1.norm")
        d = sd[f"{p}.1.fn.weight"]
        x = F.relu(z + 0.1 * (z @ d - (z @ d.T) @ d) - 0.1 * 0.1)
    return ln(x[:, 0], "mlp_head.0") @ sd["mlp_head.1.weight"].T + sd["mlp_head.1.bias"]


def _reference_state_dict(kind: str, dim: int, heads: int, depth: int, grid: int) -> dict:
    """Random weights in the reference layout (BatchNorm statistics included)."""
    g = torch.Generator().manual_seed(0)

    def rnd(*shape, scale=0.2):
        return torch.randn(*shape, generator=g) * scale

    sd = {}
    widths = [3, dim // 8, dim // 4, dim // 2, dim]
    for j, i in enumerate((0, 2, 4, 6)):
        p = f"to_patch_embedding.proj.{i}"
        sd[f"{p}.0.weight"] = rnd(widths[j + 1], widths[j], 3, 3)
        sd[f"{p}.1.weight"] = 1 + rnd(widths[j + 1], scale=0.1)
        sd[f"{p}.1.bias"] = rnd(widths[j + 1], scale=0.1)
        sd[f"{p}.1.running_mean"] = rnd(widths[j + 1], scale=0.1)
        sd[f"{p}.1.running_var"] = 1 + rnd(widths[j + 1], scale=0.1).abs()
        sd[f"{p}.1.num_batches_tracked"] = torch.tensor(100)
    sd["pos_embedding"] = rnd(1, 1 + grid * grid, dim)
    sd["cls_token"] = rnd(1, 1, dim)
    for i in range(depth):
        p = f"transformer.layers.{i}"
        for part in (0, 1):
            sd[f"{p}.{part}.norm.weight"] = 1 + rnd(dim, scale=0.1)
            sd[f"{p}.{part}.norm.bias"] = rnd(dim, scale=0.1)
        if kind == "cbsa":
            sd[f"{p}.0.fn.proj.weight"] = rnd(dim, dim)
            sd[f"{p}.0.fn.step_x"] = rnd(heads, 1, 1, scale=1.0)
            sd[f"{p}.0.fn.step_rep"] = rnd(heads, 1, 1, scale=1.0)
        else:
            sd[f"{p}.0.fn.qkv.weight"] = rnd(dim, dim)
        if kind == "tssa":
            sd[f"{p}.0.fn.temp"] = 1 + rnd(heads, 1, scale=0.3)
        sd[f"{p}.0.fn.to_out.weight"] = rnd(dim, dim)
        sd[f"{p}.0.fn.to_out.bias"] = rnd(dim, scale=0.1)
        sd[f"{p}.1.fn.weight"] = rnd(dim, dim)
    sd["mlp_head.0.weight"] = 1 + rnd(dim, scale=0.1)
    sd["mlp_head.0.bias"] = rnd(dim, scale=0.1)
    sd["mlp_head.1.weight"] = rnd(7, dim)
    sd["mlp_head.1.bias"] = rnd(7, scale=0.1)
    return sd


@pytest.mark.parametrize(
    ("kind", "name"),
    [("cbsa", "cbt_tiny_patch16_224"), ("mssa", "crate_conv_tiny_patch16_224"),
     ("tssa", "tost_conv_tiny_patch16_224")],
)  # fmt: skip
def test_from_reference_gives_the_reference_logits(kind: str, name: str) -> None:
    dim, heads, depth = 48, 3, 2
    sd = _reference_state_dict(kind, dim, heads, depth, grid=14)
    checkpoint = {"state_dict": {f"module.{k}": v for k, v in sd.items()}}
    model = from_reference(checkpoint, name, embed_dim=dim, num_heads=heads, depth=depth).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        ours, theirs = model(x), _reference_forward(sd, x, kind, heads)
    assert ours.shape == (2, 7)
    torch.testing.assert_close(ours, theirs, rtol=0, atol=1e-4)


def test_from_reference_names_what_does_not_fit() -> None:
    sd = _reference_state_dict("cbsa", 48, 3, 2, grid=14)
    sd["transformer.layers.0.0.fn.extra"] = torch.zeros(1)
    with pytest.raises(KeyError, match=r"fn\.extra"):
        from_reference(sd, "cbt_tiny_patch16_224", embed_dim=48, num_heads=3, depth=2)
    sd = _reference_state_dict("mssa", 48, 3, 2, grid=14)
    with pytest.raises(KeyError, match="lacks"):  # an MSSA checkpoint into a CBSA model
        from_reference(sd, "cbt_tiny_patch16_224", embed_dim=48, num_heads=3, depth=2)


@pytest.mark.parametrize("attention", sorted(ATTENTION_REGISTRY))
def test_intermediates_give_tokens_and_attention_maps(attention: str) -> None:
    torch.manual_seed(0)
    model = timm.create_model(
        "cbt_tiny_patch16_224", img_size=64, attention=attention, **TINY
    ).eval()
    x = torch.randn(2, 3, 64, 64)
    with torch.no_grad():
        tokens, maps = model.forward_intermediates(x, attention=True, attention_rows=[0])
        _, all_rows = model.forward_intermediates(x, attention=True)
        torch.testing.assert_close(tokens[-1], model.forward_features(x))
    assert len(tokens) == len(maps) == 2 and tokens[0].shape == (2, 17, 32)
    if attention in ("tssa", "linear"):
        assert maps == [None, None]
        return
    for cls_map, full in zip(maps, all_rows, strict=True):
        assert cls_map.shape == (2, 2, 1, 17) and full.shape == (2, 2, 17, 17)
        torch.testing.assert_close(cls_map[:, :, 0], full[:, :, 0])
        if attention != "cbsa":  # rows of a softmax-type map are distributions
            torch.testing.assert_close(full.sum(-1), torch.ones(2, 2, 17), atol=1e-5, rtol=0)


def test_cbsa_map_is_a_transpose_a() -> None:
    torch.manual_seed(0)
    model = timm.create_model("cbt_tiny_patch16_224", img_size=64, **TINY).eval()
    with torch.no_grad():
        x, grid = model._embed(torch.randn(1, 3, 64, 64))
        block = model.blocks[0]
        a = block.attn.extraction(block.norm1(x), grid)  # (1, K, m, N)
        full = block.attn.attention_map(block.norm1(x), grid)
    torch.testing.assert_close(full, a.transpose(-1, -2) @ a)
