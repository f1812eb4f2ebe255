"""Equal budgets: the epoch a study compares at, the value there, and the answer it gives."""

from __future__ import annotations

import math

import pytest

from cbtlab.tune.budget import common_budget, study_answer, value_at


def _row(trial: str, cell: str, seed: int, values: list[float], status: str = "FINISHED") -> dict:
    return {
        "trial": trial,
        "model.rep_grid": cell,
        "train.seed": seed,
        "status": status,
        "history": {epoch: v for epoch, v in enumerate(values, start=1)},
    }


def test_the_budget_is_the_last_epoch_every_finished_trial_reached() -> None:
    rows = [
        _row("a", "1x1", 0, [0.1, 0.2, 0.3, 0.4]),
        _row("b", "2x2", 0, [0.2, 0.3]),  # stopped by ASHA at its rung
        _row("c", "4x4", 0, [0.9], status="FAILED"),  # left out
        _row("d", "8x8", 0, [], status="FINISHED"),  # no epoch: left out
    ]
    assert common_budget(rows) == 2
    assert common_budget([rows[2]]) is None


def test_value_at_takes_the_epoch_or_the_best_up_to_it() -> None:
    history = {1: 0.5, 2: 0.9, 3: 0.7, 4: 0.95}
    assert value_at(history, 3, "final", "max") == 0.7
    assert value_at(history, 3, "best", "max") == 0.9
    assert value_at(history, 3, "best", "min") == 0.5
    assert value_at(history, 5, "final", "max") is None


def test_a_search_answers_at_the_budget_and_names_ashas_pick() -> None:
    rows = [
        _row("t1", "1x1", 0, [0.5, 0.6, 0.8, 0.98]),  # ran on: the 4-epoch value is not ranked
        _row("t2", "2x2", 0, [0.5, 0.7]),
        _row("t3", "4x4", 0, [0.4, 0.65, 0.7, 0.9]),
        _row("t4", "8x8", 0, [0.3], status="FAILED"),
    ]
    answer = study_answer(rows, ["model.rep_grid"], metric="val/top1", grid=False)
    assert answer.budget == 2 and answer.compared == 3
    assert answer.best_row["trial"] == "t2"  # 0.7 at epoch 2 beats t1's 0.6 and t3's 0.65
    assert answer.pick_row["trial"] == "t1" and answer.pick_epoch == 4
    assert answer.pick_reached == 2
    assert [r["at_budget"] for r in rows] == [0.6, 0.7, 0.65, None]
    text = "\n".join(answer.lines())
    assert "best at epoch 2" in text and "t2 model.rep_grid=2x2 0.7000" in text
    assert "ASHA's pick: t1 model.rep_grid=1x1 0.9800 at epoch 4" in text
    assert "left out of the comparison: t4 (FAILED)" in text


def test_a_grid_answers_with_intervals_and_tests_against_its_best_cell() -> None:
    good = {0: 0.90, 1: 0.92, 2: 0.91}
    rows = []
    for seed, value in good.items():
        rows.append(_row(f"a{seed}", "4x4", seed, [0.5, value]))
        rows.append(_row(f"b{seed}", "2x2", seed, [0.5, value - 0.002 * (seed + 1)]))
        rows.append(_row(f"c{seed}", "1x1", seed, [0.5, value - 0.3 - 0.001 * seed]))
    answer = study_answer(rows, ["model.rep_grid"], metric="val/top1", grid=True, test="t")
    assert answer.budget == 2 and answer.seeds == [0, 1, 2]
    labels = [c.label for c in answer.cells]
    assert labels == ["model.rep_grid=4x4", "model.rep_grid=2x2", "model.rep_grid=1x1"]
    best = answer.cells[0]
    assert best.mean == pytest.approx(0.91) and best.ci_low < 0.91 < best.ci_high
    assert math.isnan(best.p_holm)
    assert answer.cells[2].p_holm < 0.05  # 0.3 below on every seed
    assert answer.indistinguishable[0] == "model.rep_grid=4x4"
    assert "model.rep_grid=1x1" not in answer.indistinguishable
    text = "\n".join(answer.lines())
    assert "best at epoch 2" in text and "model.rep_grid=4x4 0.9100 ±" in text
    assert "over seeds [0, 1, 2]" in text and "below it" in text


def test_a_grid_with_one_seed_says_it_has_no_interval() -> None:
    rows = [_row("a", "1x1", 0, [0.5, 0.9]), _row("b", "2x2", 0, [0.6, 0.8])]
    answer = study_answer(rows, ["model.rep_grid"], metric="val/top1", grid=True)
    assert answer.best_label == "model.rep_grid=1x1"
    assert any("one seed: no interval" in line for line in answer.lines())


def test_no_finished_trial_gives_no_answer() -> None:
    rows = [_row("a", "1x1", 0, [0.5], status="FAILED")]
    answer = study_answer(rows, ["model.rep_grid"], metric="val/top1", grid=True)
    assert answer.budget is None and answer.best_value is None
    assert answer.lines()[0] == "no answer: no trial finished"
