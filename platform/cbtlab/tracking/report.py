"""Study summaries: the trial table, built live by the study or afterwards from MLflow.

A row is a dict with the keys `trial`, each searched config key, `representatives`, `epochs`,
`final` and `best` (of the study metric), `seconds`, `status` and `stopped_early`.
"""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

from mlflow.tracking import MlflowClient

from cbtlab.tables import render_table
from cbtlab.tracking.mlflow_tracker import PARENT_TAG


def format_table(
    rows: Sequence[dict[str, Any]], keys: Sequence[str], metric: str, mode: str = "max"
) -> str:
    """A plain-text table of the trials, best first (`mode`: is higher or lower better)."""
    headers = ["trial", *keys, "representatives", "epochs", f"final {metric}", f"best {metric}",
               "time (s)", "status"]  # fmt: skip
    sign = -1.0 if mode == "max" else 1.0
    ordered = sorted(
        rows, key=lambda r: (r["best"] is None, sign * r["best"] if r["best"] is not None else 0)
    )
    body = [
        [
            r["trial"],
            *(str(r[key]) for key in keys),
            str(r["representatives"]),
            str(r["epochs"]),
            "-" if r["final"] is None else f"{r['final']:.4f}",
            "-" if r["best"] is None else f"{r['best']:.4f}",
            "-" if r["seconds"] is None else f"{r['seconds']:.1f}",
            "STOPPED (ASHA)" if r["stopped_early"] else r["status"],
        ]
        for r in ordered
    ]
    return render_table(headers, body)


def study_from_mlflow(
    tracking_uri: str, experiment_name: str, parent_run_id: str | None = None
) -> tuple[Any, list[str], str, str, list[dict[str, Any]]]:
    """(parent run, searched keys, metric, mode, trial rows) of a logged study; the latest
    study run of the experiment unless `parent_run_id` is given."""
    client = MlflowClient(tracking_uri)
    experiment = client.get_experiment_by_name(experiment_name)
    if experiment is None:
        raise LookupError(f"no MLflow experiment {experiment_name!r} at {tracking_uri}")
    if parent_run_id is None:
        parents = client.search_runs(
            [experiment.experiment_id],
            filter_string="tags.`cbtlab.role` = 'study'",
            order_by=["attributes.start_time DESC"],
            max_results=1,
        )
        if not parents:
            raise LookupError(f"experiment {experiment_name!r} holds no study run")
        parent = parents[0]
    else:
        parent = client.get_run(parent_run_id)
    keys = list(json.loads(parent.data.params["study.space"]))
    metric, _, mode = parent.data.params["study.metric"].rpartition(":")
    children = client.search_runs(
        [experiment.experiment_id],
        filter_string=f"tags.`{PARENT_TAG}` = '{parent.info.run_id}'",
        max_results=10_000,
    )
    rows = []
    for run in children:
        params, metrics, tags = run.data.params, run.data.metrics, run.data.tags
        rows.append(
            {
                "trial": run.info.run_name,
                **{key: params.get(key) for key in keys},
                "representatives": params.get("model.num_representatives"),
                "epochs": tags.get("cbtlab.epochs_completed", "-"),
                "final": metrics.get(metric),
                "best": metrics.get(f"best/{metric}"),
                "seconds": metrics.get("time/trial_s"),
                "status": run.info.status,
                "stopped_early": tags.get("cbtlab.stopped_early") == "true",
            }
        )
    return parent, keys, metric, mode, rows
