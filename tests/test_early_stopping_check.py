"""The early-stopping check: the search it derives from a grid, its verdict and compute
fractions from stand-in rows and answers (no Ray), and its flags."""

from __future__ import annotations

import json
import math

import pytest
from mlflow.tracking import MlflowClient

from cbtlab.config import ConfigError
from cbtlab.tune.budget import study_answer
from cbtlab.tune.cli import early_stopping_check_main, early_stopping_check_parser
from cbtlab.tune.definitions import es_check_grid_spec
from cbtlab.tune.early_stopping import compare_studies, search_spec_for

KEY = "model.rep_grid"


def _grid(*argv: str):
    args = early_stopping_check_parser().parse_args(list(argv))
    return es_check_grid_spec(args).validate()


def _row(trial, cell, seed, values, status="FINISHED", seconds=10.0, stopped=False) -> dict:
    return {
        "trial": trial,
        KEY: cell,
        "train.seed": seed,
        "status": status,
        "epochs": len(values),
        "seconds": seconds,
        "stopped_early": stopped,
        "history": {epoch: v for epoch, v in enumerate(values, start=1)},
    }


def _grid_rows(failed: str | None = None) -> list[dict]:
    """4x4 best, 2x2 not distinguishable from it, 1x1 clearly below; 4 epochs, 3 seeds."""
    finals = {"4x4": [0.90, 0.92, 0.91], "2x2": [0.898, 0.918, 0.904], "1x1": [0.6, 0.61, 0.62]}
    rows = []
    for seed in range(3):
        for cell, values in finals.items():
            status = "FAILED" if cell == failed and seed == 2 else "FINISHED"
            history = [0.3, 0.5, 0.7, values[seed]][: 2 if status == "FAILED" else 4]
            rows.append(_row(f"g_{cell}_{seed}", cell, seed, history, status))
    return rows


def _answers(grid_rows, search_rows):
    grid = study_answer(grid_rows, [KEY], metric="val/top1", grid=True, test="t")
    search = study_answer(search_rows, [KEY], metric="val/top1", grid=False)
    return grid, search


def test_the_search_has_the_grids_cells_one_seed_and_tries_every_cell_first(
    tmp_path,
) -> None:
    grid = _grid("--preset", "smoke", "--storage-path", str(tmp_path), "--seed", "5")
    assert grid.grid and grid.seeds == 2 and grid.base.train.epochs == 3
    assert grid.base.model.depth == 1 and grid.base.model.embed_dim == 24
    assert [c[KEY] for c in grid.cells] == ["1x1", "2x2", "4x4"]
    search = search_spec_for(grid).validate()
    assert not search.grid and search.seeds == 1 and search.asha
    assert search.base.train.seed == 5 == grid.seed_values[0]
    assert search.space == {KEY: ["1x1", "2x2", "4x4"]}
    assert search.initial_points == grid.cells and search.num_samples == 3
    assert (search.grace_period, search.reduction_factor, search.max_concurrent) == (1, 2, 1)
    assert search.base.model == grid.base.model and search.name == "rep_count_ablation-search"
    more = search_spec_for(grid, num_samples=5, grace_period=2, search_seed=3)
    assert (more.num_samples, more.grace_period, more.search_seed) == (5, 2, 3)


def test_the_digits_preset_is_the_full_model_with_three_seeds_and_eight_epochs(tmp_path) -> None:
    grid = _grid("--storage-path", str(tmp_path))
    assert [c[KEY] for c in grid.cells] == ["1x1", "2x2", "4x4", "8x8"]
    assert (grid.seeds, grid.base.train.epochs, grid.base.model.depth) == (3, 8, 4)
    assert search_spec_for(grid).grace_period == 2
    variants = _grid("--study", "variants", "--epochs", "4", "--storage-path", str(tmp_path))
    assert len(variants.cells) == 6 and search_spec_for(variants).grace_period == 1


def test_a_search_cannot_match_a_grid_whose_cells_are_not_a_factorial(tmp_path) -> None:
    grid = _grid("--preset", "smoke", "--storage-path", str(tmp_path))
    grid.space = {KEY: ["1x1", "2x2"], "model.depth": [1, 2]}
    grid.cells = [{KEY: "1x1", "model.depth": 1}, {KEY: "2x2", "model.depth": 2}]
    with pytest.raises(ConfigError, match="full factorial"):
        search_spec_for(grid)
    with pytest.raises(ConfigError, match="--grace-period"):
        search_spec_for(_grid("--preset", "smoke", "--storage-path", str(tmp_path)), grace_period=4)


def test_ashas_pick_among_the_indistinguishable_cells_agrees() -> None:
    grid_rows = _grid_rows()
    search_rows = [
        _row("s1", "1x1", 0, [0.3, 0.4], stopped=True),
        _row("s2", "2x2", 0, [0.5, 0.7, 0.8, 0.898]),
        _row("s3", "4x4", 0, [0.4, 0.45], stopped=True),
    ]
    grid, search = _answers(grid_rows, search_rows)
    check = compare_studies(grid_rows, grid, search_rows, search)
    assert check.grid_best == "model.rep_grid=4x4"
    assert check.indistinguishable == ["model.rep_grid=4x4", "model.rep_grid=2x2"]
    assert check.pick == "model.rep_grid=2x2" and check.pick_source == "asha"
    assert check.pick_epoch == 4 and check.pick_value == pytest.approx(0.898)
    assert check.agree and check.search_stopped_early == 2
    assert (check.grid_epochs, check.search_epochs) == (36, 8)
    assert check.epochs_fraction == pytest.approx(8 / 36) and check.within_target
    assert check.seconds_fraction == pytest.approx(30 / 90) and check.claim_holds
    text = "\n".join(check.lines())
    assert "verdict: agree: ASHA's pick model.rep_grid=2x2 is not distinguishable" in text
    assert "8 of 36 trial epochs = 22% (target <= 40%: met)" in text
    assert check.grid_first_seed_epochs == 12 and check.first_seed_fraction == pytest.approx(8 / 12)
    assert "of the grid's first seed alone (12 epochs): 67%" in text
    assert "the claim (the right cell with at most 40% of the grid's epochs): holds" in text
    data = check.to_dict()
    assert data["agree"] is True and data["epochs_fraction"] == pytest.approx(8 / 36)
    json.dumps(data, allow_nan=False)


def test_a_pick_below_the_grids_best_disagrees_and_too_much_compute_misses_the_target() -> None:
    grid_rows = _grid_rows()
    search_rows = [  # every trial ran to the end: the search spent as much as the grid's seed
        _row("s1", "1x1", 0, [0.3, 0.5, 0.7, 0.95]),
        _row("s2", "2x2", 0, [0.5, 0.7, 0.8, 0.9]),
        _row("s3", "4x4", 0, [0.4, 0.45, 0.8, 0.91]),
        _row("s4", "1x1", 0, [0.3, 0.5, 0.7, 0.95]),
    ]
    grid, search = _answers(grid_rows, search_rows)
    check = compare_studies(grid_rows, grid, search_rows, search)
    assert check.pick == "model.rep_grid=1x1" and check.pick_source == "best at budget"
    assert not check.agree and check.pick_grid_p < 0.05
    assert check.epochs_fraction == pytest.approx(16 / 36) and not check.within_target
    text = "\n".join(check.lines())
    assert "disagree: ASHA's pick model.rep_grid=1x1 is below it (Holm p" in text
    assert "no trial ran further" in text and "(target <= 40%: not met)" in text
    assert "does not hold" in text


def test_no_pick_and_failed_trials_are_reported_and_their_epochs_count() -> None:
    grid_rows = _grid_rows(failed="2x2")
    search_rows = [_row("s1", "1x1", 0, [0.3], status="FAILED", seconds=3.0)]
    grid, search = _answers(grid_rows, search_rows)
    check = compare_studies(grid_rows, grid, search_rows, search)
    assert check.pick == "" and check.pick_source == "none" and not check.agree
    assert check.grid_epochs == 34 and check.search_epochs == 1  # the failed ones' epochs count
    assert check.grid_failed == ["g_2x2_2 model.rep_grid=2x2 (FAILED, 2 epochs)"]
    assert check.search_failed == ["s1 model.rep_grid=1x1 (FAILED, 1 epochs)"]
    text = "\n".join(check.lines())
    assert "no pick, no trial finished" in text and "disagree: the search has no pick" in text
    assert "grid: not compared" in text and "search: not compared" in text
    assert check.to_dict()["pick_grid_p"] is None


def test_no_grid_answer_is_undecided() -> None:
    grid_rows = [_row("g", "1x1", 0, [0.1], status="FAILED")]
    search_rows = [_row("s", "1x1", 0, [0.5, 0.6])]
    grid, search = _answers(grid_rows, search_rows)
    check = compare_studies(grid_rows, grid, search_rows, search)
    assert not check.agree and check.verdict.startswith("undecided")
    assert any("no answer" in line for line in check.lines())


@pytest.mark.parametrize(
    ("argv", "message"),
    [
        (["--study", "nope"], "--study"),
        (["--preset", "nope"], "--preset"),
        (["--seeds", "1"], "--seeds"),
        (["--grids", "9x9"], "exceeds"),
        (["--study", "variants", "--grids", "2x2"], "--grids"),
        (["--variants", "cbsa"], "--variants"),
        (["--grace-period", "9"], "--grace-period"),
        (["--num-samples", "0"], "--num-samples"),
        (["--target", "0"], "--target"),
        (["--resume"], "--resume"),
        (["--baseline", "model.rep_grid=1x1"], "--baseline"),
        (["--preset", "imagenet"], "--data-root"),
    ],
)
def test_bad_flags_exit_2_naming_the_flag(argv, message, capsys, tmp_path) -> None:
    with pytest.raises(SystemExit) as exit_info:
        early_stopping_check_main([*argv, "--storage-path", str(tmp_path)])
    assert exit_info.value.code == 2
    assert message in capsys.readouterr().err


def test_the_fractions_are_nan_without_grid_compute() -> None:
    grid, search = _answers([], [])
    check = compare_studies([], grid, [], search)
    assert math.isnan(check.epochs_fraction) and not check.within_target
    assert "n/a" in "\n".join(check.lines())


@pytest.mark.ray
def test_a_tiny_check_logs_its_run_beside_the_grid_and_the_search(
    ray_session: None, tmp_path, capsys
) -> None:
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    code = early_stopping_check_main(
        [
            "--preset", "smoke",
            "--grids", "1x1,4x4",
            "--epochs", "1",
            "--num-samples", "1",
            "--workers", "1",
            "--name", "tiny_check",
            "--tracking-uri", uri,
            "--storage-path", str(tmp_path / "ray"),
        ]
    )  # fmt: skip
    out = capsys.readouterr().out
    assert code == 0
    assert "early-stopping check (final val/top1):" in out and "verdict: " in out
    client = MlflowClient(uri)
    experiment = client.get_experiment_by_name("tiny_check")
    runs = client.search_runs([experiment.experiment_id], "tags.`cbtlab.role` = 'check'")
    assert len(runs) == 1
    check = runs[0]
    assert check.info.status == "FINISHED"
    params, metrics = check.data.params, check.data.metrics
    assert set(metrics) == {"check/agree", "check/epochs_fraction", "check/seconds_fraction"}
    assert metrics["check/epochs_fraction"] == pytest.approx(1 / 4)  # 1 search trial, 1 epoch
    artifacts = {a.path for a in client.list_artifacts(check.info.run_id)}
    assert {"check.txt", "check.json"} <= artifacts
    for param, name in (("check.grid_run", "rep_count_ablation-grid"),
                        ("check.search_run", "rep_count_ablation-search")):  # fmt: skip
        parent = client.get_run(params[param])
        assert parent.data.tags["cbtlab.check_run"] == check.info.run_id
        assert parent.data.tags["cbtlab.study"] == name
        assert parent.info.experiment_id == experiment.experiment_id


def test_a_pick_of_the_grids_best_cell_says_so() -> None:
    grid_rows = _grid_rows()
    search_rows = [_row("s1", "4x4", 0, [0.5, 0.7, 0.8, 0.9]), _row("s2", "1x1", 0, [0.2])]
    grid, search = _answers(grid_rows, search_rows)
    check = compare_studies(grid_rows, grid, search_rows, search)
    assert (
        check.agree and check.verdict == "agree: ASHA's pick model.rep_grid=4x4 is the grid's best"
    )
