"""`studies/gpu_acceptance.sh` on a CPU: its plan, its time budget, its exit status. The steps'
programs are replaced by a stand-in that records its arguments, so nothing here needs a GPU."""

from __future__ import annotations

import os
import shutil
import subprocess
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]
SCRIPT = ROOT / "studies" / "gpu_acceptance.sh"

pytestmark = pytest.mark.skipif(shutil.which("bash") is None, reason="needs bash")


def _run(
    tmp_path: Path, *args: str, budget: int = 540, failing: str = "no such program"
) -> subprocess.CompletedProcess[str]:
    """The script with a stand-in Python: it records each call's arguments and fails where
    they name `failing`."""
    calls = tmp_path / "calls"
    fake = tmp_path / "python"
    fake.write_text(
        "#!/usr/bin/env bash\n"
        f'echo "$*" >> {calls}\n'
        f'case "$*" in *"{failing}"*) echo "FAIL: loss"; exit 1;; esac\n'
    )
    fake.chmod(0o755)
    env = {**os.environ, "PYTHON": str(fake), "BUDGET_S": str(budget)}
    return subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, env=env, timeout=60
    )


def _calls(tmp_path: Path) -> list[str]:
    path = tmp_path / "calls"
    return path.read_text().splitlines()[1:] if path.exists() else []  # [0]: the version line


def _plan() -> list[tuple[str, int, int, str]]:
    out = subprocess.run(
        ["bash", str(SCRIPT), "--list"], capture_output=True, text=True, check=True
    ).stdout
    rows = []
    for line in out.splitlines()[1:]:
        name, estimate, limit, command = line.split(None, 3)
        rows.append((name, int(estimate.rstrip("s")), int(limit.rstrip("s")), command))
    return rows


def test_the_plan_puts_the_open_issues_numbers_first_and_names_real_files() -> None:
    plan = _plan()
    names = [name for name, *_ in plan]
    assert names[:2] == ["throughput", "compiled"]
    assert len(set(names)) == len(names)
    for name, estimate, limit, command in plan:
        # Each step fits the default budget, and so one 10-minute call of a lent machine.
        assert 0 < estimate <= limit <= 540, name
        for word in command.split():
            if word.startswith(("studies/", "tests/")):
                assert (ROOT / word.split("::")[0]).is_file(), (name, word)
    # A first call of 540 s runs the headline: the eager table, then the compiled one.
    assert sum(estimate for _, estimate, _, _ in plan[:2]) <= 540


def test_steps_run_in_order_while_the_budget_holds_their_estimates(tmp_path: Path) -> None:
    plan = [(name, estimate) for name, estimate, _, _ in _plan()]
    budget = plan[0][1] + 10  # the steps run at once here: each fits or not by its estimate
    fits = [name for name, estimate in plan if estimate <= budget]
    skipped = [name for name, estimate in plan if estimate > budget]
    assert fits[0] == "throughput" and "loop" in fits and skipped  # the budget picks, in order
    result = _run(tmp_path, budget=budget)
    assert result.returncode == 3, result.stdout + result.stderr  # none failed, some left out
    ran = [line.split(":")[0].removeprefix("=== ") for line in result.stdout.splitlines()
           if line.startswith("=== ") and ": exit 0 after " in line]  # fmt: skip
    assert ran == fits
    calls = _calls(tmp_path)
    assert len(calls) == len(fits)
    assert "studies/throughput.py --device cuda" in calls[0]
    assert "studies/bench_loop_overhead.py --device cuda" in calls[fits.index("loop")]
    for name in skipped:
        assert f"=== {name}: skipped: " in result.stdout
    assert f"go on with: bash studies/gpu_acceptance.sh {' '.join(skipped)}" in result.stdout
    assert f"passed: {' '.join(fits)}" in result.stdout
    assert "all steps passed" not in result.stdout


def test_a_failed_step_is_named_and_the_others_still_run(tmp_path: Path) -> None:
    result = _run(tmp_path, "check", "scaling", failing="studies/gpu_check.py")
    assert result.returncode == 1
    assert "FAIL: loss" in result.stdout and "=== check: exit 1 after" in result.stdout
    assert "FAILED: check" in result.stdout and "passed: scaling" in result.stdout
    calls = _calls(tmp_path)
    assert [c.split()[0] for c in calls] == ["studies/gpu_check.py", "studies/attention_scaling.py"]


def test_from_starts_at_a_step(tmp_path: Path) -> None:
    result = _run(tmp_path, "--from", "gpu-tests", budget=10_000)
    assert result.returncode == 0, result.stdout + result.stderr
    calls = _calls(tmp_path)
    assert calls[0].endswith("tests/test_gpu.py") and len(calls) == 5
    assert all("tests/test_gpu_compile.py::" in call for call in calls[1:])
    assert "all steps passed" in result.stdout


def test_an_unknown_step_is_refused_with_the_list(tmp_path: Path) -> None:
    result = _run(tmp_path, "--from", "throughputs")
    assert result.returncode == 2
    assert "no step named 'throughputs'" in result.stderr and "compiled-small" in result.stderr
    assert _calls(tmp_path) == []


@pytest.mark.parametrize(
    ("args", "env", "says"),
    [
        (("--from", "scaling", "kernels"), {}, "either --from STEP or the steps"),
        (("--from",), {}, "--from takes a step's name"),
        ((), {"BUDGET_S": "9m"}, "BUDGET_S must be a number of seconds, not '9m'"),
    ],
)
def test_a_wrong_command_line_runs_nothing(
    tmp_path: Path, args: tuple[str, ...], env: dict[str, str], says: str
) -> None:
    result = subprocess.run(
        ["bash", str(SCRIPT), *args], capture_output=True, text=True, timeout=60,
        env={**os.environ, "PYTHON": "false", **env},
    )  # fmt: skip
    assert result.returncode == 2 and says in result.stderr, result.stderr
    assert result.stdout == ""
