"""Optuna's parameter importances of a search, at the study's equal budget.

Optuna's own trial values are useless for this: ASHA stopped the trials at different epochs,
and Optuna stored each at its last. Here every compared trial's value is its value at the
budget (`cbtlab.tune.budget`: a row's `at_budget`), put with the trial's sampled parameters into
an in-memory Optuna study (`optuna.trial.create_trial`), whose importances
`optuna.importance.get_param_importances` evaluates (its default evaluator, PED-ANOVA, which
also ranks conditional parameters, each over the trials that sampled it).

With a conditional space (`StudySpec.conditional`) the importances come in groups:
- over all compared trials: every parameter, the space's own keys (the attention variant)
  beside the conditional ones;
- for each value of the space's own keys (each variant) whose trials sampled conditional
  parameters: those parameters, over that variant's trials only.
A search without conditions has the first group only. A group needs two trials with different
values, and a parameter two values in it; otherwise it says so ("not enough trials") instead of
ranking noise. Each group names the trials it is over.

Pure Python with Optuna (no Ray, no MLflow): the tests drive it with stand-in rows.
"""

from __future__ import annotations

import json
import warnings
from collections.abc import Mapping, Sequence
from dataclasses import asdict, dataclass, field
from typing import Any

from cbtlab.tune.spec import conditional_keys, sampled_params
from cbtlab.tune.stats import cell_label

ALL = "all compared trials"


@dataclass
class ImportanceGroup:
    """The importances over one group of trials (normalised to sum to 1), or why none."""

    over: str  # ALL, or the variant's cell ("model.attention=cbsa")
    trials: list[str]
    importances: dict[str, float] = field(default_factory=dict)
    # Parameters sampled in the group but not ranked: the reason ("one value: 4x4").
    left_out: dict[str, str] = field(default_factory=dict)
    note: str = ""  # why the group has no importances
    warnings: list[str] = field(default_factory=list)  # Optuna's, e.g. regimes of one trial

    def line(self) -> str:
        n = len(self.trials)
        head = f"{self.over}, {n} trial{'s' if n != 1 else ''} ({', '.join(self.trials)})"
        if self.note:
            return f"  {head}: {self.note}"
        ranked = ", ".join(f"{key} {value:.3f}" for key, value in self.importances.items())
        left = "; ".join(f"{key}: {why}" for key, why in self.left_out.items())
        return f"  {head}: {ranked}" + (f"; not ranked: {left}" if left else "")


@dataclass
class Importances:
    """A study's parameter importances at its budget (see the module docstring)."""

    metric: str
    kind: str
    budget: int | None
    evaluator: str
    groups: list[ImportanceGroup] = field(default_factory=list)
    conditional: bool = False

    def lines(self) -> list[str]:
        if self.budget is None:
            return ["parameter importances: none, no trial finished"]
        return [
            f"parameter importances at epoch {self.budget} ({self.kind} {self.metric} there, "
            f"not Optuna's stored values; Optuna {self.evaluator}, each line sums to 1"
            + (
                "; over all trials a conditional parameter is judged on the trials that "
                "sampled it):"
                if self.conditional
                else "):"
            ),
            *(group.line() for group in self.groups),
        ]

    def text(self) -> str:
        return "\n".join(self.lines())

    def to_dict(self) -> dict[str, Any]:
        return {
            "metric": self.metric,
            "kind": self.kind,
            "budget_epoch": self.budget,
            "evaluator": self.evaluator,
            "conditional": self.conditional,
            "groups": [asdict(group) for group in self.groups],
        }

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)


def trial_params(
    row: Mapping[str, Any], space: Mapping[str, list[Any]], conditional: list[dict[str, Any]]
) -> dict[str, Any]:
    """The parameters a trial sampled, from its summary row: every space key, or with a
    conditional space the keys its branch sampled."""
    if conditional:
        return sampled_params(space, conditional, row)
    return {key: row[key] for key in space}


def study_importances(
    rows: Sequence[Mapping[str, Any]],
    space: Mapping[str, list[Any]],
    conditional: list[dict[str, Any]] | None = None,
    *,
    metric: str,
    mode: str = "max",
    kind: str = "final",
    budget: int | None,
) -> Importances:
    """The importances of a search's summary rows at `budget`: each row needs `trial`, its
    space keys and `at_budget` (None: not compared; `cbtlab.tune.budget.study_answer` sets
    it)."""
    from optuna.importance import PedAnovaImportanceEvaluator

    conditional = conditional or []
    evaluator = PedAnovaImportanceEvaluator()
    result = Importances(
        metric, kind, budget, type(evaluator).__name__, conditional=bool(conditional)
    )
    compared = [row for row in rows if row.get("at_budget") is not None]
    if budget is None:
        return result
    params = {row["trial"]: trial_params(row, space, conditional) for row in compared}
    result.groups.append(_group(ALL, compared, params, space, mode, evaluator))
    if not conditional:
        return result
    own = [key for key in space if key not in conditional_keys(conditional)]
    variants: dict[str, list[Mapping[str, Any]]] = {}
    for row in compared:
        variants.setdefault(cell_label({key: row[key] for key in own}), []).append(row)
    for label, group_rows in variants.items():
        has = {k for row in group_rows for k in params[row["trial"]] if k not in own}
        if has:
            sub = {
                row["trial"]: {k: v for k, v in params[row["trial"]].items() if k not in own}
                for row in group_rows
            }
            result.groups.append(_group(label, group_rows, sub, space, mode, evaluator))
    return result


def _group(
    over: str,
    rows: Sequence[Mapping[str, Any]],
    params: Mapping[str, dict[str, Any]],
    space: Mapping[str, list[Any]],
    mode: str,
    evaluator: Any,
) -> ImportanceGroup:
    """The importances of the parameters `params[trial]` over the trials of `rows`."""
    import optuna
    from optuna.distributions import CategoricalDistribution

    group = ImportanceGroup(over, [str(row["trial"]) for row in rows])
    values = [float(row["at_budget"]) for row in rows]
    if len(rows) < 2 or len(set(values)) < 2:
        group.note = (
            "not enough trials (importances need two trials with different values at the budget)"
        )
        return group
    seen: dict[str, list[Any]] = {}
    for row in rows:
        for key, value in params[row["trial"]].items():
            seen.setdefault(key, [])
            if value not in seen[key]:
                seen[key].append(value)
    ranked = [key for key, taken in seen.items() if len(taken) > 1]
    group.left_out = {
        key: f"one value ({taken[0]})" for key, taken in seen.items() if key not in ranked
    }
    if not ranked:
        group.note = "not enough trials (no parameter took two values in them)"
        return group
    choices = {key: list(dict.fromkeys([*space.get(key, []), *seen[key]])) for key in seen}
    verbosity = optuna.logging.get_verbosity()
    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory"
    try:
        study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
    finally:
        optuna.logging.set_verbosity(verbosity)
    for row, value in zip(rows, values, strict=True):
        taken = params[row["trial"]]
        study.add_trial(
            optuna.trial.create_trial(
                params=taken,
                distributions={k: CategoricalDistribution(choices[k]) for k in taken},
                value=value,
            )
        )
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        try:
            importances = optuna.importance.get_param_importances(
                study, evaluator=evaluator, params=ranked
            )
        except (ValueError, RuntimeError) as exc:
            group.note = f"not computed: {exc}"
            return group
    group.importances = {key: float(value) for key, value in importances.items()}
    group.warnings = list(dict.fromkeys(str(w.message) for w in caught))
    return group
