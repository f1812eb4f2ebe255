"""`cbtlab train`: one training run outside any study, locally or inside `ray job submit`."""

from __future__ import annotations

import argparse
import dataclasses
import json
import sys
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from cbtlab.checkpoint import CheckpointError, check_compatible, check_position, load_state
from cbtlab.cluster import connect_ray, resolve_use_gpu
from cbtlab.config import ConfigError, ExperimentConfig, load_config_file
from cbtlab.models import build_model
from cbtlab.overrides import add_override_argument, parse_override
from cbtlab.paths import default_tracking_uri, ray_results_home
from cbtlab.train.finetune import init_from
from cbtlab.train.loop import check_training_data
from cbtlab.train.messages import DeterministicFailure, Diverged
from cbtlab.train.runs import (
    FAILED,
    FINISHED,
    RUNNING,
    RunChoice,
    RunRecord,
    choose_run,
    config_changes,
    continue_note,
    end_run,
    write_run,
)
from cbtlab.train.trainer import build_trainer, fit

if TYPE_CHECKING:
    from cbtlab.train.mlflow_run import TrainRun


def gpu_note(cfg: ExperimentConfig, cluster: dict[str, float]) -> str:
    """What the run's workers take, said before it starts (and what it waits for)."""
    train = cfg.train
    gpus = train.num_workers if train.use_gpu else 0
    note = f"{train.num_workers} workers x ({train.cpus_per_worker:g} CPU" + (
        ", 1 GPU)" if train.use_gpu else ")"
    )
    note += f" on a cluster of {cluster.get('CPU', 0):g} CPU, {cluster.get('GPU', 0):g} GPU"
    if gpus > cluster.get("GPU", 0):
        note += (
            f"; it needs {gpus} GPUs, more than the cluster has now: it waits for them "
            "(--workers N for fewer, --gpus-per-worker 0 for the CPUs)"
        )
    return note


def _parser(prog: str | None) -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Train one model with Ray Train (DDP) and report its final metrics.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--config", default=None, help="a .json or .toml experiment config")
    add_override_argument(parser)
    parser.add_argument("--workers", type=int, default=None, help="train.num_workers")
    parser.add_argument(
        "--gpus-per-worker",
        type=int,
        choices=(0, 1),
        default=None,
        help="1: a GPU per worker (NCCL); 0: CPU only (gloo), even where the cluster has GPUs; "
        "default: train.use_gpu, whose 'auto' takes a GPU per worker where the cluster has one",
    )
    parser.add_argument(
        "--resume",
        nargs="?",
        const="",
        default=None,
        metavar="CHECKPOINT",
        help="a checkpoint directory for a new run to start from; alone (no CHECKPOINT): "
        "continue the unfinished run started last (or the one --name names)",
    )
    parser.add_argument(
        "--name",
        default=None,
        help="the run's name under --storage-path: a new run, or an unfinished one to continue "
        "(a finished one is refused); default: a new train-YYYYmmdd-HHMMSS-xxxxxx",
    )
    parser.add_argument("--storage-path", default=None, help="Ray results folder or URI")
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow store (default: MLFLOW_TRACKING_URI, else "
        "the platform's SQLite file: `cbtlab where`)"
    )  # fmt: skip
    parser.add_argument("--experiment", default="train", help="the MLflow experiment")
    parser.add_argument("--no-mlflow", action="store_true", help="log nothing to MLflow")
    return parser


def train_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = _parser(prog)
    args = parser.parse_args(argv)
    try:
        cfg = load_config_file(args.config) if args.config else ExperimentConfig()
        overrides = dict(parse_override(text) for text in args.overrides)
        if args.workers is not None:
            overrides["train.num_workers"] = args.workers
        if args.gpus_per_worker is not None:
            overrides["train.use_gpu"] = bool(args.gpus_per_worker)
        cfg = cfg.with_overrides(overrides)
        storage_path = args.storage_path or str(ray_results_home())
        choice = _choose_run(args, storage_path)
        if args.resume and "://" not in args.resume:  # a local checkpoint: check it here
            state = load_state(Path(args.resume))
            check_compatible(state, cfg)
            check_position(state, cfg, cfg.train.num_workers)
        if cfg.train.init_from and "://" not in cfg.train.init_from:
            # Fine-tuning weights that do not fit fail here, not in every worker.
            for note in init_from(build_model(cfg.model), cfg.train.init_from, cfg.model):
                print(f"train.init_from: {note}")
        # Data that cannot train on these workers fails here, naming why.
        check_training_data(cfg, cfg.train.num_workers)
        _check_mlflow_store(args)
    except (ConfigError, CheckpointError, ValueError, FileNotFoundError, ConnectionError) as exc:
        parser.error(str(exc))

    import ray  # here: the flags are checked, and their errors said, before Ray's import

    try:
        connect_ray(args.address)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    cluster = ray.cluster_resources()
    cfg = resolve_use_gpu(cfg, cluster)
    print(f"train: {gpu_note(cfg, cluster)}", flush=True)
    record = _record_start(choice, cfg, storage_path, args.resume or None)
    try:
        tracked = _open_mlflow(args, cfg, choice, record)
    except ConnectionError as exc:
        end_run(record, FAILED, str(exc))
        print(f"error: {exc}", file=sys.stderr)
        return 1
    trainer = build_trainer(
        cfg,
        name=choice.name,
        storage_path=storage_path,
        resume_from=record.resume_from,
        callbacks=[tracked.callback()] if tracked else [],
    )
    try:
        result = fit(trainer)
    except (Diverged, DeterministicFailure) as exc:
        _end(record, tracked, FAILED, str(exc))
        what = "diverged" if isinstance(exc, Diverged) else "failed"
        print(f"error: the run {what}: {exc}", file=sys.stderr)
        return 1
    except KeyboardInterrupt:  # the record stays unfinished: `--name` continues it
        if tracked is not None:
            tracked.end("KILLED")
        raise
    except Exception as exc:
        _end(record, tracked, FAILED, str(exc).strip().partition("\n")[0])
        raise
    _end(record, tracked, FINISHED)
    print(json.dumps(result.metrics, indent=2, default=str))
    print(f"checkpoint: {result.checkpoint.path if result.checkpoint else None}")
    return 0


def _choose_run(args: argparse.Namespace, storage_path: str) -> RunChoice:
    """The run to start (`cbtlab.train.runs.choose_run`) from --name and --resume; a
    checkpoint to start from goes with a new run only."""
    choice = choose_run(storage_path, args.name, resume_latest=args.resume == "")
    if choice.continues and args.resume:
        raise ValueError(
            f"the run {choice.name!r} is unfinished and would continue from its own checkpoint, "
            "not from --resume CHECKPOINT: choose another --name for a new run from it"
        )
    return choice


def _record_start(
    choice: RunChoice, cfg: ExperimentConfig, storage_path: str, resume_from: str | None
) -> RunRecord:
    """Say which run starts (a continued one with the config fields that changed), and write
    its record (`cbtlab_run.json`) in its folder."""
    flat = cfg.flat()
    if choice.previous is not None:
        print(f"train: {continue_note(choice, flat)}", flush=True)
        record = dataclasses.replace(choice.previous, config=flat, status=RUNNING, error="")
    else:
        print(f"train: a new run {choice.name} under {storage_path}", flush=True)
        record = RunRecord(choice.name, storage_path, flat, resume_from)
    write_run(record)
    return record


def _open_mlflow(
    args: argparse.Namespace, cfg: ExperimentConfig, choice: RunChoice, record: RunRecord
) -> TrainRun | None:
    """The run's MLflow run (a continued run's own, reopened), its id kept in the record; None
    with --no-mlflow or where MLflow is not installed (said)."""
    if args.no_mlflow:
        return None
    try:
        from cbtlab.train.mlflow_run import open_train_run  # Ray and MLflow: after the flags
    except ImportError as exc:
        print(f"train: not logged to MLflow ({exc}); pip install mlflow", flush=True)
        return None
    previous = choice.previous
    tracked = open_train_run(
        cfg,
        name=choice.name,
        tracking_uri=args.tracking_uri or default_tracking_uri(),
        experiment=args.experiment,
        previous_run_id=previous.mlflow_run_id if previous else "",
        changes="; ".join(config_changes(previous.config, cfg.flat())) if previous else "",
    )
    record.mlflow_run_id = tracked.run_id
    write_run(record)
    return tracked


def _end(record: RunRecord, tracked: TrainRun | None, status: str, error: str = "") -> None:
    """The run's record and its MLflow run, ended alike."""
    end_run(record, status, error)
    if tracked is not None:
        tracked.end("FINISHED" if status == FINISHED else "FAILED", error)


def _check_mlflow_store(args: argparse.Namespace) -> None:
    """An unreachable MLflow server stops the command before Ray starts (ConnectionError); a
    refused login is said when the run opens."""
    if args.no_mlflow:
        return
    try:
        from cbtlab.train.mlflow_run import check_reachable  # as in _open_mlflow
    except ImportError:  # said by _open_mlflow
        return
    check_reachable(args.tracking_uri or default_tracking_uri())
