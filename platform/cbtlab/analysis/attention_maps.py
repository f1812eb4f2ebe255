"""The CLS token's attention over the patches, drawn over the input images (Fig. 7).

For softmax-type layers (ViT's softmax, CRATE's MSSA) the map is the CLS row of the attention
matrix. CBSA never forms an N x N matrix; its effective map is the CLS row of `A^T A` (token
i draws on token j through the shared representatives, CBSA_MATH.md). Both come from
`CBTransformer.forward_intermediates(attention=True, attention_rows=[0])`. The CLS entry
itself is dropped, leaving a map on the H x W patch grid.
"""

from __future__ import annotations

from collections.abc import Sequence
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import Tensor

from cbtlab.models import CBTransformer


@torch.no_grad()
def cls_attention_maps(model: CBTransformer, images: Tensor) -> list[Tensor | None]:
    """Per layer, the CLS token's map over the patch grid: (B, K, H, W), with (H, W) the
    patch grid of `images`. None for layers without a token-to-token map (TSSA, linear)."""
    model.eval()
    grid = (images.shape[-2] // model.patch_size, images.shape[-1] // model.patch_size)
    _, maps = model.forward_intermediates(images, attention=True, attention_rows=[0])
    prefix = model.num_prefix_tokens
    out: list[Tensor | None] = []
    for attn in maps:
        if attn is None:
            out.append(None)
            continue
        patches = attn[:, :, 0, prefix:]  # (B, K, H*W)
        out.append(patches.reshape(*patches.shape[:2], *grid).float())
    return out


def upsample_maps(maps: Tensor, size: tuple[int, int]) -> Tensor:
    """Bilinear resize of maps (..., h, w) to (..., H, W); non-negative maps stay so."""
    lead = maps.shape[:-2]
    flat = maps.reshape(-1, 1, *maps.shape[-2:]).float()
    resized = F.interpolate(flat, size=size, mode="bilinear", align_corners=False)
    return resized.reshape(*lead, *size)


def denormalize(images: Tensor, mean: Sequence[float], std: Sequence[float]) -> Tensor:
    """Undo `Normalize(mean, std)`: (B, C, H, W) -> values in [0, 1]."""
    m = torch.as_tensor(mean, dtype=images.dtype).view(1, -1, 1, 1)
    s = torch.as_tensor(std, dtype=images.dtype).view(1, -1, 1, 1)
    return (images * s + m).clamp(0, 1)


def blend(image: Tensor, attn: Tensor, *, alpha: float = 0.5, cmap: str = "jet") -> Tensor:
    """One overlay: image (C, H, W) in [0, 1] (C = 1 or 3) and a map (h, w) -> RGB (H, W, 3):
    the map is upsampled to the image, scaled to [0, 1] (min-max) and colour-mapped, then
    mixed with the image: `(1 - alpha) image + alpha colour`."""
    import matplotlib

    size = (image.shape[-2], image.shape[-1])
    a = upsample_maps(attn, size)
    a = (a - a.min()) / (a.max() - a.min()).clamp_min(1e-12)
    colour = torch.as_tensor(matplotlib.colormaps[cmap](a.numpy())[..., :3], dtype=torch.float32)
    rgb = image.float().expand(3, -1, -1).permute(1, 2, 0)  # (H, W, 3)
    return (1 - alpha) * rgb + alpha * colour


def plot_attention_overlays(
    images: Tensor,
    maps: Tensor,
    path: str | Path,
    *,
    title: str = "",
    alpha: float = 0.5,
) -> None:
    """A PNG grid: one row per image; columns: the image, then its overlay for every head,
    then for the mean over heads. images (B, C, H, W) in [0, 1]; maps (B, K, h, w)."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    b, k = maps.shape[:2]
    cols = k + 2
    fig, axes = plt.subplots(b, cols, figsize=(1.6 * cols, 1.6 * b + 0.4), squeeze=False)
    labels = ["image", *(f"head {h}" for h in range(k)), "mean"]
    for i in range(b):
        panels = [
            images[i].float().expand(3, -1, -1).permute(1, 2, 0),
            *(blend(images[i], maps[i, h], alpha=alpha) for h in range(k)),
            blend(images[i], maps[i].mean(0), alpha=alpha),
        ]
        for j, panel in enumerate(panels):
            ax = axes[i][j]
            ax.imshow(panel.clamp(0, 1).numpy(), interpolation="nearest")
            ax.set_xticks([])
            ax.set_yticks([])
            if i == 0:
                ax.set_title(labels[j], fontsize=9)
    if title:
        fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
