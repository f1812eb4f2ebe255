"""The training worker: model, optimiser, schedule, epochs of train + evaluate, reports.

`run_training` is plain PyTorch (+ torch.distributed when a process group exists), so it runs
in a Ray Train worker, in a test, or in a bare process alike; `train_loop_per_worker` is the
thin Ray Train entry point around it.
"""

from __future__ import annotations

import logging
import math
import random
import tempfile
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import numpy as np
import torch
import torch.distributed as dist
from torch import Tensor, nn

from cbtlab.config import ExperimentConfig
from cbtlab.data import (
    TrainEpoch,
    check_dataset_fits,
    eval_batches,
    open_split,
    prepare_dataset,
    transforms_for,
)
from cbtlab.data.loader import usable_workers
from cbtlab.models import build_model
from cbtlab.train.checkpoint import (
    check_compatible,
    load_state,
    make_state,
    mark_diverged,
    save_state,
)

log = logging.getLogger(__name__)

# report(metrics, checkpoint_state): called once per epoch on every rank; the state (a dict for
# `checkpoint.save_state`) is given on rank 0 at checkpoint epochs, else None.
Report = Callable[[dict[str, float], dict[str, Any] | None], None]


def seed_everything(seed: int) -> None:
    """One seed drives Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def param_groups(model: nn.Module, weight_decay: float) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on biases, norms, step sizes, CLS or positions."""
    skip = set(getattr(model, "no_weight_decay", set)())
    decay, no_decay = [], []
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        (no_decay if param.ndim <= 1 or name in skip else decay).append(param)
    return [
        {"params": decay, "weight_decay": weight_decay},
        {"params": no_decay, "weight_decay": 0.0},
    ]


def build_optimizer(model: nn.Module, cfg: ExperimentConfig) -> torch.optim.Optimizer:
    groups = param_groups(model, cfg.train.weight_decay)
    if cfg.train.optimizer == "adamw":
        return torch.optim.AdamW(groups, lr=cfg.train.lr)
    return torch.optim.SGD(groups, lr=cfg.train.lr, momentum=0.9, nesterov=True)


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up to the base rate, then cosine decay to `min_ratio` of it."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


DIVERGED_KEY = "train/diverged"
DIVERGED_WORST = {"val/top1": 0.0, "val/top5": 0.0, "val/loss": math.inf, "train/loss": math.inf}


class Diverged(FloatingPointError):
    """The training loss became NaN or infinite on some rank (raised on every rank).

    It travels from the workers to the driver as a result: `as_metrics()` in the workers'
    last report, `from_metrics()` where that report arrives (the trial, the MLflow callback).
    """

    def __init__(self, epoch: int, step: int, loss: float | None = None) -> None:
        where = f"non-finite training loss at epoch {epoch}, step {step}"
        super().__init__(where if loss is None else f"{where} (here: {loss})")
        self.epoch, self.step = epoch, step

    def as_metrics(self) -> dict[str, float]:
        # The worst values of the usual metrics go along: Tune's searcher and scheduler need
        # the study metric in every result, and the trial is failed right after.
        return {
            **DIVERGED_WORST,
            DIVERGED_KEY: 1.0,
            "diverged/epoch": self.epoch,
            "diverged/step": self.step,
        }

    @classmethod
    def from_metrics(cls, metrics: dict[str, Any] | None) -> Diverged | None:
        if not metrics or not metrics.get(DIVERGED_KEY):
            return None
        return cls(int(metrics["diverged/epoch"]), int(metrics["diverged/step"]))


def _any_rank(flag: bool) -> bool:
    """True on every rank if `flag` is true on any rank (itself without a process group)."""
    if not (dist.is_available() and dist.is_initialized()):
        return flag
    tensor = torch.tensor([float(flag)])
    dist.all_reduce(tensor, op=dist.ReduceOp.MAX)
    return bool(tensor.item())


def _all_sum(values: list[float]) -> list[float]:
    """Sum per-rank totals over all ranks (identity without a process group)."""
    tensor = torch.tensor(values, dtype=torch.float64)
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(tensor)
    return tensor.tolist()


def _topk_correct(logits: Tensor, labels: Tensor, k: int) -> float:
    k = min(k, logits.shape[-1])
    top = logits.topk(k, dim=-1).indices
    return (top == labels[:, None]).any(dim=-1).sum().item()


def evaluate(
    model: nn.Module, batches: Any, loss_fn: nn.Module, device: torch.device
) -> dict[str, float]:
    """Loss, top-1 and top-5 over this rank's batches, summed over ranks."""
    model.eval()
    loss_sum = top1 = top5 = count = 0.0
    with torch.no_grad():
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            logits = model(images)
            loss_sum += loss_fn(logits, labels).item() * labels.numel()
            top1 += _topk_correct(logits, labels, 1)
            top5 += _topk_correct(logits, labels, 5)
            count += labels.numel()
    loss_sum, top1, top5, count = _all_sum([loss_sum, top1, top5, count])
    return {
        "val/loss": loss_sum / count,
        "val/top1": top1 / count,
        "val/top5": top5 / count,
        "val/samples": count,
    }


def compression_metrics(model: nn.Module, images: Tensor) -> dict[str, float]:
    """rc/layer_XX and rc_norm/layer_XX (tokens unit-normalised): the compression term of
    every layer's output against its own subspaces (CBSA_MATH.md, eq. 2; eps = 0.5)."""
    from cbtlab.analysis import layer_compression

    metrics = {}
    for name, normalize in (("rc", False), ("rc_norm", True)):
        for i, value in enumerate(layer_compression(model, images, normalize=normalize)):
            metrics[f"{name}/layer_{i:02d}"] = value
    return metrics


def run_training(
    cfg: ExperimentConfig,
    *,
    rank: int = 0,
    world_size: int = 1,
    report: Report,
    prepare_model: Callable[[nn.Module], nn.Module] = lambda m: m,
    device: torch.device | None = None,
    resume: dict[str, Any] | None = None,
) -> nn.Module:
    """Train `cfg` on this rank's share of the data; call `report(metrics, state)` once per
    epoch with metrics already reduced over all ranks (see `Report`). `resume` is a checkpoint
    state to continue from. Returns the trained (unwrapped) model."""
    device = device or torch.device("cpu")
    threads = cfg.train.torch_threads or max(1, int(cfg.train.cpus_per_worker))
    torch.set_num_threads(threads)
    seed_everything(cfg.train.seed)

    if cfg.data.batch_size % world_size:
        raise ValueError(
            f"global batch {cfg.data.batch_size} does not split over {world_size} ranks"
        )
    batch_size = cfg.data.batch_size // world_size
    root = prepare_dataset(cfg.data)
    train_set, val_set = open_split(root, "train"), open_split(root, "val")
    check_dataset_fits(cfg.model, train_set)
    tf = transforms_for(cfg.data, cfg.model.img_size, train_set)
    draft = cfg.data.jpeg_draft
    workers = cfg.data.loader_workers
    usable = usable_workers(len(train_set.shards), world_size, workers)
    if rank == 0 and workers > usable:
        log.warning(
            "data.loader_workers=%d, but %d training shards over %d ranks feed only %d per rank",
            workers,
            len(train_set.shards),
            world_size,
            usable,
        )
    pin_memory = device.type == "cuda"

    model = build_model(cfg.model).to(device)
    wrapped = prepare_model(model)
    optimizer = build_optimizer(model, cfg)
    loss_fn = nn.CrossEntropyLoss(label_smoothing=cfg.train.label_smoothing)
    eval_loss = nn.CrossEntropyLoss()

    def epoch_data(epoch: int) -> TrainEpoch:
        return TrainEpoch(
            train_set,
            rank=rank,
            world_size=world_size,
            epoch=epoch,
            seed=cfg.train.seed,
            batch_size=batch_size,
            shuffle_buffer=cfg.data.shuffle_buffer,
            transform=tf.train,
            loader_workers=workers,
            decode_size=tf.train_decode_size if draft else None,
            pin_memory=pin_memory,
        )

    probe_images = None
    if cfg.train.probe_every:
        # The same images on every rank, so every rank reports the same values.
        probe = eval_batches(
            val_set, rank=0, world_size=1, batch_size=cfg.train.probe_samples, transform=tf.eval
        )
        probe_images = next(iter(probe))[0].to(device)

    steps_per_epoch = len(epoch_data(0))
    scheduler = warmup_cosine(
        optimizer,
        warmup_steps=round(cfg.train.warmup_epochs * steps_per_epoch),
        total_steps=cfg.train.epochs * steps_per_epoch,
        min_ratio=cfg.train.min_lr_ratio,
    )
    first_epoch = 0
    if resume is not None:
        check_compatible(resume, cfg)
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        first_epoch = resume["epochs_done"]
    failure = _parse_failure(cfg.train.inject_failure) if resume is None else None

    for epoch in range(first_epoch, cfg.train.epochs):
        # Augmentation randomness: seeded per (seed, epoch, rank), independent of data order.
        torch.manual_seed((cfg.train.seed * 1_000_003 + epoch) * 1_009 + rank)
        wrapped.train()
        start = time.perf_counter()
        loss_sum = correct = count = 0.0
        train_data = epoch_data(epoch)
        for step, (images, labels) in enumerate(train_data):
            if failure == (epoch, step, rank):
                raise InjectedFailure(
                    f"injected failure at epoch {epoch}, step {step}, rank {rank}"
                )
            images = images.to(device, non_blocking=pin_memory)
            labels = labels.to(device, non_blocking=pin_memory)
            logits = wrapped(images)
            loss = loss_fn(logits, labels)
            # Every rank learns of a non-finite loss on any rank at the same step, so all stop
            # together (a rank that stopped alone would leave the others hanging in DDP).
            if _any_rank(not torch.isfinite(loss).item()):
                raise Diverged(epoch, step, loss.item())
            optimizer.zero_grad(set_to_none=True)
            loss.backward()
            if cfg.train.grad_clip > 0:
                nn.utils.clip_grad_norm_(model.parameters(), cfg.train.grad_clip)
            optimizer.step()
            scheduler.step()
            loss_sum += loss.item() * labels.numel()
            correct += (logits.argmax(-1) == labels).sum().item()
            count += labels.numel()
        train_time = time.perf_counter() - start
        loss_sum, correct, count, corrupt = _all_sum(
            [loss_sum, correct, count, train_data.corrupt_samples]
        )
        metrics = {
            "epoch": epoch + 1,
            "train/loss": loss_sum / count,
            "train/top1": correct / count,
            "train/lr": scheduler.get_last_lr()[0],
            "throughput/train_img_s": count / train_time,
            "time/train_epoch_s": train_time,
            "data/corrupt_samples": corrupt,
        }
        val_data = eval_batches(
            val_set,
            rank=rank,
            world_size=world_size,
            batch_size=batch_size,
            transform=tf.eval,
            loader_workers=workers,
            decode_size=tf.eval_decode_size if draft else None,
            pin_memory=pin_memory,
        )
        metrics.update(evaluate(model, val_data, eval_loss, device))
        (metrics["val/corrupt_samples"],) = _all_sum([val_data.corrupt_samples])
        metrics["time/epoch_s"] = time.perf_counter() - start
        if cfg.train.probe_every and (epoch + 1) % cfg.train.probe_every == 0:
            metrics.update(compression_metrics(model, probe_images))
        state = None
        last = epoch + 1 == cfg.train.epochs
        if (
            rank == 0
            and cfg.train.checkpoint_every
            and ((epoch + 1) % cfg.train.checkpoint_every == 0 or last)
        ):
            state = make_state(
                cfg,
                epoch=epoch + 1,
                model=model,
                optimizer=optimizer,
                scheduler=scheduler,
                metrics=metrics,
            )
        report(metrics, state)
    return model


class InjectedFailure(RuntimeError):
    """The test-only failure of `train.inject_failure`."""


def _parse_failure(spec: str) -> tuple[int, int, int] | None:
    """`train.inject_failure` = "epoch:step:rank" (test-only): that rank raises at that step of
    a run that did not start from a checkpoint, so a restart from the last checkpoint goes on."""
    if not spec:
        return None
    epoch, step, rank = (int(part) for part in spec.split(":"))
    return epoch, step, rank


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: `config` is `{"experiment": ExperimentConfig.to_dict()}`."""
    import ray.train
    import ray.train.torch

    cfg = ExperimentConfig.from_dict(config["experiment"])
    ctx = ray.train.get_context()
    resume = None
    checkpoint = ray.train.get_checkpoint() or (
        ray.train.Checkpoint(config["resume_from"]) if config.get("resume_from") else None
    )
    if checkpoint is not None:
        with checkpoint.as_directory() as directory:
            resume = load_state(Path(directory))

    def report_with_checkpoint(metrics: dict[str, float], write: Callable[[Path], Any]) -> None:
        with tempfile.TemporaryDirectory() as directory:
            write(Path(directory))
            ray.train.report(metrics, checkpoint=ray.train.Checkpoint.from_directory(directory))

    def report(metrics: dict[str, float], state: dict[str, Any] | None) -> None:
        if state is None:
            ray.train.report(metrics)
        else:
            report_with_checkpoint(metrics, lambda directory: save_state(state, directory))

    try:
        run_training(
            cfg,
            rank=ctx.get_world_rank(),
            world_size=ctx.get_world_size(),
            report=report,
            prepare_model=ray.train.torch.prepare_model,
            device=ray.train.torch.get_device(),
            resume=resume,
        )
    except Diverged as exc:
        # Not a worker failure to retry: end the run normally and let the driver fail it
        # (`cbtlab.train.fit` raises), so Tune and MLflow record the divergence at once. Ray
        # Train keeps only checkpointed metrics in its result, so rank 0 attaches a marker
        # checkpoint.
        metrics, reason = exc.as_metrics(), str(exc)
        if ctx.get_world_rank() == 0:
            report_with_checkpoint(metrics, lambda directory: mark_diverged(directory, reason))
        else:
            ray.train.report(metrics)
