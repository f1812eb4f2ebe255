"""Image transforms: the training augmentation and the evaluation resize, as recipes.

Evaluation: the digits (tiny square scans) are resized whole to the model's `img_size`; every
other dataset is evaluated the ImageNet way, the shorter side resized to `img_size / crop_pct`
and a centre crop of `img_size` taken. Training augmentation, by name:
- "none": the evaluation transform;
- "digits": the evaluation resize, then a mild random affine warp (rotation, shift, scale): the
  digits split has only ~1.4 k training images, and flips or crops would change what a digit is;
- "imagenet": the paper's random-resized crop (scale (0.08, 1), aspect (3/4, 4/3), bicubic) and
  horizontal flip, optionally with a timm RandAugment/AutoAugment string.
Mixup/CutMix (batch-level, they change the labels) are not offered here.

The ImageNet-style transforms (crop_pct given, no auto_augment) are `SplitTransform`s: a
per-image part that ends in a uint8 CHW tensor (crop, resize, flip), and a per-batch part that
normalises a uint8 batch to float32. The loader runs the first in its workers and the second
once per batch where the batch is used (on the accelerator in training); calling the object on
one image runs both, the full transform any torchvision-style caller expects. The per-image part
gives the same pixels as torchvision's v2 `RandomResizedCrop` + `RandomHorizontalFlip` (or
`Resize` + `CenterCrop`) for the same seed, and timm's `create_transform` results to ~1e-4 after
normalisation. With `auto_augment`, timm's `create_transform` builds the training transform (its
augmentations work on PIL images); the digits transforms are plain torchvision ones.

Randomness comes from the global torch (crop, flip, warp) and `random` (timm) generators, which
the loader seeds per (seed, epoch, rank, worker) stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import v2
from torchvision.transforms.v2 import functional as F

from cbtlab.data.shards import ShardSet

Transform = Callable[[Any], Tensor]

AUGMENTATIONS = ("none", "digits", "imagenet")
# The paper's random-resized crop: the crop's share of the image area and its aspect range.
RRC_SCALE = (0.08, 1.0)
RRC_RATIO = (3 / 4, 4 / 3)
# timm's default for ViT-style models.
BICUBIC = v2.InterpolationMode.BICUBIC
IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


@dataclass(frozen=True)
class Transforms:
    """The (train, eval) transforms of a recipe, the (mean, std) both normalise with, and how
    small a JPEG may be decoded for each: `*_decode_size` is the side both image dimensions
    must keep (None: always decode whole)."""

    train: Transform
    eval: Transform
    mean: tuple[float, ...]
    std: tuple[float, ...]
    train_decode_size: int | None = None
    eval_decode_size: int | None = None


class SplitTransform:
    """A transform in two parts: `per_image` (any image -> uint8 CHW tensor: the geometry, and
    all of the randomness) and `per_batch` (uint8 images -> float32, normalised).

    The loader applies `per_image` in its workers and `per_batch` to each collated batch, after
    moving it to where it is used: uint8 batches are a quarter the size of float32 ones through
    shared memory and host-to-device copies, and a whole batch normalises in a few vectorised
    operations.
    Calling the object on one image runs both: the full transform."""

    def __init__(
        self, per_image: Callable[[Any], Tensor], mean: Sequence[float], std: Sequence[float]
    ) -> None:
        self.per_image = per_image
        self.mean = tuple(float(m) for m in mean)
        self.std = tuple(float(s) for s in std)
        # (255 * mean, 255 * std) as (C, 1, 1) float32 tensors, per device they were used on.
        self._stats: dict[torch.device, tuple[Tensor, Tensor]] = {}

    def per_batch(self, images: Tensor) -> Tensor:
        """uint8 images (C, H, W) or (N, C, H, W), on any device and in any memory layout, as
        contiguous float32 (x - 255 * mean) / (255 * std): ToDtype(scale=True) + Normalize,
        worked in place on the one float32 copy (which also makes an (H, W, C) layout
        contiguous, at little more than the cost of a plain conversion)."""
        if images.dtype != torch.uint8:
            raise TypeError(f"per_batch normalises uint8 images, not {images.dtype}")
        shift, scale = self._stats_on(images.device)
        floats = images.to(torch.float32, memory_format=torch.contiguous_format)
        return floats.sub_(shift).div_(scale)

    def __call__(self, image: Any) -> Tensor:
        return self.per_batch(self.per_image(image))

    def __getstate__(self) -> dict[str, Any]:
        # Without the statistics cached per device: a loader worker unpickling a CUDA tensor
        # would initialise CUDA in a forked process.
        return {**self.__dict__, "_stats": {}}

    def _stats_on(self, device: torch.device) -> tuple[Tensor, Tensor]:
        stats = self._stats.get(device)
        if stats is None:
            shift, scale = (
                torch.tensor([255 * v for v in values], dtype=torch.float32, device=device)
                for values in (self.mean, self.std)
            )
            stats = self._stats[device] = (shift.view(-1, 1, 1), scale.view(-1, 1, 1))
        return stats

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.per_image!r}, mean={self.mean}, std={self.std})"


class RandomResizedCropFlip:
    """Training's per-image part: a random-resized crop (bicubic, antialiased) to `size` x
    `size`, then a horizontal flip with probability 1/2, as a uint8 CHW tensor.

    It draws from the global torch generator exactly as torchvision's v2 `RandomResizedCrop` +
    `RandomHorizontalFlip` do (the crop's `get_params`, then one `torch.rand`), so a seed gives
    the same pixels, without the v2 wrappers' per-call overhead. A PIL image is cropped before
    its conversion: only the crop is copied, and it arrives dense in (H, W, C) memory."""

    def __init__(
        self,
        size: int,
        scale: tuple[float, float] = RRC_SCALE,
        ratio: tuple[float, float] = RRC_RATIO,
    ) -> None:
        self.size = size
        self.scale = list(scale)
        self.ratio = list(ratio)

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        top, left, height, width = T.RandomResizedCrop.get_params(image, self.scale, self.ratio)
        if isinstance(image, Image.Image):
            crop = pil_to_uint8(image.crop((left, top, left + width, top + height)))
        else:
            crop = image[..., top : top + height, left : left + width]
        out = F.resize_image(crop, [self.size, self.size], interpolation=BICUBIC, antialias=True)
        if torch.rand(1).item() < 0.5:
            out = out.flip(-1)
        return out

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.size}, scale={self.scale}, ratio={self.ratio})"


class ResizeCenterCrop:
    """Evaluation's per-image part: the shorter side resized to `resize_to` (bicubic,
    antialiased), then the centre `size` x `size`, as a uint8 CHW tensor (v2 `Resize` +
    `CenterCrop`'s pixels)."""

    def __init__(self, resize_to: int, size: int) -> None:
        self.resize_to = resize_to
        self.size = size

    def __call__(self, image: Image.Image | Tensor) -> Tensor:
        tensor = pil_to_uint8(image) if isinstance(image, Image.Image) else image
        out = F.resize_image(tensor, [self.resize_to], interpolation=BICUBIC, antialias=True)
        return F.center_crop_image(out, [self.size])

    def __repr__(self) -> str:
        return f"{type(self).__name__}({self.resize_to}, {self.size})"


def pil_to_uint8(image: Image.Image) -> Tensor:
    """An 8-bit PIL image (L, RGB, ...) as a uint8 (C, H, W) view of its (H, W, C) pixels: no
    transposing copy (v2's `ToImage` makes one), and the layout torch's antialiased uint8
    resize kernels are fastest on."""
    array = np.array(image)
    if array.dtype != np.uint8:
        raise TypeError(f"expected an 8-bit image (such as L or RGB), got mode {image.mode}")
    tensor = torch.from_numpy(array)
    return tensor[None] if tensor.ndim == 2 else tensor.permute(2, 0, 1)


def image_stats(shardset: ShardSet) -> tuple[int, list[float], list[float]]:
    """(channels, mean, std) from the dataset card's `extra`, ImageNet's where it has none."""
    extra = shardset.extra
    channels = int(extra.get("channels", 3))
    if "mean" in extra and "std" in extra:
        return channels, [float(v) for v in extra["mean"]], [float(v) for v in extra["std"]]
    if channels == 1:  # ImageNet's statistics averaged over the colours
        return 1, [sum(IMAGENET_MEAN) / 3], [sum(IMAGENET_STD) / 3]
    return channels, list(IMAGENET_MEAN), list(IMAGENET_STD)


def build_transforms(
    *,
    img_size: int,
    mean: Sequence[float],
    std: Sequence[float],
    augment: str = "none",
    crop_pct: float | None = None,
    auto_augment: str = "",
) -> Transforms:
    """The transforms of one recipe; `crop_pct` None resizes whole images (the digits),
    otherwise evaluation is the ImageNet resize + centre crop."""
    if augment not in AUGMENTATIONS:
        raise ValueError(f"unknown augmentation {augment!r}; expected one of {AUGMENTATIONS}")
    stats = (tuple(float(m) for m in mean), tuple(float(s) for s in std))
    if crop_pct is None:
        to_tensor = [T.ToTensor(), T.Normalize(mean, std)]
        resize = [T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BILINEAR)]
        evaluate: Transform = T.Compose([*resize, *to_tensor])
        eval_decode = None
    else:
        # timm's eval resize: floor(img_size / crop_pct), the shorter side.
        resize_to = math.floor(img_size / crop_pct)
        evaluate = split_eval = SplitTransform(ResizeCenterCrop(resize_to, img_size), mean, std)
        eval_decode = resize_to
    if augment == "none":
        return Transforms(evaluate, evaluate, *stats, eval_decode, eval_decode)
    if augment == "digits":
        warp = T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
        if crop_pct is None:
            train: Transform = T.Compose([*resize, warp, *to_tensor])
        else:  # the warp works on the uint8 crop, before normalisation
            train = T.Compose([split_eval.per_image, warp, split_eval.per_batch])
        return Transforms(train, evaluate, *stats, eval_decode, eval_decode)
    # The smallest crop (area share 0.08 at aspect 3/4) still covers img_size pixels on its
    # shorter side when both image sides are at least this long, so decoding down to it keeps
    # every crop at or above the output's resolution.
    train_decode = math.ceil(img_size / math.sqrt(RRC_SCALE[0] * RRC_RATIO[0]))
    if auto_augment:
        from timm.data import create_transform

        train = create_transform(
            img_size,
            is_training=True,
            scale=RRC_SCALE,
            ratio=RRC_RATIO,
            hflip=0.5,
            color_jitter=None,
            auto_augment=auto_augment,
            interpolation="bicubic",
            mean=tuple(mean),
            std=tuple(std),
        )
        return Transforms(train, evaluate, *stats, train_decode, eval_decode)
    train = SplitTransform(RandomResizedCropFlip(img_size), mean, std)
    return Transforms(train, evaluate, *stats, train_decode, eval_decode)
