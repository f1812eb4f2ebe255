"""The study's search as Optuna sees it, rebuilt from the MLflow runs alone.

A study's Optuna state lives inside Ray Tune's searcher and is not stored, so the report
rebuilds an in-memory `optuna.Study` from the trial runs, in start order: each factor a
categorical distribution over the values the runs took (as their param strings), each finished
trial COMPLETE with its `value` and its per-epoch metric as intermediate values, failed and
killed trials FAIL; running trials are left out. Parameter importances come from Optuna's
fANOVA evaluator (`FanovaImportanceEvaluator(seed=0)`: a random forest over the complete
trials, deterministic with the seed); one varying parameter has importance 1 without a fit.
"""

from __future__ import annotations

import math
import warnings
from collections.abc import Mapping, Sequence
from typing import Any

EVALUATOR = "fANOVA, Optuna"


def rebuild_study(
    rows: Sequence[Mapping[str, Any]],
    factors: Sequence[str],
    histories: Mapping[str, Mapping[str, Sequence[tuple[int, float]]]],
    *,
    metric: str,
    mode: str,
) -> Any:
    """An in-memory `optuna.Study` holding the trials of `rows` (see the module docstring)."""
    import optuna
    from optuna.distributions import CategoricalDistribution
    from optuna.trial import TrialState, create_trial

    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(direction="maximize" if mode == "max" else "minimize")
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


def history_points(study: Any) -> list[tuple[int, float | None, str]]:
    """(trial number, value, state name) of every trial of the rebuilt study."""
    return [(t.number, t.value, t.state.name) for t in study.trials]


def param_importances(study: Any) -> tuple[dict[str, float], str]:
    """(importance per varying parameter, "") or ({}, the reason there are none)."""
    import optuna
    from optuna.trial import TrialState

    complete = study.get_trials(deepcopy=False, states=(TrialState.COMPLETE,))
    if len(complete) < 2:
        return {}, f"{len(complete)} complete trial(s): parameter importances need at least 2"
    varying = [p for p in complete[0].params if len({t.params[p] for t in complete}) > 1]
    if not varying:
        return {}, "no searched parameter takes two values among the complete trials"
    if len({t.value for t in complete}) < 2:
        return {}, "every complete trial has the same value: no importances"
    if len(varying) == 1:  # importances sum to 1: no forest to fit for one parameter
        return {varying[0]: 1.0}, ""
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            found = optuna.importance.get_param_importances(
                study,
                evaluator=optuna.importance.FanovaImportanceEvaluator(seed=0),
                params=varying,
            )
    except (ValueError, RuntimeError) as exc:
        return {}, f"Optuna could not compute importances: {exc}"
    return {k: float(v) for k, v in found.items()}, ""
