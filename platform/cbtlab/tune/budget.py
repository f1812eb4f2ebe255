"""Equal budgets: at which epoch a study compares its trials, and the answer it gives there.

A trial's budget is the epochs it trained. A study compares trials only at an epoch every
compared trial reached (`common_budget`): the largest epoch that every *finished* trial ran
(finished to the end, or stopped early by ASHA, whose first rung every trial reaches). Failed,
killed and still-running trials are left out of the comparison and named. A trial's value at
that epoch (`value_at`) is its metric there (`final`) or its best over the epochs up to it
(`best`). Its last value, at whatever epoch it stopped, is shown beside it, never ranked.

`study_answer` is what a study concludes from its trials at that budget:
- a grid: each cell's mean over its seeds with a 95% t-interval, the best cell, and which
  cells are distinguishable from it (a paired test against it over the seeds, Holm-corrected
  over the cells, `cbtlab.tune.stats.compare_cells`);
- a search: the best trial at the budget and, when ASHA let some trials run further, ASHA's
  pick: the best of the trials that ran the most epochs, compared at that epoch.

Pure Python (numpy and scipy through the statistics): the dashboards and tests import it.
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cbtlab.tune.stats import Observation, cell_label, compare_cells

# A comparison's level: a cell is told apart from the best one below this Holm-corrected p.
ALPHA = 0.05
# The trial statuses compared (a finished trial, to its end or stopped by ASHA).
COMPARED = "FINISHED"


def history_of(row: Mapping[str, Any]) -> dict[int, float]:
    """A summary row's per-epoch history of the study metric, {epoch: value} (a row read back
    from JSON has its epochs as strings)."""
    return {int(epoch): float(value) for epoch, value in (row.get("history") or {}).items()}


def is_compared(row: Mapping[str, Any]) -> bool:
    """Whether a trial takes part in the comparison: finished, with at least one epoch."""
    return row["status"] == COMPARED and bool(row.get("history"))


def common_budget(rows: Sequence[Mapping[str, Any]]) -> int | None:
    """The largest epoch every compared trial reached; None when no trial is compared."""
    reached = [max(history_of(row)) for row in rows if is_compared(row)]
    return min(reached) if reached else None


def value_at(history: Mapping[int, float], epoch: int, kind: str, mode: str) -> float | None:
    """A trial's value at `epoch`: its metric there (`final`), or its best over the epochs up
    to it (`best`, in the study's `mode`); None when it did not reach `epoch`."""
    if epoch not in history:
        return None
    if kind == "final":
        return history[epoch]
    upto = [value for e, value in history.items() if e <= epoch]
    return max(upto) if mode == "max" else min(upto)


def with_budget_values(
    rows: Sequence[dict[str, Any]], budget: int | None, kind: str, mode: str
) -> list[dict[str, Any]]:
    """`rows` with `at_budget`: each compared trial's value at `budget` (None for the others)."""
    for row in rows:
        fits = budget is not None and is_compared(row)
        row["at_budget"] = value_at(history_of(row), budget, kind, mode) if fits else None
    return list(rows)


@dataclass
class CellResult:
    """A grid cell at the budget: its mean over seeds, the interval, and its test against the
    best cell (p_holm NaN for the best cell itself, or where no test is possible)."""

    label: str
    n: int
    mean: float
    ci_low: float
    ci_high: float
    p_holm: float = math.nan

    @property
    def interval(self) -> str:
        if math.isnan(self.ci_low):
            return f"{self.mean:.4f}"
        return f"{self.mean:.4f} ± {(self.ci_high - self.ci_low) / 2:.4f}"


@dataclass
class Answer:
    """What a study concludes at its budget (see the module docstring); `lines()` words it."""

    metric: str
    mode: str
    kind: str  # "final" or "best": the value taken at the budget
    grid: bool
    budget: int | None
    compared: int
    left_out: list[str] = field(default_factory=list)  # "trial (STATUS)" of trials not compared
    # A grid: its cells, best first, and the seeds.
    cells: list[CellResult] = field(default_factory=list)
    seeds: list[int] = field(default_factory=list)
    test: str = ""
    # A search: the best trial at the budget; ASHA's pick (None: no trial ran further).
    best_row: dict[str, Any] | None = None
    pick_row: dict[str, Any] | None = None
    pick_epoch: int | None = None
    pick_reached: int = 0

    @property
    def best_label(self) -> str:
        """The answer's cell (a grid's best cell, a search's ASHA pick or best trial)."""
        if self.grid:
            return self.cells[0].label if self.cells else ""
        row = self.pick_row or self.best_row
        return row["cell"] if row else ""

    @property
    def best_value(self) -> float | None:
        """The best cell's mean (a grid) or the best trial's value at the budget (a search)."""
        if self.grid:
            return self.cells[0].mean if self.cells else None
        return self.best_row["at_budget"] if self.best_row else None

    @property
    def indistinguishable(self) -> list[str]:
        """The grid's cells the test could not tell apart from the best one (the best included)."""
        if not self.cells:
            return []
        return [self.cells[0].label] + [c.label for c in self.cells[1:] if not (c.p_holm < ALPHA)]

    def lines(self) -> list[str]:
        """The answer in words: the budget it was taken at, the best, how sure."""
        if self.budget is None:
            return ["no answer: no trial finished", *self._left_out_lines()]
        what = f"{self.kind} {self.metric}"
        lines = self._grid_lines(what) if self.grid else self._search_lines(what)
        return lines + self._left_out_lines()

    def _grid_lines(self, what: str) -> list[str]:
        best = self.cells[0]
        seeds = f"seeds {self.seeds}"
        lines = [
            f"best at epoch {self.budget}, the budget every compared trial reached "
            f"({self.compared} trials, {len(self.cells)} cells x {len(self.seeds)} seeds; "
            f"{what}): {best.label} {best.interval}"
            + (f" (mean ± 95% CI over {seeds})" if not math.isnan(best.ci_low) else "")
        ]
        if len(self.seeds) < 2:
            lines.append(
                "one seed: no interval and no test, this ranking may be noise "
                "(--seeds 3 or more gives both)"
            )
            return lines
        same = [c for c in self.cells[1:] if not (c.p_holm < ALPHA)]
        worse = [c for c in self.cells[1:] if c.p_holm < ALPHA]
        if same:
            lines.append(
                f"  not distinguishable from it (paired {self.test}, Holm p >= {ALPHA}): "
                + "; ".join(f"{c.label} {c.interval}" for c in same)
            )
        if worse:
            lines.append(
                f"  below it (paired {self.test}, Holm p < {ALPHA}): "
                + "; ".join(f"{c.label} {c.interval} (p {c.p_holm:.3g})" for c in worse)
            )
        return lines

    def _search_lines(self, what: str) -> list[str]:
        best = self.best_row or {}
        lines = [
            f"best at epoch {self.budget}, the budget every compared trial reached "
            f"({self.compared} trials; {what}): {best['trial']} {best['cell']} "
            f"{best['at_budget']:.4f}"
        ]
        if self.pick_row is not None:
            lines.append(
                f"ASHA's pick: {self.pick_row['trial']} {self.pick_row['cell']} "
                f"{self.pick_row['at_pick']:.4f} at epoch {self.pick_epoch}, the most epochs "
                f"any trial ran ({self.pick_reached} of {self.compared} trials ran them)"
            )
        lines.append("one seed per trial: no interval (a grid with --seeds N gives one)")
        return lines

    def _left_out_lines(self) -> list[str]:
        if not self.left_out:
            return []
        return ["left out of the comparison: " + ", ".join(self.left_out)]

    def to_dict(self) -> dict[str, Any]:
        """The answer as plain JSON values (answer.json on the parent run)."""
        return {
            "metric": self.metric,
            "mode": self.mode,
            "kind": self.kind,
            "grid": self.grid,
            "budget_epoch": self.budget,
            "compared": self.compared,
            "left_out": self.left_out,
            "best": self.best_label,
            "best_value": self.best_value,
            "cells": [vars(c) for c in self.cells],
            "indistinguishable": self.indistinguishable,
            "seeds": self.seeds,
            "test": self.test,
            "best_trial": (self.best_row or {}).get("trial"),
            "asha_pick": (self.pick_row or {}).get("trial"),
            "asha_pick_cell": (self.pick_row or {}).get("cell"),
            "asha_pick_epoch": self.pick_epoch,
            "asha_pick_value": (self.pick_row or {}).get("at_pick"),
        }


def cell_of(row: Mapping[str, Any], factors: Sequence[str]) -> dict[str, Any]:
    return {key: row[key] for key in factors}


def study_answer(
    rows: Sequence[dict[str, Any]],
    factors: Sequence[str],
    *,
    metric: str,
    mode: str = "max",
    kind: str = "final",
    grid: bool,
    test: str = "auto",
) -> Answer:
    """The answer of a study's summary rows (each with `trial`, the `factors`, `train.seed`,
    `status` and `history`): the budget, and at it the best cell (a grid, with intervals and
    tests over seeds) or the best trial and ASHA's pick (a search). Sets each row's `cell` and
    `at_budget`."""
    budget = common_budget(rows)
    with_budget_values(rows, budget, kind, mode)
    for row in rows:
        row["cell"] = cell_label(cell_of(row, factors))
    compared = [row for row in rows if row["at_budget"] is not None]
    answer = Answer(
        metric,
        mode,
        kind,
        grid,
        budget,
        len(compared),
        left_out=[f"{r['trial']} ({r['status']})" for r in rows if not is_compared(r)],
    )
    if not compared:
        return answer
    if grid:
        _answer_grid(answer, rows, compared, factors, test)
    else:
        _answer_search(answer, compared)
    return answer


def _answer_grid(
    answer: Answer,
    rows: Sequence[dict[str, Any]],
    compared: Sequence[dict[str, Any]],
    factors: Sequence[str],
    test: str,
) -> None:
    """The cells at the budget, best first, each tested against the best one."""
    observations = [
        Observation(cell_of(r, factors), int(r["train.seed"]), r["at_budget"]) for r in rows
    ]
    means = compare_cells(observations, test=test).to_pylist()
    ranked = [m for m in means if m["n"] > 0]
    ranked.sort(key=lambda m: -m["mean"] if answer.mode == "max" else m["mean"])
    best = ranked[0]
    best_cell = {f: best[f] for f in factors}
    against_best = {
        m["cell"]: m for m in compare_cells(observations, baseline=best_cell, test=test).to_pylist()
    }
    answer.cells = [
        CellResult(
            m["cell"],
            m["n"],
            m["mean"],
            m["ci_low"],
            m["ci_high"],
            against_best[m["cell"]]["p_holm"],
        )
        for m in ranked
    ]
    answer.seeds = sorted({int(r["train.seed"]) for r in compared})
    tests = {m["test"] for m in against_best.values() if m["test"]}
    answer.test = "/".join(sorted(tests)) or "test"


def _answer_search(answer: Answer, compared: Sequence[dict[str, Any]]) -> None:
    """The best trial at the budget, and ASHA's pick where some trials ran further."""
    pick = max if answer.mode == "max" else min
    answer.best_row = pick(compared, key=lambda r: r["at_budget"])
    top = max(max(history_of(r)) for r in compared)
    if top == answer.budget:
        return
    reached = [r for r in compared if max(history_of(r)) == top]
    for row in reached:
        row["at_pick"] = value_at(history_of(row), top, answer.kind, answer.mode)
    answer.pick_row = pick(reached, key=lambda r: r["at_pick"])
    answer.pick_epoch, answer.pick_reached = top, len(reached)
