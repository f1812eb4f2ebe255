"""Load the authors' released checkpoints (reference code `CBSA_image_classification/models.py`:
`Ours_*`, `CRATE_*`, `ToST_*`) into our models.

The reference layout names, and ours:
    to_patch_embedding.proj.{0,2,4,6}.{0,1}.*   -> patch_embed.proj.{0,2,4,6}.{0,1}.*
    pos_embedding, cls_token                   -> pos_embed, cls_token
    transformer.layers.{i}.0.norm.*            -> blocks.{i}.norm1.*
    transformer.layers.{i}.0.fn.proj.weight    -> blocks.{i}.attn.qkv.weight   (CBSA's U)
    transformer.layers.{i}.0.fn.qkv.weight     -> blocks.{i}.attn.qkv.weight   (MSSA, TSSA)
    transformer.layers.{i}.0.fn.to_out.*       -> blocks.{i}.attn.proj.*
    transformer.layers.{i}.0.fn.step_{x,rep}   -> blocks.{i}.attn.step_{x,rep}  (K,1,1) -> (K,)
    transformer.layers.{i}.0.fn.temp           -> blocks.{i}.attn.temp
    transformer.layers.{i}.1.norm.*            -> blocks.{i}.norm2.*
    transformer.layers.{i}.1.fn.weight         -> blocks.{i}.mlp.weight        (ISTA's D)
    mlp_head.0.*, mlp_head.1.*                 -> norm.*, head.*
The reference CBSA pools the CLS token and drops the last patch (see CBSA_MATH.md); loading
turns on `legacy_pool` so that the logits are the reference's. Pass `legacy_pool=False` to
get the corrected pooling (the weights then no longer reproduce the published numbers exactly).

`checkpoint_filter_fn` is the zoo's timm filter: `timm.create_model(name, pretrained=True,
pretrained_cfg_overlay=dict(file=PATH))` loads a cbtlab checkpoint (`state.pt`, whose `model`
timm takes), a bare state dict of ours, or an authors' checkpoint through it.
"""

from __future__ import annotations

import math
import re
from collections.abc import Mapping
from typing import Any

import timm
import torch
from torch import Tensor, nn

from cbtlab.models.transformer import CBTransformer, resample_pos_embed

_RULES: list[tuple[str, str]] = [
    (r"^to_patch_embedding\.proj\.", "patch_embed.proj."),
    (r"^pos_embedding$", "pos_embed"),
    (r"^cls_token$", "cls_token"),
    (r"^transformer\.layers\.(\d+)\.0\.norm\.", r"blocks.\1.norm1."),
    (r"^transformer\.layers\.(\d+)\.0\.fn\.(?:proj|qkv)\.weight$", r"blocks.\1.attn.qkv.weight"),
    (r"^transformer\.layers\.(\d+)\.0\.fn\.to_out\.", r"blocks.\1.attn.proj."),
    (r"^transformer\.layers\.(\d+)\.0\.fn\.(step_x|step_rep|temp)$", r"blocks.\1.attn.\2"),
    (r"^transformer\.layers\.(\d+)\.1\.norm\.", r"blocks.\1.norm2."),
    (r"^transformer\.layers\.(\d+)\.1\.fn\.weight$", r"blocks.\1.mlp.weight"),
    (r"^mlp_head\.0\.", "norm."),
    (r"^mlp_head\.1\.", "head."),
]
# Keys only the reference layout has.
_REFERENCE_KEY = re.compile(r"^(to_patch_embedding|transformer\.layers|mlp_head|pos_embedding)")


def unwrap_checkpoint(checkpoint: Mapping[str, Any]) -> dict[str, Tensor]:
    """The bare state dict of a checkpoint: `{'state_dict': ...}` / `{'model': ...}` wrappers
    and DDP's `module.` prefix removed."""
    state = checkpoint
    for key in ("state_dict", "model"):
        if key in state and isinstance(state[key], Mapping):
            state = state[key]
    return {k.removeprefix("module."): v for k, v in state.items()}


def is_reference_layout(state: Mapping[str, Any]) -> bool:
    """Whether `state` (unwrapped) names its tensors as the reference code does."""
    return any(_REFERENCE_KEY.match(key) for key in state)


def convert_reference_state_dict(state: Mapping[str, Tensor]) -> dict[str, Tensor]:
    """Rename reference-layout keys to ours; raise KeyError naming any key it cannot place."""
    out = {}
    for key, value in state.items():
        for pattern, target in _RULES:
            if re.match(pattern, key):
                out[re.sub(pattern, target, key)] = value
                break
        else:
            raise KeyError(f"reference key {key!r} has no counterpart in cbtlab's models")
    return out


def from_reference(
    checkpoint: Mapping[str, Any], name: str, *, legacy_pool: bool = True, **overrides: Any
) -> CBTransformer:
    """Build `name` (e.g. "cbt_tiny_patch16_224") and load a reference-code checkpoint into it.

    The number of classes is read from the checkpoint's head. Shapes must match exactly
    (step sizes aside, stored there as (K, 1, 1)); a mismatch raises with the key named.
    """
    state = convert_reference_state_dict(unwrap_checkpoint(checkpoint))
    if "head.weight" not in state:
        raise KeyError("the checkpoint has no classifier head (mlp_head.1.weight)")
    num_classes = state["head.weight"].shape[0]
    model = timm.create_model(name, num_classes=num_classes, legacy_pool=legacy_pool, **overrides)
    target = model.state_dict()
    for key, value in state.items():
        if key not in target:
            raise KeyError(f"{name} has no parameter {key!r} (is the checkpoint for {name}?)")
        if value.shape != target[key].shape:
            if value.numel() != target[key].numel() or not key.endswith(("step_x", "step_rep")):
                raise ValueError(
                    f"{key}: checkpoint shape {tuple(value.shape)} != model's "
                    f"{tuple(target[key].shape)} (is the checkpoint for {name}?)"
                )
            state[key] = value.reshape(target[key].shape)
    missing = sorted(set(target) - set(state))
    if missing:
        raise KeyError(
            f"the checkpoint lacks {len(missing)} of {name}'s tensors, e.g. {missing[0]}"
        )
    with torch.no_grad():
        model.load_state_dict(state, strict=True)
    return model


def checkpoint_filter_fn(state_dict: Mapping[str, Any], model: nn.Module) -> dict[str, Tensor]:
    """timm's `pretrained_filter_fn` for the zoo: `state_dict` (as timm read it, wrappers and
    `module.` already removed) under our names, fitted to `model`: reference keys renamed,
    the reference's (K, 1, 1) step sizes reshaped to (K,), and a position embedding of another
    square patch grid resampled (bicubic) to the model's. Anything else is left for timm's
    loading to judge (a head of another class count is dropped there)."""
    state = {k: v for k, v in unwrap_checkpoint(state_dict).items() if isinstance(v, Tensor)}
    if is_reference_layout(state):
        state = convert_reference_state_dict(state)
    target = model.state_dict()
    for key, value in state.items():
        ours = target.get(key)
        if ours is None or value.shape == ours.shape:
            continue
        if key.endswith(("step_x", "step_rep")) and value.numel() == ours.numel():
            state[key] = value.reshape(ours.shape)
        elif key == "pos_embed" and value.shape[-1] == ours.shape[-1]:
            side = math.isqrt(value.shape[1] - 1)  # (1, 1 + side * side, d)
            if side * side == value.shape[1] - 1:
                state[key] = resample_pos_embed(value, (side, side), tuple(model.grid_size))
    return state
