"""The CBT backbone and its blocks, built by name; `build_model` builds one from a model config.

This package sits below `cbtlab.config` (whose validation reads its stem and layer names), so it
never imports the config: `build_model` reads the fields of whatever it is given.
"""

from __future__ import annotations

from typing import Any

from cbtlab.models import zoo
from cbtlab.models.adapt import NORM_EPS, adapt_vit
from cbtlab.models.blocks import ISTA, MLP, Block
from cbtlab.models.reference import from_reference
from cbtlab.models.segmenter import (
    SEGMENTERS,
    MaskDecoder,
    Segmenter,
    build_segmenter,
    create_segmenter,
)
from cbtlab.models.transformer import CBTransformer

__all__ = [
    "ISTA",
    "MLP",
    "SEGMENTERS",
    "Block",
    "CBTransformer",
    "MaskDecoder",
    "Segmenter",
    "adapt_vit",
    "build_model",
    "build_segmenter",
    "create_segmenter",
    "from_reference",
    "zoo",
]


def build_model(cfg: Any) -> CBTransformer:
    """The model a `cbtlab.config.ModelConfig` (or any object with its fields) describes. With
    `adapt_from` (a timm ViT name), the fields describe that ViT (config validation checks it)
    and its LayerNorms take timm's epsilon; its weights come from `train.init_from`
    (`cbtlab.models.adapt`)."""
    return CBTransformer(
        img_size=cfg.img_size,
        patch_size=cfg.patch_size,
        in_chans=cfg.in_chans,
        num_classes=cfg.num_classes,
        embed_dim=cfg.embed_dim,
        depth=cfg.depth,
        num_heads=cfg.num_heads,
        attention=cfg.attention,
        stem=cfg.stem,
        block=cfg.block,
        mlp_ratio=cfg.mlp_ratio,
        attn_options={
            "rep_grid": cfg.rep_grid,
            "rep_pool": cfg.rep_pool,
            "rep_pool_kernel": cfg.rep_pool_kernel,
            "rep_pool_stride": cfg.rep_pool_stride,
            "rep_init": cfg.rep_init,
            "legacy_pool": cfg.legacy_pool,
            "stop_grad_init": cfg.stop_grad_init,
            "contraction": cfg.contraction,
            "contraction_beta": cfg.contraction_beta,
            "eps": cfg.linear_eps,
            "step_init": cfg.step_init,
            "step_scale": cfg.step_scale,
        },
        ista_step=cfg.ista_step,
        ista_lambda=cfg.ista_lambda,
        global_pool=cfg.global_pool,
        drop_rate=cfg.drop_rate,
        norm_eps=NORM_EPS if getattr(cfg, "adapt_from", "") else 1e-5,
    )
