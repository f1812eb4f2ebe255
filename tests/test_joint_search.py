"""The joint search: its conditional space (spec, JSON round trip, define-by-run sampling), its
importances at the equal budget, and its flags. No Ray: Optuna studies in memory."""

from __future__ import annotations

import json
import pickle
from pathlib import Path

import optuna
import pytest

from cbtlab.config import ConfigError, ExperimentConfig
from cbtlab.tune.budget import study_answer
from cbtlab.tune.cli import joint_search_parser
from cbtlab.tune.definitions import POOL_VARIANTS, REP_VARIANTS, STEP_VARIANTS, joint_spec
from cbtlab.tune.importance import ALL, study_importances
from cbtlab.tune.spec import (
    ConditionalSpace,
    StudySpec,
    conditional_trials,
    sampled_params,
    spec_from_dict,
    spec_to_dict,
)

REP_KEYS = {"model.rep_grid"}
POOL_KEYS = {"model.rep_pool_stride"}
STEP_KEYS = {"model.step_init", "model.step_scale"}


def _spec(*flags: str) -> StudySpec:
    args = joint_search_parser().parse_args(["--preset", "smoke", *flags])
    return joint_spec(args).validate()


def _expected_keys(variant: str, params: dict) -> set[str]:
    """The keys a trial of `variant` may sample, given what it sampled."""
    keys = {"model.attention"}
    if variant in REP_VARIANTS:
        keys |= REP_KEYS
    if variant in POOL_VARIANTS and params.get("model.rep_grid") in ("2x2", "4x4"):
        keys |= POOL_KEYS
    if variant in STEP_VARIANTS:
        keys.add("model.step_init")
        if params.get("model.step_init") != "zero":
            keys.add("model.step_scale")
    return keys


def test_the_spec_holds_a_conditional_space_that_survives_json() -> None:
    spec = _spec()
    assert spec.space["model.attention"] == ["cbsa", "mssa", "tssa", "agent", "linear", "softmax"]
    # validate() adds the rules' keys to the space: the table's columns
    assert set(spec.space) >= REP_KEYS | POOL_KEYS | STEP_KEYS | {"model.rep_pool_kernel"}
    assert not spec.grid and spec.num_samples == 6 and spec.grace_period == 1
    assert spec.base.model.depth == 1 and spec.base.model.embed_dim == 24
    # the first trials' variants (TPE samples the rest of each): CBSA three times
    first = [point["model.attention"] for point in spec.initial_points]
    assert first == ["cbsa", "mssa", "agent", "linear", "cbsa", "cbsa"]
    again = spec_from_dict(json.loads(json.dumps(spec_to_dict(spec)))).validate()
    assert again.conditional == spec.conditional and again.space == spec.space
    assert again.initial_points == spec.initial_points
    # every distinct trial of the space is a valid config with its variant
    trials = conditional_trials(spec.space, spec.conditional)
    assert len(trials) == 40 + 6 + 5 + 3  # cbsa, agent, linear, mssa/tssa/softmax
    for assigned, sampled in trials:
        assert set(sampled) == _expected_keys(sampled["model.attention"], sampled)
        spec.base.with_overrides(assigned)


def test_the_define_by_run_function_samples_a_key_only_where_the_variant_reads_it() -> None:
    spec = _spec()
    space = pickle.loads(pickle.dumps(ConditionalSpace(spec.space, spec.conditional)))
    optuna.logging.set_verbosity(optuna.logging.WARNING)
    study = optuna.create_study(sampler=optuna.samplers.TPESampler(seed=0))
    seen = set()
    for i in range(40):
        trial = study.ask()
        constants = space(trial)
        variant = trial.params["model.attention"]
        seen.add(variant)
        assert set(trial.params) == _expected_keys(variant, trial.params), trial.params
        if trial.params.get("model.rep_pool_stride") == 1:  # overlapping windows: the kernel
            side = 8
            g = int(trial.params["model.rep_grid"].split("x")[0])
            assert constants == {"model.rep_pool_kernel": side - g + 1}
        else:
            assert constants is None
        config = spec.base.with_overrides({**trial.params, **(constants or {})})
        assert config.model.attention == variant
        # the replay from a summary row finds the same sampled keys
        assert sampled_params(spec.space, spec.conditional, config.flat()) == trial.params
        study.tell(trial, float(i % 5))
    assert seen == set(spec.space["model.attention"])


def _row(trial: str, values: list[float], status: str = "FINISHED", **config: object) -> dict:
    flat = ExperimentConfig().with_overrides(dict(config)).flat()
    return {
        "trial": trial,
        **flat,
        "status": status,
        "history": dict(enumerate(values, start=1)),
    }


def test_importances_use_the_values_at_the_budget_per_variant() -> None:
    spec = _spec()
    rows = [
        _row("t1", [0.5, 0.9], **{"model.attention": "cbsa", "model.rep_grid": "2x2"}),
        _row("t2", [0.4, 0.5, 0.99], **{"model.attention": "cbsa", "model.rep_grid": "8x8"}),
        _row(
            "t3",
            [0.6, 0.7],
            **{
                "model.attention": "cbsa",
                "model.rep_grid": "4x4",
                "model.rep_pool_stride": 1,
                "model.rep_pool_kernel": 5,
            },
        ),
        _row("t4", [0.3, 0.35], **{"model.attention": "mssa"}),
        _row("t5", [0.2, 0.25], **{"model.attention": "agent", "model.rep_grid": "2x2"}),
        _row("t6", [0.1], status="FAILED", **{"model.attention": "softmax"}),
    ]
    answer = study_answer(rows, list(spec.space), metric="val/top1", grid=False)
    assert answer.budget == 2
    imp = study_importances(
        rows, spec.space, spec.conditional, metric="val/top1", budget=answer.budget
    )
    groups = {g.over: g for g in imp.groups}
    assert groups[ALL].trials == ["t1", "t2", "t3", "t4", "t5"]  # the failed trial is left out
    assert "model.attention" in groups[ALL].importances
    assert sum(groups[ALL].importances.values()) == pytest.approx(1.0)
    cbsa = groups["model.attention=cbsa"]
    assert cbsa.trials == ["t1", "t2", "t3"]
    assert set(cbsa.importances) == {"model.rep_grid", "model.rep_pool_stride"}
    # normal, scale 1, in every cbsa trial: one value each, not ranked
    assert set(cbsa.left_out) == {"model.step_init", "model.step_scale"}
    assert groups["model.attention=agent"].note.startswith("not enough trials")
    assert "model.attention=mssa" not in groups  # nothing conditional to rank
    text = imp.text()
    assert "at epoch 2" in text and "t1, t2, t3" in text and "not enough trials" in text
    assert json.loads(imp.to_json())["budget_epoch"] == 2


def test_importances_at_the_budget_not_at_the_last_epoch() -> None:
    # At epoch 1 "2x2" is better; at epoch 3, where ASHA let only t2 go on, "8x8" would win.
    space = {"model.rep_grid": ["2x2", "8x8"], "model.attention": ["cbsa", "mssa"]}
    rows = [
        _row("t1", [0.9], **{"model.rep_grid": "2x2"}),
        _row("t2", [0.1, 0.2, 0.99], **{"model.rep_grid": "8x8"}),
        _row("t3", [0.8], **{"model.rep_grid": "2x2", "model.attention": "mssa"}),
    ]
    answer = study_answer(rows, list(space), metric="val/top1", grid=False)
    assert [r["at_budget"] for r in rows] == [0.9, 0.1, 0.8]
    imp = study_importances(rows, space, metric="val/top1", budget=answer.budget)
    assert [g.over for g in imp.groups] == [ALL] and imp.groups[0].importances


def test_too_few_trials_say_so() -> None:
    spec = _spec()
    one = [_row("t1", [0.5], **{"model.attention": "cbsa"})]
    study_answer(one, list(spec.space), metric="val/top1", grid=False)
    imp = study_importances(one, spec.space, spec.conditional, metric="val/top1", budget=1)
    assert all(g.note.startswith("not enough trials") for g in imp.groups)
    same = [_row(f"t{i}", [0.5], **{"model.attention": v}) for i, v in enumerate(["cbsa", "mssa"])]
    study_answer(same, list(spec.space), metric="val/top1", grid=False)
    imp = study_importances(same, spec.space, spec.conditional, metric="val/top1", budget=1)
    assert imp.groups[0].note.startswith("not enough trials")  # equal values
    none = study_importances([], spec.space, spec.conditional, metric="val/top1", budget=None)
    assert none.lines() == ["parameter importances: none, no trial finished"]


@pytest.mark.parametrize(
    ("flags", "named"),
    [
        (["--variants", "cbsa", "nope"], "--variants"),
        (["--grids", "9x9"], "--grids"),
        (["--grids", "axb"], "--grids"),
        (["--step-inits", "normal,uniform"], "--step-inits"),
        (["--step-scales", "0.1,big"], "--step-scales"),
        (["--step-scales", "-1"], "--step-scales"),
        (["--grid"], "--grid"),
        (["--seeds", "3"], "--seeds"),
    ],
)
def test_bad_flag_values_name_the_flag(flags: list[str], named: str) -> None:
    args = joint_search_parser().parse_args(["--preset", "smoke", *flags])
    with pytest.raises(ConfigError, match=f"^{named}"):
        joint_spec(args).validate()


def test_bad_rules_are_named() -> None:
    spec = _spec()
    spec.conditional.append({"when": {"model.nope": ["x"]}, "sample": {"model.depth": [1, 2]}})
    with pytest.raises(ConfigError, match=r"study.conditional\[6\].*model.nope"):
        spec.validate()
    spec = _spec()
    spec.conditional.append({"sample": {"model.rep_grid": ["2x2"]}})  # sampled twice
    with pytest.raises(ConfigError, match="sample it once"):
        spec.validate()
    spec = _spec()  # a trial that gives no valid config is named with its branch
    spec.conditional.append(
        {"when": {"model.attention": ["agent"]}, "set": {"model.rep_pool_kernel": 3}}
    )
    with pytest.raises(ConfigError, match=r"model.attention=agent.*model.rep_grid"):
        spec.validate()


def test_the_runners_searcher_samples_the_conditional_space_and_resumes(tmp_path: Path) -> None:
    """`_optuna_searcher` (no Ray cluster needed to ask it): define-by-run from the spec, kept
    in the RDB, and its checkpoint (what a resumed study restores) goes on with the study."""
    from ray.tune.search.optuna import OptunaSearch

    from cbtlab.tune.runner import _optuna_searcher

    spec = _spec()
    url = f"sqlite:///{tmp_path / 'optuna.db'}"
    searcher = _optuna_searcher(spec, "joint", url)
    configs = [searcher.suggest(f"t{i}") for i in range(6)]
    first = [point["model.attention"] for point in spec.initial_points]
    assert [config["model.attention"] for config in configs] == first
    for config in configs:
        params = {k: v for k, v in config.items() if k != "model.rep_pool_kernel"}
        assert set(params) == _expected_keys(config["model.attention"], params)
    searcher.save(str(tmp_path / "searcher.pkl"))
    again = OptunaSearch()  # as Tuner.restore brings it back: the checkpoint, not the spec
    again.restore(str(tmp_path / "searcher.pkl"))
    assert isinstance(again._space, ConditionalSpace)
    assert again.suggest("t6")["model.attention"] in spec.space["model.attention"]
    study = optuna.load_study(study_name="joint", storage=url)
    assert len(study.trials) == 7


def test_a_partial_initial_point_must_sample_its_keys_in_its_branch() -> None:
    spec = _spec()
    spec.initial_points = [{"model.attention": "cbsa", "model.rep_grid": "4X4"}]
    assert spec.validate().initial_points == [{"model.attention": "cbsa", "model.rep_grid": "4x4"}]
    spec.initial_points = [{"model.attention": "mssa", "model.rep_grid": "2x2"}]
    with pytest.raises(ConfigError, match=r"^study.initial_points.*model.rep_grid is not sampled"):
        spec.validate()
