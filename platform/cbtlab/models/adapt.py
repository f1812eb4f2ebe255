"""Adapting a pretrained timm ViT into CBSA style (the paper's Fig. 9).

A timm `vit_{tiny,small,base,large}_patch16_224` (any pretrained tag, e.g.
`vit_base_patch16_224.augreg_in21k`) is the same network as our `CBTransformer` with the patch
stem, MLP blocks, CLS-token pooling and LayerNorms of epsilon 1e-6 (`NORM_EPS`); only its
attention changes, to any name of the attention registry (`cbtlab.attention`): "cbsa" (with
`contraction="none"`: CBSA without the contraction step), "qkv_agent" (CBSA without the
contraction step on the ViT's own q, k and v: the authors' adapted layer), "linear_attention"
(kernelised linear attention), or "softmax" (the ViT itself: its logits are reproduced
exactly).

What maps to what (timm name -> ours; every other tensor is initialised as our model does):
    cls_token, pos_embed, patch_embed.proj.*       -> the same  (pos_embed resampled by timm to
                                                      model.img_size, the first convolution
                                                      summed over colours for in_chans=1)
    blocks.{i}.norm1.*, norm2.*, mlp.fc1.*, fc2.*  -> the same
    norm.*                                          -> norm.*
    head.*                                          -> head.* where the class count is the
                                                      file's, else a new head
    blocks.{i}.attn.qkv.*, attn.proj.*  for mechanisms with ViT's projections (softmax,
        qkv_agent, linear_attention: `qkv` is Linear(d, 3d) with bias)  -> the same, q, k and v
        kept; qkv_agent's representatives are the pretrained queries pooled over the patch grid
    for the white-box mechanisms (cbsa, agent, mssa, tssa, linear), whose one bias-free
    projection U (`qkv`, d x d) gives the subspaces the tokens are compared and mixed in:
        the value rows W_v of attn.qkv.weight       -> blocks.{i}.attn.qkv.weight  (U = W_v)
        attn.proj.weight P                          -> blocks.{i}.attn.proj.weight
        attn.proj.bias + P b_v (b_v: the value bias) -> blocks.{i}.attn.proj.bias
    The values are what the output projection was trained to read, so U = W_v keeps the layer's
    output in the space the pretrained P, MLP and head expect; the value bias, which a mixture
    whose weights sum to one passes through unchanged, is folded into the output bias. The
    query and key rows have no place in a mechanism that compares the tokens' projections with
    one another: this is the paper's CBSA. The reference code's adaptation
    (`CBSA_finetune_vit/attention.py`) keeps q, k and v instead: its layer is `qkv_agent`
    (the form "cbsa_nocontract_qkv"), which inherits the whole pretrained attention.
    New: CBSA's step sizes eta_rep, eta_x and the linear variant's eta (model.step_init and
    step_scale; "constant" 1 starts CBSA as `A^T contract(Q0 + A W)`), TSSA's temperature.

Weights come from a local file (no hub is reachable): `load_vit(name, path, ...)` is
`timm.create_model(name, pretrained=True, pretrained_cfg_overlay=dict(file=path), ...)` for
timm's .safetensors / .pth / .bin files, and timm's own loader for big_vision's .npz files.
"""

from __future__ import annotations

import os
import re
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import timm
import torch
from timm.models.vision_transformer import VisionTransformer
from torch import Tensor, nn

from cbtlab.models.transformer import CBTransformer

# The ViTs the adapter takes: timm's patch-16 family at 224 px (any pretrained tag).
VIT_NAME = re.compile(r"^vit_(tiny|small|base|large)_patch16_224(\.[\w-]+)?$")
VIT_SIZES: dict[str, dict[str, int]] = {
    "tiny": {"embed_dim": 192, "depth": 12, "num_heads": 3},
    "small": {"embed_dim": 384, "depth": 12, "num_heads": 6},
    "base": {"embed_dim": 768, "depth": 12, "num_heads": 12},
    "large": {"embed_dim": 1024, "depth": 24, "num_heads": 16},
}
# What every ViT of the family shares, as model config fields.
VIT_SKELETON: dict[str, Any] = {
    "stem": "patch",
    "block": "mlp",
    "patch_size": 16,
    "mlp_ratio": 4.0,
    "global_pool": "token",
}
NORM_EPS = 1e-6  # timm's ViT LayerNorms
# Attention forms of Fig. 9 by name -> model config fields.
FORMS: dict[str, dict[str, str]] = {
    "softmax": {"attention": "softmax"},
    "cbsa": {"attention": "cbsa", "contraction": "softmax"},
    "cbsa_nocontract": {"attention": "cbsa", "contraction": "none"},
    # the reference code's adapted layer: CBSA without contraction on the ViT's q, k, v
    "cbsa_nocontract_qkv": {"attention": "qkv_agent"},
    "linear": {"attention": "linear_attention"},
}


def vit_size(name: str) -> str:
    """The size (tiny, small, base, large) of a ViT name the adapter takes; ValueError naming
    the supported family otherwise."""
    match = VIT_NAME.match(name)
    if not match:
        raise ValueError(
            f"{name!r} is not a ViT the adapter takes: timm's vit_{{tiny,small,base,large}}"
            "_patch16_224 (a pretrained tag such as .augreg_in21k may follow)"
        )
    return match.group(1)


def vit_fields(name: str) -> dict[str, Any]:
    """The model config fields (without the `model.` prefix) that a ViT name fixes."""
    return {**VIT_SKELETON, **VIT_SIZES[vit_size(name)]}


def adapt_vit(
    vit: nn.Module, attention: str = "cbsa", attn_options: Mapping[str, Any] | None = None
) -> CBTransformer:
    """The ViT `vit` (a timm VisionTransformer of the supported family, any input size, class
    and channel count) with `attention` in place of its softmax attention, every tensor that
    maps inherited (see the module docstring), the rest as `CBTransformer` initialises it.
    `attn_options` go to the attention (e.g. `{"contraction": "none", "rep_grid": (4, 4)}`)."""
    model = CBTransformer(
        **vit_architecture(vit),
        attention=attention,
        attn_options=dict(attn_options or {}),
        norm_eps=NORM_EPS,
    )
    weights = convert_vit_state_dict(vit.state_dict(), model.state_dict())
    model.load_state_dict(weights, strict=True)
    return model


def vit_architecture(vit: nn.Module) -> dict[str, Any]:
    """`CBTransformer` arguments of a timm ViT; ValueError when it is not a plain ViT of the
    supported family (registers, layer scale, QK norm, another pooling or patch size)."""
    if not isinstance(vit, VisionTransformer):
        raise ValueError(f"{type(vit).__name__} is not a timm VisionTransformer")
    block = vit.blocks[0]
    plain = (
        vit.num_prefix_tokens == 1
        and vit.cls_token is not None
        and vit.global_pool == "token"
        and isinstance(vit.norm_pre, nn.Identity)
        and isinstance(vit.fc_norm, nn.Identity)
        and isinstance(block.ls1, nn.Identity)
        and isinstance(block.attn.q_norm, nn.Identity)
        and block.attn.qkv.bias is not None
        and tuple(vit.patch_embed.patch_size) == (16, 16)
    )
    if not plain:
        raise ValueError(
            "the adapter takes plain patch-16 ViTs (a CLS token and nothing else before the "
            "patches, CLS pooling, no layer scale or QK norm, qkv with bias)"
        )
    hidden = block.mlp.fc1.out_features
    return {
        "img_size": tuple(vit.patch_embed.img_size),
        "patch_size": 16,
        "in_chans": vit.patch_embed.proj.in_channels,
        "num_classes": vit.num_classes,
        "embed_dim": vit.embed_dim,
        "depth": len(vit.blocks),
        "num_heads": block.attn.num_heads,
        "stem": "patch",
        "block": "mlp",
        "mlp_ratio": hidden / vit.embed_dim,
        "global_pool": "token",
    }


def convert_vit_state_dict(
    vit_state: Mapping[str, Tensor], target: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """A full state dict for the model whose state dict is `target`, from a timm ViT's: every
    tensor that maps (see the module docstring) taken from `vit_state`, the others (new
    parameters, a head of another class count) kept from `target`. Names and shapes must
    match: ValueError naming the first that does not (a ViT of another size)."""
    out = dict(target)
    for key, theirs in vit_state.items():
        if key.endswith(("attn.qkv.weight", "attn.qkv.bias", "attn.proj.bias")):
            continue  # below, with the attention
        if key not in target:
            raise ValueError(f"the ViT has {key!r}, which the adapted model lacks")
        if theirs.shape != target[key].shape:
            if key.startswith("head."):
                continue  # another class count: the head stays new
            raise ValueError(_shape_message(key, theirs, target[key]))
        out[key] = theirs
    for prefix in sorted(
        {k[: -len("qkv.weight")] for k in target if k.endswith("attn.qkv.weight")}
    ):
        out.update(_attention_weights(prefix, vit_state, target))
    return out


def _attention_weights(
    prefix: str, vit_state: Mapping[str, Tensor], target: Mapping[str, Tensor]
) -> dict[str, Tensor]:
    """One block's attention tensors (`prefix` = "blocks.{i}.attn.") from the ViT's."""
    qkv_w, qkv_b = vit_state[prefix + "qkv.weight"], vit_state[prefix + "qkv.bias"]
    proj_w, proj_b = vit_state[prefix + "proj.weight"], vit_state[prefix + "proj.bias"]
    ours = target[prefix + "qkv.weight"]
    if ours.shape == qkv_w.shape and prefix + "qkv.bias" in target:
        return {
            prefix + "qkv.weight": qkv_w,
            prefix + "qkv.bias": qkv_b,
            prefix + "proj.bias": proj_b,
        }
    d = proj_w.shape[0]
    if ours.shape != (d, d) or qkv_w.shape != (3 * d, d):
        raise ValueError(_shape_message(prefix + "qkv.weight", qkv_w, ours))
    value_w, value_b = qkv_w[2 * d :], qkv_b[2 * d :]
    return {
        prefix + "qkv.weight": value_w.clone(),
        prefix + "proj.bias": proj_b + proj_w @ value_b,
    }


def _shape_message(key: str, theirs: Tensor, ours: Tensor) -> str:
    return (
        f"{key} has shape {tuple(theirs.shape)} in the ViT and {tuple(ours.shape)} in the "
        "adapted model: are the weights of another ViT size than model.adapt_from?"
    )


def load_vit(
    name: str, path: str | Path, *, num_classes: int, img_size: int, in_chans: int
) -> VisionTransformer:
    """The timm ViT `name` with the pretrained weights of the local file `path`: a head for
    `num_classes` (new unless the file has as many classes as the name's pretrained config),
    the position embedding resampled to `img_size`, the first convolution adapted to
    `in_chans`. ValueError for an unsupported name, a missing file or weights of another size."""
    vit_size(name)
    path = Path(path).expanduser()
    if not path.is_file():
        raise ValueError(f"no ViT weights file {path} (a timm .safetensors, .pth, .bin or .npz)")
    kwargs = {"num_classes": num_classes, "img_size": img_size, "in_chans": in_chans}
    try:
        if path.suffix == ".npz":  # big_vision's layout: timm's ViT reads it itself
            vit = timm.create_model(name, pretrained=False, **kwargs)
            vit.load_pretrained(str(path))
        else:
            vit = timm.create_model(
                name, pretrained=True, pretrained_cfg_overlay={"file": str(path)}, **kwargs
            )
    except RuntimeError as exc:  # load_state_dict's size mismatches and missing keys
        first = next((line.strip() for line in str(exc).splitlines()[1:] if line.strip()), "")
        raise ValueError(
            f"{path} does not hold {name} weights: {first or exc} (a checkpoint of another "
            "ViT size?)"
        ) from None
    return vit


def vit_normalisation(vit: nn.Module, in_chans: int) -> tuple[list[float], list[float]] | None:
    """The (mean, std) a timm ViT was trained with (its pretrained config), per input channel;
    for one channel (timm summed the first convolution over the colours) their averages."""
    cfg = getattr(vit, "pretrained_cfg", None) or {}
    mean, std = cfg.get("mean"), cfg.get("std")
    if mean is None or std is None:
        return None
    if in_chans == len(mean):
        return [float(m) for m in mean], [float(s) for s in std]
    if in_chans == 1:
        return [float(sum(mean) / len(mean))], [float(sum(std) / len(std))]
    return None


def write_random_vit(name: str, path: str | Path, *, seed: int = 0) -> Path:
    """A randomly initialised timm ViT `name` (224 px, 3 channels, 1000 classes: the layout of
    timm's pretrained files) saved to `path` (.safetensors): stand-in "pretrained" weights for
    smoke runs and tests, where no real file is at hand."""
    from safetensors.torch import save_file  # timm's dependency; only this helper writes

    vit_size(name)
    path = Path(path).expanduser()
    path.parent.mkdir(parents=True, exist_ok=True)
    with torch.random.fork_rng():
        torch.manual_seed(seed)
        vit = timm.create_model(name, pretrained=False)
    tmp = path.with_name(f"{path.name}.{os.getpid()}.tmp")
    save_file({k: v.contiguous() for k, v in vit.state_dict().items()}, str(tmp))
    tmp.replace(path)  # concurrent writers of the same file each rename a whole file
    return path
