"""The studies that ship with cbtlab: their search spaces and command lines.

Each `studies/*.py` script is a thin wrapper around a `*_main(argv)` here, so that the same
study also runs as `cbtlab study NAME ...`.

| study               | factors                                   | kind                      |
|---------------------|-------------------------------------------|---------------------------|
| rep_count_ablation  | model.rep_grid                            | Optuna + ASHA, or a grid  |
| variant_comparison  | model.attention (Table 4, equal size)     | grid x seeds              |
| step_size_init      | model.step_init x model.step_scale        | grid x seeds              |
| model_scaling       | model size (width, depth, heads), then    | grid x seeds, two stages  |
|                     | fine-tunes per downstream dataset         | (`cbtlab.tune.scaling`)   |

Presets (`--preset`): `smoke`, the digits on CPU in minutes (the config's defaults); `imagenet`,
the paper's ImageNet-1k recipe on CBT-T's skeleton over prebuilt shards (`--data-root`).
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Callable, Sequence
from typing import Any

from cbtlab.config import (
    ConfigError,
    ExperimentConfig,
    add_override_argument,
    format_grid,
    parse_grid,
    parse_override,
)
from cbtlab.tune.stats import TESTS
from cbtlab.tune.study import (
    StudyResult,
    StudySpec,
    latest_study_path,
    mlflow_ui_command,
    read_study_state,
    resume_study,
    run_study,
    spec_from_dict,
)

# `--resume` without a folder: the study of this name started last under --storage-path.
LATEST = "latest"

# Representative grids on the 8 x 8 patch grid of the digits preset: counts 1..64, square and not.
REP_GRIDS = ("1x1", "2x2", "4x2", "2x4", "4x4", "8x2", "2x8", "8x4", "4x8", "8x8")
# The first trials cover every count once (m = 1, 4, 8, 16, 32, 64), then TPE samples the rest.
REP_GRIDS_FIRST = ("1x1", "2x2", "4x2", "4x4", "8x4", "8x8")
# Table 4's mechanisms and the ViT baseline, all in the same skeleton (width, depth, heads).
VARIANTS = ("cbsa", "mssa", "tssa", "agent", "linear", "softmax")
# init:scale; the reference code's N(0, 1) first (the baseline), zero takes no scale.
STEP_CELLS = "normal:1,normal:0.1,constant:1,constant:0.1,constant:-0.1,constant:-1,zero"

PRESETS = ("smoke", "imagenet")
# The paper's ImageNet-1k recipe (Table 3): 150 epochs, Lion, lr 2e-4, weight decay 0.05,
# global batch 256, label smoothing 0.1; random-resized crop + flip come with prebuilt shards.
# From the reference code's main.py: 20 warm-up epochs, then a cosine to 0, no gradient clipping
# (commented out there), mixed precision (fp16 there; train.precision="auto" is bf16 on a GPU).
# The trials take a GPU per worker where the cluster has GPUs (train.use_gpu="auto"), and then
# CPUs and loader processes per GPU sized from the GPU node (`IMAGENET_NODE_SIZED`).
IMAGENET_RECIPE: dict[str, Any] = {
    "model.in_chans": 3,
    "model.num_classes": 1000,
    "model.rep_grid": "8x8",  # as the registered timm sizes (cbtlab.models.zoo)
    "data.dataset": "shards",
    "data.batch_size": 256,
    "train.epochs": 150,
    "train.optimizer": "lion",
    "train.lr": 2e-4,
    "train.weight_decay": 0.05,
    "train.label_smoothing": 0.1,
    "train.warmup_epochs": 20,
    "train.min_lr_ratio": 0.0,
    "train.grad_clip": 0.0,
}
# Sized by the study's driver from the GPU node (cbtlab.cluster.size_from_node) unless --set;
# on CPUs they keep the config's 2-core values.
IMAGENET_NODE_SIZED = ("train.cpus_per_worker", "data.loader_workers")


def _grid_list(text: str) -> list[str]:
    grids = [format_grid(parse_grid(g.strip(), "--grids")) for g in text.split(",") if g.strip()]
    if not grids:
        raise ConfigError("--grids", "give at least one grid, e.g. 2x2,4x4")
    return grids


def parse_cell(text: str, flag: str = "--baseline") -> dict[str, Any]:
    """`key=value,key=value` -> {key: value}; a value may hold commas ("mssa,cbsa")."""
    cell: dict[str, Any] = {}
    key = None
    for part in text.split(","):
        if "=" in part or key is None:
            key, value = parse_override(part)
            cell[key] = value
        else:  # the comma belonged to the previous value
            cell[key] = parse_override(f"{key}={cell[key]},{part}")[1]
    if not cell:
        raise ConfigError(flag, "expected key=value[,key=value...]")
    return cell


def preset_overrides(preset: str, data_root: str | None) -> dict[str, Any]:
    """The config overrides of a preset; raises ConfigError naming everything missing for it
    (the imagenet preset's --data-root, or a recipe field this cbtlab cannot take)."""
    if preset == "smoke":
        return {}
    if preset != "imagenet":
        raise ConfigError("--preset", f"{preset!r} is not one of {', '.join(PRESETS)}")
    from cbtlab.models.zoo import architecture

    model = {f"model.{k}": v for k, v in architecture("cbt_tiny_patch16_224").items()}
    overrides = {**model, **IMAGENET_RECIPE, "data.root": data_root or ""}
    problems = [] if data_root else ["--data-root: give the prebuilt ImageNet shards (folder/URL)"]
    whole = _config_error(overrides)
    if whole:
        # Try the parts one by one so that the message names every missing piece at once.
        data = ("data.dataset", "data.root")
        groups = [[k for k in overrides if k.startswith("model.")], list(data)]
        groups += [[k] for k in overrides if not k.startswith(("model.", *data))]
        parts = [_config_error({k: overrides[k] for k in group}) for group in groups]
        problems += [p for p in parts if p] or [whole]
    if problems:
        raise ConfigError(
            "--preset",
            "imagenet (the paper's ImageNet-1k recipe) is missing:\n  " + "\n  ".join(problems),
        )
    return overrides


def _config_error(overrides: dict[str, Any]) -> str | None:
    try:
        ExperimentConfig().with_overrides(overrides)
    except ConfigError as exc:
        return str(exc)
    return None


def study_parser(
    description: str, prog: str | None = None, *, search: bool = True, seeds: int = 1
) -> argparse.ArgumentParser:
    """Flags every study shares: preset, scale, seeds and statistics, resources, Ray, MLflow,
    config overrides; with `search`, also the Optuna/ASHA flags and `--grid`."""
    parser = argparse.ArgumentParser(
        prog=prog, description=description, formatter_class=argparse.ArgumentDefaultsHelpFormatter
    )
    parser.add_argument(
        "--preset",
        choices=PRESETS,
        default="smoke",
        help="smoke: the digits on CPU; imagenet: the paper's recipe on shards",
    )
    parser.add_argument("--data-root", default=None, help="prebuilt shards for --preset imagenet")
    parser.add_argument("--epochs", type=int, default=None, help="epochs per trial (train.epochs)")
    parser.add_argument("--seed", type=int, default=0, help="training seed (of the first seed)")
    parser.add_argument(
        "--seeds",
        type=int,
        default=seeds,
        help="seeds per cell: train.seed = --seed + i, the same in every cell (paired)"
        + ("; more than 1 runs a grid" if search else ""),
    )
    if search:
        parser.add_argument(
            "--grid", action="store_true", help="run every cell (x --seeds) instead of Optuna"
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
        help="trials at once (default: 1 for an Optuna search, as many as the cluster holds "
        "for a grid)",
    )
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
    add_override_argument(parser)
    return parser


def base_config(args: argparse.Namespace) -> ExperimentConfig:
    """The preset, then `--set` overrides, then `--epochs` and `--seed`."""
    overrides = preset_overrides(args.preset, args.data_root)
    overrides.update(parse_override(text) for text in args.overrides)
    if args.epochs is not None:
        overrides["train.epochs"] = args.epochs
    overrides["train.seed"] = args.seed
    return ExperimentConfig().with_overrides(overrides)


def study_spec(
    args: argparse.Namespace,
    *,
    name: str,
    space: dict[str, list[Any]],
    cells: Sequence[dict[str, Any]] = (),
    grid: bool = False,
) -> StudySpec:
    """A StudySpec from the shared flags (the search flags when the parser has them)."""
    search = {}
    if hasattr(args, "grid"):
        grid = grid or args.grid or args.seeds > 1
        if grid and args.num_samples is not None:
            raise ConfigError("--num-samples", "a grid runs every cell x seed; drop the flag")
        search = {
            "num_samples": args.num_samples or 6,
            "search_seed": args.search_seed,
            "asha": not args.no_asha,
            "grace_period": args.grace_period,
            "optuna_storage": args.optuna_storage,
        }
    given = {parse_override(text)[0] for text in args.overrides}
    node_sized = IMAGENET_NODE_SIZED if args.preset == "imagenet" else ()
    return StudySpec(
        name=args.name or name,
        base=base_config(args),
        space=space,
        grid=grid,
        cells=list(cells),
        seeds=args.seeds,
        baseline=parse_cell(args.baseline) if args.baseline else None,
        stats_test=args.stats_test,
        stats_on=args.stats_on,
        workers=args.workers,
        gpus_per_worker=args.gpus_per_worker,
        node_sized=[key for key in node_sized if key not in given],
        max_concurrent=args.max_concurrent,
        ray_address=args.address,
        worker_logs=args.worker_logs,
        storage_path=args.storage_path or "",
        tracking_uri=args.tracking_uri or "",
        **search,
    )


def run_study_main(
    parser: argparse.ArgumentParser,
    make_spec: Callable[[argparse.Namespace], StudySpec],
    argv: Sequence[str] | None,
) -> int:
    """Parse, build the spec (a bad value: one message naming it, exit 2), run, print the
    trial table, the statistics of a grid, and where MLflow keeps it all."""
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
    if result.best is not None:
        print(f"best: {result.best['trial']} {spec.metric} {result.best['best']:.4f}")
    print(f"MLflow: experiment {result.experiment_name!r}, parent run {result.parent_run_id}")
    print(f"open the MLflow UI with:\n  {mlflow_ui_command(result.tracking_uri)}")


def rep_count_spec(args: argparse.Namespace) -> StudySpec:
    grids = _grid_list(args.grids)
    spec = study_spec(args, name="rep_count_ablation", space={"model.rep_grid": grids})
    if not spec.grid:
        first = [g for g in REP_GRIDS_FIRST if g in grids] + [
            g for g in grids if g not in REP_GRIDS_FIRST
        ]
        spec.initial_points = [{"model.rep_grid": g} for g in first[: spec.num_samples]]
    return spec


def rep_count_parser(prog: str | None = None) -> argparse.ArgumentParser:
    parser = study_parser(
        "How many representatives does CBSA need? Searches the representative grid "
        "(count and shape) of a CBT with Optuna + ASHA, or runs every grid with --grid / "
        "--seeds N and compares them with paired statistics; logs to MLflow.",
        prog=prog,
    )
    parser.add_argument(
        "--grids",
        default=",".join(REP_GRIDS),
        help="representative grids to search (g_h x g_w, comma-separated)",
    )
    return parser


def rep_count_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    return run_study_main(rep_count_parser(prog), rep_count_spec, argv)


def variant_spec(args: argparse.Namespace) -> StudySpec:
    return study_spec(
        args, name="variant_comparison", space={"model.attention": list(args.variants)}, grid=True
    )


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


def parse_step_cells(text: str) -> list[dict[str, Any]]:
    """`init:scale,...` (zero takes no scale) -> cells of model.step_init x model.step_scale."""
    cells = []
    for item in filter(None, (part.strip() for part in text.split(","))):
        init, _, raw = item.partition(":")
        try:
            scale = float(raw) if raw else None
        except ValueError:
            raise ConfigError("--cells", f"{item}: expected init:scale, e.g. constant:1") from None
        if init == "zero":
            if scale:
                raise ConfigError("--cells", f"{item}: zero initialisation takes no scale")
            scale = 0.0
        elif scale is None:
            raise ConfigError("--cells", f"{item}: give a scale, e.g. {init}:0.1")
        cells.append({"model.step_init": init, "model.step_scale": scale})
    if not cells:
        raise ConfigError("--cells", "give at least one cell, e.g. normal:1,zero")
    return cells


def step_init_spec(args: argparse.Namespace) -> StudySpec:
    cells = parse_step_cells(args.cells)
    space = {
        key: list(dict.fromkeys(cell[key] for cell in cells))
        for key in ("model.step_init", "model.step_scale")
    }
    return study_spec(args, name="step_size_init", space=space, cells=cells, grid=True)


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
    from cbtlab.tune.scaling import SIZE_NAMES

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


def model_scaling_spec(args: argparse.Namespace) -> StudySpec:
    from cbtlab.tune.scaling import SIZE_KEYS, size_cells

    cells = size_cells(args.preset, args.sizes)
    space = {key: list(dict.fromkeys(cell[key] for cell in cells)) for key in SIZE_KEYS}
    return study_spec(args, name="model_scaling", space=space, cells=cells, grid=True)


def model_scaling_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """Pre-train every size, fine-tune each on every downstream set, print the scaling table."""
    import dataclasses

    from cbtlab.tracking import StudyTracker
    from cbtlab.tune.scaling import (
        SIZE_KEYS,
        finetune_base,
        format_scaling,
        parse_downstream,
        pretrained_checkpoints,
        scaling_json,
        scaling_rows,
    )

    parser = model_scaling_parser(prog)
    args = parser.parse_args(argv)
    if args.resume is not None:
        parser.error(
            "--resume: model_scaling runs one study per stage; go on with a stopped stage "
            "through `cbtlab study rep-count --resume FOLDER` (any study's folder), or re-run"
        )
    try:
        pretrain = model_scaling_spec(args).validate()
        downstream = parse_downstream(args.downstream)
        overrides = dict(parse_override(text) for text in args.finetune_set)
        if args.finetune_epochs is not None:
            overrides["train.epochs"] = args.finetune_epochs
        if downstream and not pretrain.base.train.checkpoint_every:
            raise ConfigError("train.checkpoint_every", "fine-tuning needs the last checkpoint")
        # Every downstream set is checked before anything trains.
        bases = {
            name: finetune_base(pretrain.base, root, args.preset, overrides)
            for name, root in downstream.items()
        }
    except ConfigError as exc:
        parser.error(str(exc))
    names, cells = list(args.sizes), pretrain.cells
    try:
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
            print(
                f"no pre-trained checkpoint (failed trial) for {', '.join(missing)}: not fine-tuned"
            )
        for stage, base in bases.items():
            tuned = [(n, c) for n, c in zip(names, cells, strict=True) if n in checkpoints]
            if not tuned:
                break
            spec = dataclasses.replace(
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
            print(f"\nfine-tuning on {stage} ({base.data.root}) from the pre-trained checkpoints")
            stage_result = run_study(spec)
            print_study_result(stage_result, spec)
            stage_rows[stage] = stage_result.rows
    except ConnectionError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    rows = scaling_rows(
        stage_rows, names=names, cells=cells, pretrain=pretrain.base, stats_on=pretrain.stats_on
    )
    table = format_scaling(rows, list(stage_rows))
    tracker = StudyTracker(pretrain.tracking_uri, pretrain.experiment_name)
    tracker.log_text(result.parent_run_id, table, "scaling.txt")
    tracker.log_text(result.parent_run_id, scaling_json(rows), "scaling.json")
    print(f"\nmodel scaling ({pretrain.stats_on} {pretrain.metric}, mean ± 95% CI over seeds):")
    print(table)
    print(f"logged as scaling.txt and scaling.json on the parent run {result.parent_run_id}")
    failed = sum(1 for stage in stage_rows.values() for r in stage if r["status"] != "FINISHED")
    return 0 if not failed else 1
