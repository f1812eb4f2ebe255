"""Grid studies with repeated seeds: the trials they queue, their resources, their statistics
(no Ray), and one tiny grid study end to end on local Ray."""

from __future__ import annotations

import math
from pathlib import Path

import pyarrow.parquet as pq
import pytest
from mlflow.tracking import MlflowClient

from cbtlab.config import ConfigError, ExperimentConfig
from cbtlab.tune.cli import (
    rep_count_main,
    rep_count_parser,
    step_size_init_parser,
    variant_comparison_parser,
)
from cbtlab.tune.definitions import (
    parse_cell,
    parse_step_cells,
    rep_count_spec,
    step_init_spec,
    variant_spec,
)
from cbtlab.tune.resources import plan_resources
from cbtlab.tune.runner import study_statistics
from cbtlab.tune.spec import StudySpec, grid_trials
from cbtlab.tune.stats import COLUMN_ORDER
from conftest import FinishedStudy


def rep_count(*argv: str) -> StudySpec:
    return rep_count_spec(rep_count_parser().parse_args(list(argv))).validate()


def test_seeds_make_a_grid_of_cells_times_seeds_paired_across_cells() -> None:
    spec = rep_count("--seeds", "3", "--seed", "10", "--grids", "2x2,4x4,8x8")
    assert spec.grid and spec.seed_values == [10, 11, 12]
    trials = grid_trials(spec)
    assert len(trials) == 3 * 3
    # Seed-major: every cell with seed 10, then every cell with 11, ...
    assert trials[:3] == [{"model.rep_grid": g, "train.seed": 10} for g in ("2x2", "4x4", "8x8")]
    seeds_per_cell: dict[str, list[int]] = {}
    for trial in trials:
        seeds_per_cell.setdefault(trial["model.rep_grid"], []).append(trial["train.seed"])
    assert seeds_per_cell == {g: [10, 11, 12] for g in ("2x2", "4x4", "8x8")}
    assert spec.trial_keys == ["model.rep_grid", "train.seed"]


def test_grid_without_seeds_and_the_full_factorial_of_two_factors() -> None:
    spec = rep_count("--grid", "--seeds", "1", "--grids", "2x2,4x4")
    assert spec.grid and spec.seeds == 1
    assert grid_trials(spec) == [
        {"model.rep_grid": "2x2", "train.seed": 0},
        {"model.rep_grid": "4x4", "train.seed": 0},
    ]
    two = StudySpec(
        name="two",
        base=ExperimentConfig(),
        space={"model.rep_grid": [(2, 2), "4x4"], "model.depth": [1, 2]},
        seeds=2,
    ).validate()
    trials = grid_trials(two)
    assert len(trials) == 2 * 2 * 2
    # Cells are normalised to the flat config's spelling ((2, 2) -> '2x2').
    assert trials[:4] == [
        {"model.rep_grid": "2x2", "model.depth": 1, "train.seed": 0},
        {"model.rep_grid": "2x2", "model.depth": 2, "train.seed": 0},
        {"model.rep_grid": "4x4", "model.depth": 1, "train.seed": 0},
        {"model.rep_grid": "4x4", "model.depth": 2, "train.seed": 0},
    ]


def test_default_rep_count_study_is_a_grid_at_one_budget_and_search_is_a_flag() -> None:
    spec = rep_count()
    assert spec.grid and spec.seeds == 3 and spec.base.train.epochs == 8
    assert [c["model.rep_grid"] for c in spec.cells] == ["1x1", "2x2", "4x4", "8x8"]
    assert len(grid_trials(spec)) == 12
    assert rep_count("--epochs", "5").base.train.epochs == 5
    for flags in (["--search"], ["--num-samples", "6"]):
        search = rep_count(*flags)
        assert not search.grid and search.asha and search.num_samples == 6 and search.seeds == 1
        assert search.base.train.epochs == 12  # the config's recipe
        assert [p["model.rep_grid"] for p in search.initial_points] == [
            "1x1", "2x2", "4x2", "4x4", "8x4", "8x8"
        ]  # fmt: skip
        assert search.max_concurrent is None
        plan = plan_resources(search, {"CPU": 64.0})  # as many at once as fit, as a grid
        assert plan.max_concurrent == plan.fits > 1
    with pytest.raises(ConfigError, match="--seeds: a search runs one seed per trial"):
        rep_count("--search", "--seeds", "2")


def test_grid_flags_that_do_not_fit_are_refused() -> None:
    with pytest.raises(ConfigError, match="--num-samples"):
        rep_count("--grid", "--num-samples", "4")
    with pytest.raises(ConfigError, match="3x3 is not a cell of the grid"):
        rep_count("--seeds", "2", "--grids", "2x2,4x4", "--baseline", "model.rep_grid=3x3")
    with pytest.raises(ConfigError, match=r"study\.seeds: must be >= 1"):
        rep_count("--seeds", "0")
    with pytest.raises(ConfigError, match=r"use study\.seeds"):
        StudySpec("s", ExperimentConfig(), {"train.seed": [0, 1]}, grid=True).validate()


def test_baseline_flag_is_normalised_and_may_hold_commas() -> None:
    spec = rep_count("--seeds", "2", "--grids", "2x2,4x4", "--baseline", "model.rep_grid=4")
    assert spec.baseline == {"model.rep_grid": "4x4"}
    assert parse_cell("model.attention=mssa,cbsa,model.depth=2") == {
        "model.attention": "mssa,cbsa",
        "model.depth": 2,
    }
    spec = variant_spec(
        variant_comparison_parser().parse_args(
            ["--variants", "cbsa", "mssa,cbsa", "--baseline", "model.attention=mssa,cbsa"]
        )
    ).validate()
    assert spec.baseline == {"model.attention": "mssa,cbsa"}


def test_variant_and_step_studies_expand_their_cells() -> None:
    variants = variant_spec(variant_comparison_parser().parse_args([])).validate()
    assert variants.grid and variants.seeds == 3
    assert variants.space == {
        "model.attention": ["cbsa", "mssa", "tssa", "agent", "linear", "softmax"]
    }
    assert len(grid_trials(variants)) == 6 * 3

    steps = step_init_spec(step_size_init_parser().parse_args([])).validate()
    trials = grid_trials(steps)
    assert len(trials) == 7 * 3
    cells = [{k: v for k, v in t.items() if k != "train.seed"} for t in trials[:7]]
    assert cells[0] == {"model.step_init": "normal", "model.step_scale": 1.0}
    assert {"model.step_init": "constant", "model.step_scale": -1.0} in cells
    assert {"model.step_init": "zero", "model.step_scale": 0.0} in cells
    assert not any(c["model.step_init"] == "zero" and c["model.step_scale"] for c in cells)
    # A negative scale is a standard deviation under normal: the config refuses the cell.
    args = step_size_init_parser().parse_args(["--cells", "normal:1,normal:-1"])
    with pytest.raises(ConfigError, match=r"model\.step_scale: must be >= 0"):
        step_init_spec(args).validate()
    with pytest.raises(ConfigError, match="takes no scale"):
        parse_step_cells("zero:1")


def test_resources_follow_the_cluster_unless_flags_say_otherwise() -> None:
    grid = rep_count("--seeds", "2", "--grids", "2x2,4x4")  # 2 workers x 0.5 CPU + 0.1
    plan = plan_resources(grid, {"CPU": 2.0})
    assert (plan.max_concurrent, plan.trial_cpus, plan.trial_gpus) == (1, 1.1, 0)
    assert plan_resources(grid, {"CPU": 8.0}).max_concurrent == 7
    gpu = plan_resources(grid, {"CPU": 16.0, "GPU": 4.0})
    assert gpu.base.train.use_gpu is True and gpu.trial_gpus == 2 and gpu.max_concurrent == 2
    assert plan.base.train.use_gpu is False  # "auto" on a cluster without GPUs
    cpu = rep_count("--seeds", "2", "--grids", "2x2", "--gpus-per-worker", "0")
    assert plan_resources(cpu, {"CPU": 16.0, "GPU": 4.0}).base.train.use_gpu is False
    wide = rep_count("--seeds", "2", "--grids", "2x2", "--workers", "4", "--max-concurrent", "3")
    plan = plan_resources(wide, {"CPU": 16.0, "GPU": 8.0})
    assert plan.base.train.num_workers == 4 and plan.max_concurrent == 3 and plan.fits == 2
    big = plan_resources(rep_count("--seeds", "2", "--workers", "4"), {"CPU": 2.0})
    assert big.fits == 0 and big.max_concurrent == 1 and "waits for resources" in big.summary


def test_imagenet_preset_builds_the_recipe_and_names_what_is_missing(
    capsys: pytest.CaptureFixture[str],
) -> None:
    spec = rep_count("--preset", "imagenet", "--data-root", "/data/imagenet-wds")
    cfg = ExperimentConfig.from_dict(spec.base.to_dict())  # valid as a whole
    assert cfg.train.optimizer == "lion" and cfg.train.lr == 2e-4
    assert (cfg.data.dataset, cfg.data.root) == ("shards", "/data/imagenet-wds")
    assert (cfg.model.num_classes, cfg.model.img_size, cfg.data.batch_size) == (1000, 224, 256)
    with pytest.raises(SystemExit) as exit_info:
        rep_count_main(["--preset", "imagenet"])
    assert exit_info.value.code == 2
    err = capsys.readouterr().err
    assert "--preset: imagenet" in err
    missing = err.split("is missing")[1]
    assert "--data-root" in missing and "'lion'" not in missing


def row(grid: str, seed: int, final: float | None, status: str = "FINISHED") -> dict:
    history = {1: 0.5, 2: 0.6, 3: final} if final is not None else {1: 0.1}
    return {"model.rep_grid": grid, "train.seed": seed, "final": final, "best": final,
            "status": status, "stopped_early": False, "history": history}  # fmt: skip


def test_statistics_of_the_trial_rows_follow_the_grid() -> None:
    spec = rep_count("--seeds", "3", "--grids", "2x2,4x4", "--baseline", "model.rep_grid=4x4")
    rows = [  # finished out of order; one trial failed
        row("4x4", 1, 0.91), row("2x2", 0, 0.93), row("4x4", 0, 0.90), row("2x2", 1, 0.95),
        row("4x4", 2, 0.92), row("2x2", 2, None, "FAILED"),
    ]  # fmt: skip
    table = study_statistics(rows, spec)
    assert table.column("model.rep_grid").to_pylist() == ["2x2", "4x4"]
    got = {r["model.rep_grid"]: r for r in table.to_pylist()}
    assert got["4x4"]["is_baseline"] and got["4x4"]["n"] == 3
    assert got["2x2"]["n"] == 2 and got["2x2"]["n_failed"] == 1 and got["2x2"]["n_pairs"] == 2
    assert got["2x2"]["diff_mean"] == pytest.approx(0.035)  # (0.03 + 0.04) / 2
    assert table.schema.metadata[b"metric"] == b"final val/top1 at epoch 3"
    # A trial that ran further is compared at the epoch every trial reached, not its last.
    longer = [dict(r) for r in rows]
    longer[1]["history"] = {**longer[1]["history"], 4: 0.99}
    again = {r["model.rep_grid"]: r for r in study_statistics(longer, spec).to_pylist()}
    assert again["2x2"]["diff_mean"] == pytest.approx(0.035)
    with pytest.raises(LookupError, match="baseline"):
        study_statistics([r for r in rows if r["model.rep_grid"] == "2x2"], spec)


@pytest.mark.ray
def test_tiny_grid_study_with_two_seeds_logs_its_statistics(
    tiny_variant_study: FinishedStudy, tmp_path: Path
) -> None:
    uri, out, code = tiny_variant_study.uri, tiny_variant_study.out, tiny_variant_study.code
    assert code == 0
    assert "statistics over seeds [0, 1, 2]" in out and "(baseline)" in out

    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny_grid")
    runs = client.search_runs([experiment.experiment_id])
    # The study's parent and its trials (the report test, sharing this study, nests a probe
    # run under one trial).
    (parent,) = [r for r in runs if "mlflow.parentRunId" not in r.data.tags]
    children = [r for r in runs if r.data.tags.get("mlflow.parentRunId") == parent.info.run_id]
    assert parent.info.status == "FINISHED" and len(children) == 6
    assert parent.data.params["study.searcher"] == "grid"
    assert parent.data.params["study.seeds"] == "3"
    assert parent.data.params["study.scheduler"] == "fifo"
    assert parent.data.params["study.baseline"] == "model.attention=cbsa"
    finals: dict[tuple[str, int], float] = {}
    for child in children:
        assert child.info.status == "FINISHED"
        attention, seed = child.data.params["model.attention"], int(child.data.params["train.seed"])
        assert child.data.tags["cbtlab.cell"] == f"model.attention={attention}"
        assert child.data.tags["cbtlab.seed"] == str(seed)
        finals[attention, seed] = child.data.metrics["val/top1"]
    assert set(finals) == {(a, s) for a in ("cbsa", "softmax") for s in (0, 1, 2)}

    artifacts = {a.path for a in client.list_artifacts(parent.info.run_id)}
    assert {"stats.parquet", "stats.txt", "summary.txt", "cells.json"} <= artifacts
    path = client.download_artifacts(parent.info.run_id, "stats.parquet", str(tmp_path / "dl"))
    table = pq.read_table(path)
    assert table.column_names == ["cell", "model.attention", *COLUMN_ORDER[1:]]
    rows = {r["model.attention"]: r for r in table.to_pylist()}
    assert set(rows) == {"cbsa", "softmax"} and rows["cbsa"]["is_baseline"]
    for attention, r in rows.items():
        values = [finals[attention, s] for s in (0, 1, 2)]
        assert r["n"] == 3 and r["seeds"] == [0, 1, 2]
        assert r["mean"] == pytest.approx(sum(values) / 3)
        assert r["ci_low"] <= r["mean"] <= r["ci_high"]  # a 95% interval (zero-wide if equal)
    softmax = rows["softmax"]
    assert softmax["n_pairs"] == 3 and softmax["test"] == "t"
    diffs = [finals["softmax", s] - finals["cbsa", s] for s in (0, 1, 2)]
    assert softmax["diff_mean"] == pytest.approx(sum(diffs) / 3)
    if len(set(diffs)) > 1:  # a constant difference has no t-test (NaN, with a note)
        assert 0 <= softmax["p_value"] <= softmax["p_holm"] <= 1
    assert math.isnan(rows["cbsa"]["p_value"])
    assert len(list(tiny_variant_study.storage.glob("tiny_grid-*/stats.parquet"))) == 1
