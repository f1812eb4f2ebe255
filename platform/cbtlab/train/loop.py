"""The training worker: this rank's data, the model and its optimisation, then epochs of
train, evaluate, checkpoint when due, report.

`run_training` is plain PyTorch (+ torch.distributed when a process group exists), so it runs
in a Ray Train worker, in a test, or in a bare process alike; `train_loop_per_worker` is the
thin Ray Train entry point around it. The recipe's parts are in `cbtlab.train.recipe`, the
epoch's bookkeeping in `cbtlab.train.metrics`, the evaluation in `cbtlab.analysis`, what the
workers tell the driver in `cbtlab.train.messages`.
"""

from __future__ import annotations

import itertools
import logging
import math
import random
import tempfile
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import Tensor, nn

from cbtlab.analysis import evaluate, layer_compression
from cbtlab.checkpoint import (
    check_compatible,
    check_position,
    data_position,
    finished_epochs,
    load_state,
    make_state,
    mark_diverged,
    rng_state,
    save_state,
    set_rng_state,
)
from cbtlab.config import ExperimentConfig
from cbtlab.data import (
    ShardSet,
    TrainEpoch,
    Transforms,
    WorkerPool,
    check_dataset_fits,
    eval_batches,
    open_split,
    prepare_dataset,
    transforms_for,
)
from cbtlab.data.loader import plan_train_epoch, usable_workers
from cbtlab.models import build_model
from cbtlab.train.collectives import all_reduce, gather_objects, reduction_device
from cbtlab.train.faults import FailAt
from cbtlab.train.finetune import (
    Normalisation,
    StartingWeights,
    load_backbone,
    normalisation,
    read_start,
)
from cbtlab.train.messages import MID_EPOCH_KEY, Diverged
from cbtlab.train.metrics import DivergenceGuard, EpochMeter
from cbtlab.train.recipe import (
    TrainStep,
    autocast,
    build_optimizer,
    compile_model,
    resolve_precision,
    warmup_cosine,
)
from cbtlab.train.segmentation import check_segmentation_data, run_segmentation

log = logging.getLogger(__name__)

# report(metrics, checkpoint_state): called once per epoch on every rank, and at mid-epoch
# checkpoints (`train.checkpoint_every_steps`; their metrics carry MID_EPOCH_KEY); the state (a
# dict for `checkpoint.save_state`) is given on rank 0 at checkpoints, else None.
Report = Callable[[dict[str, float], dict[str, Any] | None], None]


def seed_everything(seed: int) -> None:
    """One seed drives Python, NumPy and torch."""
    random.seed(seed)
    np.random.seed(seed)
    torch.manual_seed(seed)


def compression_metrics(model: nn.Module, images: Tensor) -> dict[str, float]:
    """rc/layer_XX and rc_norm/layer_XX (tokens unit-normalised): the compression term of
    every layer's output against its own subspaces (CBSA_MATH.md, eq. 2; eps = 0.5)."""
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
    if cfg.task.segmentation:
        return check_segmentation_data(cfg, world_size)
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
    fail_at: FailAt | None = None,
) -> nn.Module:
    """Train `cfg` on this rank's share of the data; call `report(metrics, state)` once per
    epoch with metrics already reduced over all ranks (see `Report`). `resume` is a checkpoint
    state to continue from (an epoch's end or, with a data position, mid-epoch); `fail_at` a
    test's injected failure (`cbtlab.train.faults`). Returns the trained (unwrapped) model."""
    device = device or torch.device("cpu")
    reduction_device(device)  # a process group that cannot reduce this rank's tensors fails now
    _set_threads_and_seed(cfg)
    # A restart continues from its checkpoint, not from the weights it first started from.
    start = (
        read_start(cfg.train.init_from, cfg.model)
        if cfg.train.init_from and resume is None
        else None
    )
    stats = normalisation(cfg, start, resume)
    data = RankData.open(cfg, rank=rank, world_size=world_size, device=device, stats=stats)
    learner = Learner.build(cfg, data, prepare_model=prepare_model, start=start)
    first_epoch, position = learner.resume_from(resume, cfg, world_size)
    fail_at = fail_at if resume is None else None  # a restart goes on past the failure
    # Every finished epoch reported again, as it was: a run goes on after its trial's driver
    # is lost with a node (its workers elsewhere), so the checkpoint it restarts from may be
    # several epochs past the last report that reached Tune. Tune's scheduler and the MLflow
    # logger take an epoch they already hold once.
    for finished in learner.history:
        report(dict(finished), None)
    try:
        for epoch in range(first_epoch, cfg.train.epochs):
            meter, corrupt = train_epoch(cfg, learner, data, epoch, position, report, fail_at)
            position = None
            metrics = epoch_metrics(cfg, learner, data, epoch, meter, corrupt)
            learner.history.append(metrics)
            report(metrics, epoch_checkpoint(cfg, learner, data, epoch, metrics))
    finally:  # however the run ends: the loader's workers stop with it
        data.close()
    return learner.model


def _set_threads_and_seed(cfg: ExperimentConfig) -> None:
    """This worker's torch threads, and the one seed of its model and start."""
    # The worker's CPUs, less those its loader processes take (a GPU worker sized from its node
    # has one CPU for itself and the rest for loader processes: cbtlab.cluster).
    own_cpus = int(cfg.train.cpus_per_worker) - cfg.data.loader_workers
    threads = cfg.train.torch_threads or max(1, own_cpus)
    torch.set_num_threads(threads)
    seed_everything(cfg.train.seed)


@dataclass
class RankData:
    """This rank's view of the run's data: its splits and transforms, its share of every
    training epoch and evaluation, and the loader worker processes kept for the whole run
    (started at the first epoch's first batch, stopped by `close`: no forking per epoch or per
    evaluation)."""

    cfg: ExperimentConfig
    rank: int
    world_size: int
    device: torch.device
    batch_size: int  # per rank
    train_set: ShardSet
    val_set: ShardSet
    tf: Transforms
    pool: WorkerPool | None

    @classmethod
    def open(
        cls,
        cfg: ExperimentConfig,
        *,
        rank: int,
        world_size: int,
        device: torch.device,
        stats: Normalisation | None,
    ) -> RankData:
        """`stats`: the (mean, std) of the weights the model starts from (None: the dataset
        card's)."""
        batch_size = _rank_batch(cfg, world_size)
        root = prepare_dataset(cfg.data)
        train_set, val_set = open_split(root, "train"), open_split(root, "val")
        check_dataset_fits(cfg.model, train_set)
        tf = transforms_for(cfg.data, cfg.model.img_size, train_set, stats)
        if rank == 0 and stats is not None:
            log.info("normalising with the starting weights' mean %s, std %s", tf.mean, tf.std)
        workers = cfg.data.loader_workers
        usable = usable_workers(len(train_set.shards), world_size, workers)
        if rank == 0 and workers > usable:
            log.warning(
                "data.loader_workers=%d, but %d training shards over %d ranks feed only %d per "
                "rank",
                workers,
                len(train_set.shards),
                world_size,
                usable,
            )
        pool = WorkerPool() if workers else None
        return cls(cfg, rank, world_size, device, batch_size, train_set, val_set, tf, pool)

    @property
    def pin_memory(self) -> bool:
        return self.device.type == "cuda"

    def train_epoch(self, epoch: int) -> TrainEpoch:
        return TrainEpoch(
            self.train_set,
            rank=self.rank,
            world_size=self.world_size,
            epoch=epoch,
            seed=self.cfg.train.seed,
            batch_size=self.batch_size,
            shuffle_buffer=self.cfg.data.shuffle_buffer,
            transform=self.tf.train,
            loader_workers=self.cfg.data.loader_workers,
            decode_size=self.tf.train_decode_size if self.cfg.data.jpeg_draft else None,
            pin_memory=self.pin_memory,
            device=self.device,  # uint8 batches cross to the device and are normalised there
            pool=self.pool,
            checksums=self.cfg.data.checksums,
        )

    def val_batches(self) -> Any:
        return eval_batches(
            self.val_set,
            rank=self.rank,
            world_size=self.world_size,
            batch_size=self.batch_size,
            transform=self.tf.eval,
            loader_workers=self.cfg.data.loader_workers,
            decode_size=self.tf.eval_decode_size if self.cfg.data.jpeg_draft else None,
            pin_memory=self.pin_memory,
            device=self.device,
            pool=self.pool,
            checksums=self.cfg.data.checksums,
        )

    def probe_images(self) -> Tensor:
        """`train.probe_samples` validation images, the same on every rank, so that every rank
        reports the same values."""
        probe = eval_batches(
            self.val_set,
            rank=0,
            world_size=1,
            batch_size=self.cfg.train.probe_samples,
            transform=self.tf.eval,
            device=self.device,
            checksums=self.cfg.data.checksums,
        )
        return next(iter(probe))[0]

    def close(self) -> None:
        if self.pool is not None:
            self.pool.close()


@dataclass
class Learner:
    """The model (`model` as built, `wrapped` as trained: DDP, compiled) and what trains and
    evaluates it."""

    model: nn.Module
    wrapped: nn.Module
    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    train_step: TrainStep
    amp: Callable[[], Any]
    memory_format: torch.memory_format
    probe_images: Tensor | None
    # The metrics of every finished epoch (checkpoints carry them: see `run_training`).
    history: list[dict[str, Any]] = field(default_factory=list)

    @classmethod
    def build(
        cls,
        cfg: ExperimentConfig,
        data: RankData,
        *,
        prepare_model: Callable[[nn.Module], nn.Module],
        start: StartingWeights | None,
    ) -> Learner:
        device, train = data.device, cfg.train
        amp = autocast(resolve_precision(train.precision, device), device)
        model = build_model(cfg.model)
        if start is not None:
            for note in load_backbone(model, start.weights):
                if data.rank == 0:
                    log.info("train.init_from=%s: %s", train.init_from, note)
        # channels_last: NHWC images and convolution weights (the stems' convolutions run
        # faster so on tensor cores); the model's numbers do not change.
        memory_format = torch.channels_last if train.channels_last else torch.contiguous_format
        model = model.to(device, memory_format=memory_format)
        wrapped = prepare_model(model)
        if train.compile:
            wrapped = compile_model(wrapped, device, train.compile_mode)
        probe_images = data.probe_images() if train.probe_every else None
        optimizer, scheduler = _optimisation(cfg, model, _steps_per_epoch(cfg, data))
        train_step = TrainStep(
            wrapped,
            optimizer,
            scheduler,
            nn.CrossEntropyLoss(label_smoothing=train.label_smoothing),
            accum_steps=train.grad_accum_steps,
            grad_clip=train.grad_clip,
            clip_params=list(model.parameters()),
            autocast=amp,
            compiled=train.compile,
        )
        return cls(
            model, wrapped, optimizer, scheduler, train_step, amp, memory_format, probe_images
        )

    def resume_from(
        self, resume: dict[str, Any] | None, cfg: ExperimentConfig, world_size: int
    ) -> tuple[int, dict[str, Any] | None]:
        """Load a checkpoint state, if any; the first epoch to train and, for a mid-epoch
        checkpoint, the data position within it."""
        if resume is None:
            return 0, None
        check_compatible(resume, cfg)
        check_position(resume, cfg, world_size)
        self.model.load_state_dict(resume["model"])
        self.optimizer.load_state_dict(resume["optimizer"])
        self.scheduler.load_state_dict(resume["scheduler"])
        self.history = finished_epochs(resume)
        return resume["epochs_done"], resume.get("position")


def _steps_per_epoch(cfg: ExperimentConfig, data: RankData) -> int:
    """Optimiser steps in an epoch of this rank's data."""
    accum = cfg.train.grad_accum_steps
    batches = len(data.train_epoch(0))
    if batches < accum:
        raise ValueError(
            f"train.grad_accum_steps={accum} exceeds the {batches} batches of an epoch"
        )
    return batches // accum


def _optimisation(
    cfg: ExperimentConfig, model: nn.Module, steps_per_epoch: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LRScheduler]:
    optimizer = build_optimizer(
        model, cfg, frozen_steps=cfg.train.head_only_epochs * steps_per_epoch
    )
    scheduler = warmup_cosine(
        optimizer,
        warmup_steps=round(cfg.train.warmup_epochs * steps_per_epoch),
        total_steps=cfg.train.epochs * steps_per_epoch,
        min_ratio=cfg.train.min_lr_ratio,
    )
    return optimizer, scheduler


def train_epoch(
    cfg: ExperimentConfig,
    learner: Learner,
    data: RankData,
    epoch: int,
    position: dict[str, Any] | None,
    report: Report,
    fail_at: FailAt | None,
) -> tuple[EpochMeter, int]:
    """Train one epoch (from `position`, a mid-epoch checkpoint's, when given), reporting the
    mid-epoch checkpoints that fall in it; its meter, and the corrupt samples it skipped."""
    rank, device, accum = data.rank, data.device, cfg.train.grad_accum_steps
    # Augmentation randomness: seeded per (seed, epoch, rank), independent of data order.
    torch.manual_seed((cfg.train.seed * 1_000_003 + epoch) * 1_009 + rank)
    learner.wrapped.train()
    meter = EpochMeter(device)
    guard = DivergenceGuard(device)
    train_data = data.train_epoch(epoch)
    # Whole optimiser steps only: a remainder of fewer than `accum` batches is not read.
    used = len(train_data) // accum * accum
    epoch_batches = iter(train_data)
    batches = epoch_batches if used == len(train_data) else itertools.islice(epoch_batches, used)
    skip = 0
    if position is not None:  # a mid-epoch checkpoint: see cbtlab.checkpoint
        skip = position["batches_done"]
        _consume(batches, skip)
        mine = position["ranks"][rank]
        set_rng_state(mine["rng"], device)
        meter.load(mine["sums"])
        meter.restart_clock()
    every_steps = cfg.train.checkpoint_every_steps
    for index, (images, labels) in enumerate(meter.timed(batches), start=skip):
        if fail_at is not None:
            fail_at.check(epoch, index, rank)
        # No-ops: the loader has moved the batch to `device` already.
        images = images.to(device, non_blocking=data.pin_memory)
        labels = labels.to(device, non_blocking=data.pin_memory)
        images = images.contiguous(memory_format=learner.memory_format)
        stepped = train_batch(learner.train_step, meter, guard, images, labels, epoch, index)
        # A mid-epoch checkpoint every `every_steps` optimiser steps; the epoch's end has one of
        # its own.
        if (
            stepped
            and every_steps
            and learner.scheduler.last_epoch % every_steps == 0
            and index + 1 < used
        ):
            _stop_if_diverged(guard, epoch)  # no checkpoint of a diverged model
            _mid_epoch_checkpoint(cfg, report, learner, data, epoch, index + 1, used, meter)
    # Stop the loader's streams (a remainder left unread), freeing its workers for the
    # evaluation.
    epoch_batches.close()
    _stop_if_diverged(guard, epoch)
    return meter, train_data.corrupt_samples


def epoch_metrics(
    cfg: ExperimentConfig,
    learner: Learner,
    data: RankData,
    epoch: int,
    meter: EpochMeter,
    corrupt: int,
) -> dict[str, Any]:
    """The epoch's metrics, reduced over all ranks: its training, the evaluation on the
    validation split, and (every `train.probe_every` epochs) the layers' compression."""
    device, world_size = data.device, data.world_size
    metrics: dict[str, Any] = {"epoch": epoch + 1, "train/lr": learner.scheduler.get_last_lr()[0]}
    metrics.update(meter.metrics(world_size=world_size, corrupt=corrupt))
    val_data = data.val_batches()
    metrics.update(
        evaluate(
            learner.model,
            val_data,
            nn.CrossEntropyLoss(),
            device,
            learner.amp,
            learner.memory_format,
            reduce=lambda sums: all_reduce(sums, device),
        )
    )
    (metrics["val/corrupt_samples"],) = all_reduce([val_data.corrupt_samples], device)
    metrics["time/epoch_s"] = time.perf_counter() - meter.start
    if cfg.train.probe_every and (epoch + 1) % cfg.train.probe_every == 0:
        metrics.update(compression_metrics(learner.model, learner.probe_images))
    return metrics


def epoch_checkpoint(
    cfg: ExperimentConfig, learner: Learner, data: RankData, epoch: int, metrics: dict[str, Any]
) -> dict[str, Any] | None:
    """The checkpoint state at the end of `epoch`, on rank 0 where one is due (every
    `train.checkpoint_every` epochs, and the last), else None."""
    every = cfg.train.checkpoint_every
    last = epoch + 1 == cfg.train.epochs
    if data.rank != 0 or not every or not ((epoch + 1) % every == 0 or last):
        return None
    return make_state(
        cfg,
        epoch=epoch + 1,
        model=learner.model,
        optimizer=learner.optimizer,
        scheduler=learner.scheduler,
        metrics=metrics,
        normalisation=(data.tf.mean, data.tf.std),
        history=learner.history,
    )


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
    """Read and drop `count` batches (decoded and transformed: see cbtlab.checkpoint)."""
    next(itertools.islice(batches, count, count), None)


def _mid_epoch_checkpoint(
    cfg: ExperimentConfig,
    report: Report,
    learner: Learner,
    data: RankData,
    epoch: int,
    batches_done: int,
    batches_in_epoch: int,
    meter: EpochMeter,
) -> None:
    """Report a checkpoint with every rank's random state and partial sums (a collective)."""
    sums = meter.state()
    rng = rng_state(data.device)
    ranks = gather_objects({"rng": rng, "sums": sums}, data.world_size)
    metrics = {
        "epoch": epoch + batches_done / batches_in_epoch,
        "train/step": learner.scheduler.last_epoch,
        MID_EPOCH_KEY: 1.0,
        # Unscored: never among the best kept by val/top1, only ever kept as the latest.
        "val/top1": -math.inf,
    }
    state = None
    if data.rank == 0:
        state = make_state(
            cfg,
            epoch=epoch,
            model=learner.model,
            optimizer=learner.optimizer,
            scheduler=learner.scheduler,
            metrics=metrics,
            normalisation=(data.tf.mean, data.tf.std),
            history=learner.history,
            position=data_position(
                cfg, world_size=data.world_size, batches_done=batches_done, ranks=ranks
            ),
        )
    report(metrics, state)
    # Whatever reporting draws from the generators, the run goes on from the saved state, as a
    # run restarted from this checkpoint does.
    set_rng_state(rng, data.device)


def train_loop_per_worker(config: dict[str, Any]) -> None:
    """Ray Train entry point: `config` is `{"experiment": ExperimentConfig.to_dict()}`, with
    "resume_from" (a checkpoint directory or URI) and a test's "fail_at" (a `FailAt`) where
    given."""
    # Ray here, not at the top: the worker loop imports on a bare machine without Ray.
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

    # A segmentation config trains in its own worker, under the same report contract.
    run = run_segmentation if cfg.task.segmentation else run_training
    extra = {} if cfg.task.segmentation else {"fail_at": config.get("fail_at")}
    try:
        run(
            cfg,
            rank=ctx.get_world_rank(),
            world_size=ctx.get_world_size(),
            report=report,
            prepare_model=ray.train.torch.prepare_model,
            device=ray.train.torch.get_device(),
            resume=resume,
            **extra,
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
