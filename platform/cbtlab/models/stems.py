"""Patch stems: image (B, C, H, W) -> patch feature map (B, d, H/p, W/p).

Each stem names its first convolution (`first_conv`, relative to the stem), the layer timm
adapts when pretrained weights meet another number of input channels; None where there is no
convolution to adapt.
"""

from __future__ import annotations

import math

from torch import Tensor, nn
from torch.nn.utils.fusion import fuse_conv_bn_eval


class PatchStem(nn.Module):
    """ViT's stem: one p x p convolution with stride p."""

    first_conv: str | None = "proj"

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.proj = nn.Conv2d(in_chans, embed_dim, patch_size, stride=patch_size)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class ConvNorm(nn.Sequential):
    """A bias-free convolution (index 0) and its BatchNorm (index 1).

    `fuse()` folds the BatchNorm's running statistics and affine map into the convolution's
    weight and bias, the hook that `timm.utils.reparameterize_model` calls on every module that
    has one: an inference model without the BatchNorm pass (same outputs, to rounding).
    """

    def __init__(self, c_in: int, c_out: int) -> None:
        super().__init__(
            nn.Conv2d(c_in, c_out, 3, stride=2, padding=1, bias=False), nn.BatchNorm2d(c_out)
        )

    def fuse(self) -> nn.Conv2d:
        if self.training:
            raise ValueError(
                "BatchNorm folds into the convolution only in eval mode (its running statistics "
                "are what inference uses): call model.eval() before reparameterize_model"
            )
        return fuse_conv_bn_eval(self[0], self[1])


class ConvStem(nn.Module):
    """CBT's stem: log2(p) 3x3 stride-2 convolutions, each with BatchNorm, GELU between them;
    widths d / 2^(n-1), ..., d / 2, d. Layer indices match the reference code's
    `to_patch_embedding.proj.{0,2,4,6}.{0,1}` (conv, norm) so checkpoints map one to one.
    For inference, `timm.utils.reparameterize_model(model.eval())` folds each BatchNorm into
    its convolution (`ConvNorm.fuse`)."""

    first_conv: str | None = "proj.0.0"

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        steps = int(math.log2(patch_size))
        if patch_size < 2 or 2**steps != patch_size:
            raise ValueError(f"the conv stem needs a power-of-two patch size, got {patch_size}")
        if embed_dim % 2 ** (steps - 1):
            raise ValueError(f"embed_dim {embed_dim} is not divisible by 2^{steps - 1}")
        widths = [embed_dim // 2 ** (steps - 1 - i) for i in range(steps)]
        layers: list[nn.Module] = []
        for i, (c_in, c_out) in enumerate(zip([in_chans, *widths[:-1]], widths, strict=True)):
            if i:
                layers.append(nn.GELU())
            layers.append(ConvNorm(c_in, c_out))
        self.proj = nn.Sequential(*layers)

    def forward(self, x: Tensor) -> Tensor:
        return self.proj(x)


class LinearStem(nn.Module):
    """The original CRATE stem: flatten each p x p patch (order p1, p2, c), LayerNorm, Linear,
    LayerNorm."""

    # The linear layer and the LayerNorm before it both depend on the channel count.
    first_conv: str | None = None

    def __init__(self, in_chans: int, embed_dim: int, patch_size: int) -> None:
        super().__init__()
        self.patch_size = patch_size
        patch_dim = in_chans * patch_size * patch_size
        self.norm_in = nn.LayerNorm(patch_dim)
        self.proj = nn.Linear(patch_dim, embed_dim)
        self.norm_out = nn.LayerNorm(embed_dim)

    def forward(self, x: Tensor) -> Tensor:
        b, c, h, w = x.shape
        p = self.patch_size
        gh, gw = h // p, w // p
        patches = x[:, :, : gh * p, : gw * p].reshape(b, c, gh, p, gw, p)
        patches = patches.permute(0, 2, 4, 3, 5, 1).reshape(b, gh * gw, p * p * c)
        tokens = self.norm_out(self.proj(self.norm_in(patches)))  # (B, H*W, d)
        return tokens.transpose(1, 2).reshape(b, -1, gh, gw)


STEMS: dict[str, type[nn.Module]] = {"patch": PatchStem, "conv": ConvStem, "linear": LinearStem}
