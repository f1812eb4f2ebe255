"""The study table: best first in the study's direction, unfinished trials last."""

from __future__ import annotations

from cbtlab.tables import format_table


def _row(trial: str, best: float | None) -> dict:
    return {"trial": trial, "model.rep_grid": "2x2", "representatives": 4, "epochs": 3,
            "final": best, "best": best, "seconds": 1.0, "status": "FINISHED",
            "stopped_early": trial == "c"}  # fmt: skip


def _order(text: str) -> list[str]:
    return [line.split()[0] for line in text.splitlines()[2:]]


def test_best_first_in_either_direction() -> None:
    rows = [_row("a", 0.5), _row("b", None), _row("c", 0.9), _row("d", 0.7)]
    assert _order(format_table(rows, ["model.rep_grid"], "val/top1", "max")) == ["c", "d", "a", "b"]
    assert _order(format_table(rows, ["model.rep_grid"], "val/loss", "min")) == ["a", "d", "c", "b"]
    table = format_table(rows, ["model.rep_grid"], "val/top1")
    assert "STOPPED (ASHA)" in table.splitlines()[2]
    assert table.splitlines()[0].split()[:3] == ["trial", "model.rep_grid", "representatives"]
