"""The studies that ship with cbtlab: their search spaces and command lines.

Each `studies/*.py` script is a thin wrapper around a `*_main(argv)` here, so that the same
study also runs as `cbtlab study NAME ...`.
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cbtlab.config import (
    ConfigError,
    ExperimentConfig,
    add_override_argument,
    format_grid,
    parse_grid,
    parse_override,
)
from cbtlab.tracking.report import format_table
from cbtlab.tune.study import StudySpec, mlflow_ui_command, run_study

# Representative grids on the 8 x 8 patch grid of the digits preset: counts 1..64, square and not.
REP_GRIDS = ("1x1", "2x2", "4x2", "2x4", "4x4", "8x2", "2x8", "8x4", "4x8", "8x8")
# The first trials cover every count once (m = 1, 4, 8, 16, 32, 64), then TPE samples the rest.
REP_GRIDS_FIRST = ("1x1", "2x2", "4x2", "4x4", "8x4", "8x8")


def _grid_list(text: str) -> list[str]:
    grids = [format_grid(parse_grid(g.strip(), "--grids")) for g in text.split(",") if g.strip()]
    if not grids:
        raise ConfigError("--grids", "give at least one grid, e.g. 2x2,4x4")
    return grids


def study_parser(description: str, prog: str | None = None) -> argparse.ArgumentParser:
    """Flags every study shares: scale, search, Ray, MLflow, config overrides."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument("--num-samples", type=int, default=6, help="number of trials")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (train.epochs)")
    parser.add_argument("--seed", type=int, default=0, help="training seed of every trial")
    parser.add_argument("--search-seed", type=int, default=0, help="seed of the Optuna sampler")
    parser.add_argument("--max-concurrent", type=int, default=1, help="trials run at once")
    parser.add_argument("--no-asha", action="store_true", help="run every trial to the end")
    parser.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="ASHA: epochs every trial runs before it may be stopped (default: half the epochs)",
    )
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow store (or MLFLOW_TRACKING_URI)"
    )
    parser.add_argument("--storage-path", default=None, help="Ray results folder or URI")
    parser.add_argument("--worker-logs", action="store_true", help="show training workers' logs")
    parser.add_argument("--name", default=None, help="study name (the MLflow experiment)")
    add_override_argument(parser)
    return parser


def base_config(args: argparse.Namespace) -> ExperimentConfig:
    overrides = dict(parse_override(text) for text in args.overrides)
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    overrides["train.seed"] = args.seed
    return ExperimentConfig().with_overrides(overrides)


def rep_count_spec(args: argparse.Namespace) -> StudySpec:
    grids = _grid_list(args.grids)
    first = [g for g in REP_GRIDS_FIRST if g in grids] + [
        g for g in grids if g not in REP_GRIDS_FIRST
    ]
    return StudySpec(
        name=args.name or "rep_count_ablation",
        base=base_config(args),
        space={"model.rep_grid": grids},
        initial_points=[{"model.rep_grid": g} for g in first[: args.num_samples]],
        num_samples=args.num_samples,
        search_seed=args.search_seed,
        asha=not args.no_asha,
        grace_period=args.grace_period,
        max_concurrent=args.max_concurrent,
        ray_address=args.address,
        worker_logs=args.worker_logs,
        storage_path=args.storage_path or "",
        tracking_uri=args.tracking_uri or "",
    ).validate()


def rep_count_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = study_parser(
        "How many representatives does CBSA need? Searches the representative grid "
        "(count and shape) of a CBT on the digits with Optuna + ASHA; logs to MLflow.",
        prog=prog,
    )
    parser.add_argument(
        "--grids",
        default=",".join(REP_GRIDS),
        help="representative grids to search (g_h x g_w, comma-separated)",
    )
    args = parser.parse_args(argv)
    try:
        spec = rep_count_spec(args)
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        result = run_study(spec)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print()
    print(format_table(result.rows, list(spec.space), spec.metric, spec.mode))
    print()
    if result.best is not None:
        print(f"best: {result.best['trial']} {spec.metric} {result.best['best']:.4f}")
    print(f"MLflow: experiment {result.experiment_name!r}, parent run {result.parent_run_id}")
    print(f"open the MLflow UI with:\n  {mlflow_ui_command(result.tracking_uri)}")
    return 0 if result.failed < len(result.rows) else 1
