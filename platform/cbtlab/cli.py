"""The `cbtlab` command: every tool of the platform as a subcommand (`cbtlab --help` lists them
with an example each). The repository's scripts (`studies/`, `data_pipelines/`, `dashboards/`)
call the same functions, for `ray job submit -- python studies/...` from a checkout.

Each subcommand is `module:function`, imported only when it runs, so `cbtlab --help` and
`cbtlab where` load neither torch nor Ray nor MLflow; the function takes `(argv, prog)` and
parses its own flags (`cbtlab study rep-count --help`).
"""

from __future__ import annotations

import argparse
import difflib
import importlib
import sys
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING

from cbtlab.overrides import ConfigError, add_override_argument, parse_override
from cbtlab.paths import cbtlab_home, data_home, default_tracking_uri, ray_results_home

if TYPE_CHECKING:
    from cbtlab.config import ExperimentConfig


@dataclass(frozen=True)
class Command:
    target: str  # "module:function", called as function(argv, prog=...)
    summary: str
    example: str


# Group -> name -> command; a group of one command has the name "".
COMMANDS: dict[str, dict[str, Command]] = {
    "train": {
        "": Command(
            "cbtlab.train.cli:train_main",
            "one training run (Ray Train, DDP workers), logged to MLflow",
            "cbtlab train --set model.depth=6 --set train.epochs=20",
        ),
    },
    "study": {
        "rep-count": Command(
            "cbtlab.tune.cli:rep_count_main",
            "how many representatives does CBSA need? (grid with seeds, or --search)",
            "cbtlab study rep-count --search --num-samples 10",
        ),
        "variants": Command(
            "cbtlab.tune.cli:variant_comparison_main",
            "CBSA against softmax, linear, channel and agent attention at equal size",
            "cbtlab study variants --seeds 3",
        ),
        "step-init": Command(
            "cbtlab.tune.cli:step_size_init_main",
            "which step-size initialisation trains best",
            "cbtlab study step-init",
        ),
        "scaling": Command(
            "cbtlab.tune.cli:model_scaling_main",
            "model sizes pre-trained, then fine-tuned downstream (the scaling table)",
            "cbtlab study scaling --preset smoke",
        ),
        "vit-adapt": Command(
            "cbtlab.dashboards.study_reports:vit_adaptation_main",
            "Fig. 9: pretrained timm ViTs adapted to CBSA / linear attention, vs FLOPs",
            "cbtlab study vit-adapt --preset smoke",
        ),
        "joint": Command(
            "cbtlab.tune.cli:joint_search_main",
            "variant x representatives x pooling x step sizes, one conditional Optuna search",
            "cbtlab study joint --preset smoke",
        ),
        "es-check": Command(
            "cbtlab.tune.cli:early_stopping_check_main",
            "does ASHA find the grid's best cell, and with how much compute?",
            "cbtlab study es-check --preset smoke",
        ),
        "seg-decoders": Command(
            "cbtlab.dashboards.study_reports:segmentation_decoders_main",
            "Fig. 8 left: segmentation decoders' attention x depth, mIoU against decoder FLOPs",
            "cbtlab study seg-decoders --preset smoke",
        ),
        "decoder-robustness": Command(
            "cbtlab.dashboards.study_reports:decoder_robustness_main",
            "Fig. 8 right: trained decoders' mIoU under noise on their projection matrices",
            "cbtlab study decoder-robustness --preset smoke --scales 0 0.5 1",
        ),
        "synthetic": Command(
            "cbtlab.analysis.synthetic:synthetic_main",
            "Fig. 4: the parameter-free linear variant compresses each class onto a line",
            "cbtlab study synthetic --classes 4 --noise 0.5",
        ),
        "resume": Command(
            "cbtlab.tune.cli:resume_main",
            "go on with a study whose driver stopped, from its results folder",
            "cbtlab study resume ~/.cbtlab/ray_results/rep_count_ablation-1a2b3c4d",
        ),
        "report": Command(
            "cbtlab.dashboards.report:report_main",
            "a study's table, figures and HTML report, logged on its parent run",
            "cbtlab study report --study rep_count_ablation",
        ),
        "table": Command(
            "cbtlab.dashboards.table:table_main",
            "print a study's trial table from MLflow (and save it as CSV)",
            "cbtlab study table --experiment rep_count_ablation --csv table.csv",
        ),
        "reproduce": Command(
            "cbtlab.tune.reproduce:reproduce_main",
            "re-run a logged trial exactly (or over more seeds) and compare",
            "cbtlab study reproduce --run-id RUN_ID --seeds 5",
        ),
    },
    "data": {
        "digits": Command(
            "cbtlab.cli:dataset_main",
            "build (or check) the built-in digits shards; print where they are",
            "cbtlab data digits",
        ),
        "shards": Command(
            "cbtlab.cli:dataset_main",
            "read a prebuilt dataset's card; print its splits",
            "cbtlab data shards --set data.root=s3://bucket/imagenet-wds",
        ),
        "build": Command(
            "cbtlab.data.cli:build_main",
            "write WebDataset shards from ImageNet, CIFAR, Flowers, Pets or an image folder",
            "cbtlab data build --source imagefolder --input /data/imagenet "
            "--output s3://bucket/imagenet-wds",
        ),
        "ade20k": Command(
            "cbtlab.data.segmentation:ade20k_main",
            "shard ADE20K (ADEChallengeData2016 layout) as image + mask for segmentation",
            "cbtlab data ade20k --input /data/ade --output /data/ade20k-wds",
        ),
        "verify": Command(
            "cbtlab.data.cli:verify_main",
            "check shards against their manifest: every checksum, label and image",
            "cbtlab data verify s3://bucket/imagenet-wds --workers 16",
        ),
        "bench": Command(
            "cbtlab.perf.loader:bench_main",
            "our shard loader against webdataset's WebLoader and torch's DataLoader, side by side",
            "cbtlab data bench --cache warm",
        ),
    },
    "probe": {
        "": Command(
            "cbtlab.analysis.interpretability:probe_main",
            "a trained run's compression, coding rates, attention maps and robustness",
            "cbtlab probe --run-id RUN_ID",
        ),
    },
    "bench": {
        "throughput": Command(
            "cbtlab.perf.cli:throughput_main",
            "training and inference images/s of CBT, ViT, CRATE and ToST side by side",
            "cbtlab bench throughput --device cuda",
        ),
        "attention": Command(
            "cbtlab.perf.cli:scaling_main",
            "time and memory of every attention against the token count",
            "cbtlab bench attention --device cuda",
        ),
        "loop": Command(
            "cbtlab.perf.loop_overhead:loop_overhead_main",
            "per-step cost of the training loop over a bare PyTorch loop",
            "cbtlab bench loop --device cuda",
        ),
        "ray": Command(
            "cbtlab.perf.ray_overhead:overhead_main",
            "the same training under Ray Train and as a plain DDP job",
            "cbtlab bench ray --quick",
        ),
    },
    "gpu-check": {
        "": Command(
            "cbtlab.train.gpu_check:gpu_check_main",
            "train on every visible GPU under NCCL and Ray Train; PASS/FAIL per check",
            "cbtlab gpu-check",
        ),
    },
    "ui": {
        "": Command(
            "cbtlab.dashboards.serve:serve_main",
            "the MLflow UI on the platform's store (and optuna-dashboard with --optuna)",
            "cbtlab ui --port 0",
        ),
    },
    "config": {
        "": Command(
            "cbtlab.cli:config_main",
            "print every config field and its value, after --set overrides",
            "cbtlab config --set model.depth=6",
        ),
    },
    "where": {
        "": Command(
            "cbtlab.cli:where_main",
            "print where cbtlab keeps data, MLflow and Ray results",
            "cbtlab where",
        ),
    },
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help"):
        print(overview())
        return 0 if argv else 2
    group, rest = argv[0], argv[1:]
    if group not in COMMANDS:
        return _unknown("a command", group, list(COMMANDS), "cbtlab")
    commands = COMMANDS[group]
    if "" in commands:
        return run(commands[""], rest, f"cbtlab {group}")
    if not rest or rest[0] in ("-h", "--help"):
        print(overview(group))
        return 0 if rest else 2
    name = rest[0]
    if name not in commands:
        return _unknown(f"a `cbtlab {group}` command", name, list(commands), f"cbtlab {group}")
    return run(commands[name], rest[1:], f"cbtlab {group} {name}")


def run(command: Command, argv: list[str], prog: str) -> int:
    """Import the command's function and call it."""
    module, _, name = command.target.partition(":")
    function: Callable[..., int | None] = getattr(importlib.import_module(module), name)
    return function(argv, prog=prog) or 0


def overview(group: str | None = None) -> str:
    """The help: every command (of `group`), what it does and an example."""
    groups = [group] if group else list(COMMANDS)
    lines = [
        "usage: cbtlab COMMAND [flags]      (cbtlab COMMAND --help: its flags)",
        "",
        "cbtlab: studies of Contract-and-Broadcast Transformers on Ray, Optuna and MLflow.",
    ]
    for name in groups:
        lines.append("")
        for sub, command in COMMANDS[name].items():
            title = f"{name} {sub}".strip()
            lines.append(f"  {title:<18}{command.summary}")
            lines.append(f"  {'':<18}  e.g. {command.example}")
    return "\n".join(lines)


def _unknown(what: str, given: str, known: list[str], help_command: str) -> int:
    close = difflib.get_close_matches(given, known, n=1)
    hint = f"; did you mean {close[0]!r}?" if close else ""
    print(f"cbtlab: {given!r} is not {what}{hint} (see `{help_command} --help`)", file=sys.stderr)
    return 2


def where_main(argv: Sequence[str], prog: str) -> int:
    _parser(prog, "Print where cbtlab keeps data, MLflow and Ray results.").parse_args(argv)
    print(f"home          {cbtlab_home()}  (CBTLAB_HOME)")
    print(f"data cache    {data_home()}")
    print(f"MLflow store  {default_tracking_uri()}  (MLFLOW_TRACKING_URI)")
    print(f"Ray results   {ray_results_home()}")
    return 0


def config_main(argv: Sequence[str], prog: str) -> int:
    parser = _parser(prog, "Print every config field and its value, after --set overrides.")
    add_override_argument(parser)
    cfg = _config(parser, parser.parse_args(argv).overrides, {})
    for key, value in cfg.flat().items():
        print(f"{key} = {value}")
    return 0


def dataset_main(argv: Sequence[str], prog: str) -> int:
    """`cbtlab data digits|shards`: prepare the dataset (digits: build its shards once) and
    print its splits."""
    from cbtlab.data import open_split, prepare_dataset  # start-up: see the module docstring

    dataset = prog.rsplit(" ", 1)[-1]
    parser = _parser(prog, COMMANDS["data"][dataset].summary)
    add_override_argument(parser)
    cfg = _config(parser, parser.parse_args(argv).overrides, {"data.dataset": dataset})
    root = prepare_dataset(cfg.data)
    for split in ("train", "val"):
        shards = open_split(root, split)
        print(f"{split}: {shards.num_samples} samples in {len(shards.shards)} shards")
    print(f"at {root}")
    return 0


def _parser(prog: str, description: str) -> argparse.ArgumentParser:
    return argparse.ArgumentParser(prog=prog, description=description)


def _config(
    parser: argparse.ArgumentParser, overrides: list[str], fixed: dict[str, str]
) -> ExperimentConfig:
    """The config after `overrides` and `fixed`; a bad value stops the command (exit 2)."""
    from cbtlab.config import ExperimentConfig  # start-up: see the module docstring

    try:
        return ExperimentConfig().with_overrides({**dict(map(parse_override, overrides)), **fixed})
    except ConfigError as exc:
        parser.error(str(exc))


if __name__ == "__main__":
    sys.exit(main())
