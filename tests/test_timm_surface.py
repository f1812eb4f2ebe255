"""timm's model surface on every registered name, at a tiny size: creation, the classifier,
layer-decay groups, gradient checkpointing, the pretrained_cfg as timm's data config reads it,
and pretrained loading from a file (our training's state.pt, the authors' layout)."""

from __future__ import annotations

import subprocess
import sys
from pathlib import Path

import pytest
import timm
import timm.optim
import torch
from timm.data import IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD, resolve_model_data_config
from torch import nn

from cbtlab.checkpoint import STATE_FILE, make_state, save_state
from cbtlab.config import ExperimentConfig
from cbtlab.models import from_reference
from cbtlab.models.transformer import resample_pos_embed
from cbtlab.models.zoo import MODEL_NAMES
from test_model_zoo import _reference_state_dict

TINY = {"embed_dim": 32, "depth": 2, "num_heads": 2, "num_classes": 5, "rep_grid": (2, 2)}
SIZE = 32  # a 2 x 2 patch grid


def _model(name: str, **overrides: object) -> nn.Module:
    torch.manual_seed(0)
    return timm.create_model(name, img_size=SIZE, **{**TINY, **overrides})


def _images(channels: int = 3) -> torch.Tensor:
    return torch.randn(2, channels, SIZE, SIZE, generator=torch.Generator().manual_seed(1))


def test_import_cbtlab_alone_registers_every_name_without_loading_torch() -> None:
    code = (
        "import sys, cbtlab\n"
        "assert 'torch' not in sys.modules and 'timm' not in sys.modules\n"
        "import timm\n"
        f"missing = [n for n in {MODEL_NAMES!r} if not timm.is_model(n)]\n"
        "assert not missing, missing\n"
        "print(len(timm.list_models('cbt_*')))\n"
    )
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True)
    assert out.returncode == 0, out.stderr[-3000:]
    assert out.stdout.split() == ["4"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_the_classifier_resets(name: str) -> None:
    model = _model(name).eval()
    x = _images()
    assert model.get_classifier() is model.head
    assert model.num_features == model.head_hidden_size == TINY["embed_dim"]
    assert model(x).shape == (2, 5)
    model.reset_classifier(7)
    assert model.num_classes == 7 and model(x).shape == (2, 7)
    model.reset_classifier(0)  # no classifier: the pooled features
    assert isinstance(model.get_classifier(), nn.Identity)
    assert model(x).shape == (2, model.num_features)
    token = model(x)
    model.reset_classifier(0, global_pool="avg")
    assert model.global_pool == "avg" and not torch.allclose(model(x), token)
    with pytest.raises(ValueError, match="global_pool"):
        model.reset_classifier(3, global_pool="max")


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_group_matcher_places_every_parameter_for_layer_decay(name: str) -> None:
    model = _model(name)
    groups = timm.models.group_parameters(model, model.group_matcher())
    placed = [p for names in groups.values() for p in names]
    assert sorted(placed) == sorted(n for n, _ in model.named_parameters())
    # Stem, each block, head; unmatched names would fall into an extra last group.
    assert len(groups) == TINY["depth"] + 2
    matchers = model.group_matcher(coarse=True)
    assert timm.models.group_parameters(model, matchers) == groups
    optimizer = timm.optim.create_optimizer_v2(model, "adamw", lr=1e-3, layer_decay=0.75)
    scale = {id(p): g["lr_scale"] for g in optimizer.param_groups for p in g["params"]}
    assert len(scale) == len(list(model.parameters()))
    params = dict(model.named_parameters())
    assert scale[id(params["head.weight"])] == scale[id(params["norm.weight"])] == 1.0
    assert scale[id(params["cls_token"])] == 0.75 ** (TINY["depth"] + 1)
    assert scale[id(params["blocks.1.norm1.weight"])] == 0.75


def _block_calls(model: nn.Module) -> list[int]:
    calls = [0] * len(model.blocks)
    for i, block in enumerate(model.blocks):
        block.register_forward_pre_hook(lambda *_, i=i: calls.__setitem__(i, calls[i] + 1))
    return calls


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_grad_checkpointing_recomputes_the_blocks_with_the_same_gradients(name: str) -> None:
    model = _model(name).train()
    x = _images()
    grads = []
    for checkpointing in (False, True):
        model.set_grad_checkpointing(checkpointing)
        model.zero_grad(set_to_none=True)
        calls = _block_calls(model)
        model(x).logsumexp(-1).sum().backward()
        # Checkpointed, each block starts again in the backward pass (to recompute).
        assert calls == [2 if checkpointing else 1] * TINY["depth"]
        grads.append({n: p.grad.clone() for n, p in model.named_parameters()})
        for block in model.blocks:
            block._forward_pre_hooks.clear()
    for key, plain in grads[0].items():
        torch.testing.assert_close(grads[1][key], plain, rtol=0, atol=0, msg=key)
    calls = _block_calls(model)
    with torch.no_grad():  # nothing to recompute for
        model(x)
    assert calls == [1] * TINY["depth"]


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_pretrained_cfg_is_what_timm_resolves(name: str) -> None:
    model = _model(name)
    assert resolve_model_data_config(model) == {
        "input_size": (3, 224, 224),
        "interpolation": "bicubic",
        "mean": IMAGENET_DEFAULT_MEAN,
        "std": IMAGENET_DEFAULT_STD,
        "crop_pct": 0.875,
        "crop_mode": "center",
    }
    cfg = model.pretrained_cfg
    assert cfg["num_classes"] == 1000 and cfg["architecture"] == name
    assert model.get_submodule(cfg["classifier"]) is model.get_classifier()
    convs = [m for m in model.modules() if isinstance(m, nn.Conv2d)]
    if cfg["first_conv"] is None:  # CRATE's linear stem: nothing for timm to adapt
        assert "linear" in type(model.patch_embed).__name__.lower() and not convs
    else:
        first = model.get_submodule(cfg["first_conv"])
        assert first is convs[0] and first.in_channels == 3


def _save_as_training_does(model: nn.Module, folder: Path) -> Path:
    optimizer = torch.optim.AdamW(model.parameters())
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    state = make_state(
        ExperimentConfig(),
        epoch=1,
        model=model,
        optimizer=optimizer,
        scheduler=scheduler,
        metrics={},
        normalisation=(IMAGENET_DEFAULT_MEAN, IMAGENET_DEFAULT_STD),
    )
    save_state(state, folder)
    return folder / STATE_FILE


@pytest.mark.parametrize("name", MODEL_NAMES)
def test_pretrained_from_our_checkpoint_gives_the_same_logits(name: str, tmp_path: Path) -> None:
    trained = _model(name).train()
    with torch.no_grad():  # BatchNorm statistics of its own, as training leaves them
        trained(_images() * 2 + 1)
    path = _save_as_training_does(trained.eval(), tmp_path)
    overlay = {"file": str(path), "num_classes": TINY["num_classes"]}
    loaded = _model(name, pretrained=True, pretrained_cfg_overlay=overlay).eval()
    x = _images()
    with torch.no_grad():
        assert torch.equal(loaded(x), trained(x))
    # Another class count: timm drops the checkpoint's head and keeps everything else.
    fresh = _model(name, pretrained=True, pretrained_cfg_overlay=overlay, num_classes=3)
    for key, value in fresh.state_dict().items():
        assert key.startswith("head.") or torch.equal(value, trained.state_dict()[key]), key
    if model_first_conv := fresh.pretrained_cfg["first_conv"]:
        # One input channel: timm folds the first convolution's colours (its first_conv).
        grey = _model(name, pretrained=True, pretrained_cfg_overlay=overlay, in_chans=1)
        weight = trained.get_submodule(model_first_conv).weight
        torch.testing.assert_close(
            grey.get_submodule(model_first_conv).weight, weight.sum(1, keepdim=True)
        )
        assert grey(_images(1)).shape == (2, 5)


def test_pretrained_at_another_size_resamples_the_position_embedding(tmp_path: Path) -> None:
    trained = _model("cbt_tiny_patch16_224").eval()
    path = _save_as_training_does(trained, tmp_path)
    overlay = {"file": str(path), "num_classes": TINY["num_classes"]}
    larger = timm.create_model(
        "cbt_tiny_patch16_224", img_size=2 * SIZE, pretrained=True,
        pretrained_cfg_overlay=overlay, **TINY,
    )  # fmt: skip
    expected = resample_pos_embed(trained.pos_embed, (2, 2), (4, 4))
    torch.testing.assert_close(larger.pos_embed, expected, rtol=0, atol=0)


@pytest.mark.parametrize(
    ("kind", "name"),
    [("cbsa", "cbt_tiny_patch16_224"), ("mssa", "crate_conv_tiny_patch16_224"),
     ("tssa", "tost_conv_tiny_patch16_224")],
)  # fmt: skip
def test_pretrained_from_the_authors_checkpoint_matches_from_reference(
    kind: str, name: str, tmp_path: Path
) -> None:
    dim, heads, depth = 48, 3, 2
    sd = _reference_state_dict(kind, dim, heads, depth, grid=14)
    path = tmp_path / "model_best.pth.tar"
    torch.save({"epoch": 300, "state_dict": {f"module.{k}": v for k, v in sd.items()}}, path)
    arch = {"embed_dim": dim, "num_heads": heads, "depth": depth}
    ours = from_reference(torch.load(path, weights_only=True), name, **arch).eval()
    through_timm = timm.create_model(
        name,
        pretrained=True,
        pretrained_cfg_overlay={"file": str(path), "num_classes": 7},
        num_classes=7,
        legacy_pool=True,  # the reference's pooling, as from_reference sets it
        **arch,
    ).eval()
    x = torch.randn(2, 3, 224, 224, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        assert torch.equal(through_timm(x), ours(x))


def test_pretrained_without_a_file_says_how_to_give_one() -> None:
    with pytest.raises(ValueError, match=r"pretrained_cfg_overlay=dict\(file=PATH\)"):
        timm.create_model("cbt_tiny_patch16_224", pretrained=True)
