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

The ImageNet-style transforms run on uint8 tensors (torchvision's v2 transforms, antialiased):
they give timm's `create_transform` results (to ~1e-4 after normalisation) in about half the
time, and decoding plus these transforms is most of a loader's work. With `auto_augment`,
timm's `create_transform` builds the training transform (its augmentations work on PIL images).

Randomness comes from the global torch (crop, flip, warp) and `random` (timm) generators, which
the loader seeds per (seed, epoch, rank, worker) stream.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor
from torchvision import transforms as T
from torchvision.transforms import v2

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
    """The (train, eval) transforms of a recipe, and how small a JPEG may be decoded for each:
    `*_decode_size` is the side both image dimensions must keep (None: always decode whole)."""

    train: Transform
    eval: Transform
    train_decode_size: int | None = None
    eval_decode_size: int | None = None


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
    if crop_pct is None:
        to_tensor = [T.ToTensor(), T.Normalize(mean, std)]
        resize = [T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BILINEAR)]
        eval_decode = None
    else:
        to_tensor = [v2.ToDtype(torch.float32, scale=True), v2.Normalize(mean, std)]
        # timm's eval resize: floor(img_size / crop_pct), the shorter side.
        resize_to = math.floor(img_size / crop_pct)
        resize = [
            v2.ToImage(),  # PIL -> uint8 tensor: the tensor kernels are the fast ones
            v2.Resize(resize_to, interpolation=BICUBIC, antialias=True),
            v2.CenterCrop(img_size),
        ]
        eval_decode = resize_to
    evaluate = T.Compose([*resize, *to_tensor])
    if augment == "none":
        return Transforms(evaluate, evaluate, eval_decode, eval_decode)
    if augment == "digits":
        warp = T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
        train = T.Compose([*resize, warp, *to_tensor])
        return Transforms(train, evaluate, eval_decode, eval_decode)
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
        return Transforms(train, evaluate, train_decode, eval_decode)
    train = v2.Compose(
        [
            v2.ToImage(),
            v2.RandomResizedCrop(
                img_size, scale=RRC_SCALE, ratio=RRC_RATIO, interpolation=BICUBIC, antialias=True
            ),
            v2.RandomHorizontalFlip(),
            *to_tensor,
        ]
    )
    return Transforms(train, evaluate, train_decode, eval_decode)
