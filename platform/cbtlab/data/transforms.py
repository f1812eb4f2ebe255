"""Image transforms for training (with augmentation) and evaluation."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

from torch import Tensor
from torchvision import transforms as T


def build_transforms(
    *, img_size: int, mean: Sequence[float], std: Sequence[float], augment: bool
) -> tuple[Callable[[Any], Tensor], Callable[[Any], Tensor]]:
    """(train, eval) transforms for small single-scale images such as the digits.

    Images are resized (bilinear) to the model's `img_size`. Training augmentation is a mild
    random affine warp (rotation, shift, scale): the digits split has only ~1.4 k training
    images.
    """
    resize = T.Resize((img_size, img_size), interpolation=T.InterpolationMode.BILINEAR)
    to_tensor = [T.ToTensor(), T.Normalize(mean, std)]
    evaluate = T.Compose([resize, *to_tensor])
    if not augment:
        return evaluate, evaluate
    warp = T.RandomAffine(degrees=10, translate=(0.1, 0.1), scale=(0.9, 1.1))
    return T.Compose([resize, warp, *to_tensor]), evaluate
