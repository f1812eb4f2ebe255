"""The study table: ranked by the metric at the study's budget in the study's direction, trials
not compared last; a trial's own last and best values shown beside, never ranked."""

from __future__ import annotations

from cbtlab.tables import format_table


def _row(trial: str, at_budget: float | None, best: float | None = None) -> dict:
    return {"trial": trial, "model.rep_grid": "2x2", "representatives": 4, "epochs": 3,
            "at_budget": at_budget, "final": best, "best": best, "seconds": 1.0,
            "status": "FINISHED", "stopped_early": trial == "c"}  # fmt: skip


def _order(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines()[2:]]


def test_ranked_at_the_budget_in_either_direction() -> None:
    rows = [_row("a", 0.5), _row("b", None), _row("c", 0.9), _row("d", 0.7)]
    assert _order(format_table(rows, ["model.rep_grid"], "val/top1", "max", 6)) == list("cdab")
    assert _order(format_table(rows, ["model.rep_grid"], "val/loss", "min", 6)) == list("adcb")
    table = format_table(rows, ["model.rep_grid"], "val/top1", budget=6)
    assert "STOPPED (ASHA)" in table.splitlines()[2]
    assert table.splitlines()[0].split()[:3] == ["trial", "model.rep_grid", "representatives"]
    assert "val/top1 @ epoch 6" in table.splitlines()[0]


def test_a_longer_trials_own_best_does_not_rank_it() -> None:
    """ASHA let `long` run 12 epochs (best 0.98) and stopped `short` at 6: at the budget both
    reached, `short` is ahead, and the table says so."""
    rows = [_row("long", 0.80, best=0.98), _row("short", 0.90, best=0.90)]
    assert _order(format_table(rows, ["model.rep_grid"], "val/top1", "max", 6)) == [
        "short",
        "long",
    ]
