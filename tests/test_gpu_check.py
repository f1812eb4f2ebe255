"""The GPU check's machinery, run on the CPU: 2 gloo processes instead of one per GPU, the same
code otherwise (`cbtlab.train.gpu_check`). One real run is shared; the failure tests replay its
ranks' results with one fault put in, through the check's `launch` seam."""

from __future__ import annotations

import dataclasses
import io
import math
from collections.abc import Callable
from pathlib import Path

import pytest
import torch

from cbtlab.train.faults import FailAt
from cbtlab.train.gpu_check import (
    CUDA_RESUME_RTOL,
    RankPlan,
    RankResult,
    gpu_check_main,
    resume_check,
    spawn_ranks,
)

TINY = ["model.depth=1", "model.embed_dim=24", "model.rep_grid=2x2"]
FLAGS = [
    "--device", "cpu", "--processes", "2", "--epochs", "2", "--no-ray", "--min-top1", "0.05",
    *(flag for text in TINY for flag in ("--set", text)),
]  # fmt: skip
CHECKS = [
    "gloo: run_training on 2 ranks",
    "gloo: training loss falls",
    "gloo: metrics finite (fp32)",
    "gloo: ranks report identical metrics",
    "gloo: ranks end with identical parameters",
    "gloo: checkpoint state on CPU",
    "gloo: checkpoint round-trips",
    "gloo: run resumed from epoch 1 matches",
    "gloo: val/top1",
]


def _check(argv: list[str], launch: Callable[[RankPlan], list[RankResult]] = spawn_ranks):
    out = io.StringIO()
    code = gpu_check_main(argv, launch=launch, out=out)
    return code, out.getvalue()


def _line(output: str, name: str) -> str:
    """The output's line of the check `name`."""
    (line,) = [line for line in output.splitlines() if line[6:].startswith(name + "  ")]
    return line


def _status(output: str, name: str) -> str:
    """PASS, FAIL or SKIP: the check `name`'s status in the output."""
    return _line(output, name)[:4]


@pytest.fixture(scope="module")
def cpu_run(digits_root: Path) -> tuple[int, str, list[RankResult]]:
    """The check on 2 gloo processes, 2 tiny epochs; its exit code, output, ranks' results."""
    launched: list[list[RankResult]] = []

    def launch(plan: RankPlan) -> list[RankResult]:
        launched.append(spawn_ranks(plan))
        return launched[-1]

    code, output = _check([*FLAGS, "--data-root", str(digits_root)], launch)
    return code, output, launched[0]


def test_the_check_passes_on_cpu_processes_and_prints_every_check(cpu_run) -> None:
    code, output, results = cpu_run
    assert code == 0, output
    for name in CHECKS:
        assert _status(output, name) == "PASS", (name, output)
    assert _status(output, "ray") == "SKIP"
    assert output.splitlines()[0].startswith("GPU check: CPU, 2 gloo processes")
    assert output.splitlines()[-1] == "GPU check passed: 9 checks passed, 1 skipped"
    # What the checks read: two ranks, both runs' epochs, rank 0's weights and checkpoint.
    assert [r.rank for r in results] == [0, 1]
    assert [m["epoch"] for m in results[1].straight] == [1, 2]
    # Resumed from epoch 1: that epoch reported again (cbtlab.train.loop), then epoch 2.
    assert [m["epoch"] for m in results[1].resumed] == [1, 2]
    assert results[0].state_devices == ["cpu"] and results[0].roundtrip == ""
    assert set(results[0].weights) == {"straight", "resumed"}


def _replay(results: list[RankResult], fault: Callable[[list[RankResult]], None]):
    """A launch that returns copies of `results` with `fault` applied, and runs nothing."""

    def launch(plan: RankPlan) -> list[RankResult]:
        copies = [
            dataclasses.replace(
                r,
                straight=[dict(m) for m in r.straight],
                resumed=[dict(m) for m in r.resumed],
                weights={k: dict(v) for k, v in r.weights.items()} if r.weights else None,
            )
            for r in results
        ]
        fault(copies)
        return copies

    return launch


def _ranks_disagree(results: list[RankResult]) -> None:
    results[1].digest = "0" * 64
    results[1].straight[1]["val/loss"] += 1e-9


def _loss_rises(results: list[RankResult]) -> None:
    for result in results:
        result.straight[0]["train/loss"] = result.straight[-1]["train/loss"] - 0.5
        if result.resumed[0]["epoch"] == 1:  # the resumed run's report of its checkpoint's epoch
            result.resumed[0]["train/loss"] = result.straight[0]["train/loss"]


def _non_finite(results: list[RankResult]) -> None:
    for result in results:
        result.resumed[0]["val/loss"] = math.nan


def _resume_drifts(results: list[RankResult]) -> None:
    weights = results[0].weights["resumed"]
    name = next(iter(weights))
    weights[name] = weights[name] + 1e-6


def _state_on_gpu(results: list[RankResult]) -> None:
    results[0].state_devices = ["cpu", "cuda"]


@pytest.mark.parametrize(
    ("fault", "failing"),
    [
        (
            _ranks_disagree,
            ["gloo: ranks report identical metrics", "gloo: ranks end with identical parameters"],
        ),
        (_loss_rises, ["gloo: training loss falls"]),
        (_non_finite, ["gloo: metrics finite (fp32)", "gloo: run resumed from epoch 1 matches"]),
        (_resume_drifts, ["gloo: run resumed from epoch 1 matches"]),
        (_state_on_gpu, ["gloo: checkpoint state on CPU"]),
    ],
)
def test_a_fault_fails_the_check_that_sees_it(
    cpu_run, digits_root: Path, fault: Callable, failing: list[str]
) -> None:
    _, _, results = cpu_run
    code, output = _check([*FLAGS, "--data-root", str(digits_root)], _replay(results, fault))
    assert code == 1, output
    for name in CHECKS[1:]:
        assert _status(output, name) == ("FAIL" if name in failing else "PASS"), (name, output)
    assert output.splitlines()[-1] == (
        f"GPU check FAILED ({len(failing)} of 10): {'; '.join(failing)}"
    )


def test_a_rank_that_crashes_fails_the_run(digits_root: Path) -> None:
    """A real fault: rank 1 raises at its second step (the loop's injected failure), and the
    check reports the run as failed with that rank's error (not rank 0's, whose peer went
    away) instead of hanging on rank 0."""
    flags = [*FLAGS, "--data-root", str(digits_root)]
    fail_at = FailAt(epoch=0, step=1, rank=1)
    code, output = _check(
        flags, lambda plan: spawn_ranks(dataclasses.replace(plan, fail_at=fail_at))
    )
    assert code == 1, output
    line = _line(output, "gloo: run_training on 2 ranks")
    assert line.endswith("rank 1: InjectedFailure: injected failure at epoch 0, step 1, rank 1"), (
        line
    )
    assert output.splitlines()[-1] == ("GPU check FAILED (1 of 2): gloo: run_training on 2 ranks")


def test_a_resume_on_cuda_may_differ_by_rounding_only() -> None:
    reports = [
        {"epoch": 1, "train/loss": 2.0, "time/epoch_s": 3.0},
        {"epoch": 2, "train/loss": 1.0, "time/epoch_s": 3.0},
    ]
    weights = {"w": torch.ones(100)}

    def check(delta: float, exact: bool, resumed=reports[1:]):
        drifted = {"w": weights["w"] + delta}
        return resume_check(
            "resume", reports, resumed, (weights, drifted), exact=exact, rtol=CUDA_RESUME_RTOL
        )

    assert check(0.0, exact=True).status == "PASS"
    assert check(1e-7, exact=True).status == "FAIL"  # the CPU: bit for bit
    assert check(1e-7, exact=False).status == "PASS"  # CUDA: rounding
    assert check(1e-2, exact=False).status == "FAIL"
    # A run that started over instead of resuming fails even with equal weights.
    restarted = check(0.0, exact=True, resumed=[{**reports[0], "time/epoch_s": 2.9}, reports[1]])
    assert restarted.status == "FAIL" and "did not continue" in restarted.detail
    # A resumed run reports its checkpoint's epoch again, as saved: that passes.
    assert check(0.0, exact=True, resumed=reports).status == "PASS"


def test_no_gpu_and_no_data_stop_the_check_with_a_reason(tmp_path: Path) -> None:
    if not torch.cuda.is_available():
        code, output = _check(["--no-ray"])
        assert code == 2 and "no CUDA device is visible" in output and "--device cpu" in output
    code, output = _check([*FLAGS, "--data-root", str(tmp_path)])
    assert code == 2
    assert "holds no digits shards" in output and "data_pipelines/prepare_digits.py" in output
