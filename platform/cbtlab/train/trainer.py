"""Build the Ray Train `TorchTrainer` for one experiment config."""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from cbtlab.cluster import resolve_use_gpu
from cbtlab.config import AUTO, ExperimentConfig
from cbtlab.train.faults import FailAt
from cbtlab.train.loop import check_training_data, train_loop_per_worker
from cbtlab.train.messages import DeterministicFailure, Diverged


def build_trainer(
    cfg: ExperimentConfig,
    *,
    name: str,
    storage_path: str,
    callbacks: Sequence[Any] = (),
    resume_from: str | None = None,
    fail_at: FailAt | None = None,
) -> Any:
    """A TorchTrainer running `cfg` on `cfg.train.num_workers` DDP workers (gloo on CPU).

    Workers report a checkpoint every `train.checkpoint_every` epochs; after a worker crash
    the run restarts from the latest one (up to `train.max_failures` times); a bad value
    raised in a worker (`DeterministicFailure`) fails the run at once. `resume_from` is a
    checkpoint directory (or URI) to start from; `fail_at` a test's injected failure
    (`cbtlab.train.faults`). Data that cannot train on these workers (see
    `check_training_data`) raises ValueError here, not in every worker at every restart.

    `train.use_gpu="auto"` is resolved here, on the driver, if the caller has not
    (`cbtlab.cluster.resolve_use_gpu`: a GPU per worker where the connected cluster has one,
    or, before Ray is started, where this machine has one), so the workers get true or false."""
    # Ray here, not at the top: `cbtlab.train` imports on a bare machine without Ray.
    from ray.train import CheckpointConfig, FailureConfig, RunConfig, ScalingConfig
    from ray.train.torch import TorchTrainer

    from cbtlab.train.retries import StopOnDeterministicError  # imports Ray

    if cfg.train.use_gpu == AUTO:
        import ray
        import torch

        # Not connected yet: fit() starts Ray on this machine, which finds its GPUs.
        local = {"GPU": float(torch.cuda.device_count())}
        cfg = resolve_use_gpu(cfg, ray.cluster_resources() if ray.is_initialized() else local)
    check_training_data(cfg, cfg.train.num_workers)
    resources = {"CPU": cfg.train.cpus_per_worker}
    if cfg.train.use_gpu:
        resources["GPU"] = 1
    loop_config: dict[str, Any] = {"experiment": cfg.to_dict(), "resume_from": resume_from}
    if fail_at is not None:
        loop_config["fail_at"] = fail_at
    return TorchTrainer(
        train_loop_per_worker,
        train_loop_config=loop_config,
        scaling_config=ScalingConfig(
            num_workers=cfg.train.num_workers,
            use_gpu=cfg.train.use_gpu,
            resources_per_worker=resources,
        ),
        run_config=RunConfig(
            name=name,
            storage_path=storage_path,
            callbacks=[StopOnDeterministicError(), *callbacks],
            failure_config=FailureConfig(max_failures=cfg.train.max_failures),
            checkpoint_config=CheckpointConfig(
                num_to_keep=cfg.train.keep_checkpoints,
                checkpoint_score_attribute="val/miou" if cfg.task.segmentation else "val/top1",
                checkpoint_score_order="max",
            ),
        ),
    )


def fit(trainer: Any) -> Any:
    """Run `trainer.fit()`; raise `Diverged` if the workers stopped on a non-finite loss, and
    `DeterministicFailure` if one raised a bad value."""
    try:
        result = trainer.fit()
    except Exception as exc:  # Ray Train's ControllerError carries the callback's failure
        failure = getattr(exc, "controller_failure", None)
        if isinstance(failure, DeterministicFailure):
            raise failure from None
        raise
    diverged = Diverged.from_metrics(result.metrics)
    if diverged is not None:
        raise diverged
    return result
