"""cbtlab.models.adapt: a pretrained timm ViT with its attention replaced (the paper's Fig. 9),
its weights from a local file; the config, fine-tuning and study paths that use it."""

from __future__ import annotations

import argparse

import pytest
import timm
import torch
from safetensors.torch import load_file

from cbtlab.analysis import count_flops
from cbtlab.config import ConfigError, ExperimentConfig
from cbtlab.models import build_model
from cbtlab.models.adapt import FORMS, adapt_vit, load_vit, vit_fields, write_random_vit
from cbtlab.train.finetune import init_from, read_start

NAME = "vit_tiny_patch16_224"
IMG = 32  # a 2 x 2 patch grid: fast


@pytest.fixture(scope="module")
def vit_file(tmp_path_factory: pytest.TempPathFactory):
    """A randomly initialised "pretrained" tiny ViT on disk, in timm's layout (224 px, 3
    channels, 1000 classes)."""
    return write_random_vit(NAME, tmp_path_factory.mktemp("vit") / f"{NAME}.safetensors")


def _vit(path, **kwargs):
    return load_vit(NAME, path, **{"num_classes": 10, "img_size": IMG, "in_chans": 3, **kwargs})


def _adapted_config(path, **model):
    fields = {f"model.{k}": v for k, v in vit_fields(NAME).items()}
    return ExperimentConfig().with_overrides(
        {
            **fields,
            "model.adapt_from": NAME,
            "model.img_size": IMG,
            "model.in_chans": 3,
            "model.rep_grid": "1x1",
            "train.init_from": str(path),
            **{f"model.{k}": v for k, v in model.items()},
        }
    )


def test_softmax_reproduces_the_vit(vit_file) -> None:
    vit = _vit(vit_file).eval()
    model = adapt_vit(vit, "softmax").eval()
    x = torch.randn(3, 3, IMG, IMG)
    with torch.no_grad():
        torch.testing.assert_close(model(x), vit(x))


def test_inherited_weights_are_the_files(vit_file) -> None:
    saved = load_file(str(vit_file))
    d = saved["cls_token"].shape[-1]
    cbsa = adapt_vit(_vit(vit_file), "cbsa", {"contraction": "none", "rep_grid": (1, 1)})
    ours = cbsa.state_dict()
    for key in ("cls_token", "patch_embed.proj.weight", "blocks.3.norm1.weight", "norm.bias"):
        torch.testing.assert_close(ours[key], saved[key], rtol=0, atol=0)
    for i in (0, 11):
        p = f"blocks.{i}."
        torch.testing.assert_close(ours[p + "mlp.fc2.weight"], saved[p + "mlp.fc2.weight"])
        qkv_w, qkv_b = saved[p + "attn.qkv.weight"], saved[p + "attn.qkv.bias"]
        torch.testing.assert_close(ours[p + "attn.qkv.weight"], qkv_w[2 * d :])  # U = W_v
        proj_w = saved[p + "attn.proj.weight"]
        torch.testing.assert_close(ours[p + "attn.proj.weight"], proj_w)
        expected = saved[p + "attn.proj.bias"] + proj_w @ qkv_b[2 * d :]
        torch.testing.assert_close(ours[p + "attn.proj.bias"], expected)
    # The file has 1000 classes: the 10-class head is new.
    assert ours["head.weight"].shape == (10, d)
    linear = adapt_vit(_vit(vit_file), "linear_attention").state_dict()
    torch.testing.assert_close(
        linear["blocks.5.attn.qkv.weight"], saved["blocks.5.attn.qkv.weight"]
    )
    torch.testing.assert_close(linear["blocks.5.attn.qkv.bias"], saved["blocks.5.attn.qkv.bias"])


def test_the_reference_layer_inherits_the_whole_attention(vit_file) -> None:
    """qkv_agent (the authors' adapted layer) takes the ViT's q, k, v and output projection as
    they are, and computes softmax(s q Q0^T) softmax(s Q0 K^T) V with Q0 the queries pooled
    over the patch grid: checked against the equations written out here."""
    saved = load_file(str(vit_file))
    vit = load_vit(NAME, vit_file, num_classes=10, img_size=64, in_chans=3).eval()
    model = adapt_vit(vit, "qkv_agent", {"rep_grid": (2, 2)}).eval()
    ours = model.state_dict()
    for key in ("attn.qkv.weight", "attn.qkv.bias", "attn.proj.weight", "attn.proj.bias"):
        torch.testing.assert_close(ours[f"blocks.7.{key}"], saved[f"blocks.7.{key}"])
    attn = model.blocks[0].attn
    heads, d = attn.num_heads, ours["cls_token"].shape[-1]
    p = d // heads
    x = torch.randn(2, 1 + 16, d)  # a CLS token and a 4 x 4 patch grid
    q, k, v = (t.view(2, 17, heads, p).transpose(1, 2) for t in attn.qkv(x).chunk(3, dim=-1))
    grid = q[:, :, 1:].transpose(-1, -2).reshape(2 * heads, p, 4, 4)
    reps = torch.nn.functional.adaptive_avg_pool2d(grid, 2).reshape(2, heads, p, 4)
    reps = reps.transpose(-1, -2)  # (B, K, m, p)
    gathered = torch.softmax(reps @ k.transpose(-1, -2) / p**0.5, dim=-1) @ v
    read = torch.softmax(q @ reps.transpose(-1, -2) / p**0.5, dim=-1)
    expected = attn.proj((read @ gathered).transpose(1, 2).reshape(2, 17, d))
    with torch.no_grad():
        torch.testing.assert_close(attn(x, (4, 4)), expected)
        mixed = attn.attention_map(x, (4, 4)) @ v  # the map is the layer's token mixing
        torch.testing.assert_close(attn.proj(mixed.transpose(1, 2).reshape(2, 17, d)), expected)
    assert attn.pairwise_similarities(17) == heads * 2 * 17 * 4


@pytest.fixture(scope="module")
def vit():
    """A 2-layer tiny ViT (the adapter reads the depth from the model): fast to train."""
    torch.manual_seed(0)
    return timm.create_model(NAME, depth=2, img_size=IMG, num_classes=10)


@pytest.mark.parametrize("form", sorted(FORMS))
def test_every_form_trains_and_counts(vit, form: str) -> None:
    fields = {"contraction": "softmax", **FORMS[form]}
    torch.manual_seed(0)
    model = adapt_vit(vit, fields.pop("attention"), {**fields, "rep_grid": (1, 1)})
    x, y = torch.randn(4, 3, IMG, IMG), torch.arange(4)
    opt = torch.optim.AdamW(model.parameters(), lr=1e-3)
    losses = []
    for _ in range(4):
        loss = torch.nn.functional.cross_entropy(model(x), y)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]
    assert count_flops(model, IMG) > 0


def test_the_config_path_matches_the_adapter(vit_file, tmp_path) -> None:
    """`train.init_from` with `model.adapt_from` starts the model as `adapt_vit` builds it;
    a one-channel model gets the first convolution summed and one-channel statistics."""
    cfg = _adapted_config(vit_file, attention="cbsa", contraction="none")
    model = build_model(cfg.model)
    init_from(model, vit_file, cfg.model)
    reference = adapt_vit(_vit(vit_file), "cbsa", {"contraction": "none", "rep_grid": (1, 1)})
    for key, value in reference.state_dict().items():
        if "step" not in key and not key.startswith("head."):
            torch.testing.assert_close(model.state_dict()[key], value, msg=key)
    pth = tmp_path / "vit.pth"  # timm's other layout: a torch state dict
    torch.save(load_file(str(vit_file)), pth)
    from_pth = read_start(pth, cfg.model).weights
    torch.testing.assert_close(
        from_pth["blocks.2.mlp.fc1.weight"], reference.blocks[2].mlp.fc1.weight
    )
    grey = _adapted_config(vit_file, in_chans=1)
    start = read_start(vit_file, grey.model)
    assert start.weights["patch_embed.proj.weight"].shape[1] == 1
    assert start.normalisation is not None and len(start.normalisation[0]) == 1


def test_bad_inputs_are_named(vit_file, tmp_path) -> None:
    small = write_random_vit("vit_small_patch16_224", tmp_path / "small.safetensors")
    with pytest.raises(ValueError, match="another ViT size"):
        _vit(small)
    for name in ("resnet50", "vit_base_patch32_224", "vit_base_patch16_384"):
        with pytest.raises(ValueError, match="not a ViT the adapter takes"):
            load_vit(name, vit_file, num_classes=10, img_size=IMG, in_chans=3)
    with pytest.raises(ValueError, match="no ViT weights file"):
        _vit(tmp_path / "missing.safetensors")
    with pytest.raises(ValueError, match="not a timm VisionTransformer"):
        adapt_vit(timm.create_model("resnet18"))
    with pytest.raises(ConfigError, match=r"model\.adapt_from: 'resnet50' is not a ViT"):
        ExperimentConfig().with_overrides({"model.adapt_from": "resnet50"})
    with pytest.raises(ConfigError, match=r"--set model\.embed_dim=192"):
        ExperimentConfig().with_overrides({"model.adapt_from": NAME})
    cfg = _adapted_config(small)  # a small ViT's file for the tiny model
    with pytest.raises(ValueError, match=r"train\.init_from: .*another ViT size"):
        read_start(small, cfg.model)
    with pytest.raises(ValueError, match="not a URI"):
        read_start("s3://bucket/vit.safetensors", cfg.model)


def test_study_cells(tmp_path, monkeypatch) -> None:
    """The study's grid: forms x sizes, only what varies in a cell, the smoke preset's random
    stand-in weights written once."""
    from cbtlab.tune.cli import _adaptation_specs, vit_adaptation_parser

    monkeypatch.setenv("CBTLAB_HOME", str(tmp_path))
    forms = ["softmax", "cbsa", "cbsa_nocontract"]
    args = vit_adaptation_parser().parse_args(["--preset", "smoke", "--forms", *forms])
    (spec,) = _adaptation_specs(args).values()
    assert spec.seeds == 2
    assert [(c["model.attention"], c["model.contraction"]) for c in spec.cells] == [
        ("softmax", "softmax"),
        ("cbsa", "softmax"),
        ("cbsa", "none"),
    ]
    assert set(spec.space) == {"model.attention", "model.contraction"}
    assert spec.base.model.adapt_from == NAME and spec.base.model.img_size == 48
    assert spec.base.train.init_from.endswith(f"random_{NAME}.safetensors")
    default = vit_adaptation_parser().parse_args(["--preset", "smoke"])
    (spec,) = _adaptation_specs(default).values()  # the smoke's forms: the paper's claim
    assert [c["model.attention"] for c in spec.cells] == ["softmax", "cbsa", "linear_attention"]
    assert spec.cells[1]["model.contraction"] == "none"
    bad = vit_adaptation_parser().parse_args(["--preset", "imagenet"])
    with pytest.raises(ConfigError, match="--weights"):
        _adaptation_specs(bad)
    sizes = argparse.Namespace(**{**vars(args), "sizes": ["tiny", "small"], "weights": [
        f"tiny={tmp_path / 'nope'}"]})  # fmt: skip
    with pytest.raises(ConfigError, match="no ViT weights file"):
        _adaptation_specs(sizes)
    tiny_file = spec.base.train.init_from
    other = argparse.Namespace(**{**vars(args), "sizes": ["small"], "weights": [
        f"small={tiny_file}"]})  # fmt: skip
    with pytest.raises(ConfigError, match=r"--weights: small: .*another ViT size"):
        _adaptation_specs(other)
