"""The Ray-overhead bench's arithmetic (its runs need Ray and minutes: run the script)."""

from __future__ import annotations

import pytest

from cbtlab.perf.ray_overhead import OverheadResult, OverheadSpec, RunTimes, overhead_main


def test_ratios_pair_back_to_back_runs() -> None:
    runs = [
        RunTimes("plain", 30.0, [2.0, 2.2, 2.0], [1.8, 1.8, 1.8]),
        RunTimes("ray", 36.0, [2.1, 2.1, 2.3], [1.9, 1.9, 1.9]),
        RunTimes("ray", 40.0, [4.2, 4.4, 4.2], [3.8, 3.8, 3.8]),  # the machine got busier
        RunTimes("plain", 34.0, [4.0, 4.0, 4.1], [3.6, 3.6, 3.6]),
    ]
    result = OverheadResult(OverheadSpec(epochs=4), ray_init_s=5.0, runs=runs)
    ratios = result.ratios()
    assert ratios["epoch"] == pytest.approx((2.1 / 2.0 + 4.2 / 4.0) / 2)
    assert ratios["fastest"] == pytest.approx(2.1 / 2.0)
    assert ratios["wall"] == pytest.approx(38.0 / 32.0)
    lines = result.lines()
    assert [line.split()[0] + line.split()[1] for line in lines[3:7]] == [
        "plain#1",
        "ray#1",
        "ray#2",
        "plain#2",
    ]
    assert lines[-1].startswith("ray/plain time ratio: 1.050 per steady-state epoch")


def test_the_bench_refuses_a_bad_override(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        overhead_main(["--set", "model.depth=0"])
    assert "model.depth" in capsys.readouterr().err
