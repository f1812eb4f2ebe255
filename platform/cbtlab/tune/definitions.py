"""The studies that ship with cbtlab: each a function from parsed flags to a `StudySpec` (its
search space or grid), with the presets' base configs (`smoke`, `imagenet`).

A bad flag value raises `ConfigError` naming it; nothing here parses a command line or runs.
"""

from __future__ import annotations

import argparse
from collections.abc import Sequence
from typing import Any

from cbtlab.attention.common import STEP_INITS
from cbtlab.config import ConfigError, ExperimentConfig, format_grid, parse_grid
from cbtlab.models.adapt import FORMS, VIT_SIZES, vit_fields
from cbtlab.models.zoo import architecture
from cbtlab.overrides import parse_override
from cbtlab.tune.scaling import SIZE_KEYS, size_cells
from cbtlab.tune.spec import StudySpec

# Representative grids on the 8 x 8 patch grid of the digits preset: counts 1..64, square and not.
REP_GRIDS = ("1x1", "2x2", "4x2", "2x4", "4x4", "8x2", "2x8", "8x4", "4x8", "8x8")
# The default study (`make study`): every fourth count, 1..64, each with 3 seeds, all trained
# DEFAULT_GRID_EPOCHS epochs: 12 trials, about 10 minutes on 2 CPU cores (docs/studies.md).
DEFAULT_REP_GRIDS = "1x1,2x2,4x4,8x8"
DEFAULT_GRID_EPOCHS = 8
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
    seeds = args.seeds
    if hasattr(args, "grid"):
        grid = grid or study_mode(args) == "grid"
        if grid and args.num_samples is not None:
            raise ConfigError("--num-samples", "a grid runs every cell x seed; drop the flag")
        if seeds is None:
            seeds = args.default_seeds if grid else 1
        if not grid and seeds > 1:
            raise ConfigError(
                "--seeds", "a search runs one seed per trial; --grid runs every cell x seeds"
            )
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
        seeds=seeds,
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


def study_mode(args: argparse.Namespace) -> str:
    """ "grid" or "search": --grid or --search; else --num-samples means a search and --seeds
    above 1 a grid; else the study's default."""
    if args.grid or args.search:
        return "grid" if args.grid else "search"
    if args.num_samples is not None:
        return "search"
    if args.seeds is not None and args.seeds > 1:
        return "grid"
    return args.default_mode


def rep_count_spec(args: argparse.Namespace) -> StudySpec:
    grid = study_mode(args) == "grid"
    grids = _grid_list(args.grids or (DEFAULT_REP_GRIDS if grid else ",".join(REP_GRIDS)))
    if grid and args.epochs is None and args.preset == "smoke":
        args = argparse.Namespace(**{**vars(args), "epochs": DEFAULT_GRID_EPOCHS})
    spec = study_spec(args, name="rep_count_ablation", space={"model.rep_grid": grids})
    if not spec.grid:
        first = [g for g in REP_GRIDS_FIRST if g in grids] + [
            g for g in grids if g not in REP_GRIDS_FIRST
        ]
        spec.initial_points = [{"model.rep_grid": g} for g in first[: spec.num_samples]]
    return spec


def variant_spec(args: argparse.Namespace) -> StudySpec:
    return study_spec(
        args, name="variant_comparison", space={"model.attention": list(args.variants)}, grid=True
    )


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


def model_scaling_spec(args: argparse.Namespace) -> StudySpec:
    cells = size_cells(args.preset, args.sizes)
    space = {key: list(dict.fromkeys(cell[key] for cell in cells)) for key in SIZE_KEYS}
    return study_spec(args, name="model_scaling", space=space, cells=cells, grid=True)


# The joint search (studies/joint_search.py): the attention variant with the representatives,
# their pooling and the step sizes, as a conditional space. Which config fields each variant
# reads (cbtlab.models.build_model hands every attention the same options and
# cbtlab.attention.create_attention drops those its class does not take):
#   cbsa    rep_grid, rep_pool, rep_pool_kernel/rep_pool_stride, step_init/step_scale (eta_rep,
#           eta_x), rep_init, contraction, ...
#   agent   rep_grid and rep_pool (its agents; adaptive pooling only: no kernel or stride)
#   linear  step_init/step_scale (its eta) and linear_eps
#   mssa, tssa, softmax: none of them.
# A key is sampled only for the variants that read it, so that TPE never learns from a dead one.
REP_VARIANTS = ("cbsa", "agent")
POOL_VARIANTS = ("cbsa",)
STEP_VARIANTS = ("cbsa", "linear")
JOINT_PRESETS = ("digits", "smoke", "imagenet")
# The representative grids searched: counts 1..64 on the digits' 8 x 8 patch grid, grids that
# fit the 14 x 14 patch grid of 224 px images with patch 16 (1 to 64 representatives).
JOINT_GRIDS = {"digits": "1x1,2x2,4x2,4x4,8x4,8x8", "imagenet": "1x1,2x2,4x4,7x7,8x8"}
JOINT_STEP_INITS = "normal,constant,zero"
JOINT_STEP_SCALES = "0.1,1"
# Pooling: 0 = adaptive pooling (equal tiles where the grid divides the patch grid), 1 =
# overlapping k x k windows every patch, k = side - g + 1 for a g x g grid on a side x side
# patch grid. Sampled for CBSA's square grids 1 < g < side only (elsewhere both are the same).
JOINT_POOL_STRIDES = (0, 1)
# Per preset: trials, epochs (None: the preset's), ASHA's grace period, config overrides before
# --set (the smoke preset's small model: one worker, one layer, 24 wide), and the variants of
# the first trials (those in --variants; TPE samples the rest of each, and the later trials):
# every variant once; the smoke's 6 trials give CBSA three, so that its own parameters get
# importances.
JOINT_SETTINGS: dict[str, dict[str, Any]] = {
    "smoke": {
        "num_samples": 6,
        "epochs": 2,
        "grace_period": 1,
        "overrides": {"model.depth": 1, "model.embed_dim": 24, "train.num_workers": 1},
        "first": ("cbsa", "mssa", "agent", "linear", "cbsa", "cbsa"),
    },
    "digits": {
        "num_samples": 20,
        "epochs": 12,
        "grace_period": 3,
        "overrides": {},
        "first": VARIANTS,
    },
    "imagenet": {
        "num_samples": 30,
        "epochs": None,
        "grace_period": 15,
        "overrides": {},
        "first": VARIANTS,
    },
}


def _float_list(text: str, flag: str) -> list[float]:
    try:
        values = [float(v) for v in text.split(",") if v.strip()]
    except ValueError:
        raise ConfigError(flag, f"expected numbers separated by commas, got {text!r}") from None
    if not values:
        raise ConfigError(flag, "give at least one value")
    return values


def joint_rules(
    base: ExperimentConfig,
    variants: Sequence[str],
    grids: Sequence[str],
    step_inits: Sequence[str],
    step_scales: Sequence[float],
    pool_strides: Sequence[int] = JOINT_POOL_STRIDES,
) -> list[dict[str, Any]]:
    """The conditional rules (`StudySpec.conditional`) of the joint search: representative
    grids for the variants with representatives, the pooling for CBSA's square grids where
    windows differ from adaptive pooling, the step-size initialisation (and, but for zero, its
    scale) for the variants with learnable step sizes."""
    side = base.model.img_size // base.model.patch_size
    rules: list[dict[str, Any]] = []
    has = [v for v in variants if v in REP_VARIANTS]
    if has:
        rules.append({"when": {"model.attention": has}, "sample": {"model.rep_grid": list(grids)}})
    pooled = [v for v in variants if v in POOL_VARIANTS]
    # Square grids strictly between one representative and one per patch.
    square = [
        g for g in grids if parse_grid(g)[0] == parse_grid(g)[1] and 1 < parse_grid(g)[0] < side
    ]
    strides = [s for s in pool_strides if s]
    if pooled and square and strides:
        rules.append(
            {
                "when": {"model.attention": pooled, "model.rep_grid": square},
                "sample": {"model.rep_pool_stride": list(pool_strides)},
            }
        )
        for grid in square:
            g = parse_grid(grid)[0]
            for stride in strides:
                rules.append(
                    {
                        "when": {
                            "model.attention": pooled,
                            "model.rep_grid": [grid],
                            "model.rep_pool_stride": [stride],
                        },
                        "set": {"model.rep_pool_kernel": side - (g - 1) * stride},
                    }
                )
    stepped = [v for v in variants if v in STEP_VARIANTS]
    if stepped:
        rules.append(
            {"when": {"model.attention": stepped}, "sample": {"model.step_init": list(step_inits)}}
        )
        scaled = [init for init in step_inits if init != "zero"]
        if scaled:
            rules.append(
                {
                    "when": {"model.attention": stepped, "model.step_init": scaled},
                    "sample": {"model.step_scale": list(step_scales)},
                }
            )
    return rules


def joint_spec(args: argparse.Namespace) -> StudySpec:
    """The joint search: Optuna TPE + ASHA over the attention variant and, where the variant
    has them, the representative grid, its pooling and the step-size initialisation."""
    if study_mode(args) == "grid":
        raise ConfigError(
            "--grid" if args.grid else "--seeds",
            "the joint search is one Optuna search with one seed per trial",
        )
    if args.preset not in JOINT_PRESETS:
        raise ConfigError("--preset", f"{args.preset!r} is not one of {', '.join(JOINT_PRESETS)}")
    settings = JOINT_SETTINGS[args.preset]
    preset_sets = [f"{key}={value}" for key, value in settings["overrides"].items()]
    args = argparse.Namespace(
        **{
            **vars(args),
            "preset": "imagenet" if args.preset == "imagenet" else "smoke",
            "overrides": preset_sets + list(args.overrides),
            "epochs": args.epochs if args.epochs is not None else settings["epochs"],
            "num_samples": args.num_samples or settings["num_samples"],
            "grace_period": (
                args.grace_period if args.grace_period is not None else settings["grace_period"]
            ),
        }
    )
    base = base_config(args)
    for variant in args.variants:
        try:
            base.with_overrides({"model.attention": variant})
        except ConfigError as exc:
            raise ConfigError("--variants", str(exc)) from None
    grids = _grid_list(
        args.grids or JOINT_GRIDS["imagenet" if args.preset == "imagenet" else "digits"]
    )
    for grid in grids:
        try:
            base.with_overrides({"model.rep_grid": grid, "model.rep_pool_kernel": 0})
        except ConfigError as exc:
            raise ConfigError("--grids", str(exc)) from None
    inits = [v.strip() for v in args.step_inits.split(",") if v.strip()]
    bad = [v for v in inits if v not in STEP_INITS] or ([] if inits else [""])
    if bad:
        raise ConfigError("--step-inits", f"{bad[0]!r} is not one of {', '.join(STEP_INITS)}")
    scales = _float_list(args.step_scales, "--step-scales")
    if "normal" in inits and min(scales) < 0:
        raise ConfigError("--step-scales", "normal takes a standard deviation: give scales >= 0")
    spec = study_spec(args, name="joint_search", space={"model.attention": list(args.variants)})
    spec.conditional = joint_rules(base, args.variants, grids, inits, scales)
    first = [v for v in settings["first"] if v in args.variants][: spec.num_samples]
    spec.initial_points = [{"model.attention": variant} for variant in first]
    return spec


# The early-stopping check (cbtlab.tune.early_stopping): the spaces it checks and its presets.
# "digits" is the smoke preset's full digits model (the real measurement); "smoke" shrinks it to
# a quick run on 2 CPU cores: a tiny model, ES_SMOKE_CELLS cells, 2 seeds, 3 epochs.
ES_STUDIES = ("rep-count", "variants")
ES_PRESETS = ("smoke", "digits", "imagenet")
ES_SMOKE_MODEL: dict[str, Any] = {"model.depth": 1, "model.embed_dim": 24}
ES_SMOKE_CELLS = {"rep-count": "1x1,2x2,4x4", "variants": "cbsa,softmax,linear"}
ES_SMOKE_SEEDS, ES_SMOKE_EPOCHS = 2, 3
ES_DEFAULT_SEEDS = 3


def es_check_grid_spec(args: argparse.Namespace) -> StudySpec:
    """The ground-truth grid of the early-stopping check: `--study rep-count` (the default
    rep-count cells, or --grids) or `variants` (the six attentions, or --variants), every cell
    x --seeds, all to --epochs (smoke: 3, digits: DEFAULT_GRID_EPOCHS, imagenet: its recipe's).
    Named `<study>-grid`, apart from the study's own runs (a lookup by study name finds those)."""
    if args.study not in ES_STUDIES:
        raise ConfigError("--study", f"{args.study!r} is not one of {', '.join(ES_STUDIES)}")
    if args.preset not in ES_PRESETS:
        raise ConfigError("--preset", f"{args.preset!r} is not one of {', '.join(ES_PRESETS)}")
    smoke = args.preset == "smoke"
    wrong = "--variants" if args.study == "rep-count" else "--grids"
    if getattr(args, wrong.lstrip("-")) is not None:
        raise ConfigError(wrong, f"does not apply to --study {args.study}")
    epochs = args.epochs
    if epochs is None and args.preset != "imagenet":
        epochs = ES_SMOKE_EPOCHS if smoke else DEFAULT_GRID_EPOCHS
    seeds = args.seeds
    if seeds is None:
        seeds = ES_SMOKE_SEEDS if smoke else ES_DEFAULT_SEEDS
    if seeds < 2:
        raise ConfigError("--seeds", "the grid's answer needs a paired test: give 2 or more")
    given = [parse_override(text)[0] for text in args.overrides]
    model = [f"{k}={v}" for k, v in ES_SMOKE_MODEL.items() if smoke and k not in given]
    spec_args = argparse.Namespace(
        **{
            **vars(args),
            "preset": "imagenet" if args.preset == "imagenet" else "smoke",
            "epochs": epochs,
            "seeds": seeds,
            "name": None,
            "overrides": [*model, *args.overrides],
        }
    )
    if args.study == "rep-count":
        default = ES_SMOKE_CELLS["rep-count"] if smoke else DEFAULT_REP_GRIDS
        grids = _grid_list(args.grids or default)
        return study_spec(
            spec_args, name="rep_count_ablation-grid", space={"model.rep_grid": grids}, grid=True
        )
    variants = args.variants or (ES_SMOKE_CELLS["variants"].split(",") if smoke else VARIANTS)
    space = {"model.attention": list(variants)}
    return study_spec(spec_args, name="variant_comparison-grid", space=space, grid=True)


# Segmentation decoders (the paper's Fig. 8; studies/segmentation_decoders.py and
# studies/decoder_robustness.py): a ViT encoder with a mask-transformer decoder whose attention
# and depth vary (cbtlab.models.segmenter), scored by val/miou.
SEG_DECODERS = ("cbsa", "mssa", "softmax")
SEG_DEPTHS = (1, 2)
SEG_PRESETS = ("smoke", "ade20k")
SEG_METRIC = "val/miou"
# The smoke preset: the generated shapes (4 classes, 64 px, cbtlab.data.segmentation) with
# crops of 32 px, a one-layer encoder of width 48 on 4-pixel patches, one training worker, 3
# epochs (about 0.9 mIoU against the majority class's 0.2). A trial asks 0.9 + 0.1 CPU, so two
# run at once on 2 cores (each trains on one torch thread either way): the 12 trials of
# seg-decoders took 5 min 20 s so, 8 min 54 s one at a time, with the same mIoU per trial.
SEG_SMOKE: dict[str, Any] = {
    "task.kind": "segmentation",
    "task.photometric": False,
    "data.dataset": "shapes",
    "data.batch_size": 16,
    "data.shuffle_buffer": 32,
    "model.in_chans": 3,
    "model.num_classes": 4,
    "model.img_size": 32,
    "model.patch_size": 4,
    "model.embed_dim": 48,
    "model.num_heads": 3,
    "model.depth": 1,
    "model.block": "mlp",
    "model.attention": "softmax",
    "model.rep_grid": "4x4",
    "train.epochs": 3,
    "train.lr": 2e-3,
    "train.warmup_epochs": 0.5,
    "train.num_workers": 1,
    "train.cpus_per_worker": 0.9,
}
# Segmenter's ADE20K recipe (Strudel et al., 2021; the CBSA repository's segm/config.yml): a
# ViT-T/16 encoder (ImageNet weights from a file: --set task.encoder_weights=PATH), 512 crops
# of images whose shorter side is 512 x [0.5, 2], SGD lr 1e-3, momentum 0.9, no weight decay,
# poly 0.9 decay, batch 8, 160k iterations (64 epochs of the 20,210 training images), sliding
# windows of 512 every 512 at evaluation as Segmenter (--set task.eval_stride=341 for
# mmseg's). The decoder pools its representatives to 8 x 8 on the 32 x 32 patch grid.
SEG_ADE20K: dict[str, Any] = {
    "task.kind": "segmentation",
    "task.encoder": "vit_tiny_patch16_224",
    "task.base_size": 512,
    "task.eval_stride": 512,
    "data.dataset": "shards",
    "data.batch_size": 8,
    "data.loader_workers": 4,
    "model.in_chans": 3,
    "model.num_classes": 150,
    "model.img_size": 512,
    "model.patch_size": 16,
    "model.rep_grid": "8x8",
    "train.epochs": 64,
    "train.optimizer": "sgd",
    "train.lr": 1e-3,
    "train.weight_decay": 0.0,
    "train.warmup_epochs": 0,
    "train.grad_clip": 0.0,
    "train.num_workers": 1,
}


def seg_overrides(args: argparse.Namespace) -> list[str]:
    """The segmentation preset as `--set` overrides before the user's own; ConfigError for
    the ade20k preset without --data-root."""
    if args.preset not in SEG_PRESETS:
        raise ConfigError("--preset", f"{args.preset!r} is not one of {', '.join(SEG_PRESETS)}")
    preset = dict(SEG_SMOKE if args.preset == "smoke" else SEG_ADE20K)
    if args.preset == "ade20k":
        if not args.data_root:
            raise ConfigError("--data-root", "give the ADE20K shards (`cbtlab data ade20k`)")
        preset["data.root"] = args.data_root
    return [f"{key}={value}" for key, value in preset.items()] + list(args.overrides)


def _seg_args(args: argparse.Namespace, **changes: Any) -> argparse.Namespace:
    return argparse.Namespace(
        **{**vars(args), "preset": "smoke", "overrides": seg_overrides(args), **changes}
    )


def _check_values(base: ExperimentConfig, key: str, values: Sequence[Any], flag: str) -> None:
    for value in values:
        try:
            base.with_overrides({key: value})
        except ConfigError as exc:
            raise ConfigError(flag, str(exc)) from None


def seg_decoders_spec(args: argparse.Namespace) -> StudySpec:
    """Decoder attention x decoder depth, every cell with the same --seeds, scored by
    val/miou (the first attention at the first depth is the baseline)."""
    seg_args = _seg_args(args)
    base = base_config(seg_args)
    _check_values(base, "task.decoder_attention", args.decoders, "--decoders")
    _check_values(base, "task.decoder_depth", args.depths, "--depths")
    space = {"task.decoder_attention": list(args.decoders), "task.decoder_depth": list(args.depths)}
    spec = study_spec(seg_args, name="segmentation_decoders", space=space, grid=True)
    spec.metric = SEG_METRIC
    return spec


def decoder_robustness_spec(args: argparse.Namespace) -> StudySpec:
    """The decoders to perturb: each attention at --depth, trained with the same --seeds
    (the noise is applied to the trained decoders afterwards: `cbtlab.tune.segmentation`)."""
    seg_args = _seg_args(args)
    base = base_config(seg_args)
    _check_values(base, "task.decoder_attention", args.decoders, "--decoders")
    _check_values(base, "task.decoder_depth", [args.depth], "--depth")
    space = {"task.decoder_attention": list(args.decoders), "task.decoder_depth": [args.depth]}
    spec = study_spec(seg_args, name="decoder_robustness", space=space, grid=True)
    spec.metric = SEG_METRIC
    if not spec.base.train.checkpoint_every:
        raise ConfigError("train.checkpoint_every", "the noise is applied to the last checkpoint")
    return spec


# The ViT adaptation study (the paper's Fig. 9, studies/vit_adaptation.py): timm ViTs with
# pretrained weights, their attention replaced by each form (cbtlab.models.adapt.FORMS), each
# fine-tuned on every downstream dataset; top-1 over seeds against FLOPs.
ADAPT_SIZES = tuple(VIT_SIZES)
ADAPT_DEFAULT_SIZES = {"smoke": ("tiny",), "imagenet": ("tiny", "small", "base")}
# smoke: the forms of the paper's claim (CBSA without contraction against linear attention,
# the ViT itself beside them), 6 trials; every form took 8 min 38 s for its 10 trials.
ADAPT_DEFAULT_FORMS = {"smoke": ("softmax", "cbsa_nocontract", "linear"), "imagenet": tuple(FORMS)}
# Every preset: the step sizes start at 1 (CBSA starts as `A^T contract(Q0 + A W)`, the
# reference adaptation's extraction and broadcast without a learned scale).
ADAPT_COMMON: dict[str, Any] = {"model.step_init": "constant", "model.step_scale": 1.0}
# smoke: the tiny ViT on the digits at 48 px (a 3 x 3 patch grid, 2 x 2 representatives), one
# worker, 2 epochs, 2 seeds: minutes on 2 CPU cores. A trial asks 0.9 + 0.1 CPU so that two,
# not three, share 2 cores: a trial took 135-153 s three at once, 71-78 s two at once.
ADAPT_SMOKE: dict[str, Any] = {
    "model.img_size": 48,
    "model.in_chans": 1,
    "model.num_classes": 10,
    "model.rep_grid": "2x2",
    "train.epochs": 2,
    "train.num_workers": 1,
    "train.cpus_per_worker": 0.9,
    "train.lr": 5e-4,
    "train.warmup_epochs": 0.0,
}
ADAPT_SMOKE_SEEDS = 2
# imagenet: the reference code's adaptation command (CBSA README: AdamW, lr 5e-5, weight decay
# 0.01, global batch 512, 50 epochs) with its main.py's label smoothing 0.1 and 10 warm-up
# epochs, then a cosine to 0; 224 px, the 14 x 14 patch grid pooled to 8 x 8 representatives as
# the reference's adapted attention does.
ADAPT_RECIPE: dict[str, Any] = {
    "model.img_size": 224,
    "model.rep_grid": "8x8",
    "data.dataset": "shards",
    "data.batch_size": 512,
    "data.augment": "imagenet",
    "train.optimizer": "adamw",
    "train.lr": 5e-5,
    "train.weight_decay": 0.01,
    "train.epochs": 50,
    "train.warmup_epochs": 10.0,
    "train.min_lr_ratio": 0.0,
    "train.label_smoothing": 0.1,
    "train.grad_clip": 1.0,
}


def parse_size_files(items: Sequence[str], flag: str = "--weights") -> dict[str, str]:
    """`SIZE=FILE` items -> {size: file}, each size a ViT size (tiny, small, base, large)."""
    out: dict[str, str] = {}
    for item in items:
        size, sep, path = item.partition("=")
        if not sep or size not in ADAPT_SIZES or not path.strip():
            raise ConfigError(
                flag, f"{item!r}: expected SIZE=FILE with SIZE one of {', '.join(ADAPT_SIZES)}"
            )
        out[size] = path.strip()
    return out


def adaptation_cells(
    forms: Sequence[str], sizes: Sequence[str], weights: dict[str, str]
) -> list[dict[str, Any]]:
    """One cell per size x attention form: the ViT (`model.adapt_from` and the architecture
    it fixes), the form's attention fields and the size's weights file (`train.init_from`)."""
    cells = []
    for size in sizes:
        name = f"vit_{size}_patch16_224"
        arch = {f"model.{k}": v for k, v in vit_fields(name).items()}
        for form in forms:
            fields = {**FORMS[form]}
            fields.setdefault("contraction", "softmax")  # read by CBSA only
            cells.append(
                {
                    **{f"model.{k}": v for k, v in fields.items()},
                    "model.adapt_from": name,
                    **arch,
                    "train.init_from": weights[size],
                }
            )
    return cells


def factor_out(cells: Sequence[dict[str, Any]]) -> tuple[dict[str, Any], list[dict[str, Any]]]:
    """(the keys every cell sets alike, the cells without them), so that a cell names only what
    varies; model.attention always stays."""
    same = {
        key: value
        for key, value in cells[0].items()
        if key != "model.attention" and all(cell[key] == value for cell in cells)
    }
    return same, [{k: v for k, v in cell.items() if k not in same} for cell in cells]


def adaptation_spec(
    args: argparse.Namespace, *, name: str, data: dict[str, Any], weights: dict[str, str]
) -> StudySpec:
    """The grid of one downstream dataset (`data`: its config overrides): every size x form of
    `args`, each with the same seeds, starting from `weights` (size -> timm file)."""
    same, cells = factor_out(adaptation_cells(args.forms, args.sizes, weights))
    recipe = ADAPT_SMOKE if args.preset == "smoke" else ADAPT_RECIPE
    preset_sets = {**recipe, **ADAPT_COMMON, **data, **same}
    given = {parse_override(text)[0] for text in args.overrides}
    spec_args = argparse.Namespace(
        **{
            **vars(args),
            "data_root": data.get("data.root"),
            "seeds": args.seeds or (ADAPT_SMOKE_SEEDS if args.preset == "smoke" else 3),
            # The preset's fields unless --set gives them (`--set` comes last either way).
            "overrides": [f"{k}={v}" for k, v in preset_sets.items() if k not in given]
            + list(args.overrides),
        }
    )
    space = {key: list(dict.fromkeys(cell[key] for cell in cells)) for key in cells[0]}
    return study_spec(spec_args, name=name, space=space, cells=cells, grid=True)
