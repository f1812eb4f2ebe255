"""Zero-shot segmentation from the CLS token's attention (Tables 5-6, CRATE's protocol).

Protocol: the CLS map of one layer (`cls_attention_maps`) is upsampled (bilinear) from the
patch grid to the image's own size; per head, and for the mean of the heads ("combined"), it
becomes a foreground mask by keeping the smallest set of pixels that holds `mass` of the map's
total (DINO's and CRATE's thresholding, 0.6 by default). Each mask is compared with the
ground truth, ignoring void pixels:

- foreground IoU: |P & G| / |P | G| with G = every object class (label not 0, not 255);
- background IoU: the same for the complements, ~P against label 0;
- boundary IoU (Cheng et al., 2021): the IoU of the two masks' boundary bands, where the band
  of width w of a mask M is the pixels of M within w pixels (Chebyshev distance, i.e. a
  (2w+1) x (2w+1) square) of a pixel outside M; the image border counts as outside. The
  width is `boundary_ratio` of the image diagonal (at least 1 px; Cheng et al. use 2 %).

Labels follow PASCAL VOC: 0 background, 1..20 objects, 255 void (object outlines and
difficult regions). Void pixels are never scored; when the ground truth's band is built they
count as outside the object (VOC draws its void outlines over the object edges). An IoU whose
union is empty (both masks empty there) is 1. Dataset scores are the mean over images of the
per-image IoU (DINO's Jaccard).

The second part serves supervised semantic segmentation (ADE20K, Fig. 8): `ConfusionMatrix`
(mIoU, per-class IoU, pixel accuracy, summed over ranks), `sliding_window_logits` and the
decoder noise of Fig. 8 right (`add_projection_noise`).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from PIL import Image
from torch import Tensor, nn

from cbtlab.analysis.attention_maps import cls_attention_maps, upsample_maps
from cbtlab.models import CBTransformer

VOID = 255
SEG_KINDS = ("fg_iou", "bg_iou", "boundary_iou")


def mass_threshold(maps: Tensor, mass: float = 0.6) -> Tensor:
    """Boolean masks (..., H, W) of non-negative maps (..., H, W): the highest pixels whose sum
    first reaches `mass` of the map's total (ties broken by position; mass 1 keeps the
    support)."""
    if not 0 < mass <= 1:
        raise ValueError(f"mass must be in (0, 1], got {mass}")
    flat = maps.flatten(-2).clamp_min(0)
    values, order = flat.sort(dim=-1, descending=True)
    cumulative = values.cumsum(-1)
    # keep a pixel if the mass before it has not reached the target yet
    keep = (cumulative - values) < mass * cumulative[..., -1:]
    keep &= values > 0
    mask = torch.zeros_like(keep).scatter(-1, order, keep)
    return mask.view(maps.shape)


def iou(pred: Tensor, target: Tensor, valid: Tensor | None = None) -> Tensor:
    """IoU of boolean masks (..., H, W) over the `valid` pixels -> (...); 1 where the union is
    empty."""
    if valid is not None:
        pred, target = pred & valid, target & valid
    inter = (pred & target).sum((-2, -1)).double()
    union = (pred | target).sum((-2, -1)).double()
    return torch.where(union > 0, inter / union.clamp_min(1), torch.ones_like(union))


def boundary_band(mask: Tensor, width: int) -> Tensor:
    """The pixels of `mask` (..., H, W) within `width` pixels (Chebyshev) of a pixel outside
    it; outside the image counts as outside the mask."""
    if width < 1:
        raise ValueError(f"boundary width must be >= 1 pixel, got {width}")
    lead, (h, w) = mask.shape[:-2], mask.shape[-2:]
    outside = (~mask).reshape(-1, 1, h, w).float()
    outside = F.pad(outside, (width, width, width, width), value=1.0)
    near_outside = F.max_pool2d(outside, 2 * width + 1, stride=1) > 0  # dilation of ~mask
    return mask & near_outside.reshape(*lead, h, w)


def segmentation_ious(pred: Tensor, label: Tensor, boundary_width: int) -> dict[str, Tensor]:
    """Foreground, background and boundary IoU of predicted masks (..., H, W) against one
    label map (H, W) (VOC: 0 background, 255 void) -> each (...)."""
    valid = label != VOID
    truth = valid & (label != 0)
    return {
        "fg_iou": iou(pred, truth, valid),
        "bg_iou": iou(~pred, valid & (label == 0), valid),
        "boundary_iou": iou(
            boundary_band(pred, boundary_width),
            boundary_band(truth, boundary_width).expand_as(pred),
            valid,
        ),
    }


def boundary_width_for(size: tuple[int, int], ratio: float) -> int:
    """Boundary band width in pixels: `ratio` of the image diagonal, at least 1."""
    return max(1, round(ratio * (size[0] ** 2 + size[1] ** 2) ** 0.5))


class VOCSegmentation:
    """PASCAL VOC segmentation, read from its folder layout:

        root/JPEGImages/<id>.jpg
        root/SegmentationClass/<id>.png      palette PNG: 0 background, 1..20, 255 void
        root/ImageSets/Segmentation/<split>.txt

    Item i is (RGB image, label (H, W) uint8 tensor), ids in the split file's order."""

    def __init__(self, root: str | Path, split: str = "val") -> None:
        self.root = Path(root).expanduser()
        ids_file = self.root / "ImageSets" / "Segmentation" / f"{split}.txt"
        for needed in (self.root / "JPEGImages", self.root / "SegmentationClass", ids_file):
            if not needed.exists():
                raise FileNotFoundError(
                    f"{needed} is missing: expected the PASCAL VOC layout (JPEGImages/, "
                    f"SegmentationClass/, ImageSets/Segmentation/{split}.txt) under {self.root}"
                )
        self.ids = [line.strip() for line in ids_file.read_text().splitlines() if line.strip()]

    def __len__(self) -> int:
        return len(self.ids)

    def __getitem__(self, index: int) -> tuple[Image.Image, Tensor]:
        name = self.ids[index]
        with Image.open(self.root / "JPEGImages" / f"{name}.jpg") as img:
            image = img.convert("RGB")
        with Image.open(self.root / "SegmentationClass" / f"{name}.png") as png:
            if png.mode not in ("P", "L"):
                raise ValueError(
                    f"{name}.png has mode {png.mode}; expected a palette (class index) PNG"
                )
            label = torch.from_numpy(np.array(png, dtype=np.uint8))
        if label.shape != (image.height, image.width):
            raise ValueError(f"{name}: label {tuple(label.shape)} and image sizes differ")
        return image, label


@dataclass
class SegmentationSettings:
    layer: int = -1  # which layer's CLS map (negative: from the end)
    mass: float = 0.6
    boundary_ratio: float = 0.02
    batch_size: int = 16


def model_input(
    image: Image.Image, img_size: int, mean: Sequence[float], std: Sequence[float]
) -> Tensor:
    """An image as the model reads it: resized (bilinear) to img_size x img_size, greyscale
    when (mean, std) have one channel, normalised: (C, img_size, img_size)."""
    resized = image.convert("L" if len(mean) == 1 else "RGB").resize(
        (img_size, img_size), Image.BILINEAR
    )
    x = torch.from_numpy(np.array(resized, dtype=np.float32) / 255.0)
    x = x.unsqueeze(0) if x.ndim == 2 else x.permute(2, 0, 1)
    m = torch.as_tensor(mean, dtype=torch.float32).view(-1, 1, 1)
    s = torch.as_tensor(std, dtype=torch.float32).view(-1, 1, 1)
    return (x - m) / s


@torch.no_grad()
def zero_shot_segmentation(
    model: CBTransformer,
    samples: Iterable[tuple[Image.Image, Tensor]],
    *,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    settings: SegmentationSettings | None = None,
) -> dict[str, float]:
    """Mean per-image IoUs of the masks from one layer's CLS map (see the module docstring).

    Images go through `model_input` (resized to `img_size`, normalised with (mean, std)); the
    masks are made and scored at each image's own size. Metrics: `seg/layer_XX/<kind>/head_YY` and
    `seg/layer_XX/<kind>/combined` for kind in fg_iou, bg_iou, boundary_iou, and
    `seg/images`."""
    settings = settings or SegmentationSettings()
    layer = settings.layer % len(model.blocks)
    totals: Tensor | None = None  # (3, K + 1) running sums over images
    count = 0

    def flush(batch: list[tuple[Image.Image, Tensor]]) -> None:
        nonlocal totals, count
        x = torch.stack([model_input(img, img_size, mean, std) for img, _ in batch])
        maps = cls_attention_maps(model, x)[layer]
        if maps is None:
            raise ValueError(f"layer {layer} has no token-to-token attention map")
        for (_, label), per_head in zip(batch, maps, strict=True):
            both = torch.cat([per_head, per_head.mean(0, keepdim=True)])  # (K + 1, h, w)
            size = (label.shape[0], label.shape[1])
            masks = mass_threshold(upsample_maps(both, size), settings.mass)
            scores = segmentation_ious(
                masks, label, boundary_width_for(size, settings.boundary_ratio)
            )
            row = torch.stack([scores[kind] for kind in SEG_KINDS])  # (3, K + 1)
            totals = row if totals is None else totals + row
            count += 1

    batch: list[tuple[Image.Image, Tensor]] = []
    for sample in samples:
        batch.append(sample)
        if len(batch) == settings.batch_size:
            flush(batch)
            batch = []
    if batch:
        flush(batch)
    if totals is None:
        raise ValueError("no images to segment")
    means = (totals / count).tolist()
    heads = len(means[0]) - 1
    metrics: dict[str, float] = {"seg/images": float(count)}
    for kind, values in zip(SEG_KINDS, means, strict=True):
        for h in range(heads):
            metrics[f"seg/layer_{layer:02d}/{kind}/head_{h:02d}"] = values[h]
        metrics[f"seg/layer_{layer:02d}/{kind}/combined"] = values[heads]
    return metrics


# Supervised semantic segmentation (ADE20K, the paper's Fig. 8): a confusion matrix over the
# dataset, mIoU, per-class IoU and pixel accuracy as mmseg and Segmenter report them, and the
# sliding-window inference at the training crop. Label maps hold classes 0..n-1 and VOID (255,
# ADE20K's label 0) for pixels never scored.


class ConfusionMatrix:
    """Counts of (true class, predicted class) over the scored pixels, (n, n) int64.

    `update` adds a batch; `reduce` sums the matrices of every rank (pass an all-reduce over
    a tensor, e.g. `cbtlab.train.collectives.all_reduce`). Per-class IoU is
    `TP / (TP + FP + FN)`, NaN for a class in neither the truth nor the predictions; mIoU is
    the mean over the classes that are not NaN (mmseg's `nanmean`); pixel accuracy is the share
    of scored pixels predicted right."""

    def __init__(self, num_classes: int, *, ignore_index: int = VOID, device: Any = None) -> None:
        self.num_classes = num_classes
        self.ignore_index = ignore_index
        self.matrix = torch.zeros(num_classes, num_classes, dtype=torch.int64, device=device)

    def update(self, pred: Tensor, target: Tensor) -> None:
        """Add predicted classes `pred` and labels `target` of the same shape (..., H, W).
        Raises ValueError for a label that is neither a class nor the ignore index."""
        if pred.shape != target.shape:
            raise ValueError(f"prediction {tuple(pred.shape)} and label {tuple(target.shape)}")
        valid = target != self.ignore_index
        truth = target[valid].long()
        outside = (truth < 0) | (truth >= self.num_classes)
        if bool(outside.any()):
            bad = int(truth[outside][0])
            raise ValueError(
                f"label {bad} is outside the {self.num_classes} classes (ignore index "
                f"{self.ignore_index})"
            )
        index = truth * self.num_classes + pred[valid].long().to(truth.device)
        counts = torch.bincount(index, minlength=self.num_classes**2)
        self.matrix += counts.view(self.num_classes, self.num_classes).to(self.matrix.device)

    def reduce(self, all_reduce: Callable[[Tensor], Any]) -> None:
        """Replace the matrix by its sum over ranks: `all_reduce` sums a float64 tensor and
        returns it or its values (`cbtlab.train.collectives.all_reduce` with the device)."""
        total = torch.as_tensor(all_reduce(self.matrix.double()), dtype=torch.float64)
        self.matrix = total.round().to(torch.int64).view_as(self.matrix).to(self.matrix.device)

    def class_iou(self) -> Tensor:
        """(n,) float64: IoU per class, NaN where the class is in neither truth nor prediction."""
        m = self.matrix.double()
        tp = m.diagonal()
        union = m.sum(0) + m.sum(1) - tp
        return torch.where(union > 0, tp / union.clamp_min(1), torch.full_like(tp, math.nan))

    def miou(self) -> float:
        ious = self.class_iou()
        present = ~ious.isnan()
        return float(ious[present].mean()) if bool(present.any()) else math.nan

    def pixel_accuracy(self) -> float:
        total = self.matrix.sum()
        return float(self.matrix.diagonal().sum() / total) if int(total) else math.nan

    def metrics(self, prefix: str = "val/") -> dict[str, float]:
        """`{prefix}miou`, `{prefix}pixel_acc` and `{prefix}iou/XXX` per class seen."""
        out = {f"{prefix}miou": self.miou(), f"{prefix}pixel_acc": self.pixel_accuracy()}
        for index, value in enumerate(self.class_iou().tolist()):
            if not math.isnan(value):  # a class in neither truth nor prediction: no value
                out[f"{prefix}iou/{index:03d}"] = value
        return out


def window_starts(size: int, window: int, stride: int) -> list[int]:
    """Start offsets of windows of `window` every `stride` along `size`, the last one flush
    with the end (mmseg's slide inference), covering every position."""
    if window >= size:
        return [0]
    starts = list(range(0, size - window, stride))
    return [*starts, size - window]


@torch.no_grad()
def sliding_window_logits(
    model: Callable[[Tensor], Tensor],
    images: Tensor,
    *,
    window: int,
    stride: int,
    num_classes: int,
) -> Tensor:
    """Logits (B, n, H, W) of images (B, C, H, W) from overlapping `window` x `window` crops
    every `stride` pixels, averaged where windows overlap. A side shorter than the window is
    padded (zeros, at the bottom / right) for the model and cropped back."""
    if stride < 1 or stride > window:
        raise ValueError(f"stride {stride} must be in [1, window={window}]")
    b, _, h, w = images.shape
    ph, pw = max(h, window), max(w, window)
    padded = F.pad(images, (0, pw - w, 0, ph - h)) if (ph, pw) != (h, w) else images
    logits = images.new_zeros(b, num_classes, ph, pw, dtype=torch.float32)
    counts = images.new_zeros(1, 1, ph, pw, dtype=torch.float32)
    for top in window_starts(ph, window, stride):
        for left in window_starts(pw, window, stride):
            crop = padded[:, :, top : top + window, left : left + window]
            logits[:, :, top : top + window, left : left + window] += model(crop).float()
            counts[:, :, top : top + window, left : left + window] += 1
    return (logits / counts)[:, :, :h, :w]


def add_projection_noise(
    attention_layers: Iterable[nn.Module], scale: float, generator: torch.Generator
) -> None:
    """In place: every layer's input projection W (`qkv.weight`: U of MSSA and CBSA, q/k/v of
    softmax attention) becomes `W + scale * rms(W) * G`, G ~ N(0, 1) elementwise (the
    convention of `cbtlab.analysis.probes.noisy_attention_accuracy`)."""
    with torch.no_grad():
        for layer in attention_layers:
            weight = layer.qkv.weight
            rms = weight.square().mean().sqrt()
            noise = torch.randn(weight.shape, generator=generator, dtype=weight.dtype)
            weight.add_(scale * rms * noise.to(weight.device))
