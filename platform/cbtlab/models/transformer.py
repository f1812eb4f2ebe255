"""The backbone: a patch stem, CLS token, position embedding, a stack of blocks and a head.

CBT, CRATE, ToST, ViT and the CRATE+CBT hybrid are all this class with different stems, block
types and attention names (see `cbtlab.models.zoo`).
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

import torch
import torch.nn.functional as F
from timm.models import checkpoint
from torch import Tensor, nn

from cbtlab.models.blocks import Block
from cbtlab.models.stems import STEMS

GLOBAL_POOLS = ("token", "avg")


def layer_attentions(attention: str | Sequence[str], depth: int) -> list[str]:
    """Per-layer attention names. `"mssa,cbsa"` splits the layers into equal consecutive groups
    (MSSA in the first half, CBSA in the second); a sequence gives one name per layer."""
    if isinstance(attention, str):
        names = [a.strip() for a in attention.split(",")]
        if depth % len(names):
            raise ValueError(f"{len(names)} attention groups do not split depth {depth} evenly")
        return [name for name in names for _ in range(depth // len(names))]
    if len(attention) != depth:
        raise ValueError(f"{len(attention)} attention names for {depth} layers")
    return list(attention)


def _pair(value: int | Sequence[int]) -> tuple[int, int]:
    return (value, value) if isinstance(value, int) else (int(value[0]), int(value[1]))


def resample_pos_embed(
    pos_embed: Tensor, grid_size: tuple[int, int], new_grid: tuple[int, int]
) -> Tensor:
    """A (1, 1 + H*W, d) position embedding (CLS first) resampled, bicubic, to another grid."""
    prefix, patches = pos_embed[:, :1], pos_embed[:, 1:]
    d = patches.shape[-1]
    patches = patches.reshape(1, *grid_size, d).permute(0, 3, 1, 2)  # (1, d, H, W)
    patches = F.interpolate(patches, size=new_grid, mode="bicubic", align_corners=False)
    return torch.cat([prefix, patches.flatten(2).transpose(1, 2)], dim=1)  # (1, 1 + H'*W', d)


class CBTransformer(nn.Module):
    """A vision transformer whose stem, block type and attention are chosen by name.

    `forward_features` returns the tokens after the last block (B, 1 + H*W, d); `forward_head`
    pools them (CLS token or mean of the patch tokens), normalises the pooled vector (as the
    reference code's `mlp_head`) and classifies. Any input size whose sides are multiples of the
    patch size works: the position embedding is resampled (bicubic) to the input's grid.

    timm's model surface: `reset_classifier`, `get_classifier`, `group_matcher` (for timm's
    layer-decay optimisers), `set_grad_checkpointing` (blocks recomputed in the backward pass),
    `no_weight_decay`, `num_features` and `head_hidden_size` (the width `forward_head` pools).
    `norm_eps` is every LayerNorm's epsilon but the linear stem's (1e-6 in an adapted timm ViT,
    `cbtlab.models.adapt`).
    """

    def __init__(
        self,
        *,
        img_size: int | Sequence[int] = 224,
        patch_size: int = 16,
        in_chans: int = 3,
        num_classes: int = 1000,
        embed_dim: int = 192,
        depth: int = 12,
        num_heads: int = 3,
        attention: str | Sequence[str] = "cbsa",
        attn_options: dict[str, Any] | None = None,
        stem: str = "patch",
        block: str = "ista",
        ista_step: float = 0.1,
        ista_lambda: float = 0.1,
        mlp_ratio: float = 4.0,
        global_pool: str = "token",
        drop_rate: float = 0.0,
        norm_eps: float = 1e-5,
    ) -> None:
        super().__init__()
        img_h, img_w = _pair(img_size)
        if img_h % patch_size or img_w % patch_size:
            raise ValueError(f"patch_size={patch_size} does not divide img_size={img_size}")
        _check_pool(global_pool)
        if stem not in STEMS:
            raise ValueError(f"unknown stem {stem!r}; known: {', '.join(STEMS)}")
        self.num_classes = num_classes
        self.global_pool = global_pool
        self.in_chans = in_chans
        self.patch_size = patch_size
        self.embed_dim = self.num_features = self.head_hidden_size = embed_dim
        self.grad_checkpointing = False
        self.num_prefix_tokens = 1
        self.grid_size = (img_h // patch_size, img_w // patch_size)
        num_patches = self.grid_size[0] * self.grid_size[1]

        self.patch_embed = STEMS[stem](in_chans, embed_dim, patch_size)
        self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
        self.pos_embed = nn.Parameter(torch.zeros(1, 1 + num_patches, embed_dim))
        options = {"num_prefix_tokens": self.num_prefix_tokens, **(attn_options or {})}
        self.blocks = nn.ModuleList(
            Block(
                embed_dim,
                num_heads,
                attention=name,
                attn_options=options,
                block=block,
                ista_step=ista_step,
                ista_lambda=ista_lambda,
                mlp_ratio=mlp_ratio,
                norm_eps=norm_eps,
            )
            for name in layer_attentions(attention, depth)
        )
        self.norm = nn.LayerNorm(embed_dim, eps=norm_eps)
        self.head_drop = nn.Dropout(drop_rate)
        self.head: nn.Module = _classifier(embed_dim, num_classes)
        nn.init.trunc_normal_(self.pos_embed, std=0.02)
        nn.init.trunc_normal_(self.cls_token, std=0.02)

    def no_weight_decay(self) -> set[str]:
        skip = {"pos_embed", "cls_token"}
        for name, module in self.named_modules():
            if module is not self and hasattr(module, "no_weight_decay"):
                skip |= {f"{name}.{param}" for param in module.no_weight_decay()}
        return skip

    def get_classifier(self) -> nn.Module:
        return self.head

    def reset_classifier(self, num_classes: int, global_pool: str | None = None) -> None:
        """A new, freshly initialised head for `num_classes` (0: none, `forward` returns the
        pooled features); `global_pool` ("token" or "avg") changes the pooling too."""
        if global_pool is not None:
            _check_pool(global_pool)
            self.global_pool = global_pool
        self.num_classes = num_classes
        self.head = _classifier(self.embed_dim, num_classes)

    def group_matcher(self, coarse: bool = False) -> dict[str, Any]:
        """Parameter groups by depth, for timm's layer-wise learning-rate decay: the stem and
        embeddings, each block, then the head (the pooled vector's norm and the classifier).
        `coarse` changes nothing: a block is already the coarsest unit."""
        return {
            "stem": r"^cls_token|^pos_embed|^patch_embed",
            "blocks": [(r"^blocks\.(\d+)", None)],
            "head": r"^norm|^head",
        }

    def set_grad_checkpointing(self, enable: bool = True) -> None:
        """Recompute each block's activations in the backward pass instead of keeping them
        (less memory, one more forward pass of the blocks), while gradients are recorded."""
        self.grad_checkpointing = enable

    def _pos_embed(self, grid_size: tuple[int, int]) -> Tensor:
        if grid_size == self.grid_size:
            return self.pos_embed
        return resample_pos_embed(self.pos_embed, self.grid_size, grid_size)

    def _embed(self, x: Tensor) -> tuple[Tensor, tuple[int, int]]:
        if x.shape[-2] % self.patch_size or x.shape[-1] % self.patch_size:
            raise ValueError(
                f"input {tuple(x.shape[-2:])} is not a multiple of patch size {self.patch_size}"
            )
        x = self.patch_embed(x)  # (B, d, H, W)
        grid_size = (x.shape[-2], x.shape[-1])
        x = x.flatten(2).transpose(1, 2)  # (B, H*W, d)
        x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], dim=1)
        return x + self._pos_embed(grid_size), grid_size

    def forward_intermediates(
        self,
        x: Tensor,
        *,
        attention: bool = False,
        attention_rows: Sequence[int] | Tensor | None = None,
    ) -> tuple[list[Tensor], list[Tensor | None]]:
        """Per-layer outputs, for analysis, without hooks.

        Returns the tokens after every block (each (B, 1 + H*W, d)) and, when `attention` is
        set, every layer's token-to-token attention map (B, K, R, N) for the query tokens
        `attention_rows` (default all; `[0]` is the CLS token's map). Mechanisms without a
        token-to-token map (TSSA, the linear variant) give None.
        """
        rows = None if attention_rows is None else torch.as_tensor(attention_rows)
        x, grid_size = self._embed(x)
        tokens: list[Tensor] = []
        maps: list[Tensor | None] = []
        for block in self.blocks:
            if attention:
                attn_map = getattr(block.attn, "attention_map", None)
                maps.append(None if attn_map is None else attn_map(block.norm1(x), grid_size, rows))
            x = block(x, grid_size)
            tokens.append(x)
        return tokens, maps

    def forward_features(self, x: Tensor) -> Tensor:
        x, grid_size = self._embed(x)
        recompute = self.grad_checkpointing and torch.is_grad_enabled()
        for block in self.blocks:
            x = checkpoint(block, x, grid_size) if recompute else block(x, grid_size)
        return x  # (B, 1 + H*W, d)

    def forward_head(self, x: Tensor, pre_logits: bool = False) -> Tensor:
        x = x[:, self.num_prefix_tokens :].mean(dim=1) if self.global_pool == "avg" else x[:, 0]
        x = self.head_drop(self.norm(x))
        return x if pre_logits else self.head(x)

    def forward(self, x: Tensor) -> Tensor:
        return self.forward_head(self.forward_features(x))


def _check_pool(global_pool: str) -> None:
    if global_pool not in GLOBAL_POOLS:
        raise ValueError(f"unknown global_pool {global_pool!r}; known: {', '.join(GLOBAL_POOLS)}")


def _classifier(embed_dim: int, num_classes: int) -> nn.Module:
    """timm's convention: 0 classes means no classifier at all."""
    return nn.Linear(embed_dim, num_classes) if num_classes > 0 else nn.Identity()
