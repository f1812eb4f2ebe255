"""`cbtlab train`: one training run outside any study, locally or inside `ray job submit`."""

from __future__ import annotations

import argparse
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from cbtlab.config import (
    ConfigError,
    ExperimentConfig,
    add_override_argument,
    load_config_file,
    parse_override,
)
from cbtlab.train.checkpoint import CheckpointError, check_compatible, check_position, load_state
from cbtlab.train.loop import check_training_data


def train_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train one model with Ray Train (DDP) and report its final metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="a .json or .toml experiment config")
    add_override_argument(parser)
    parser.add_argument("--workers", type=int, default=None, help="train.num_workers")
    parser.add_argument("--gpus-per-worker", type=int, default=0, help="0: CPU (gloo)")
    parser.add_argument("--resume", default=None, help="a checkpoint directory to start from")
    parser.add_argument("--name", default="train", help="the run's name under --storage-path")
    parser.add_argument("--storage-path", default=None, help="Ray results folder or URI")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    args = parser.parse_args(argv)
    try:
        cfg = load_config_file(args.config) if args.config else ExperimentConfig()
        overrides = dict(parse_override(text) for text in args.overrides)
        if args.workers is not None:
            overrides["train.num_workers"] = args.workers
        if args.gpus_per_worker:
            if args.gpus_per_worker != 1:
                raise ConfigError("--gpus-per-worker", "one GPU per worker (DDP) is supported")
            overrides["train.use_gpu"] = True
        cfg = cfg.with_overrides(overrides)
        if args.resume and "://" not in args.resume:  # a local checkpoint: check it here
            state = load_state(Path(args.resume))
            check_compatible(state, cfg)
            check_position(state, cfg, cfg.train.num_workers)
        if cfg.train.init_from and "://" not in cfg.train.init_from:
            # Fine-tuning weights that do not fit fail here, not in every worker.
            from cbtlab.models import build_model
            from cbtlab.train.finetune import init_from

            for note in init_from(build_model(cfg.model), cfg.train.init_from):
                print(f"train.init_from: {note}")
        # Data that cannot train on these workers fails here, naming why.
        check_training_data(cfg, cfg.train.num_workers)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError) as exc:
        parser.error(str(exc))

    from cbtlab.paths import ray_results_home
    from cbtlab.train import Diverged, build_trainer, fit
    from cbtlab.tune.study import connect_ray

    try:
        connect_ray(args.address)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    trainer = build_trainer(
        cfg,
        name=args.name,
        storage_path=args.storage_path or str(ray_results_home()),
        resume_from=args.resume,
    )
    try:
        result = fit(trainer)
    except Diverged as exc:
        print(f"error: the run diverged: {exc}", file=sys.stderr)
        return 1
    print(json.dumps(result.metrics, indent=2, default=str))
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    return 0
