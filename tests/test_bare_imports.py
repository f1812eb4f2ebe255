"""The models, the worker loop and the GPU check import and train on a bare GPU machine's
Python: torch, torchvision, timm, numpy, pillow, pyarrow and a few small pure-Python packages,
without the driver-side ones (Ray, MLflow, Optuna) nor scikit-learn, pandas, matplotlib or
scipy.

Each test runs Python in a subprocess whose `sitecustomize` wraps every finder of
`sys.meta_path` so that it does not see those packages: `import ray` raises
ModuleNotFoundError and `importlib.util.find_spec("ray")` is None, as where they are not
installed (torch and timm probe for some of them with `find_spec` as they import). The
processes the GPU check spawns start with the same `sitecustomize`. A failure prints the
subprocess's traceback, which names the module and line that imported a blocked package.
"""

from __future__ import annotations

import os
import subprocess
import sys
import textwrap
from pathlib import Path

REPO = Path(__file__).resolve().parents[1]
BLOCKED = ("ray", "mlflow", "optuna", "sklearn", "pandas", "matplotlib", "scipy")
# Their distributions' names, hidden from importlib.metadata as well.
BLOCKED_DISTRIBUTIONS = (*BLOCKED, "scikit-learn")

SITECUSTOMIZE = """
import importlib.abc
import sys

BLOCKED = frozenset({blocked!r})
DISTRIBUTIONS = frozenset({distributions!r})


class Hidden(importlib.abc.MetaPathFinder):
    \"\"\"A meta path finder as it would be where the blocked packages are not installed.\"\"\"

    def __init__(self, inner):
        self.inner = inner

    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in BLOCKED:
            return None
        find = getattr(self.inner, "find_spec", None)
        return find(name, path, target) if find else None

    def find_distributions(self, *args, **kwargs):
        find = getattr(self.inner, "find_distributions", None)
        found = find(*args, **kwargs) if find else ()
        return [d for d in found if (d.metadata["Name"] or "").lower() not in DISTRIBUTIONS]

    def __getattr__(self, name):
        return getattr(self.inner, name)


sys.meta_path[:] = [Hidden(finder) for finder in sys.meta_path]
"""


def _bare_python(
    tmp_path: Path,
    code: str | list[str],
    timeout: int = 240,
    blocked: tuple[str, ...] = BLOCKED,
):
    """Run `code` (a script, or argv after the interpreter) without the `blocked` packages,
    with the package taken from the checkout (PYTHONPATH=platform)."""
    site = tmp_path / "bare_site"
    site.mkdir(parents=True)
    distributions = (*blocked, "scikit-learn")  # sklearn's distribution name
    (site / "sitecustomize.py").write_text(
        SITECUSTOMIZE.format(blocked=blocked, distributions=distributions)
    )
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(site), str(REPO / "platform")])}
    argv = ["-c", textwrap.dedent(code)] if isinstance(code, str) else code
    return subprocess.run(
        [sys.executable, *argv],
        cwd=REPO,
        env=env,
        capture_output=True,
        text=True,
        timeout=timeout,
    )


def test_the_blocker_hides_the_packages(tmp_path: Path) -> None:
    proc = _bare_python(
        tmp_path,
        f"""
        import importlib.metadata, importlib.util
        for name in {BLOCKED!r}:
            assert importlib.util.find_spec(name) is None, name
            try:
                __import__(name)
            except ModuleNotFoundError:
                pass
            else:
                raise AssertionError(name + " imported")
        names = {{d.metadata["Name"].lower() for d in importlib.metadata.distributions()}}
        assert "torch" in names and not names & {set(BLOCKED_DISTRIBUTIONS)!r}, names
        print("hidden")
        """,
    )
    assert proc.returncode == 0 and proc.stdout.strip() == "hidden", proc.stderr


def test_models_loop_and_gpu_check_import_and_train_without_them(
    tmp_path: Path, digits_root: Path
) -> None:
    """Import the three, build the model, train one epoch on the prebuilt digits shards (the
    cache folder holding them: building them would need scikit-learn)."""
    proc = _bare_python(
        tmp_path,
        f"""
        import math, sys
        import torch
        import cbtlab.models, cbtlab.train.loop, cbtlab.train.gpu_check
        from cbtlab.config import ExperimentConfig
        from cbtlab.models import build_model
        from cbtlab.train.loop import run_training

        cfg = ExperimentConfig().with_overrides({{
            "model.depth": 1, "model.embed_dim": 24, "model.rep_grid": "2x2",
            "train.epochs": 1, "data.batch_size": 128,
            "data.cache_dir": {str(digits_root.parent)!r},
        }})
        logits = build_model(cfg.model)(torch.zeros(2, 1, 16, 16))
        assert logits.shape == (2, 10), logits.shape
        reports = []
        run_training(cfg, report=lambda metrics, state: reports.append(metrics))
        assert len(reports) == 1 and math.isfinite(reports[0]["train/loss"]), reports
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in {BLOCKED!r})
        assert not loaded, loaded
        print("trained", int(reports[0]["val/samples"]))
        """,
    )
    assert proc.returncode == 0, proc.stderr[-6000:]
    assert proc.stdout.split() == ["trained", "360"], proc.stdout


def test_the_gpu_check_runs_on_cpu_without_them(tmp_path: Path, digits_root: Path) -> None:
    """The entry point end to end (one gloo process, whose spawned interpreter is bare too):
    without Ray its Ray part is skipped; without scikit-learn, digits that are not prebuilt
    stop it with the way to pre-build them, and `--data-root` (the digits folder itself) reads
    prebuilt ones."""
    script = str(REPO / "studies" / "gpu_check.py")
    tiny = ["--set", "model.depth=1", "--set", "model.embed_dim=24", "--set", "model.rep_grid=2x2"]
    flags = ["--device", "cpu", "--processes", "1", "--epochs", "2", "--min-top1", "0", *tiny]
    # An empty cache folder: the digits would have to be built there.
    no_data = _bare_python(
        tmp_path / "empty", [script, *flags, "--set", f"data.cache_dir={tmp_path / 'none'}"]
    )
    assert no_data.returncode == 2, no_data.stdout + no_data.stderr[-3000:]
    assert "building them needs sklearn" in no_data.stdout
    assert "python data_pipelines/prepare_digits.py" in no_data.stdout
    proc = _bare_python(tmp_path / "run", [script, *flags, "--data-root", str(digits_root)])
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    lines = proc.stdout.splitlines()
    assert "SKIP  ray  ray is not installed" in lines
    assert lines[-1] == "GPU check passed: 8 checks passed, 2 skipped"


# The benchmarks need less still: torch, timm and triton (issue 19), not the small packages the
# worker loop's data layer reads shards with, which the GPU check needs carried over.
BENCHMARK_BLOCKED = (*BLOCKED, "webdataset", "braceexpand", "cloudpickle")


def test_the_benchmarks_run_without_them(tmp_path: Path) -> None:
    """Both benchmark scripts, in one process (to import torch once): their help, then a tiny
    CPU run of each, without even webdataset, braceexpand and cloudpickle. Without MLflow and
    without --no-mlflow, the scaling study says once that it prints only."""
    scaling = ["--device", "cpu", "--levels", "mechanism", "--sides", "4", "--batch", "1",
               "--heads", "1", "--head-dim", "8", "--rep-grid", "2,2", "--rounds", "1"]  # fmt: skip
    throughput = ["--device", "cpu", "--models", "cbt_tiny_patch16_224,vit_tiny_patch16_224",
                  "--resolutions", "128", "--batch", "1", "--modes", "infer", "--rounds", "1",
                  "--no-mlflow"]  # fmt: skip
    runs = [(script, ["--help"]) for script in ("attention_scaling.py", "throughput.py")]
    runs += [("attention_scaling.py", scaling), ("throughput.py", throughput)]
    proc = _bare_python(
        tmp_path,
        blocked=BENCHMARK_BLOCKED,
        code=f"""
        import runpy, sys
        for script, argv in {runs!r}:
            sys.argv = [script, *argv]
            try:
                runpy.run_path({str(REPO / "studies")!r} + "/" + script, run_name="__main__")
            except SystemExit as exc:
                assert exc.code in (0, None), (script, argv, exc.code)
        loaded = sorted(m for m in sys.modules if m.partition(".")[0] in {BENCHMARK_BLOCKED!r})
        assert not loaded, loaded
        """,
    )
    assert proc.returncode == 0, proc.stdout + proc.stderr[-6000:]
    out = proc.stdout
    assert out.count("usage: attention_scaling.py") == out.count("usage: throughput.py") == 1
    assert "--dtype {fp32,bf16,fp16}" in out and "--compile" in out
    lines = out.splitlines()
    assert lines.count("MLflow is not installed here: results are printed only (not logged)") == 1
    assert any(line.startswith("mechanism  cbsa ") for line in lines), out
    assert any(line.startswith("cbt_tiny_patch16_224 infer at 128 px: ") for line in lines), out
