"""cbtlab.tune.stats against scipy and numbers worked out by hand."""

from __future__ import annotations

import math
from pathlib import Path

import numpy as np
import pandas
import pyarrow.parquet as pq
import pytest
from scipy import stats

from cbtlab.tune.stats import (
    COLUMN_ORDER,
    Observation,
    compare_cells,
    format_stats,
    holm,
    mean_ci,
    paired_comparison,
    write_stats,
)

A = {"model.attention": "cbsa"}
B = {"model.attention": "mssa"}
C = {"model.attention": "tssa"}


def observations(values: dict[str, list[float | None]], seeds: list[int] | None = None):
    """Observations of cells named by attention, seeds 0.. (or `seeds`) in order."""
    out = []
    for name, cell_values in values.items():
        for seed, value in zip(seeds or range(len(cell_values)), cell_values, strict=True):
            out.append(Observation({"model.attention": name}, seed, value))
    return out


def by_attention(table) -> dict[str, dict]:
    return {row["model.attention"]: row for row in table.to_pylist()}


def test_mean_ci_by_hand_and_against_scipy() -> None:
    mean, std, low, high = mean_ci([1.0, 2.0, 3.0])
    # mean 2, std 1, t(0.975, 2) = 4.302653 -> half-width 4.302653 / sqrt(3) = 2.484138
    assert (mean, std) == (2.0, 1.0)
    assert low == pytest.approx(2 - 2.484138, abs=1e-6)
    assert high == pytest.approx(2 + 2.484138, abs=1e-6)
    x = [0.91, 0.95, 0.93, 0.97, 0.92]
    ci = stats.ttest_1samp(x, 0).confidence_interval(0.9)
    assert mean_ci(x, 0.9)[2:] == pytest.approx((ci.low, ci.high), rel=1e-12)


def test_mean_ci_of_one_value_and_of_equal_values() -> None:
    mean, std, low, high = mean_ci([0.9])
    assert mean == 0.9 and all(math.isnan(v) for v in (std, low, high))
    assert all(math.isnan(v) for v in mean_ci([]))
    assert mean_ci([0.5, 0.5, 0.5]) == (0.5, 0.0, 0.5, 0.5)


def test_holm_by_hand() -> None:
    # sorted 0.01 (x3 = 0.03), 0.03 (x2 = 0.06), 0.04 (x1 = 0.04, raised to 0.06 to stay monotone)
    adjusted = holm([0.01, 0.04, 0.03, float("nan")])
    assert adjusted[:3] == pytest.approx([0.03, 0.06, 0.06])
    assert math.isnan(adjusted[3])
    assert holm([0.5, 0.9]) == [1.0, 1.0]  # capped at 1
    assert holm([]) == []


def test_paired_t_matches_scipy_ttest_rel() -> None:
    base = np.array([0.90, 0.92, 0.91, 0.93])
    cell = np.array([0.93, 0.94, 0.95, 0.96])
    out = paired_comparison(cell - base, test="t")
    ref = stats.ttest_rel(cell, base)
    ci = ref.confidence_interval()
    assert out["test"] == "t" and out["n_pairs"] == 4
    assert out["statistic"] == pytest.approx(ref.statistic, rel=1e-9)
    assert out["p_value"] == out["p_t"] == pytest.approx(ref.pvalue, rel=1e-9)
    assert (out["diff_ci_low"], out["diff_ci_high"]) == pytest.approx((ci.low, ci.high))
    # diffs 0.03, 0.02, 0.04, 0.03: mean 0.03, std sqrt(0.0002 / 3) -> d_z = 3.674235
    assert out["diff_mean"] == pytest.approx(0.03)
    assert out["effect_dz"] == pytest.approx(3.674235, rel=1e-6)
    assert out["statistic"] == pytest.approx(3.674235 * 2, rel=1e-6)  # t = d_z * sqrt(n)
    assert out["p_wilcoxon"] == pytest.approx(stats.wilcoxon(cell - base).pvalue)


def test_wilcoxon_matches_scipy_and_the_exact_minimum() -> None:
    diffs = [0.01, -0.02, 0.03, 0.04, 0.05, 0.06, 0.07]
    out = paired_comparison(diffs, test="wilcoxon")
    ref = stats.wilcoxon(diffs)
    assert out["test"] == "wilcoxon"
    assert out["statistic"] == ref.statistic == 2.0  # the rank of |-0.02|
    assert out["p_value"] == pytest.approx(ref.pvalue)
    # Six positive differences: the exact two-sided p-value is 2 / 2^6.
    assert paired_comparison([1, 2, 3, 4, 5, 6], test="wilcoxon")["p_value"] == 2 / 64


def test_auto_uses_t_below_six_pairs_and_wilcoxon_from_six() -> None:
    five = paired_comparison([0.01, 0.02, 0.015, 0.03, 0.02])
    six = paired_comparison([0.01, 0.02, 0.015, 0.03, 0.02, 0.025])
    assert five["test"] == "t" and five["p_value"] == five["p_t"]
    assert six["test"] == "wilcoxon" and six["p_value"] == six["p_wilcoxon"]
    # Five pairs cannot reach 0.05 with Wilcoxon whatever the data; the t-test can.
    assert five["p_wilcoxon"] == 2 / 32 and five["p_t"] < 0.05
    with pytest.raises(ValueError, match="not one of"):
        paired_comparison([1.0, 2.0], test="sign")


def test_identical_and_constant_shift_differences() -> None:
    same = paired_comparison([0.0, 0.0, 0.0])
    assert same["p_value"] == same["p_t"] == same["p_wilcoxon"] == 1.0
    assert same["effect_dz"] == 0.0 and same["diff_ci_low"] == same["diff_ci_high"] == 0.0
    assert "every seed" in same["note"]
    # 0.97 - 0.96 and 0.95 - 0.94 differ by float noise; rounded they are one constant shift.
    shift = paired_comparison([0.97 - 0.96, 0.95 - 0.94, 0.93 - 0.92])
    assert math.isnan(shift["p_t"]) and math.isnan(shift["effect_dz"])
    assert math.isnan(shift["p_value"])  # auto -> t with 3 pairs, undefined
    assert shift["p_wilcoxon"] == pytest.approx(0.25)  # all three signs agree: 2 / 2^3
    assert shift["diff_ci_low"] == shift["diff_ci_high"] == pytest.approx(0.01)
    assert "zero variance" in shift["note"]
    assert paired_comparison([0.01, 0.01, 0.01], test="wilcoxon")["p_value"] == 0.25


def test_one_pair_and_no_pair() -> None:
    one = paired_comparison([0.02])
    assert one["diff_mean"] == 0.02 and math.isnan(one["p_value"]) and one["test"] == ""
    assert "one pair" in one["note"]
    none = paired_comparison([])
    assert none["n_pairs"] == 0 and math.isnan(none["diff_mean"])


def test_table_rows_columns_and_holm_over_the_comparisons() -> None:
    base = [0.90, 0.92, 0.91, 0.93]
    mssa = [0.93, 0.94, 0.95, 0.96]
    tssa = [0.91, 0.91, 0.93, 0.92]
    table = compare_cells(
        observations({"cbsa": base, "mssa": mssa, "tssa": tssa}), metric="val/top1"
    )
    assert table.column_names == ["cell", "model.attention", *COLUMN_ORDER[1:]]
    assert table.num_rows == 3
    rows = by_attention(table)
    assert rows["cbsa"]["is_baseline"] and not rows["mssa"]["is_baseline"]
    assert rows["cbsa"]["cell"] == "model.attention=cbsa"
    assert rows["cbsa"]["seeds"] == [0, 1, 2, 3] and rows["cbsa"]["n"] == 4
    mean, std, low, high = mean_ci(mssa)
    assert (rows["mssa"]["mean"], rows["mssa"]["std"]) == (mean, std)
    assert (rows["mssa"]["ci_low"], rows["mssa"]["ci_high"]) == (low, high)
    assert math.isnan(rows["cbsa"]["p_value"]) and math.isnan(rows["cbsa"]["p_holm"])
    p_mssa = stats.ttest_rel(mssa, base).pvalue
    p_tssa = stats.ttest_rel(tssa, base).pvalue
    assert rows["mssa"]["p_value"] == pytest.approx(p_mssa)
    assert rows["tssa"]["p_value"] == pytest.approx(p_tssa)
    low_p, high_p = sorted([p_mssa, p_tssa])
    expected = {low_p: min(1, 2 * low_p), high_p: max(min(1, 2 * low_p), high_p)}
    assert rows["mssa"]["p_holm"] == pytest.approx(expected[p_mssa])
    assert rows["tssa"]["p_holm"] == pytest.approx(expected[p_tssa])
    meta = table.schema.metadata
    assert meta[b"metric"] == b"val/top1" and meta[b"baseline"] == b"model.attention=cbsa"
    assert meta[b"test"] == b"auto" and meta[b"confidence"] == b"0.95"


def test_explicit_baseline_and_its_sign() -> None:
    table = compare_cells(
        observations({"cbsa": [0.9, 0.91, 0.93], "mssa": [0.95, 0.95, 0.96]}), baseline=B
    )
    rows = by_attention(table)
    assert rows["mssa"]["is_baseline"] and not rows["cbsa"]["is_baseline"]
    assert rows["cbsa"]["diff_mean"] == pytest.approx(-0.04)  # cbsa - mssa: -0.05, -0.04, -0.03
    with pytest.raises(ValueError, match="is not one of the cells"):
        compare_cells(observations({"cbsa": [0.9]}), baseline=C)


def test_one_seed_gives_nan_and_a_note_not_a_crash() -> None:
    rows = by_attention(compare_cells(observations({"cbsa": [0.9], "mssa": [0.95]})))
    for row in rows.values():
        assert row["n"] == 1 and math.isnan(row["std"]) and math.isnan(row["ci_low"])
        assert "one seed" in row["note"]
    assert rows["mssa"]["diff_mean"] == pytest.approx(0.05)
    assert math.isnan(rows["mssa"]["p_value"]) and math.isnan(rows["mssa"]["p_holm"])
    assert "one pair" in rows["mssa"]["note"]


def test_a_failed_seed_drops_only_its_pair() -> None:
    base = [0.90, 0.92, 0.91, 0.93]
    cell = [0.93, None, 0.95, float("nan")]  # seeds 1 and 3 failed in this cell
    rows = by_attention(compare_cells(observations({"cbsa": base, "mssa": cell})))
    assert rows["mssa"]["n"] == 2 and rows["mssa"]["n_failed"] == 2
    assert rows["mssa"]["seeds"] == [0, 2] and rows["mssa"]["n_pairs"] == 2
    ref = stats.ttest_rel([0.93, 0.95], [0.90, 0.91])
    assert rows["mssa"]["p_value"] == pytest.approx(ref.pvalue)
    assert "failed seeds [1, 3]" in rows["mssa"]["note"]
    assert "unpaired seeds [1, 3]" in rows["mssa"]["note"]
    assert rows["cbsa"]["n"] == 4 and rows["cbsa"]["n_pairs"] == 0


def test_identical_cells_give_p_one_and_zero_effect() -> None:
    same = [0.9, 0.92, 0.91]
    rows = by_attention(compare_cells(observations({"cbsa": same, "mssa": list(same)})))
    assert rows["mssa"]["p_value"] == 1.0 and rows["mssa"]["p_holm"] == 1.0
    assert rows["mssa"]["effect_dz"] == 0.0 and rows["mssa"]["diff_mean"] == 0.0
    flat = by_attention(compare_cells(observations({"cbsa": [0.5] * 3, "mssa": [0.5] * 3})))
    assert flat["cbsa"]["std"] == 0.0 and flat["cbsa"]["ci_low"] == flat["cbsa"]["ci_high"]


def test_bad_observations_are_refused() -> None:
    with pytest.raises(ValueError, match="seed 0 appears twice"):
        compare_cells([Observation(A, 0, 0.9), Observation(A, 0, 0.8)])
    with pytest.raises(ValueError, match="does not assign"):
        compare_cells([Observation(A, 0, 0.9), Observation({"model.depth": 2}, 0, 0.8)])
    with pytest.raises(ValueError, match="no observations"):
        compare_cells([])


def test_two_factors_parquet_round_trip_and_text(tmp_path: Path) -> None:
    obs = [
        Observation({"model.step_init": init, "model.step_scale": scale}, seed, value)
        for (init, scale), values in {
            ("normal", 1.0): [0.90, 0.91, 0.92],
            ("constant", -0.1): [0.80, 0.83, 0.81],
            ("zero", 0.0): [0.91, 0.93, 0.93],
        }.items()
        for seed, value in zip((10, 11, 12), values, strict=True)
    ]
    table = compare_cells(obs, metric="val/top1")
    path = write_stats(table, tmp_path / "sub" / "stats.parquet")
    back = pq.read_table(path)
    pandas.testing.assert_frame_equal(back.to_pandas(), table.to_pandas())
    assert back.schema.metadata[b"metric"] == b"val/top1"
    assert back.column("model.step_scale").to_pylist() == [1.0, -0.1, 0.0]
    assert back.column("seeds").to_pylist()[0] == [10, 11, 12]
    text = format_stats(table)
    lines = text.splitlines()
    assert "val/top1 mean ± 95% CI" in lines[0] and len(lines) == 2 + 3
    assert "(baseline)" in lines[2] and "model.step_init=constant, model.step_scale=-0.1" in text
    assert "0.9100 ± " in lines[2]


def test_mixed_type_factor_values_become_strings() -> None:
    obs = [Observation({"model.rep_grid": g}, 0, 0.9) for g in ("4x4", (2, 2))]
    assert compare_cells(obs).column("model.rep_grid").to_pylist() == ["4x4", "(2, 2)"]
