"""`cbtlab study table`: a study's trial table from MLflow, ranked at the study's budget (the
epoch every finished trial reached), printed and optionally saved as CSV."""

from __future__ import annotations

import argparse
import csv
import json
import sys
from collections.abc import Sequence
from pathlib import Path

from cbtlab.paths import default_tracking_uri
from cbtlab.tables import format_table
from cbtlab.tracking.schema import parse_value_kind, study_from_mlflow
from cbtlab.tune.budget import common_budget, with_budget_values


def table_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog, description="Print (and optionally save) the trial table of a study in MLflow."
    )
    parser.add_argument("--experiment", default="rep_count_ablation", help="the study's name")
    parser.add_argument(
        "--parent", default=None, help="the study's parent run id (default: latest)"
    )
    parser.add_argument("--tracking-uri", default=None, help="MLflow store")
    parser.add_argument("--csv", type=Path, default=None, help="also write the rows as CSV")
    args = parser.parse_args(argv)
    try:
        parent, keys, metric, mode, rows = study_from_mlflow(
            args.tracking_uri or default_tracking_uri(), args.experiment, args.parent
        )
    except LookupError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 1
    print(f"study {args.experiment!r}, parent run {parent.info.run_id} ({parent.info.status})")
    # Ranked at the study's budget (the epoch every finished trial reached), on the value its
    # statistics use.
    kind = parse_value_kind(parent.data.params)
    budget = common_budget(rows)
    with_budget_values(rows, budget, kind, mode)
    print(format_table(rows, keys, metric, mode, budget=budget))
    for row in rows:  # one CSV cell: the per-epoch history as JSON
        row["history"] = json.dumps(row["history"])
    if args.csv is not None:
        with args.csv.open("w", newline="") as handle:
            writer = csv.DictWriter(handle, fieldnames=list(rows[0]) if rows else ["trial"])
            writer.writeheader()
            writer.writerows(rows)
    return 0
