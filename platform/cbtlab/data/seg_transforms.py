"""Joint image/mask augmentation for semantic segmentation (Segmenter's and mmseg's ADE20K
recipe) and the evaluation resize; the loaders of segmentation shards.

Training (`SegTrainTransform`): resize so that the shorter side is `base_size x r`, r drawn
uniformly from `scale_range` (bilinear for the image, nearest for the mask); a random
`crop` x `crop` window, redrawn up to 10 times while one category holds more than
`cat_max_ratio` of its scored pixels (mmseg's RandomCrop); padding to the crop where the image
is smaller (image 0, mask ignored); a horizontal flip with probability 1/2; photometric
distortion on the image only (brightness, contrast, saturation, hue, each with probability
1/2, in mmseg's ranges). Evaluation (`SegEvalTransform`): the image's shorter side resized to
`base_size`, evaluated by sliding windows of the crop, its logits resized back to the mask,
which stays at the image's original size (Segmenter and mmseg score at the original
resolution); `at_original=False` resizes the mask with the image (nearest) instead.
"""

from __future__ import annotations

import random
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from typing import Any

import numpy as np
import torch
from PIL import Image, ImageEnhance
from torch import Tensor

from cbtlab.data.segmentation import IGNORE_INDEX, decode_sample

Pair = tuple[Tensor, Tensor]  # image (3, H, W) float normalised, mask (H, W) int64


def resize_pair(
    image: Image.Image, mask: np.ndarray, short_side: int
) -> tuple[Image.Image, np.ndarray]:
    """Resize so that the shorter side is `short_side`: bilinear image, nearest mask."""
    w, h = image.size
    scale = short_side / min(w, h)
    size = (max(1, round(w * scale)), max(1, round(h * scale)))
    if size == (w, h):
        return image, mask
    resized = Image.fromarray(mask).resize(size, Image.Resampling.NEAREST)
    return image.resize(size, Image.Resampling.BILINEAR), np.asarray(resized)


def to_tensors(
    image: Image.Image, mask: np.ndarray, mean: Sequence[float], std: Sequence[float]
) -> Pair:
    pixels = torch.from_numpy(np.asarray(image, dtype=np.float32) / 255.0).permute(2, 0, 1)
    pixels = (pixels - torch.tensor(mean).view(3, 1, 1)) / torch.tensor(std).view(3, 1, 1)
    return pixels.contiguous(), torch.from_numpy(mask.astype(np.int64))


def _crop_box(
    mask: np.ndarray, crop: int, cat_max_ratio: float, rng: random.Random
) -> tuple[int, int]:
    h, w = mask.shape
    top = left = 0
    for _ in range(10):
        top, left = rng.randint(0, max(0, h - crop)), rng.randint(0, max(0, w - crop))
        if cat_max_ratio >= 1:
            break
        window = mask[top : top + crop, left : left + crop]
        counts = np.bincount(window[window != IGNORE_INDEX].ravel())
        counts = counts[counts > 0]
        if len(counts) > 1 and counts.max() / counts.sum() < cat_max_ratio:
            break
    return top, left


def photometric(image: Image.Image, rng: random.Random) -> Image.Image:
    """mmseg's PhotoMetricDistortion, approximately: brightness +-32 levels, contrast and
    saturation x [0.5, 1.5], hue +-18 degrees, each with probability 1/2."""
    if rng.random() < 0.5:
        delta = rng.uniform(-32, 32)
        array = np.asarray(image, dtype=np.float32) + delta
        image = Image.fromarray(np.clip(array, 0, 255).astype(np.uint8))
    if rng.random() < 0.5:
        image = ImageEnhance.Contrast(image).enhance(rng.uniform(0.5, 1.5))
    if rng.random() < 0.5:
        image = ImageEnhance.Color(image).enhance(rng.uniform(0.5, 1.5))
    if rng.random() < 0.5:
        hsv = np.asarray(image.convert("HSV")).copy()
        shift = round(rng.uniform(-18, 18) * 256 / 360)
        hsv[..., 0] = (hsv[..., 0].astype(np.int16) + shift) % 256
        image = Image.fromarray(hsv, "HSV").convert("RGB")
    return image


@dataclass
class SegTrainTransform:
    crop: int
    base_size: int
    scale_range: tuple[float, float] = (0.5, 2.0)
    cat_max_ratio: float = 0.75
    flip: bool = True
    photometric: bool = True
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)

    def __call__(self, image: Image.Image, mask: np.ndarray, rng: random.Random) -> Pair:
        short = max(1, round(self.base_size * rng.uniform(*self.scale_range)))
        image, mask = resize_pair(image, mask, short)
        top, left = _crop_box(mask, self.crop, self.cat_max_ratio, rng)
        image = image.crop((left, top, left + self.crop, top + self.crop))  # pads with 0
        window = mask[top : top + self.crop, left : left + self.crop]
        mask = np.full((self.crop, self.crop), IGNORE_INDEX, dtype=np.uint8)
        mask[: window.shape[0], : window.shape[1]] = window
        if self.flip and rng.random() < 0.5:
            image, mask = image.transpose(Image.Transpose.FLIP_LEFT_RIGHT), mask[:, ::-1]
        if self.photometric:
            image = photometric(image, rng)
        return to_tensors(image, mask, self.mean, self.std)


@dataclass
class SegEvalTransform:
    """The image with its shorter side at `base_size`; the mask at the original size (to be
    scored against the logits resized back, `evaluate_segmentation`), or resized with the
    image (nearest) where `at_original` is False."""

    base_size: int
    mean: Sequence[float] = (0.485, 0.456, 0.406)
    std: Sequence[float] = (0.229, 0.224, 0.225)
    at_original: bool = True

    def __call__(self, image: Image.Image, mask: np.ndarray) -> Pair:
        resized, resized_mask = resize_pair(image, mask, self.base_size)
        return to_tensors(resized, mask if self.at_original else resized_mask, self.mean, self.std)


class SegShardStream(torch.utils.data.IterableDataset):
    """Samples of a list of shards through a transform, read with webdataset, split into parts
    one per (rank, loader worker) so that every sample goes to one part (`split_shards`): whole
    shards to each rank, then to each of its loader workers, where there are enough shards;
    otherwise the samples by position modulo the parts (every such part reads the bytes of all
    its shards and decodes only its samples). For training the shard order (the same on every
    rank) and a buffer of samples are shuffled with `seed`; for evaluation the order is the
    shards'."""

    def __init__(
        self,
        urls: Sequence[str],
        transform: Callable[..., Pair],
        *,
        train: bool,
        seed: int = 0,
        shuffle_buffer: int = 64,
        rank: int = 0,
        world_size: int = 1,
    ) -> None:
        super().__init__()
        self.urls, self.transform, self.train = list(urls), transform, train
        self.seed, self.shuffle_buffer = seed, shuffle_buffer
        self.rank, self.world_size = rank, world_size

    def __iter__(self) -> Iterator[Pair]:
        import webdataset as wds

        info = torch.utils.data.get_worker_info()
        worker, workers = (info.id, info.num_workers) if info else (0, 1)
        urls = list(self.urls)
        if self.train:
            random.Random(self.seed).shuffle(urls)
        urls, part, parts = split_shards(urls, (self.rank, self.world_size), (worker, workers))
        rng = random.Random((self.seed * 1_000_003 + self.rank * workers + worker) * 7919)
        if not urls:
            return
        raw = wds.WebDataset(urls, shardshuffle=False, empty_check=False)
        mine = (decode_sample(s) for i, s in enumerate(raw) if i % parts == part)
        samples = _shuffled(mine, self.shuffle_buffer, rng) if self.train else mine
        for _, image, mask in samples:
            yield self.transform(image, mask, rng) if self.train else self.transform(image, mask)


def split_shards(
    urls: Sequence[str], rank: tuple[int, int], worker: tuple[int, int]
) -> tuple[list[str], int, int]:
    """(the shards this (rank, loader worker) reads, part, parts): it keeps the samples of
    those shards whose position is `part` modulo `parts`. `rank` and `worker` are (index,
    count). Whole shards go round-robin to the ranks where there are at least as many shards as
    ranks, then to the rank's workers likewise; where there are fewer, every reader of the same
    shards takes every `parts`-th sample. Each sample goes to exactly one (rank, worker)."""
    (r, ranks), (w, workers) = rank, worker
    if len(urls) < ranks:
        return list(urls), r * workers + w, ranks * workers
    mine = list(urls[r::ranks])
    if len(mine) < workers:
        return mine, w, workers
    return mine[w::workers], 0, 1


def _shuffled(items: Iterator[Any], size: int, rng: random.Random) -> Iterator[Any]:
    buffer: list[Any] = []
    for item in items:
        buffer.append(item)
        if len(buffer) >= size:
            yield buffer.pop(rng.randrange(len(buffer)))
    rng.shuffle(buffer)
    yield from buffer


def seg_loader(
    urls: Sequence[str],
    transform: Callable[..., Pair],
    *,
    batch_size: int,
    train: bool,
    seed: int = 0,
    rank: int = 0,
    world_size: int = 1,
    workers: int = 0,
    shuffle_buffer: int = 64,
) -> torch.utils.data.DataLoader:
    """A DataLoader over this rank's part of segmentation shards (`SegShardStream`), batches of
    (images (B, 3, H, W), masks (B, H, W)); training drops each loader worker's remainder."""
    stream = SegShardStream(
        urls, transform, train=train, seed=seed, shuffle_buffer=shuffle_buffer, rank=rank,
        world_size=world_size,
    )  # fmt: skip
    return torch.utils.data.DataLoader(
        stream, batch_size=batch_size, num_workers=workers, drop_last=train
    )
