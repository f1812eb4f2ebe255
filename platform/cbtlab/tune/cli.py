"""The command lines of the shipped studies: one `*_main(argv)` per study, behind both its
`studies/*.py` script and `cbtlab study NAME ...`.

A bad flag value exits 2 with one message naming it; a main returns 0 when the study ran and
not every trial failed, 1 otherwise (or when Ray or the resume folder cannot be reached).
"""

from __future__ import annotations

import argparse
import dataclasses
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cbtlab.config import ExperimentConfig
from cbtlab.data import open_split
from cbtlab.data.transforms import image_stats
from cbtlab.models.adapt import FORMS, load_vit, write_random_vit
from cbtlab.overrides import ConfigError, add_override_argument, parse_override
from cbtlab.paths import cbtlab_home
from cbtlab.tracking import StudyTracker
from cbtlab.tune.definitions import (
    ADAPT_DEFAULT_FORMS,
    ADAPT_DEFAULT_SIZES,
    ADAPT_SIZES,
    DEFAULT_GRID_EPOCHS,
    DEFAULT_REP_GRIDS,
    ES_PRESETS,
    ES_STUDIES,
    JOINT_GRIDS,
    JOINT_SETTINGS,
    JOINT_STEP_INITS,
    JOINT_STEP_SCALES,
    PRESETS,
    REP_GRIDS,
    SEG_DECODERS,
    SEG_DEPTHS,
    STEP_CELLS,
    VARIANTS,
    adaptation_spec,
    decoder_robustness_spec,
    es_check_grid_spec,
    joint_spec,
    model_scaling_spec,
    parse_size_files,
    rep_count_spec,
    seg_decoders_spec,
    step_init_spec,
    variant_spec,
)
from cbtlab.tune.early_stopping import TARGET_FRACTION, run_check, search_spec_for
from cbtlab.tune.runner import StudyResult, mlflow_ui_command, resume_study, run_study
from cbtlab.tune.scaling import (
    SIZE_KEYS,
    SIZE_NAMES,
    finetune_base,
    format_scaling,
    parse_downstream,
    pretrained_checkpoints,
    scaling_json,
    scaling_rows,
)
from cbtlab.tune.segmentation import NOISE_SCALES, evaluate_robustness
from cbtlab.tune.spec import StudySpec, spec_from_dict
from cbtlab.tune.state import latest_study_path, read_study_state
from cbtlab.tune.stats import TESTS

# `--resume` without a folder: the study of this name started last under --storage-path.
LATEST = "latest"
# The presets of every study but the joint search (`PRESETS`), with their help.
PRESET_HELP = dict(zip(PRESETS, ("the digits on CPU", "the paper's recipe on shards"), strict=True))


def study_parser(
    description: str,
    prog: str | None = None,
    *,
    search: bool = True,
    seeds: int = 1,
    default_mode: str = "search",
    presets: dict[str, str] | None = None,
) -> argparse.ArgumentParser:
    """Flags every study shares: preset, scale, seeds and statistics, resources, Ray, MLflow,
    config overrides; with `search`, also `--grid`/`--search` and the Optuna/ASHA flags, the
    study running as `default_mode` ("grid" or "search") when no flag decides. `seeds` is a
    grid's default number of seeds (a search runs one per trial). `presets`: the study's own
    presets, name -> help, the first the default (default: `PRESET_HELP`)."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    _add_recipe_flags(parser, search=search, seeds=seeds, presets=presets or PRESET_HELP)
    if search:
        _add_search_flags(parser, default_mode)
    _add_statistics_flags(parser)
    _add_resource_flags(parser)
    _add_service_flags(parser)
    add_override_argument(parser)
    parser.set_defaults(default_mode=default_mode if search else "grid", default_seeds=seeds)
    return parser


def _add_recipe_flags(
    parser: argparse.ArgumentParser, *, search: bool, seeds: int, presets: dict[str, str]
) -> None:
    """--preset, --data-root, --epochs, --seed and --seeds."""
    parser.add_argument(
        "--preset",
        choices=list(presets),
        default=next(iter(presets)),
        help="; ".join(f"{name}: {text}" for name, text in presets.items()),
    )
    parser.add_argument("--data-root", default=None, help="prebuilt shards for --preset imagenet")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (train.epochs)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (of the first seed)")
    parser.add_argument(
        "--seeds",
        type=int,
        default=None if search else seeds,
        help="seeds per cell: train.seed = --seed + i, the same in every cell (paired)"
        + (
            f"; default {seeds} in a grid, 1 in a search (more than 1 runs a grid)"
            if search
            else ""
        ),
    )


def _add_search_flags(parser: argparse.ArgumentParser, default_mode: str) -> None:
    """--grid / --search and the Optuna/ASHA flags."""
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument(
        "--grid",
        action="store_true",
        help="run every cell x --seeds, all to the same epoch"
        + (" (the default)" if default_mode == "grid" else ""),
    )
    mode.add_argument(
        "--search",
        action="store_true",
        help="an Optuna TPE search with ASHA early stopping, one seed per trial"
        + (" (the default)" if default_mode == "search" else "; --num-samples implies it"),
    )
    parser.add_argument(
        "--num-samples", type=int, default=None, help="trials of the Optuna search (6)"
    )
    parser.add_argument("--search-seed", type=int, default=0, help="seed of the Optuna sampler")
    parser.add_argument("--no-asha", action="store_true", help="run every trial to the end")
    parser.add_argument(
        "--optuna-storage",
        default="",
        metavar="URL",
        help="the Optuna study's database (sqlite:///..., postgresql://...); default: "
        "optuna.db in the study's results folder",
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="ASHA: epochs every trial runs before it may be stopped (default: half the "
        "epochs); a grid never stops trials early",
    )


def _add_statistics_flags(parser: argparse.ArgumentParser) -> None:
    """--baseline, --stats-test and --stats-on."""
    parser.add_argument(
        "--baseline",
        default=None,
        metavar="KEY=VALUE,...",
        help="the cell every other is compared with (default: the grid's first cell)",
    )
    parser.add_argument(
        "--stats-test",
        choices=TESTS,
        default="auto",
        help="paired test: auto = t below 6 seeds, Wilcoxon from 6",
    )
    parser.add_argument(
        "--stats-on",
        choices=("final", "best"),
        default="final",
        help="a trial's value: its metric at the last epoch or its best epoch",
    )


def _add_resource_flags(parser: argparse.ArgumentParser) -> None:
    """--workers, --gpus-per-worker and --max-concurrent."""
    parser.add_argument(
        "--workers",
        type=int,
        default=None,
        help="training workers per trial (default: train.num_workers)",
    )
    parser.add_argument(
        "--gpus-per-worker",
        type=int,
        choices=(0, 1),
        default=None,
        help="1: a GPU per worker; 0: CPU only, even where the cluster has GPUs; default: "
        "train.use_gpu, whose 'auto' takes a GPU per worker where the cluster has one",
    )
    parser.add_argument(
        "--max-concurrent",
        type=int,
        default=None,
        help="trials at once (default: as many as the cluster holds; 1 makes a search's "
        "decisions independent of timing)",
    )


def _add_service_flags(parser: argparse.ArgumentParser) -> None:
    """Where the study runs and writes: Ray, MLflow, the results folder, --resume, --name."""
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    parser.add_argument(
        "--tracking-uri", default=None, help="MLflow store (or MLFLOW_TRACKING_URI)"
    )
    parser.add_argument("--storage-path", default=None, help="Ray results folder or URI")
    parser.add_argument("--worker-logs", action="store_true", help="show training workers' logs")
    parser.add_argument(
        "--resume",
        nargs="?",
        const=LATEST,
        default=None,
        metavar="FOLDER",
        help="go on with a study whose driver stopped: its results folder "
        "(<storage path>/<name>-<run id>, printed as it starts), or none for the latest study "
        "of this name under --storage-path; its settings come from that folder, other flags "
        "but --address and --worker-logs are ignored",
    )
    parser.add_argument("--name", default=None, help="study name (the MLflow experiment)")


def run_study_main(
    parser: argparse.ArgumentParser,
    make_spec: Callable[[argparse.Namespace], StudySpec],
    argv: Sequence[str] | None,
    *,
    report: Callable[[StudyResult], None] | None = None,
) -> int:
    """Parse, build the spec (a bad value: one message naming it, exit 2), run, print the
    trial table, the statistics of a grid, and where MLflow keeps it all; then, where given
    and the parser has no --no-report or it is not set, hand the result to `report`."""
    args = parser.parse_args(argv)
    try:
        spec = make_spec(args).validate()
    except ConfigError as exc:
        parser.error(str(exc))
    path = args.resume
    if path is not None:
        if path == LATEST and "://" in spec.storage_path:
            parser.error("--resume: give the study's results folder on remote storage")
        try:
            path = latest_study_path(spec.storage_path, spec.name) if path == LATEST else path
            spec = spec_from_dict(read_study_state(path).spec).validate()
        except (FileNotFoundError, ValueError) as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
    try:
        if path is not None:
            result = resume_study(path, ray_address=args.address, worker_logs=args.worker_logs)
        else:
            result = run_study(spec)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_study_result(result, spec)
    if report is not None and not getattr(args, "no_report", False):
        report(result)
    return 0 if result.failed < len(result.rows) else 1


def resume_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`cbtlab study resume FOLDER`: any study, from its results folder alone (the study's
    own `--resume FOLDER` does the same)."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Go on with a study whose driver stopped (killed, crashed, interrupted): "
        "finished trials are kept, the others go on from their checkpoints, under the same "
        "MLflow parent run. Everything but the Ray address comes from the folder.",
    )
    parser.add_argument(
        "folder", help="the study's results folder, <storage path>/<name>-<run id> (printed as "
        "it started; the parent run's tag cbtlab.study_path)"
    )  # fmt: skip
    parser.add_argument("--address", default=None, help="Ray cluster address (default: local)")
    parser.add_argument("--worker-logs", action="store_true", help="show training workers' logs")
    args = parser.parse_args(argv)
    try:
        spec = spec_from_dict(read_study_state(args.folder).spec).validate()
        result = resume_study(args.folder, ray_address=args.address, worker_logs=args.worker_logs)
    except (FileNotFoundError, ValueError, ConnectionError) as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_study_result(result, spec)
    return 0 if result.failed < len(result.rows) else 1


def print_study_result(result: StudyResult, spec: StudySpec) -> None:
    """The trial table, a grid's statistics, the best trial and where MLflow keeps it all."""
    print()
    print(result.table)
    print()
    if result.stats_text:
        print(f"statistics over seeds {spec.seed_values} (each cell vs the baseline, paired):")
        print(result.stats_text)
        where = f"written to {result.stats_path}; " if result.stats_path else ""
        print(f"{where}logged as stats.parquet and stats.txt on the parent run")
        print()
    for line in result.answer.lines():
        print(line)
    if result.importances_text:
        print(result.importances_text)
        print("logged as importances.txt and importances.json on the parent run")
    print(f"MLflow: experiment {result.experiment_name!r}, parent run {result.parent_run_id}")
    print(f"open the MLflow UI with:\n  {mlflow_ui_command(result.tracking_uri)}")


def rep_count_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = study_parser(
        "How many representatives does CBSA need? By default every representative count "
        f"({DEFAULT_REP_GRIDS}) with the same 3 seeds, all trained "
        f"{DEFAULT_GRID_EPOCHS} epochs on the digits, then the best count with its 95% "
        "interval and paired tests against it; --search runs Optuna + ASHA over the "
        "representative grids (count and shape) instead. Logs to MLflow.",
        prog=prog,
        seeds=3,
        default_mode="grid",
    )
    parser.add_argument(
        "--grids",
        default=None,
        help=f"representative grids (g_h x g_w, comma-separated); default {DEFAULT_REP_GRIDS} "
        f"in a grid, {','.join(REP_GRIDS)} in a search",
    )
    return parser


def rep_count_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_study_main(rep_count_parser(prog), rep_count_spec, argv)


def variant_comparison_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = study_parser(
        "CBSA against the other attentions at equal size (the paper's Table 4): every variant "
        "in the same skeleton, each with the same --seeds; paired statistics vs the baseline.",
        prog=prog,
        search=False,
        seeds=3,
    )
    parser.add_argument(
        "--variants",
        nargs="+",
        default=list(VARIANTS),
        help="attention names (a per-layer mix as 'mssa,cbsa'); the first is the baseline",
    )
    return parser


def variant_comparison_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_study_main(variant_comparison_parser(prog), variant_spec, argv)


def step_size_init_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = study_parser(
        "How should CBSA's learnable step sizes (eta_rep, eta_x) start? N(0, s), the constant "
        "s (either sign) or zero, each with the same --seeds; paired statistics vs the baseline.",
        prog=prog,
        search=False,
        seeds=3,
    )
    parser.add_argument(
        "--cells",
        default=STEP_CELLS,
        help="init:scale cells (normal, constant, zero); the first is the baseline",
    )
    return parser


def step_size_init_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_study_main(step_size_init_parser(prog), step_init_spec, argv)


def model_scaling_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = study_parser(
        "Model scaling (the paper's Table 3): CBT sizes pre-trained with the same --seeds, "
        "then each fine-tuned from its checkpoint on every --downstream dataset; prints and "
        "logs the scaling table (parameters, FLOPs, top-1 per stage).",
        prog=prog,
        search=False,
    )
    parser.add_argument(
        "--sizes", nargs="+", choices=SIZE_NAMES, default=list(SIZE_NAMES), help="CBT sizes"
    )
    parser.add_argument(
        "--downstream",
        nargs="*",
        default=[],
        metavar="NAME=ROOT",
        help="fine-tuning datasets: prebuilt shards (folder or URL), e.g. cifar10=/data/c10",
    )
    parser.add_argument(
        "--finetune-epochs", type=int, default=None, help="epochs of each fine-tuning trial"
    )
    parser.add_argument(
        "--finetune-set",
        action="append",
        default=[],
        metavar="KEY=VALUE",
        help="a config override of the fine-tuning stage only (repeatable)",
    )
    return parser


def model_scaling_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Pre-train every size, fine-tune each on every downstream set, print the scaling table."""
    parser = model_scaling_parser(prog)
    args = parser.parse_args(argv)
    if args.resume is not None:
        parser.error(
            "--resume: model_scaling runs one study per stage; go on with a stopped stage "
            "through `cbtlab study rep-count --resume FOLDER` (any study's folder), or re-run"
        )
    try:
        pretrain, bases, overrides = _scaling_stages(args)
    except ConfigError as exc:
        parser.error(str(exc))
    names = list(args.sizes)
    try:
        result, stage_rows = _run_scaling(pretrain, bases, overrides, names)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    _report_scaling(pretrain, result, stage_rows, names)
    failed = sum(1 for stage in stage_rows.values() for r in stage if r["status"] != "FINISHED")
    return 0 if not failed else 1


def _scaling_stages(
    args: argparse.Namespace,
) -> tuple[StudySpec, dict[str, ExperimentConfig], dict[str, Any]]:
    """The pre-training spec, each downstream set's fine-tuning base config and the
    fine-tuning overrides; every downstream set is checked before anything trains."""
    pretrain = model_scaling_spec(args).validate()
    downstream = parse_downstream(args.downstream)
    overrides = dict(parse_override(text) for text in args.finetune_set)
    if args.finetune_epochs is not None:
        overrides["train.epochs"] = args.finetune_epochs
    if downstream and not pretrain.base.train.checkpoint_every:
        raise ConfigError("train.checkpoint_every", "fine-tuning needs the last checkpoint")
    bases = {
        name: finetune_base(pretrain.base, root, args.preset, overrides)
        for name, root in downstream.items()
    }
    return pretrain, bases, overrides


def _run_scaling(
    pretrain: StudySpec,
    bases: dict[str, ExperimentConfig],
    overrides: dict[str, Any],
    names: list[str],
) -> tuple[StudyResult, dict[str, list[dict[str, Any]]]]:
    """Run the pre-training study, then one fine-tuning study per downstream set from the
    sizes' pre-trained checkpoints; return the pre-training's result and every stage's rows."""
    cells = pretrain.cells
    result = run_study(pretrain)
    print_study_result(result, pretrain)
    stage_rows = {"pretrain": result.rows}
    checkpoints = pretrained_checkpoints(
        result.rows,
        pretrain.tracking_uri,
        names=names,
        cells=cells,
        seed=pretrain.seed_values[0],
    )
    missing = [n for n in names if n not in checkpoints]
    if bases and missing:
        print(f"no pre-trained checkpoint (failed trial) for {', '.join(missing)}: not fine-tuned")
    for stage, base in bases.items():
        tuned = [(n, c) for n, c in zip(names, cells, strict=True) if n in checkpoints]
        if not tuned:
            break
        spec = _finetune_spec(pretrain, stage, base, tuned, checkpoints, overrides)
        print(f"\nfine-tuning on {stage} ({base.data.root}) from the pre-trained checkpoints")
        stage_result = run_study(spec)
        print_study_result(stage_result, spec)
        stage_rows[stage] = stage_result.rows
    return result, stage_rows


def _finetune_spec(
    pretrain: StudySpec,
    stage: str,
    base: ExperimentConfig,
    tuned: list[tuple[str, dict[str, Any]]],
    checkpoints: dict[str, str],
    overrides: dict[str, Any],
) -> StudySpec:
    """The fine-tuning study of one downstream set: the `tuned` sizes, each from its
    pre-trained checkpoint (a factor of the grid), with the pre-training's seeds."""
    return dataclasses.replace(
        pretrain,
        name=f"{pretrain.name}-{stage}",
        base=base,
        space={
            **{k: list(dict.fromkeys(c[k] for _, c in tuned)) for k in SIZE_KEYS},
            "train.init_from": [checkpoints[n] for n, _ in tuned],
        },
        cells=[{**c, "train.init_from": checkpoints[n]} for n, c in tuned],
        baseline=None,
        # --finetune-set values stay as given
        node_sized=[k for k in pretrain.node_sized if k not in overrides],
    ).validate()


def _report_scaling(
    pretrain: StudySpec,
    result: StudyResult,
    stage_rows: dict[str, list[dict[str, Any]]],
    names: list[str],
) -> None:
    """Print the scaling table and log it on the pre-training's parent run."""
    rows = scaling_rows(
        stage_rows,
        names=names,
        cells=pretrain.cells,
        pretrain=pretrain.base,
        stats_on=pretrain.stats_on,
    )
    table = format_scaling(rows, list(stage_rows))
    tracker = StudyTracker(pretrain.tracking_uri, pretrain.experiment_name)
    tracker.log_text(result.parent_run_id, table, "scaling.txt")
    tracker.log_text(result.parent_run_id, scaling_json(rows), "scaling.json")
    print(f"\nmodel scaling ({pretrain.stats_on} {pretrain.metric}, mean ± 95% CI over seeds):")
    print(table)
    print(f"logged as scaling.txt and scaling.json on the parent run {result.parent_run_id}")


def joint_search_parser(prog: str | None = None) -> argparse.ArgumentParser:
    digits, smoke = JOINT_SETTINGS["digits"], JOINT_SETTINGS["smoke"]
    parser = study_parser(
        "The joint search: Optuna TPE + ASHA over the attention variant and, only where the "
        "variant has them, the representative grid (cbsa, agent), CBSA's pooling (adaptive or "
        "overlapping stride-1 windows) and the step-size initialisation (cbsa, linear). "
        "Prints the answer at the equal budget and Optuna's parameter importances there. "
        "Logs to MLflow.",
        prog=prog,
        presets={
            "digits": f"the digits, full-size model, {digits['num_samples']} trials of "
            f"{digits['epochs']} epochs",
            "smoke": f"the digits, a 1-layer 24-wide model, {smoke['num_samples']} trials of "
            f"{smoke['epochs']} epochs (minutes on 2 CPU cores)",
            "imagenet": "the paper's recipe on shards (--data-root), grids of the 14x14 patches",
        },
    )
    parser.add_argument(
        "--variants", nargs="+", default=list(VARIANTS), help="attention variants searched"
    )
    parser.add_argument(
        "--grids",
        default=None,
        help="representative grids (cbsa, agent); default "
        + "; ".join(f"{name}: {grids}" for name, grids in JOINT_GRIDS.items()),
    )
    parser.add_argument(
        "--step-inits",
        default=JOINT_STEP_INITS,
        help="step-size initialisations (cbsa, linear): normal, constant, zero",
    )
    parser.add_argument(
        "--step-scales",
        default=JOINT_STEP_SCALES,
        help="their scales (N(0, s) or the constant s; zero takes none)",
    )
    return parser


def early_stopping_check_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = study_parser(
        "Does early stopping find the right answer? Runs the study's grid (every cell x "
        "--seeds, all to --epochs: the ground truth) and the Optuna TPE + ASHA search over the "
        "same cells (one seed, every cell tried once first), then reports whether ASHA's pick "
        "is statistically indistinguishable from the grid's best cell and at what share of the "
        f"grid's compute (the claim: at most {TARGET_FRACTION:.0%} of its epochs). Logs the "
        "grid, the search and the check's own run to one MLflow experiment.",
        prog=prog,
        search=False,
    )
    # The check's presets: digits (the full digits model) by default; smoke a quick tiny run.
    preset = parser._option_string_actions["--preset"]
    preset.choices, preset.default = ES_PRESETS, "digits"
    preset.help = (
        "digits: the digits model, 3 seeds, 8 epochs; smoke: a tiny model, 3 cells, 2 seeds, "
        "3 epochs (a few minutes on 2 CPUs); imagenet: the paper's recipe on --data-root"
    )
    parser.set_defaults(seeds=None)
    seeds = parser._option_string_actions["--seeds"]
    seeds.help = "seeds per cell of the grid (default: 3; smoke: 2); the search runs the first"
    parser.add_argument("--study", choices=ES_STUDIES, default="rep-count", help="the space")
    parser.add_argument(
        "--grids", default=None, help="--study rep-count: its grids (default 1x1,2x2,4x4,8x8)"
    )
    parser.add_argument(
        "--variants", nargs="+", default=None, help="--study variants: its attentions"
    )
    parser.add_argument(
        "--num-samples", type=int, default=None, help="trials of the search (default: the cells)"
    )
    parser.add_argument(
        "--grace-period",
        type=int,
        default=None,
        help="ASHA: epochs every search trial runs before it may be stopped (default: a "
        "quarter of the epochs, at least 1)",
    )
    parser.add_argument("--search-seed", type=int, default=0, help="seed of the Optuna sampler")
    parser.add_argument(
        "--target",
        type=float,
        default=TARGET_FRACTION,
        help="the share of the grid's epochs the search may use for the claim to hold",
    )
    return parser


def joint_search_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_study_main(joint_search_parser(prog), joint_spec, argv)


def early_stopping_check_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Build both studies (a bad flag: one message naming it, exit 2), run the grid then the
    search, print each, then the check. Exit 0 when the check ran (whatever its verdict), 1
    when Ray or MLflow cannot be reached or every trial of a study failed."""
    parser = early_stopping_check_parser(prog)
    args = parser.parse_args(argv)
    if args.resume is not None:
        parser.error("--resume: the check runs two studies; resume either with its own study")
    if args.baseline is not None:
        parser.error("--baseline: the check compares every cell with the grid's best")
    if not 0 < args.target <= 1:
        parser.error(f"--target: a share of the grid's epochs in (0, 1], got {args.target}")
    try:
        grid = es_check_grid_spec(args).validate()
        search = search_spec_for(
            grid,
            num_samples=args.num_samples,
            grace_period=args.grace_period,
            search_seed=args.search_seed,
        ).validate()
    except ConfigError as exc:
        parser.error(str(exc))
    name = args.name or "early_stopping_check"
    print(
        f"early-stopping check {name}: a grid of {len(grid.cells)} cells x {grid.seeds} seeds "
        f"x {grid.base.train.epochs} epochs, then a TPE + ASHA search of {search.num_samples} "
        f"trials (seed {search.base.train.seed}, grace {search.grace_period}, reduction "
        f"factor {search.reduction_factor})",
        flush=True,
    )
    try:
        outcome = run_check(
            grid, search, study=args.study, name=name, target=args.target,
            on_study=print_study_result,
        )  # fmt: skip
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print()
    for line in outcome.check.lines():
        print(line)
    print(
        f"MLflow: experiment {name!r}, check run {outcome.check_run_id} (grid "
        f"{outcome.grid.parent_run_id}, search {outcome.search.parent_run_id})"
    )
    failed = any(r.failed == len(r.rows) for r in (outcome.grid, outcome.search))
    return 1 if failed else 0


# The segmentation studies (the paper's Fig. 8): presets of their own.
SEG_PRESET_HELP = {
    "smoke": "generated shapes in the ADE20K layout, a tiny encoder, on CPU in minutes",
    "ade20k": "Segmenter's ADE20K recipe on prebuilt shards (--data-root), ViT-T encoder",
}


def _seg_parser(description: str, prog: str | None, seeds: int) -> argparse.ArgumentParser:
    parser = study_parser(
        description, prog=prog, search=False, seeds=seeds, presets=SEG_PRESET_HELP
    )
    parser.add_argument(
        "--no-report", action="store_true", help="skip the report (figures, HTML) at the end"
    )
    parser.add_argument(
        "--decoders",
        nargs="+",
        default=list(SEG_DECODERS),
        help="decoder attention names (any of cbtlab.attention); the first is the baseline",
    )
    return parser


def seg_decoders_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = _seg_parser(
        "Segmentation decoders (the paper's Fig. 8 left): a mask-transformer decoder on a ViT "
        "encoder, its attention x its depth, each cell with the same --seeds; val/miou with "
        "paired statistics vs the baseline; the report plots mIoU against decoder FLOPs.",
        prog,
        seeds=2,
    )
    parser.add_argument(
        "--depths", nargs="+", type=int, default=list(SEG_DEPTHS), help="decoder depths"
    )
    return parser


def seg_decoders_main(
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    *,
    report: Callable[[StudyResult], None] | None = None,
) -> int:
    """The grid; then, unless --no-report, `report` (`cbtlab.dashboards.study_reports`)."""
    return run_study_main(seg_decoders_parser(prog), seg_decoders_spec, argv, report=report)


def decoder_robustness_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = _seg_parser(
        "Decoder robustness (the paper's Fig. 8 right): each decoder trained with the same "
        "--seeds, then its last checkpoint evaluated with Gaussian noise of every --scales "
        "(times the weights' rms) added to the decoder's projection matrices; mIoU against "
        "the scale per decoder, with 95%% intervals over seeds.",
        prog,
        seeds=2,
    )
    parser.add_argument("--depth", type=int, default=1, help="decoder depth (task.decoder_depth)")
    parser.add_argument(
        "--scales",
        nargs="+",
        type=float,
        default=list(NOISE_SCALES),
        help="noise scales (0: the clean decoder)",
    )
    parser.add_argument("--noise-seed", type=int, default=0, help="seed of the noise draws")
    return parser


def decoder_robustness_main(
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    *,
    report: Callable[[StudyResult], None] | None = None,
) -> int:
    """Train the decoders (a grid), then evaluate each under noise and log the curves; then,
    unless --no-report, `report` (`cbtlab.dashboards.study_reports`)."""
    parser = decoder_robustness_parser(prog)
    args = parser.parse_args(argv)
    if args.resume is not None:
        parser.error("--resume: re-run the study (the noise runs after its training)")
    if min(args.scales) < 0:
        parser.error("--scales: noise scales must be >= 0")
    try:
        spec = decoder_robustness_spec(args).validate()
    except ConfigError as exc:
        parser.error(str(exc))
    try:
        result = run_study(spec)
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print_study_result(result, spec)
    tracker = StudyTracker(result.tracking_uri, result.experiment_name)
    summary = evaluate_robustness(
        spec.base,
        result.rows,
        keys=list(spec.space),
        scales=args.scales,
        tracker=tracker,
        parent_run_id=result.parent_run_id,
        seed=args.noise_seed,
        decoders=args.decoders,
    )
    print("\nval mIoU under noise on the decoder's projections (mean [95% CI] over seeds):")
    for row in summary:
        print(
            f"  {row['decoder']:>10}  scale {row['scale']:<5g} {row['miou']:.4f} "
            f"[{row['ci_low']:.4f}, {row['ci_high']:.4f}]  ({row['seeds']} seeds)"
        )
    print(f"logged as noise_robustness.json and .png on the parent run {result.parent_run_id}")
    if report is not None and not args.no_report:
        report(result)
    return 0 if result.failed < len(result.rows) else 1


def vit_adaptation_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = study_parser(
        "ViT adaptation (the paper's Fig. 9): timm ViTs with pretrained weights, their attention "
        "replaced by each --forms (softmax: the ViT itself; cbsa; cbsa_nocontract: CBSA without "
        "the contraction step; cbsa_nocontract_qkv: the same on the ViT's own q, k, v, the "
        "authors' adapted layer; linear: kernelised linear attention), every other weight "
        "inherited, each fine-tuned with the same --seeds on every --downstream dataset; top-1 "
        "with 95% intervals against FLOPs (the report's pareto_flops.png).",
        prog=prog,
        search=False,
        seeds=3,
        presets={
            "smoke": "the tiny ViT on the digits at 48 px, 2 seeds x 2 epochs (minutes on 2 "
            "CPUs); a random ViT stands in for weights not given",
            "imagenet": "the reference's adaptation recipe at 224 px on --downstream shards",
        },
    )
    parser.add_argument(
        "--forms",
        nargs="+",
        choices=list(FORMS),
        default=None,
        help="attention forms; default: "
        + "; ".join(f"{p}: {' '.join(f)}" for p, f in ADAPT_DEFAULT_FORMS.items()),
    )
    parser.add_argument(
        "--sizes",
        nargs="+",
        choices=ADAPT_SIZES,
        default=None,
        help="ViT sizes (vit_SIZE_patch16_224); default: "
        + "; ".join(f"{p}: {' '.join(s)}" for p, s in ADAPT_DEFAULT_SIZES.items()),
    )
    parser.add_argument(
        "--weights",
        nargs="*",
        default=[],
        metavar="SIZE=FILE",
        help="each size's pretrained timm weights (.safetensors, .pth, .bin or .npz), a path "
        "every worker reads, e.g. small=/data/vit_small_patch16_224.augreg_in21k.safetensors",
    )
    parser.add_argument(
        "--downstream",
        nargs="*",
        default=[],
        metavar="NAME=ROOT",
        help="fine-tuning datasets: prebuilt shards (folder or URL), e.g. cifar10=/data/c10; "
        "none: the digits (smoke)",
    )
    parser.add_argument(
        "--no-report", action="store_true", help="skip the report (figures, HTML) at the end"
    )
    parser.set_defaults(seeds=None)  # the preset's: 2 for smoke, 3 for imagenet
    return parser


def vit_adaptation_main(
    argv: Sequence[str] | None = None,
    prog: str | None = None,
    *,
    report: Callable[[StudyResult], None] | None = None,
) -> int:
    """Build one grid per downstream dataset (a bad flag: one message naming it, exit 2), run
    each, print it and, unless --no-report, hand its result to `report` (the console script's
    report builder, `cbtlab.dashboards.study_reports`)."""
    parser = vit_adaptation_parser(prog)
    args = parser.parse_args(argv)
    if args.resume is not None:
        parser.error(
            "--resume: the study runs one grid per downstream set; go on with a stopped one "
            "through `cbtlab study resume FOLDER`"
        )
    try:
        specs = _adaptation_specs(args)
    except ConfigError as exc:
        parser.error(str(exc))
    failed = 0
    for stage, spec in specs.items():
        print(f"\nViT adaptation on {stage}: {len(spec.cells)} cells x {spec.seeds} seeds")
        try:
            result = run_study(spec)
        except ConnectionError as exc:
            print(f"error: {exc}", file=sys.stderr)
            return 1
        print_study_result(result, spec)
        if report is not None and not args.no_report:
            report(result)
        failed += result.failed == len(result.rows)
    return 0 if not failed else 1


def _adaptation_specs(args: argparse.Namespace) -> dict[str, StudySpec]:
    """Each downstream set's validated grid (`adaptation_spec`), every set and weights file
    checked before anything trains; the smoke preset writes a random ViT for a size without
    --weights (and says so)."""
    if args.data_root is not None:
        raise ConfigError("--data-root", "give the fine-tuning shards as --downstream NAME=ROOT")
    args.sizes = args.sizes or list(ADAPT_DEFAULT_SIZES[args.preset])
    args.forms = args.forms or list(ADAPT_DEFAULT_FORMS[args.preset])
    weights = parse_size_files(args.weights)
    for size in args.sizes:
        if size in weights:
            _check_weights(size, weights[size])
        elif args.preset == "smoke":
            name = f"vit_{size}_patch16_224"
            path = cbtlab_home() / "vit_adaptation" / f"random_{name}.safetensors"
            if not path.is_file():
                write_random_vit(name, path)
            weights[size] = str(path)
            print(
                f"--weights: none for {size}: a randomly initialised {name} ({path}) stands in "
                "for pretrained weights; a smoke run of the machinery, its numbers say nothing "
                "about adaptation"
            )
        else:
            raise ConfigError(
                "--weights",
                f"give vit_{size}_patch16_224's pretrained timm file: --weights {size}=FILE "
                "(docs/studies.md: ViT adaptation)",
            )
    downstream = parse_downstream(args.downstream)
    if not downstream:
        if args.preset != "smoke":
            raise ConfigError("--downstream", "give the fine-tuning shards: NAME=ROOT ...")
        return {
            "digits": adaptation_spec(
                args, name="vit_adaptation", data={}, weights=weights
            ).validate()
        }
    return {
        stage: adaptation_spec(
            args, name=f"vit_adaptation-{stage}", data=_downstream_data(root), weights=weights
        ).validate()
        for stage, root in downstream.items()
    }


def _check_weights(size: str, path: str) -> None:
    """A size's weights file exists and holds that ViT (read here once, so that a file of
    another size fails before any trial starts); a URI is refused by the workers' loader."""
    if "://" in path:
        return
    try:
        load_vit(f"vit_{size}_patch16_224", path, num_classes=1, img_size=224, in_chans=3)
    except ValueError as exc:
        raise ConfigError("--weights", f"{size}: {exc}") from None


def _downstream_data(root: str) -> dict[str, Any]:
    """The config overrides of fine-tuning on the shards at `root`: their classes and channels
    (the ViT's first convolution is fitted to them)."""
    try:
        shardset = open_split(root, "train")
    except (OSError, KeyError, ValueError) as exc:
        raise ConfigError("--downstream", f"{root}: {exc}") from exc
    channels, _, _ = image_stats(shardset)
    return {
        "data.dataset": "shards",
        "data.root": root,
        "model.num_classes": shardset.num_classes,
        "model.in_chans": channels,
    }
