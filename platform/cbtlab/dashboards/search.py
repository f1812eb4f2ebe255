"""A study's search as an Optuna study, for Optuna's own figures (`cbtlab.dashboards.figures`).

A search keeps its Optuna study in a storage (the parent run's params `study.optuna_storage`,
password hidden, and `study.optuna_study`; by default `optuna.db` in the study's results
folder): `stored_study` loads it. Ray Tune's searcher told Optuna each trial's last reported
value (ASHA stopped trials at different epochs) and reported every epoch as an intermediate
value (step = Tune's result count: the epoch, unless the trial was restarted). The report
compares trials at the study's budget (`cbtlab.tune.budget`), so `at_budget` copies the stored
trials (numbers, params, distributions, states) into an in-memory study whose values are the
metric at the budget epoch (`final`) or its best up to it (`best`), read from those
intermediate values.

A grid has no Optuna study: `rebuild_study` makes one in memory from the MLflow trial runs, in
start order: each factor a categorical distribution over the values the runs took (as their
param strings), each finished trial COMPLETE with its `value` (already at the budget) and its
per-epoch metric as intermediate values, failed and killed trials FAIL; running trials are
left out. A search whose storage cannot be read is rebuilt the same way.

`importance_params` says which parameters Optuna's importances can rank (or why none).
"""

from __future__ import annotations

import math
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from cbtlab.paths import unredact_url
from cbtlab.tracking.schema import OPTUNA_STORAGE_PARAM, OPTUNA_STUDY_PARAM

# The importances drawn: Optuna's fANOVA (a random forest, deterministic with its seed).
EVALUATOR = "fANOVA, Optuna, seed 0"


def _quiet_optuna() -> Any:
    import optuna

    optuna.logging.set_verbosity(optuna.logging.WARNING)  # no "A new study created in memory"
    return optuna


def storage_of(params: Mapping[str, str]) -> tuple[str, str] | None:
    """(storage URL, study name) of the Optuna study a parent run's params name, the password
    restored from the environment (PGPASSWORD, ...); None for a study without one (a grid)."""
    storage, name = params.get(OPTUNA_STORAGE_PARAM), params.get(OPTUNA_STUDY_PARAM)
    if not storage or not name:
        return None
    return unredact_url(storage), name


def stored_study(storage: str, name: str) -> Any:
    """The Optuna study `name` in `storage`; FileNotFoundError for a SQLite file that is not
    there (Optuna would create an empty one), KeyError when the storage has no such study."""
    prefix = "sqlite:///"
    if storage.startswith(prefix) and not Path(storage[len(prefix) :]).is_file():
        raise FileNotFoundError(f"no Optuna storage at {storage[len(prefix) :]}")
    return _quiet_optuna().load_study(study_name=name, storage=storage)


def _value_at(steps: Mapping[int, float], budget: int, kind: str, mode: str) -> float | None:
    """The metric at epoch `budget` (`final`) or its best up to there (`best`)."""
    if kind != "best":
        return steps.get(budget)
    upto = [v for s, v in steps.items() if s <= budget and math.isfinite(v)]
    if not upto:
        return None
    return max(upto) if mode == "max" else min(upto)


def at_budget(study: Any, *, budget: int | None, kind: str, mode: str) -> Any:
    """An in-memory copy of `study` whose complete trials' values are at `budget` (see the
    module docstring); a complete trial without a value there becomes PRUNED. `budget` None
    (no finished trial, or a search logged before budgets) keeps Optuna's values."""
    from optuna.trial import TrialState

    optuna = _quiet_optuna()
    view = optuna.create_study(study_name=study.study_name, direction=study.direction)
    for trial in study.get_trials(deepcopy=True):
        if trial.state == TrialState.COMPLETE and budget is not None:
            value = _value_at(trial.intermediate_values, budget, kind, mode)
            if value is None:
                trial.state, trial.value = TrialState.PRUNED, None
            else:
                trial.value = value
        view.add_trial(trial)
    return view


def rebuild_study(
    rows: Sequence[Mapping[str, Any]],
    factors: Sequence[str],
    histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    *,
    metric: str,
    mode: str,
) -> Any:
    """An in-memory `optuna.Study` holding the trials of `rows` (see the module docstring)."""
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    study = _quiet_optuna().create_study(direction="maximize" if mode == "max" else "minimize")
    choices = {
        f: tuple(
            dict.fromkeys(str(r["factors"][f]) for r in rows if r["factors"].get(f) is not None)
        )
        for f in factors
    }
    distributions = {f: CategoricalDistribution(c) for f, c in choices.items() if c}
    for r in sorted(rows, key=lambda r: r["order"]):
        params = {f: str(r["factors"][f]) for f in distributions if r["factors"].get(f) is not None}
        if set(params) != set(distributions):
            continue
        value = r["value"]
        if r["status"] == "FINISHED" and isinstance(value, float) and math.isfinite(value):
            state = TrialState.COMPLETE
        elif r["status"] in ("FAILED", "KILLED"):
            state, value = TrialState.FAIL, None
        else:  # running, or finished without a usable value
            continue
        intermediate = {
            step: v
            for step, v in histories.get(r["run_id"], {}).get(metric, [])
            if math.isfinite(v)
        }
        study.add_trial(
            create_trial(
                params=params,
                distributions=distributions,
                value=value,
                state=state,
                intermediate_values=intermediate,
                user_attrs={"run_id": r["run_id"], "cell": r["cell"]},
            )
        )
    return study


def complete_values(study: Any) -> list[float]:
    """The values of the study's complete trials, in trial order."""
    from optuna.trial import TrialState

    return [t.value for t in study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))]


def importance_params(study: Any) -> tuple[list[str], str]:
    """(the parameters Optuna's importances can rank, "") or ([], why there are none): the
    complete trials must be two or more, with different values, and a parameter must take two
    values among them (Optuna would rank a constant one above zero)."""
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return [], f"{len(complete)} complete trial(s): parameter importances need at least 2"
    if len({t.value for t in complete}) < 2:
        return [], "every complete trial has the same value: no importances"
    seen: dict[str, set[str]] = {}
    for t in complete:
        for key, value in t.params.items():
            seen.setdefault(key, set()).add(repr(value))
    varying = [key for key, values in seen.items() if len(values) > 1]
    if not varying:
        return [], "no searched parameter takes two values among the complete trials"
    return varying, ""
