"""The `cbtlab` command.

cbtlab study rep-count [flags]  the representative-count ablation (= studies/rep_count_ablation.py)
cbtlab data digits              build (or verify) the built-in digits shards; print where they are
cbtlab data shards --set data.root=PATH_OR_URL   read a prebuilt dataset's card; print its splits
cbtlab config [--set k=v ...]   print the default experiment config, flattened, after overrides
cbtlab where                    print where cbtlab keeps data, MLflow and Ray results
cbtlab study variants|step-init|scaling [flags]   the attention-variant / step-size / model-
                                 scaling studies (studies/*.py)
cbtlab study joint [flags]      the joint search: variant x representatives x pooling x step
                                 sizes, conditional (= studies/joint_search.py)
cbtlab study es-check [flags]   does ASHA find the grid's best cell, with how much compute?
                                 (= studies/early_stopping_check.py)
"""

from __future__ import annotations

import argparse
import sys
from collections.abc import Sequence

from cbtlab.overrides import ConfigError, add_override_argument, parse_override
from cbtlab.paths import cbtlab_home, data_home, default_tracking_uri, ray_results_home

# Every subcommand imports what it runs when it runs: `cbtlab --help` and `cbtlab where` load
# neither torch (config, data, train) nor Ray and MLflow (the studies).
STUDIES = {
    "rep-count": "cbtlab.tune.cli:rep_count_main",
    "variants": "cbtlab.tune.cli:variant_comparison_main",
    "step-init": "cbtlab.tune.cli:step_size_init_main",
    "scaling": "cbtlab.tune.cli:model_scaling_main",
    "joint": "cbtlab.tune.cli:joint_search_main",
    "es-check": "cbtlab.tune.cli:early_stopping_check_main",
}


def main(argv: Sequence[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    parser = argparse.ArgumentParser(prog="cbtlab", description=__doc__.split("\n\n")[0])
    commands = parser.add_subparsers(dest="command", required=True)
    study = commands.add_parser("study", help="run a study", add_help=False)
    study.add_argument("name", choices=sorted(STUDIES))
    commands.add_parser(
        "train", help="one training run (see `cbtlab train --help`)", add_help=False
    )
    data = commands.add_parser("data", help="build a built-in dataset's shards, or check a card")
    data.add_argument("dataset", choices=["digits", "shards"])
    add_override_argument(data)
    config = commands.add_parser("config", help="print the experiment config")
    add_override_argument(config)
    commands.add_parser("where", help="print where state is kept")

    args, rest = parser.parse_known_args(argv)
    if args.command == "train":
        from cbtlab.train.cli import train_main  # start-up: see above

        return train_main(rest, prog="cbtlab train")
    if args.command == "study":
        module, _, func = STUDIES[args.name].partition(":")
        study_main = getattr(__import__(module, fromlist=[func]), func)
        return study_main(rest, prog=f"cbtlab study {args.name}")
    if rest:
        parser.error(f"unrecognized arguments: {' '.join(rest)}")
    if args.command == "where":
        print(f"home          {cbtlab_home()}  (CBTLAB_HOME)")
        print(f"data cache    {data_home()}")
        print(f"MLflow store  {default_tracking_uri()}  (MLFLOW_TRACKING_URI)")
        print(f"Ray results   {ray_results_home()}")
        return 0
    from cbtlab.config import ExperimentConfig  # start-up: see above
    from cbtlab.data import open_split, prepare_dataset  # start-up: see above

    try:
        overrides = dict(map(parse_override, args.overrides))
        if args.command == "data":
            overrides["data.dataset"] = args.dataset
        cfg = ExperimentConfig().with_overrides(overrides)
    except ConfigError as exc:
        parser.error(str(exc))
    if args.command == "config":
        for key, value in cfg.flat().items():
            print(f"{key} = {value}")
        return 0
    root = prepare_dataset(cfg.data)
    for split in ("train", "val"):
        shards = open_split(root, split)
        print(f"{split}: {shards.num_samples} samples in {len(shards.shards)} shards")
    print(f"at {root}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
