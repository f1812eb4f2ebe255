"""The loader benchmark (data_pipelines/bench_loader.py) on a tiny dataset: it runs end to end,
measures both loaders and ends with the ratio line."""

from __future__ import annotations

import math
from pathlib import Path

import pytest

from cbtlab.perf.loader import (
    IMAGEFOLDER_STEPS,
    WEBDATASET_MAIN_STEP,
    WEBDATASET_WORKER_STEPS,
    BenchConfig,
    run_bench,
)


def test_the_bench_times_both_loaders_and_ends_with_the_ratio(tmp_path: Path) -> None:
    cfg = BenchConfig(
        images=48,
        width=160,
        height=120,
        samples_per_shard=12,
        batch_size=8,
        img_size=32,
        repeats=2,
    )
    result = run_bench(cfg, tmp_path)
    assert len(result.webdataset_img_s) == len(result.imagefolder_img_s) == 2
    assert all(rate > 0 for rate in result.webdataset_img_s + result.imagefolder_img_s)
    # The pool's workers, never joined, are read from /proc (NaN if they could not be).
    assert all(math.isfinite(ms) and ms > 0 for ms in result.webdataset_cpu_ms)
    for step in (*IMAGEFOLDER_STEPS, *WEBDATASET_WORKER_STEPS, WEBDATASET_MAIN_STEP):
        assert result.costs_ms[step] > 0
    lines = result.lines()
    assert "page cache cold" in lines[0]
    assert lines[-1] == f"webdataset/imagefolder images/s ratio: {result.ratio:.2f}"
    with pytest.raises(ValueError, match="cache='lukewarm'"):
        run_bench(BenchConfig(cache="lukewarm"), tmp_path)
