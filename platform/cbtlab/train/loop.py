"""The training worker: model, optimiser, schedule, epochs of train + evaluate, reports.

`run_training` is plain PyTorch (+ torch.distributed when a process group exists), so it runs
in a Ray Train worker, in a test, or in a bare process alike; `train_loop_per_worker` is the
thin Ray Train entry point around it. The recipe's parts (optimiser, schedule, precision,
compilation, the accumulated step) are in `cbtlab.train.recipe`, the epoch's bookkeeping in
`cbtlab.train.metrics`, the weights of a fine-tuning start in `cbtlab.train.finetune`.
"""

from __future__ import annotations

import contextlib
import itertools
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cbtlab.config import ExperimentConfig
from cbtlab.data import (
    TrainEpoch,
    WorkerPool,
    check_dataset_fits,
    eval_batches,
    open_split,
    prepare_dataset,
    transforms_for,
)
from cbtlab.data.loader import plan_train_epoch, usable_workers
from cbtlab.models import build_model
from cbtlab.train.checkpoint import (
    check_compatible,
    check_position,
    data_position,
    load_state,
    make_state,
    mark_diverged,
    rng_state,
    save_state,
    set_rng_state,
)
from cbtlab.train.collectives import all_reduce, gather_objects, reduction_device
from cbtlab.train.finetune import init_from
from cbtlab.train.metrics import DivergenceGuard, EpochMeter, correct_counts
from cbtlab.train.recipe import (
    TrainStep,
    autocast,
    build_optimizer,
    compile_model,
    resolve_precision,
    warmup_cosine,
)

log = logging.getLogger(__name__)

# report(metrics, checkpoint_state): called once per epoch on every rank, and at mid-epoch
# checkpoints (`train.checkpoint_every_steps`; their metrics carry MID_EPOCH_KEY); the state (a
# dict for `checkpoint.save_state`) is given on rank 0 at checkpoints, else None.
Report = Callable[[dict[str, float], dict[str, Any] | None], None]
MID_EPOCH_KEY = "checkpoint/mid_epoch"


def seed_everything(seed: int) -> None:
    """One seed drives Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


DIVERGED_KEY = "train/diverged"
DIVERGED_WORST = {"val/top1": 0.0, "val/top5": 0.0, "val/loss": math.inf, "train/loss": math.inf}


class Diverged(FloatingPointError):
    """The training loss became NaN or infinite on some rank (raised on every rank alike, at
    most `DivergenceGuard.every - 1` micro-batches later: see `cbtlab.train.metrics`).

    It travels from the workers to the driver as a result: `as_metrics()` in the workers'
    last report, `from_metrics()` where that report arrives (the trial, the MLflow callback).
    """

    def __init__(self, epoch: int, step: int) -> None:
        super().__init__(f"non-finite training loss at epoch {epoch}, step {step}")
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


def evaluate(
    model: nn.Module,
    batches: Any,
    loss_fn: nn.Module,
    device: torch.device,
    amp: Callable[[], Any] = contextlib.nullcontext,
    memory_format: torch.memory_format = torch.contiguous_format,
) -> dict[str, float]:
    """Loss, top-1 and top-5 over this rank's batches, summed over ranks; `amp` gives the
    forward pass's autocast context. Sums stay on `device` until the one reduction."""
    model.eval()
    # (loss x samples, top-1 hits, top-5 hits, samples)
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    with torch.no_grad():
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            with amp():
                logits = model(images.contiguous(memory_format=memory_format))
            n = labels.numel()
            loss = loss_fn(logits.float(), labels).double().reshape(1) * n
            sums += torch.cat([loss, correct_counts(logits, labels), loss.new_tensor([n])])
    loss_sum, top1, top5, count = all_reduce(sums, device)
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


def _rank_batch(cfg: ExperimentConfig, world_size: int) -> int:
    if cfg.data.batch_size % world_size:
        raise ValueError(
            f"global batch {cfg.data.batch_size} does not split over {world_size} ranks"
        )
    return cfg.data.batch_size // world_size


def check_training_data(cfg: ExperimentConfig, world_size: int) -> None:
    """Raise ValueError, before any worker starts, where `cfg`'s data cannot train on
    `world_size` ranks: a global batch that does not split over them, a dataset whose channels
    or classes differ from the model's, or a first epoch in which some rank's stream holds no
    full batch. Workers would meet the same error, and Ray Train would restart them for it
    `train.max_failures` times."""
    batch_size = _rank_batch(cfg, world_size)
    train_set = open_split(prepare_dataset(cfg.data), "train")
    check_dataset_fits(cfg.model, train_set)
    plan_train_epoch(
        train_set,
        world_size=world_size,
        workers=max(1, cfg.data.loader_workers),
        epoch=0,
        seed=cfg.train.seed,
        batch_size=batch_size,
    )


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
    state to continue from (an epoch's end or, with a data position, mid-epoch). Returns the
    trained (unwrapped) model."""
    device = device or torch.device("cpu")
    reduction_device(device)  # a process group that cannot reduce this rank's tensors fails now
    # The worker's CPUs, less those its loader processes take (a GPU worker sized from its node
    # has one CPU for itself and the rest for loader processes: cbtlab.cluster).
    own_cpus = int(cfg.train.cpus_per_worker) - cfg.data.loader_workers
    threads = cfg.train.torch_threads or max(1, own_cpus)
    torch.set_num_threads(threads)
    seed_everything(cfg.train.seed)

    batch_size = _rank_batch(cfg, world_size)
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
    # Loader worker processes kept for the whole run (started at the first epoch's first batch,
    # stopped when the epochs end or fail): no forking per epoch or per evaluation.
    pool = WorkerPool() if workers else None
    amp = autocast(resolve_precision(cfg.train.precision, device), device)

    model = build_model(cfg.model)
    if cfg.train.init_from and resume is None:  # a restart continues from its checkpoint
        for note in init_from(model, cfg.train.init_from):
            if rank == 0:
                log.info("train.init_from=%s: %s", cfg.train.init_from, note)
    # channels_last: NHWC images and convolution weights (the stems' convolutions run faster
    # so on tensor cores); the model's numbers do not change.
    memory_format = torch.channels_last if cfg.train.channels_last else torch.contiguous_format
    model = model.to(device, memory_format=memory_format)
    wrapped = prepare_model(model)
    if cfg.train.compile:
        wrapped = compile_model(wrapped, device, cfg.train.compile_mode)
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
            device=device,  # uint8 batches cross to the device and are normalised there
            pool=pool,
        )

    probe_images = None
    if cfg.train.probe_every:
        # The same images on every rank, so every rank reports the same values.
        probe = eval_batches(
            val_set,
            rank=0,
            world_size=1,
            batch_size=cfg.train.probe_samples,
            transform=tf.eval,
            device=device,
        )
        probe_images = next(iter(probe))[0]

    accum = cfg.train.grad_accum_steps
    steps_per_epoch = len(epoch_data(0)) // accum  # optimiser steps
    if steps_per_epoch == 0:
        raise ValueError(
            f"train.grad_accum_steps={accum} exceeds the {len(epoch_data(0))} batches of an epoch"
        )
    optimizer = build_optimizer(
        model, cfg, frozen_steps=cfg.train.head_only_epochs * steps_per_epoch
    )
    scheduler = warmup_cosine(
        optimizer,
        warmup_steps=round(cfg.train.warmup_epochs * steps_per_epoch),
        total_steps=cfg.train.epochs * steps_per_epoch,
        min_ratio=cfg.train.min_lr_ratio,
    )
    first_epoch, position = 0, None
    if resume is not None:
        check_compatible(resume, cfg)
        check_position(resume, cfg, world_size)
        model.load_state_dict(resume["model"])
        optimizer.load_state_dict(resume["optimizer"])
        scheduler.load_state_dict(resume["scheduler"])
        first_epoch, position = resume["epochs_done"], resume.get("position")
    failure = _parse_failure(cfg.train.inject_failure) if resume is None else None
    train_step = TrainStep(
        wrapped,
        optimizer,
        scheduler,
        loss_fn,
        accum_steps=accum,
        grad_clip=cfg.train.grad_clip,
        clip_params=list(model.parameters()),
        autocast=amp,
        compiled=cfg.train.compile,
    )
    every_steps = cfg.train.checkpoint_every_steps

    try:
        for epoch in range(first_epoch, cfg.train.epochs):
            # Augmentation randomness: seeded per (seed, epoch, rank), independent of data order.
            torch.manual_seed((cfg.train.seed * 1_000_003 + epoch) * 1_009 + rank)
            wrapped.train()
            meter = EpochMeter(device)
            guard = DivergenceGuard(device)
            train_data = epoch_data(epoch)
            # Whole optimiser steps only: a remainder of fewer than `accum` batches is not read.
            used = len(train_data) // accum * accum
            epoch_batches = iter(train_data)
            batches = (
                epoch_batches if used == len(train_data) else itertools.islice(epoch_batches, used)
            )
            skip = 0
            if position is not None:  # a mid-epoch checkpoint: see cbtlab.train.checkpoint
                skip = position["batches_done"]
                _consume(batches, skip)
                mine = position["ranks"][rank]
                set_rng_state(mine["rng"], device)
                meter.load(mine["sums"])
                meter.restart_clock()
                position = None
            for index, (images, labels) in enumerate(meter.timed(batches), start=skip):
                if failure == (epoch, index, rank):
                    raise InjectedFailure(
                        f"injected failure at epoch {epoch}, step {index}, rank {rank}"
                    )
                # No-ops: the loader has moved the batch to `device` already.
                images = images.to(device, non_blocking=pin_memory)
                labels = labels.to(device, non_blocking=pin_memory)
                images = images.contiguous(memory_format=memory_format)
                stepped = train_batch(train_step, meter, guard, images, labels, epoch, index)
                # A mid-epoch checkpoint every `every_steps` optimiser steps; the epoch's end has
                # one of its own.
                if (
                    stepped
                    and every_steps
                    and scheduler.last_epoch % every_steps == 0
                    and index + 1 < used
                ):
                    _stop_if_diverged(guard, epoch)  # no checkpoint of a diverged model
                    _mid_epoch_checkpoint(
                        cfg,
                        report,
                        rank=rank,
                        world_size=world_size,
                        device=device,
                        epoch=epoch,
                        batches_done=index + 1,
                        batches_in_epoch=used,
                        sums=meter.state(),
                        training=(model, optimizer, scheduler),
                    )
            # Stop the loader's streams (a remainder left unread), freeing its workers for the
            # evaluation.
            epoch_batches.close()
            _stop_if_diverged(guard, epoch)
            metrics: dict[str, Any] = {"epoch": epoch + 1, "train/lr": scheduler.get_last_lr()[0]}
            metrics.update(meter.metrics(world_size=world_size, corrupt=train_data.corrupt_samples))
            val_data = eval_batches(
                val_set,
                rank=rank,
                world_size=world_size,
                batch_size=batch_size,
                transform=tf.eval,
                loader_workers=workers,
                decode_size=tf.eval_decode_size if draft else None,
                pin_memory=pin_memory,
                device=device,
                pool=pool,
            )
            metrics.update(evaluate(model, val_data, eval_loss, device, amp, memory_format))
            (metrics["val/corrupt_samples"],) = all_reduce([val_data.corrupt_samples], device)
            metrics["time/epoch_s"] = time.perf_counter() - meter.start
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
    finally:  # however the run ends: the loader's workers stop with it
        if pool is not None:
            pool.close()
    return model


def train_batch(
    train_step: TrainStep,
    meter: EpochMeter,
    guard: DivergenceGuard,
    images: Tensor,
    labels: Tensor,
    epoch: int,
    index: int,
) -> bool:
    """One micro-batch of the loop: forward, backward (and the optimiser step every
    `accum_steps`), its sums counted on the device, and every `guard.every` micro-batches the
    divergence check. Returns whether the optimiser stepped. `cbtlab.perf.loop_overhead` times
    this against a bare training loop."""
    loss, logits, stepped = train_step(images, labels)
    meter.add(loss, logits, labels)
    guard.observe(loss, index)
    if guard.due(index):
        _stop_if_diverged(guard, epoch)
    return stepped


def _stop_if_diverged(guard: DivergenceGuard, epoch: int) -> None:
    """Raise `Diverged` on every rank if some rank's loss was non-finite (a collective)."""
    step = guard.first_bad_step()
    if step is not None:
        raise Diverged(epoch, step)


def _consume(batches: Iterator[Any], count: int) -> None:
    """Read and drop `count` batches (decoded and transformed: see cbtlab.train.checkpoint)."""
    next(itertools.islice(batches, count, count), None)


def _mid_epoch_checkpoint(
    cfg: ExperimentConfig,
    report: Report,
    *,
    rank: int,
    world_size: int,
    device: torch.device,
    epoch: int,
    batches_done: int,
    batches_in_epoch: int,
    sums: dict[str, float],
    training: tuple[nn.Module, torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler],
) -> None:
    """Report a checkpoint with every rank's random state and partial sums (a collective)."""
    model, optimizer, scheduler = training
    rng = rng_state(device)
    ranks = gather_objects({"rng": rng, "sums": sums}, world_size)
    metrics = {
        "epoch": epoch + batches_done / batches_in_epoch,
        "train/step": scheduler.last_epoch,
        MID_EPOCH_KEY: 1.0,
        # Unscored: never among the best kept by val/top1, only ever kept as the latest.
        "val/top1": -math.inf,
    }
    state = None
    if rank == 0:
        state = make_state(
            cfg,
            epoch=epoch,
            model=model,
            optimizer=optimizer,
            scheduler=scheduler,
            metrics=metrics,
            position=data_position(
                cfg, world_size=world_size, batches_done=batches_done, ranks=ranks
            ),
        )
    report(metrics, state)
    # Whatever reporting draws from the generators, the run goes on from the saved state, as a
    # run restarted from this checkpoint does.
    set_rng_state(rng, device)


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
