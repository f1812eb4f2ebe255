"""The CBT backbone: patch stem, CLS token, position embedding, a stack of blocks, a head."""

from __future__ import annotations

from typing import Any

import torch
from torch import Tensor, nn

from cbtlab.models.blocks import Block


class CBTransformer(nn.Module):
    """A vision transformer whose attention and block options are chosen by name.

    `forward_features` returns all tokens (B, 1 + H*W, d) after the final norm;
    `forward_head` pools them (CLS token or the mean of the patch tokens) and classifies.
    """

    def __init__(
        self,
        *,
        img_size: int = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        attention: str = "cbsa",
        attn_options: dict[str, Any] | None = None,
        ista_step: float = 0.1,
        ista_lambda: float = 0.1,
        global_pool: str = "token",
        drop_rate: float = 0.0,
    ) -> None:
        super().__init__()
        if img_size % patch_size:
            raise ValueError(f"patch_size={patch_size} does not divide img_size={img_size}")
        if global_pool not in ("token", "avg"):
            raise ValueError(f"unknown global_pool {global_pool!r}; known: token, avg")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.num_prefix_tokens = 1
        self.grid_size = (img_size // patch_size, img_size // patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.patch_embed = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        options = {"num_prefix_tokens": self.num_prefix_tokens, **(attn_options or {})}
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                attention=attention,
                attn_options=options,
                ista_step=ista_step,
                ista_lambda=ista_lambda,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(embed_dim)
        self.head_drop = nn.Dropout(drop_rate)
        self.head = nn.Linear(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        return {"pos_embed", "cls_token"}

    def forward_features(self, x: Tensor) -> Tensor:
        x = self.patch_embed(x)  # (B, d, H, W)
        grid_size = (x.shape[-2], x.shape[-1])
        if grid_size != self.grid_size:
            raise ValueError(
                f"input gives a {grid_size} patch grid; model expects {self.grid_size}"
            )
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, d)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1) + self.pos_embed
        for block in self.blocks:
            x = block(x, grid_size)
        return self.norm(x)  # (B, 1 + H*W, d)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(x)
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))
