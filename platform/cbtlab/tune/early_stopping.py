"""Does early stopping find the right answer? A grid with seeds as the ground truth, and the
Optuna TPE + ASHA search over the same cells, compared.

- `search_spec_for(grid)`: the search matching a grid study: the same cells (the grid's space),
  one seed per trial (the grid's first), every cell tried once first, in the grid's order
  (`initial_points`), then TPE; ASHA with a grace period of a quarter of the epochs and a
  reduction factor of 2; one trial at a time.
- `compare_studies(...)` (pure: rows and answers in): the grid's answer (its best cell and the
  cells a paired Holm-corrected test over the seeds cannot tell apart from it), ASHA's pick
  (the search's `pick_row`, or its best trial at the budget when no trial ran further), the
  verdict (the pick is among the grid's indistinguishable cells) and the compute: the epochs the
  trials trained and their seconds, the search's over the grid's, against the claim that the
  search needs at most `TARGET_FRACTION` of the grid's epochs.
- `run_check(...)`: runs both studies in one MLflow experiment with a run of its own
  (role `check`: check.txt, check.json, the verdict and fractions as metrics, both parent runs
  as params; each parent run tagged with the check's run id).
"""

from __future__ import annotations

import dataclasses
import itertools
import json
import math
import time
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any

from cbtlab.config import ConfigError
from cbtlab.tracking import StudyTracker, provenance_tags
from cbtlab.tracking.schema import (
    CHECK_AGREE_METRIC,
    CHECK_EPOCHS_METRIC,
    CHECK_GRID_RUN_PARAM,
    CHECK_JSON,
    CHECK_RUN_TAG,
    CHECK_SEARCH_RUN_PARAM,
    CHECK_SECONDS_METRIC,
    CHECK_STUDY_PARAM,
    CHECK_TARGET_PARAM,
    CHECK_TEXT,
    ROLE_CHECK,
    ROLE_TAG,
    STUDY_TAG,
)
from cbtlab.tune.budget import ALPHA, Answer
from cbtlab.tune.runner import StudyResult, run_study
from cbtlab.tune.spec import StudySpec
from cbtlab.tune.stats import cell_label

# The platform's claim: the search finds the right cell with at most this share of the grid's
# compute (the epochs its trials trained).
TARGET_FRACTION = 0.40
REDUCTION_FACTOR = 2


def default_grace_period(epochs: int) -> int:
    """ASHA's grace period in the check: a quarter of the epochs, at least one."""
    return max(1, epochs // 4)


def search_spec_for(
    grid: StudySpec,
    *,
    num_samples: int | None = None,
    grace_period: int | None = None,
    search_seed: int = 0,
    name: str | None = None,
) -> StudySpec:
    """The Optuna TPE + ASHA search over the cells of the validated grid study `grid`: its
    space, one seed per trial (the grid's first seed), the cells in the grid's order as the
    first trials, `num_samples` trials (default: one per cell), ASHA with `grace_period`
    (default: a quarter of the epochs) and a reduction factor of 2, one trial at a time.
    Raises ConfigError when the cells are not the full factorial of the space (the search
    samples each key on its own and could leave the grid)."""
    if not grid.grid or not grid.cells:
        raise ConfigError("study.grid", "the check needs a validated grid study")
    space = {key: list(dict.fromkeys(cell[key] for cell in grid.cells)) for key in grid.space}
    product = [dict(zip(space, combo, strict=True)) for combo in itertools.product(*space.values())]
    if len(product) != len(grid.cells) or any(c not in grid.cells for c in product):
        raise ConfigError("study.cells", "the grid's cells are not the full factorial of its space")
    epochs = grid.base.train.epochs
    grace = default_grace_period(epochs) if grace_period is None else grace_period
    if grace < 1 or grace > epochs:
        raise ConfigError("--grace-period", f"must be in 1..{epochs} (the epochs), got {grace}")
    samples = len(grid.cells) if num_samples is None else num_samples
    if samples < 1:
        raise ConfigError("--num-samples", f"must be >= 1, got {samples}")
    return dataclasses.replace(
        grid,
        name=name or f"{grid.name.removesuffix('-grid')}-search",
        base=grid.base.with_overrides({"train.seed": grid.seed_values[0]}),
        space=space,
        initial_points=[dict(cell) for cell in grid.cells],
        num_samples=samples,
        search_seed=search_seed,
        asha=True,
        grace_period=grace,
        reduction_factor=REDUCTION_FACTOR,
        grid=False,
        cells=[],
        seeds=1,
        baseline=None,
        max_concurrent=1,
        optuna_storage="",
    )


def trained_epochs(rows: Sequence[Mapping[str, Any]]) -> int:
    """The epochs a study's trials trained, whatever became of them (failed ones included)."""
    return sum(int(row.get("epochs") or 0) for row in rows)


def trial_seconds(rows: Sequence[Mapping[str, Any]]) -> float:
    """The wall seconds a study's trials ran, summed over the trials."""
    return float(sum(float(row.get("seconds") or 0.0) for row in rows))


def _fraction(part: float, whole: float) -> float:
    return part / whole if whole > 0 else math.nan


@dataclass
class CheckResult:
    """The check's verdict and compute (see the module docstring); `lines()` words it."""

    metric: str
    kind: str  # "final" or "best": the value compared
    grid_budget: int | None
    grid_best: str  # "" when the grid has no answer
    grid_best_value: float | None
    grid_best_interval: str
    indistinguishable: list[str]
    seeds: list[int]
    test: str
    pick: str  # ASHA's pick's cell; "" when the search has no answer
    pick_source: str  # "asha" | "best at budget" | "none"
    pick_trial: str
    pick_epoch: int | None
    pick_value: float | None
    # The pick's cell in the grid: its mean over the seeds and its Holm p against the best.
    pick_grid_value: float | None
    pick_grid_p: float
    agree: bool
    grid_epochs: int
    search_epochs: int
    grid_seconds: float
    search_seconds: float
    grid_trials: int
    search_trials: int
    search_stopped_early: int
    # The epochs of the grid's first seed alone (a one-seed grid: what ASHA saves by itself).
    grid_first_seed_epochs: int = 0
    target: float = TARGET_FRACTION
    grid_failed: list[str] = field(default_factory=list)
    search_failed: list[str] = field(default_factory=list)
    # The studies' wall time (their drivers, start to end) and parent runs, where known.
    grid_wall_s: float | None = None
    search_wall_s: float | None = None
    grid_run_id: str = ""
    search_run_id: str = ""

    @property
    def epochs_fraction(self) -> float:
        return _fraction(self.search_epochs, self.grid_epochs)

    @property
    def seconds_fraction(self) -> float:
        return _fraction(self.search_seconds, self.grid_seconds)

    @property
    def first_seed_fraction(self) -> float:
        """The search's epochs over those of the grid's first seed alone: the share ASHA and
        TPE leave of a one-seed grid (the fraction above also counts the grid's other seeds)."""
        return _fraction(self.search_epochs, self.grid_first_seed_epochs)

    @property
    def within_target(self) -> bool:
        """The search trained at most `target` of the grid's epochs."""
        return self.epochs_fraction <= self.target  # NaN compares False

    @property
    def claim_holds(self) -> bool:
        """The right cell, found within the target share of the grid's compute."""
        return self.agree and self.within_target

    @property
    def verdict(self) -> str:
        if not self.grid_best:
            return "undecided: the grid has no answer (no trial finished)"
        if not self.pick:
            return "disagree: the search has no pick (no trial finished)"
        if self.agree and self.pick == self.grid_best:
            return f"agree: ASHA's pick {self.pick} is the grid's best"
        if self.agree:
            return (
                f"agree: ASHA's pick {self.pick} is not distinguishable from the grid's best "
                f"{self.grid_best}"
            )
        where = (
            f"below it (Holm p {self.pick_grid_p:.3g})"
            if not math.isnan(self.pick_grid_p)
            else "not among its cells"
        )
        return f"disagree: ASHA's pick {self.pick} is {where} in the grid (best {self.grid_best})"

    def lines(self) -> list[str]:
        """The check in words (check.txt)."""
        what = f"{self.kind} {self.metric}"
        lines = [f"early-stopping check ({what}):"]
        if self.grid_best:
            seeds = f"{len(self.seeds)} seeds {self.seeds}"
            lines.append(
                f"  grid ({self.grid_trials} trials, {seeds}, compared at epoch "
                f"{self.grid_budget}): best {self.grid_best} {self.grid_best_interval}"
            )
            others = [c for c in self.indistinguishable if c != self.grid_best]
            lines.append(
                f"  not distinguishable from it (paired {self.test or 'test'}, Holm p >= "
                f"{ALPHA}): " + ("; ".join(others) if others else "none")
            )
        else:
            lines.append(f"  grid ({self.grid_trials} trials): no answer, no trial finished")
        if self.pick:
            value = "" if self.pick_value is None else f" {self.pick_value:.4f}"
            at = f" at epoch {self.pick_epoch}" if self.pick_epoch is not None else ""
            source = (
                "ASHA's pick (the best of the trials that ran the most epochs)"
                if self.pick_source == "asha"
                else "the search's best at its budget (no trial ran further)"
            )
            grid_value = (
                f"; in the grid: {self.pick_grid_value:.4f}"
                if self.pick_grid_value is not None
                else ""
            )
            lines.append(
                f"  search ({self.search_trials} trials, {self.search_stopped_early} stopped "
                f"early): {source}: {self.pick_trial} {self.pick}{value}{at}{grid_value}"
            )
        else:
            lines.append(f"  search ({self.search_trials} trials): no pick, no trial finished")
        lines.append(f"  verdict: {self.verdict}")
        lines.append(
            f"  compute: {self.search_epochs} of {self.grid_epochs} trial epochs = "
            f"{_percent(self.epochs_fraction)} (target <= {_percent(self.target)}: "
            f"{'met' if self.within_target else 'not met'}); {self.search_seconds:.0f} of "
            f"{self.grid_seconds:.0f} trial seconds = {_percent(self.seconds_fraction)}"
        )
        if self.grid_first_seed_epochs and len(self.seeds) > 1:
            lines.append(
                f"  of the grid's first seed alone ({self.grid_first_seed_epochs} epochs): "
                f"{_percent(self.first_seed_fraction)} (the rest of the saving is the seeds)"
            )
        if self.grid_wall_s is not None and self.search_wall_s is not None:
            lines.append(
                f"  wall time: grid {self.grid_wall_s:.0f} s, search {self.search_wall_s:.0f} s "
                "(the grid may run trials side by side, the search runs one at a time)"
            )
        for study, failed in (("grid", self.grid_failed), ("search", self.search_failed)):
            if failed:
                lines.append(
                    f"  {study}: not compared (their epochs count as compute): " + ", ".join(failed)
                )
        lines.append(
            "  the claim (the right cell with at most "
            f"{_percent(self.target)} of the grid's epochs): "
            + ("holds" if self.claim_holds else "does not hold")
            + " here"
        )
        return lines

    def to_dict(self) -> dict[str, Any]:
        """The check as plain JSON values (check.json); NaN as null."""
        data = dataclasses.asdict(self)
        data.update(
            epochs_fraction=self.epochs_fraction,
            seconds_fraction=self.seconds_fraction,
            first_seed_fraction=self.first_seed_fraction,
            within_target=self.within_target,
            claim_holds=self.claim_holds,
            verdict=self.verdict,
        )
        return json.loads(json.dumps(data, default=str).replace("NaN", "null"))


def _percent(value: float) -> str:
    return "n/a" if math.isnan(value) else f"{100 * value:.0f}%"


def _not_compared(rows: Sequence[Mapping[str, Any]]) -> list[str]:
    return [
        f"{r['trial']} {r.get('cell') or ''} ({r['status']}, {int(r.get('epochs') or 0)} epochs)"
        for r in rows
        if r.get("at_budget") is None
    ]


def compare_studies(
    grid_rows: Sequence[Mapping[str, Any]],
    grid_answer: Answer,
    search_rows: Sequence[Mapping[str, Any]],
    search_answer: Answer,
    *,
    target: float = TARGET_FRACTION,
) -> CheckResult:
    """The check of a grid's and a search's summary rows and answers (`cbtlab.tune.budget`;
    the rows as `study_answer` left them, with `cell` and `at_budget`): is the search's pick
    among the grid's indistinguishable cells, at what share of the grid's compute."""
    cells = {c.label: c for c in grid_answer.cells}
    best = grid_answer.cells[0] if grid_answer.cells else None
    row = search_answer.pick_row or search_answer.best_row
    source = "asha" if search_answer.pick_row else ("best at budget" if row else "none")
    pick = row["cell"] if row else ""
    in_grid = cells.get(pick)
    indistinguishable = grid_answer.indistinguishable
    first_seed = min((r.get("train.seed") for r in grid_rows), default=None)
    if row is None:
        pick_value, pick_epoch = None, None
    elif source == "asha":
        pick_value, pick_epoch = row.get("at_pick"), search_answer.pick_epoch
    else:
        pick_value, pick_epoch = row.get("at_budget"), search_answer.budget
    return CheckResult(
        metric=grid_answer.metric,
        kind=grid_answer.kind,
        grid_budget=grid_answer.budget,
        grid_best=best.label if best else "",
        grid_best_value=best.mean if best else None,
        grid_best_interval=best.interval if best else "",
        indistinguishable=indistinguishable,
        seeds=list(grid_answer.seeds),
        test=grid_answer.test,
        pick=pick,
        pick_source=source,
        pick_trial=row["trial"] if row else "",
        pick_epoch=pick_epoch,
        pick_value=pick_value,
        pick_grid_value=in_grid.mean if in_grid else None,
        pick_grid_p=in_grid.p_holm if in_grid else math.nan,
        agree=bool(best and pick and pick in indistinguishable),
        grid_epochs=trained_epochs(grid_rows),
        search_epochs=trained_epochs(search_rows),
        grid_seconds=trial_seconds(grid_rows),
        search_seconds=trial_seconds(search_rows),
        grid_trials=len(grid_rows),
        search_trials=len(search_rows),
        search_stopped_early=sum(1 for r in search_rows if r.get("stopped_early")),
        grid_first_seed_epochs=trained_epochs(
            [r for r in grid_rows if r.get("train.seed") == first_seed]
        ),
        target=target,
        grid_failed=_not_compared(grid_rows),
        search_failed=_not_compared(search_rows),
    )


@dataclass
class CheckOutcome:
    """What `run_check` ran and concluded."""

    check: CheckResult
    check_run_id: str
    grid: StudyResult
    search: StudyResult


def check_params(study: str, grid: StudySpec, search: StudySpec, target: float) -> dict[str, Any]:
    """The check run's params (besides the two parent runs, logged as they end)."""
    return {
        CHECK_STUDY_PARAM: study,
        CHECK_TARGET_PARAM: target,
        "check.cells": json.dumps([cell_label(c) for c in grid.cells])[:6000],
        "check.seeds": json.dumps(grid.seed_values),
        "check.epochs": grid.base.train.epochs,
        "check.grace_period": search.grace_period,
        "check.reduction_factor": search.reduction_factor,
        "check.num_samples": search.num_samples,
        "check.search_seed": search.search_seed,
        "check.metric": f"{grid.metric}:{grid.mode}",
        "check.stats": f"{grid.stats_test}:{grid.stats_on}",
    }


def run_check(
    grid: StudySpec,
    search: StudySpec,
    *,
    study: str,
    name: str,
    target: float = TARGET_FRACTION,
    on_study: Any = None,
) -> CheckOutcome:
    """Run the grid, then the search, as studies of the MLflow experiment `name` (the grid's
    tracking store), each parent run tagged with the check's run; log the check on its run.
    `on_study(result, spec)` is called after each study (the command prints it)."""
    grid.validate()
    search.validate()
    for spec in (grid, search):
        spec.experiment_name = name
        spec.tracking_uri = grid.tracking_uri
    tracker = StudyTracker(grid.tracking_uri, name)
    check_run_id = tracker.start_run(
        name,
        params=check_params(study, grid, search, target),
        tags={ROLE_TAG: ROLE_CHECK, STUDY_TAG: name, **provenance_tags()},
    )
    status = "FAILED"
    try:
        results = []
        walls = []
        for spec, param in ((grid, CHECK_GRID_RUN_PARAM), (search, CHECK_SEARCH_RUN_PARAM)):
            started = time.monotonic()
            result = run_study(spec)
            walls.append(time.monotonic() - started)
            tracker.set_tags(result.parent_run_id, {CHECK_RUN_TAG: check_run_id})
            tracker.log_params(check_run_id, {param: result.parent_run_id})
            results.append(result)
            if on_study is not None:
                on_study(result, spec)
        grid_result, search_result = results
        check = compare_studies(
            grid_result.rows, grid_result.answer, search_result.rows, search_result.answer,
            target=target,
        )  # fmt: skip
        check.grid_wall_s, check.search_wall_s = walls
        check.grid_run_id = grid_result.parent_run_id
        check.search_run_id = search_result.parent_run_id
        tracker.log_text(check_run_id, "\n".join(check.lines()), CHECK_TEXT)
        tracker.log_text(check_run_id, json.dumps(check.to_dict(), indent=2), CHECK_JSON)
        tracker.log_metrics(
            check_run_id,
            {
                CHECK_AGREE_METRIC: float(check.agree),
                CHECK_EPOCHS_METRIC: check.epochs_fraction,
                CHECK_SECONDS_METRIC: check.seconds_fraction,
            },
            step=0,
        )
        status = "FINISHED"
    except KeyboardInterrupt:
        status = "KILLED"
        raise
    finally:
        tracker.end_run(check_run_id, status)
    return CheckOutcome(check, check_run_id, grid_result, search_result)
