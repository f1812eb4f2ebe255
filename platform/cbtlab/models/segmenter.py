"""Semantic segmentation: a ViT encoder and a mask-transformer decoder (Segmenter, DEPICT).

The decoder (Strudel et al., 2021; DEPICT, Wen et al.) projects the encoder's patch tokens to
its width, puts one learned class token per category in front of them (as prefix tokens, so
that CBSA pools its representatives from the patch grid only), and runs a stack of layers whose
attention is any name of `cbtlab.attention`. Then the tokens are normalised, patch and class
tokens are L2-normalised, and the masks are their products, (B, N, n_cls), normalised over
the classes (LayerNorm, as both references), laid out on the patch grid and upsampled
(bilinear) to the image.

Layers are `Z = Z + Attn(LN(Z))`, with `Z = Z + MLP(LN(Z))` after it only where the decoder
has a feed-forward module: Segmenter's softmax decoder has one, DEPICT's MSSA and the paper's
CBSA decoders have none (the paper's Fig. 8; `ffn="auto"` decides so by the attention name).

Named models (`SEGMENTERS`, built by `create_segmenter`): `seg_{decoder}_{encoder}`, e.g.
`seg_cbsa_vit_tiny`: the decoder attention and a timm ViT encoder of that size, patch 16.
Keyword arguments override any field (`num_classes=150`, `img_size=512`, `decoder_depth=2`).
"""

from __future__ import annotations

from collections.abc import Iterator
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbtlab.attention import create_attention
from cbtlab.models.blocks import MLP
from cbtlab.models.transformer import CBTransformer

# The decoder attentions with a feed-forward module under ffn="auto": Segmenter's.
FFN_ATTENTIONS = frozenset({"softmax"})
DECODERS = ("softmax", "mssa", "cbsa")
ENCODERS = {
    "vit_tiny": "vit_tiny_patch16_224",
    "vit_small": "vit_small_patch16_224",
    "vit_base": "vit_base_patch16_224",
}
SEGMENTERS: dict[str, dict[str, Any]] = {
    f"seg_{decoder}_{encoder}": {"encoder": timm_name, "decoder_attention": decoder}
    for decoder in DECODERS
    for encoder, timm_name in ENCODERS.items()
}


class DecoderLayer(nn.Module):
    """`Z = Z + Attn(LN(Z))`, then `Z = Z + MLP(LN(Z))` if the layer has a feed-forward module."""

    def __init__(
        self,
        dim: int,
        num_heads: int,
        *,
        attention: str,
        num_prefix_tokens: int,
        ffn: bool,
        mlp_ratio: float = 4.0,
        attn_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        options = {**(attn_options or {}), "num_prefix_tokens": num_prefix_tokens}
        self.norm1 = nn.LayerNorm(dim)
        self.attn = create_attention(attention, dim, num_heads, **options)
        self.norm2 = nn.LayerNorm(dim) if ffn else None
        self.mlp = MLP(dim, int(dim * mlp_ratio)) if ffn else None

    def forward(self, x: Tensor, grid_size: tuple[int, int]) -> Tensor:
        x = x + self.attn(self.norm1(x), grid_size)
        if self.mlp is not None:
            x = x + self.mlp(self.norm2(x))
        return x


class MaskDecoder(nn.Module):
    """Class tokens and patch tokens through attention layers; masks from their products.

    Input: the encoder's patch tokens (B, H*W, encoder_dim), row-major over `grid_size`.
    Output: masks on the patch grid, (B, num_classes, H, W).
    """

    def __init__(
        self,
        *,
        num_classes: int,
        encoder_dim: int,
        dim: int = 192,
        depth: int = 2,
        num_heads: int = 3,
        attention: str = "cbsa",
        ffn: bool | str = "auto",
        mlp_ratio: float = 4.0,
        attn_options: dict[str, Any] | None = None,
    ) -> None:
        super().__init__()
        if ffn == "auto":
            ffn = attention in FFN_ATTENTIONS
        self.num_classes = num_classes
        self.attention = attention
        self.has_ffn = bool(ffn)
        self.proj_dec = nn.Linear(encoder_dim, dim)
        self.cls_emb = nn.Parameter(torch.zeros(1, num_classes, dim))
        nn.init.trunc_normal_(self.cls_emb, std=0.02)
        self.layers = nn.ModuleList(
            DecoderLayer(
                dim,
                num_heads,
                attention=attention,
                num_prefix_tokens=num_classes,
                ffn=self.has_ffn,
                mlp_ratio=mlp_ratio,
                attn_options=attn_options,
            )
            for _ in range(depth)
        )
        self.norm = nn.LayerNorm(dim)
        self.mask_norm = nn.LayerNorm(num_classes)

    def no_weight_decay(self) -> set[str]:
        return {"cls_emb"}

    def forward(self, patches: Tensor, grid_size: tuple[int, int]) -> Tensor:
        b = patches.shape[0]
        x = self.proj_dec(patches)  # (B, N, D)
        x = torch.cat([self.cls_emb.expand(b, -1, -1), x], dim=1)  # (B, n_cls + N, D)
        for layer in self.layers:
            x = layer(x, grid_size)
        x = self.norm(x)
        cls, tokens = x[:, : self.num_classes], x[:, self.num_classes :]
        cls = F.normalize(cls, dim=-1)  # (B, n_cls, D)
        tokens = F.normalize(tokens, dim=-1)  # (B, N, D)
        masks = self.mask_norm(tokens @ cls.transpose(1, 2))  # (B, N, n_cls)
        return masks.transpose(1, 2).unflatten(2, grid_size)  # (B, n_cls, H, W)

    def attention_layers(self) -> Iterator[nn.Module]:
        """The attention module of every layer (whose projections noise studies perturb)."""
        for layer in self.layers:
            yield layer.attn


def encoder_patch_size(encoder: nn.Module) -> int:
    """The patch size of a cbtlab or timm ViT encoder."""
    size = getattr(encoder, "patch_size", None)
    if size is None:
        size = encoder.patch_embed.patch_size
    return int(size[0] if isinstance(size, (tuple, list)) else size)


class Segmenter(nn.Module):
    """An encoder (anything with `forward_features` giving (B, prefix + H*W, d) tokens and
    `num_prefix_tokens`: our `CBTransformer`, timm's ViTs) and a `MaskDecoder`.

    `forward(images)`: logits (B, num_classes, H_img, W_img) for (B, C, H_img, W_img) images
    whose sides are multiples of the patch size."""

    def __init__(self, encoder: nn.Module, decoder: MaskDecoder) -> None:
        super().__init__()
        self.encoder = encoder
        self.decoder = decoder
        self.patch_size = encoder_patch_size(encoder)
        self.num_classes = decoder.num_classes
        # The decoder reads normalised tokens: timm's ViTs normalise them in forward_features,
        # our backbone in its head, after pooling; its final norm is applied per token here
        # (the same module: its weights load and train as the encoder's).
        self.token_norm = encoder.norm if isinstance(encoder, CBTransformer) else nn.Identity()

    def no_weight_decay(self) -> set[str]:
        inner = getattr(self.encoder, "no_weight_decay", lambda: set())()
        return {f"encoder.{n}" for n in inner} | {"decoder.cls_emb"}

    def forward(self, images: Tensor) -> Tensor:
        h, w = images.shape[-2:]
        if h % self.patch_size or w % self.patch_size:
            raise ValueError(f"image {h}x{w} is not a multiple of the patch size {self.patch_size}")
        grid = (h // self.patch_size, w // self.patch_size)
        tokens = self.encoder.forward_features(images)
        patches = self.token_norm(tokens[:, self.encoder.num_prefix_tokens :])  # (B, H*W, d)
        masks = self.decoder(patches, grid)  # (B, n_cls, H, W)
        return F.interpolate(masks, size=(h, w), mode="bilinear", align_corners=False)


def build_segmenter(
    encoder: nn.Module,
    *,
    num_classes: int,
    decoder_attention: str = "cbsa",
    decoder_depth: int = 2,
    decoder_dim: int = 0,
    decoder_heads: int = 0,
    ffn: bool | str = "auto",
    attn_options: dict[str, Any] | None = None,
) -> Segmenter:
    """A `Segmenter` on `encoder`; the decoder's width and heads default to the encoder's."""
    encoder_dim = int(getattr(encoder, "embed_dim", None) or encoder.num_features)
    heads = decoder_heads or _encoder_heads(encoder)
    decoder = MaskDecoder(
        num_classes=num_classes,
        encoder_dim=encoder_dim,
        dim=decoder_dim or encoder_dim,
        depth=decoder_depth,
        num_heads=heads,
        attention=decoder_attention,
        ffn=ffn,
        attn_options=attn_options,
    )
    return Segmenter(encoder, decoder)


def _encoder_heads(encoder: nn.Module) -> int:
    block = encoder.blocks[0]
    return int(block.attn.num_heads)


def create_segmenter(
    name: str, *, num_classes: int = 150, img_size: int = 512, **overrides: Any
) -> Segmenter:
    """The named segmenter of `SEGMENTERS` (a timm ViT encoder, randomly initialised: pass
    `pretrained_cfg_overlay=dict(file=PATH)` and `pretrained=True` for weights on disk)."""
    try:
        spec = {**SEGMENTERS[name]}
    except KeyError:
        known = ", ".join(sorted(SEGMENTERS))
        raise ValueError(f"unknown segmenter {name!r}; known: {known}") from None
    encoder_kwargs = {
        k: overrides.pop(k) for k in ("pretrained", "pretrained_cfg_overlay") if k in overrides
    }
    encoder = timm.create_model(
        spec.pop("encoder"), num_classes=0, img_size=img_size, dynamic_img_size=True,
        **encoder_kwargs,
    )  # fmt: skip
    return build_segmenter(encoder, num_classes=num_classes, **{**spec, **overrides})


def decoder_share(by_module: dict[str, int]) -> int:
    """The decoder's part of a `by_module` count (`count_flops`, `count_pairwise_similarities`):
    the entry of the module named `decoder` (FlopCounterMode's "Segmenter.decoder" or
    `named_modules`' per-layer names under "decoder.")."""
    names = [n for n in by_module if n.split(".")[-1] == "decoder" and n.count(".") <= 1]
    if names:
        return int(by_module[names[0]])
    return int(sum(v for n, v in by_module.items() if n.startswith("decoder.")))
