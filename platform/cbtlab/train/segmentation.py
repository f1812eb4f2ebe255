"""The segmentation worker (`task.kind="segmentation"`): an encoder and a mask-transformer
decoder trained with per-pixel cross-entropy (ADE20K's unlabelled pixels ignored), a linear
warm-up then a polynomial decay of the rate (Segmenter), and per epoch an evaluation by sliding
windows that reports `val/miou`, `val/pixel_acc` and every class's IoU over all ranks.

It is the classification worker's counterpart (`cbtlab.train.loop`, which hands segmentation
configs here): the same report / checkpoint contract (`Report`, `make_state`), so Ray Train,
Tune, the checkpoints and MLflow take a segmentation run as any other. Data: this rank's part of
the shards' samples (every `world_size`-th sample, `cbtlab.data.seg_transforms`), a fixed
number of steps per epoch (equal on every rank: DDP needs it), read from the dataset card.
Checkpoints are at epoch ends only (no mid-epoch position).
"""

from __future__ import annotations

import itertools
import logging
import math
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from torch import Tensor, nn

from cbtlab.analysis import count_flops, count_pairwise_similarities
from cbtlab.analysis.segmentation import VOID, ConfusionMatrix, sliding_window_logits
from cbtlab.checkpoint import check_compatible, finished_epochs, make_state
from cbtlab.config import ExperimentConfig
from cbtlab.data import check_dataset_fits, open_split, prepare_dataset
from cbtlab.data.seg_transforms import SegEvalTransform, SegTrainTransform, seg_loader
from cbtlab.data.shards import ShardSet
from cbtlab.data.transforms import image_stats
from cbtlab.models import build_model, build_segmenter, zoo
from cbtlab.models.segmenter import Segmenter, decoder_share
from cbtlab.train.collectives import all_reduce, reduction_device
from cbtlab.train.messages import Diverged
from cbtlab.train.recipe import autocast, build_optimizer, resolve_precision

log = logging.getLogger(__name__)

Report = Callable[[dict[str, Any], dict[str, Any] | None], None]


def build_segmentation_model(cfg: ExperimentConfig) -> Segmenter:
    """The encoder (`task.encoder`: a timm name, or the model section's backbone) and the
    decoder a config describes."""
    task = cfg.task
    if task.encoder:
        kwargs: dict[str, Any] = {"num_classes": 0, "img_size": cfg.model.img_size}
        if task.encoder_weights:
            kwargs |= {"pretrained": True, "pretrained_cfg_overlay": {"file": task.encoder_weights}}
        if task.encoder not in zoo.MODEL_NAMES:  # timm's ViTs: any multiple of the patch
            kwargs["dynamic_img_size"] = True  # (ours resample their positions anyway)
        encoder = timm.create_model(task.encoder, **kwargs)
    else:
        encoder = build_model(cfg.model)
        encoder.reset_classifier(0)
    return build_segmenter(
        encoder,
        num_classes=cfg.model.num_classes,
        decoder_attention=task.decoder_attention,
        decoder_depth=task.decoder_depth,
        decoder_dim=task.decoder_dim,
        decoder_heads=task.decoder_heads,
        ffn="auto" if task.decoder_ffn == "auto" else bool(task.decoder_ffn),
        attn_options={
            "rep_grid": cfg.model.rep_grid,
            "rep_pool": cfg.model.rep_pool,
            "rep_init": cfg.model.rep_init,
            "contraction": cfg.model.contraction,
            "step_init": cfg.model.step_init,
            "step_scale": cfg.model.step_scale,
            "eps": cfg.model.linear_eps,
        },
    )


def open_segmentation_data(cfg: ExperimentConfig) -> tuple[ShardSet, ShardSet]:
    """The train and val splits; ValueError where they are not segmentation shards or differ
    from the model's channels and classes."""
    root = prepare_dataset(cfg.data)
    train_set, val_set = open_split(root, "train"), open_split(root, "val")
    if train_set.extra.get("task") != "segmentation":
        raise ValueError(
            f"dataset {train_set.name!r} holds no segmentation masks (its card has no "
            'extra.task="segmentation"); build it with `cbtlab data ade20k`'
        )
    check_dataset_fits(cfg.model, train_set)
    return train_set, val_set


def steps_per_epoch(cfg: ExperimentConfig, train_set: ShardSet, world_size: int) -> int:
    """Optimiser steps per epoch, the same on every rank: the smallest rank's samples (every
    `world_size`-th) over its batch. ValueError where some rank has no full batch."""
    batch = cfg.data.batch_size // world_size
    per_rank = train_set.num_samples // world_size
    if per_rank < batch:
        raise ValueError(
            f"{train_set.num_samples} training images over {world_size} ranks give {per_rank} "
            f"per rank, fewer than its batch of {batch}"
        )
    return per_rank // batch


def check_segmentation_data(cfg: ExperimentConfig, world_size: int) -> None:
    """The driver's check before any worker starts (as `check_training_data`)."""
    train_set, _ = open_segmentation_data(cfg)
    steps_per_epoch(cfg, train_set, world_size)


def decoder_costs(model: Segmenter, crop: int) -> dict[str, float]:
    """FLOPs and pairwise similarities of one `crop` x `crop` image: the model's and the
    decoder's share (counted on the meta device; the paper's Fig. 8 left)."""
    flops = count_flops(model, crop, by_module=True)
    similarities = count_pairwise_similarities(model, crop, by_module=True)
    return {
        "model/flops": float(flops["Global"]),
        "model/decoder_flops": float(decoder_share(flops)),
        "model/decoder_similarities": float(decoder_share(similarities)),
    }


def poly_schedule(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, power: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Linear warm-up, then `(1 - t / T) ** power` of the base rate (Segmenter's schedule)."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return max(0.0, 1.0 - progress) ** power

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


@dataclass
class SegRun:
    """What one rank trains and evaluates with."""

    cfg: ExperimentConfig
    rank: int
    world_size: int
    device: torch.device
    model: Segmenter
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    amp: Callable[[], Any]
    train_set: ShardSet
    val_set: ShardSet
    steps: int
    mean: list[float]
    std: list[float]
    costs: dict[str, float]

    def batches(self, epoch: int) -> Iterator[tuple[Tensor, Tensor]]:
        """`steps` training batches of this rank for `epoch`; the stream starts over (with a
        new seed) where a loader's remainder falls short."""
        cfg, task, crop = self.cfg, self.cfg.task, self.cfg.model.img_size
        transform = SegTrainTransform(
            crop=crop,
            base_size=task.eval_size(crop),
            scale_range=(task.scale_min, task.scale_max),
            cat_max_ratio=task.cat_max_ratio,
            flip=task.flip,
            photometric=task.photometric,
            mean=self.mean,
            std=self.std,
        )
        for round_ in itertools.count():
            loader = seg_loader(
                self.train_set.urls, transform, batch_size=cfg.data.batch_size // self.world_size,
                train=True, seed=(cfg.train.seed * 1_009 + epoch) * 101 + round_,
                rank=self.rank, world_size=self.world_size, workers=cfg.data.loader_workers,
                shuffle_buffer=cfg.data.shuffle_buffer,
            )  # fmt: skip
            yield from loader

    def val_loader(self) -> Any:
        crop = self.cfg.model.img_size
        transform = SegEvalTransform(self.cfg.task.eval_size(crop), mean=self.mean, std=self.std)
        return seg_loader(
            self.val_set.urls, transform, batch_size=1, train=False, rank=self.rank,
            world_size=self.world_size, workers=self.cfg.data.loader_workers,
        )  # fmt: skip


def build_run(
    cfg: ExperimentConfig,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    prepare_model: Callable[[nn.Module], nn.Module],
) -> SegRun:
    train_set, val_set = open_segmentation_data(cfg)
    steps = steps_per_epoch(cfg, train_set, world_size)
    _, mean, std = image_stats(train_set)
    model = build_segmentation_model(cfg).to(device)
    wrapped = prepare_model(model)
    optimizer = build_optimizer(model, cfg)
    scheduler = poly_schedule(
        optimizer,
        warmup_steps=round(cfg.train.warmup_epochs * steps),
        total_steps=cfg.train.epochs * steps,
        power=cfg.task.poly_power,
    )
    amp = autocast(resolve_precision(cfg.train.precision, device), device)
    return SegRun(
        cfg, rank, world_size, device, model, wrapped, optimizer, scheduler, amp, train_set,
        val_set, steps, mean, std, decoder_costs(model, cfg.model.img_size),
    )  # fmt: skip


def train_epoch(run: SegRun, epoch: int) -> dict[str, float]:
    """One epoch of `run.steps` optimiser steps; the mean loss over all ranks."""
    torch.manual_seed((run.cfg.train.seed * 1_000_003 + epoch) * 1_009 + run.rank)
    run.wrapped.train()
    total = torch.zeros(2, dtype=torch.float64, device=run.device)  # loss sum, batches
    for images, masks in itertools.islice(run.batches(epoch), run.steps):
        images, masks = images.to(run.device), masks.to(run.device)
        with run.amp():
            logits = run.wrapped(images)
        loss = F.cross_entropy(logits.float(), masks, ignore_index=VOID)
        run.optimizer.zero_grad(set_to_none=True)
        loss.backward()
        if run.cfg.train.grad_clip:
            nn.utils.clip_grad_norm_(run.model.parameters(), run.cfg.train.grad_clip)
        run.optimizer.step()
        run.scheduler.step()
        total += torch.stack([loss.detach().double(), torch.ones((), device=run.device).double()])
    loss_sum, batches = all_reduce(total, run.device)
    if not math.isfinite(loss_sum):
        raise Diverged(epoch, int(batches))
    return {"train/loss": loss_sum / max(1.0, batches)}


@torch.no_grad()
def evaluate_segmentation(
    model: nn.Module,
    batches: Any,
    *,
    num_classes: int,
    crop: int,
    stride: int,
    device: torch.device,
    amp: Callable[[], Any],
    reduce: Callable[[Tensor], Any] | None = None,
) -> dict[str, float]:
    """`val/loss`, `val/miou`, `val/pixel_acc` and `val/iou/XXX` of `model` on (image, mask)
    batches by sliding windows of `crop` every `stride` pixels; logits are resized (bilinear)
    to a mask of another size, the original image's (`SegEvalTransform`), before they are
    scored, as Segmenter and mmseg do; with `reduce`, summed over ranks first."""
    model.eval()
    matrix = ConfusionMatrix(num_classes, device=device)
    sums = torch.zeros(2, dtype=torch.float64, device=device)  # loss sum, scored pixels

    def forward(x: Tensor) -> Tensor:
        with amp():
            return model(x)

    for images, masks in batches:
        images, masks = images.to(device), masks.to(device)
        logits = sliding_window_logits(
            forward, images, window=crop, stride=stride, num_classes=num_classes
        )
        if logits.shape[-2:] != masks.shape[-2:]:
            logits = F.interpolate(logits, size=masks.shape[-2:], mode="bilinear")
        scored = (masks != VOID).sum()
        loss = F.cross_entropy(logits, masks, ignore_index=VOID, reduction="sum")
        sums += torch.stack([loss.double(), scored.double()])
        matrix.update(logits.argmax(1), masks)
    if reduce is not None:
        matrix.reduce(reduce)
        sums = torch.as_tensor(reduce(sums), dtype=torch.float64)
    metrics = matrix.metrics()
    metrics["val/loss"] = float(sums[0] / sums[1].clamp_min(1))
    return metrics


def epoch_metrics(run: SegRun, epoch: int, train: dict[str, float], start: float) -> dict:
    cfg, crop = run.cfg, run.cfg.model.img_size
    metrics: dict[str, Any] = {"epoch": epoch + 1, "train/lr": run.scheduler.get_last_lr()[0]}
    metrics.update(train)
    metrics.update(run.costs)
    metrics.update(
        evaluate_segmentation(
            run.model,
            run.val_loader(),
            num_classes=cfg.model.num_classes,
            crop=crop,
            stride=cfg.task.stride(crop),
            device=run.device,
            amp=run.amp,
            reduce=lambda t: all_reduce(t, run.device),
        )
    )
    metrics["time/epoch_s"] = time.perf_counter() - start
    return metrics


def run_segmentation(
    cfg: ExperimentConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    report: Report,
    prepare_model: Callable[[nn.Module], nn.Module] = lambda m: m,
    device: torch.device | None = None,
    resume: dict[str, Any] | None = None,
) -> Segmenter:
    """Train a segmentation config on this rank (see the module docstring); `report(metrics,
    state)` once per epoch, a checkpoint state every `train.checkpoint_every` epochs and after
    the last, on rank 0. Returns the trained model."""
    device = device or torch.device("cpu")
    reduction_device(device)
    torch.manual_seed(cfg.train.seed)
    run = build_run(
        cfg, rank=rank, world_size=world_size, device=device, prepare_model=prepare_model
    )
    history: list[dict[str, Any]] = []
    first = 0
    if resume is not None:
        check_compatible(resume, cfg)
        run.model.load_state_dict(resume["model"])
        run.optimizer.load_state_dict(resume["optimizer"])
        run.scheduler.load_state_dict(resume["scheduler"])
        history, first = finished_epochs(resume), resume["epochs_done"]
    for finished in history:
        report(dict(finished), None)
    for epoch in range(first, cfg.train.epochs):
        start = time.perf_counter()
        metrics = epoch_metrics(run, epoch, train_epoch(run, epoch), start)
        history.append(metrics)
        report(metrics, _checkpoint(run, epoch, metrics, history))
    return run.model


def _checkpoint(
    run: SegRun, epoch: int, metrics: dict[str, Any], history: list[dict[str, Any]]
) -> dict[str, Any] | None:
    every, last = run.cfg.train.checkpoint_every, epoch + 1 == run.cfg.train.epochs
    if run.rank != 0 or not every or not ((epoch + 1) % every == 0 or last):
        return None
    state = make_state(
        run.cfg, epoch=epoch + 1, model=run.model, optimizer=run.optimizer,
        scheduler=run.scheduler, metrics=metrics, normalisation=(run.mean, run.std),
        history=history,
    )  # fmt: skip
    # The decoder's fields, so that a study can rebuild the model from the checkpoint alone.
    state["task_config"] = {k: v for k, v in run.cfg.flat().items() if k.startswith("task.")}
    return state
