"""The loader benchmark (`cbtlab data bench`) on a tiny dataset: it runs end to end, times our
loader and both library paths, and ends with the ratio over the best of them."""

from __future__ import annotations

import math
import statistics
from pathlib import Path

import pytest

from cbtlab.perf.loader import (
    IMAGEFOLDER_STEPS,
    LIBRARY_LOADERS,
    LOADERS,
    WEBDATASET_MAIN_STEP,
    WEBDATASET_WORKER_STEPS,
    WEBLOADER_STEPS,
    BenchConfig,
    BenchResult,
    run_bench,
)


def test_the_bench_times_every_loader_and_ends_with_the_ratio(tmp_path: Path) -> None:
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
    assert set(result.img_s) == set(result.cpu_ms) == set(LOADERS)
    for name in LOADERS:
        assert len(result.img_s[name]) == 2 and all(r > 0 for r in result.img_s[name])
        # Persistent workers, never joined, are read from /proc (NaN if they could not be).
        assert all(math.isfinite(ms) and ms > 0 for ms in result.cpu_ms[name]), name
    for step in (
        *IMAGEFOLDER_STEPS,
        *WEBLOADER_STEPS,
        *WEBDATASET_WORKER_STEPS,
        WEBDATASET_MAIN_STEP,
    ):
        assert result.costs_ms[step] > 0
    lines = result.lines()
    assert "page cache cold" in lines[0]
    assert lines[-1] == f"ours/best library path images/s ratio: {result.ratio:.2f}"
    with pytest.raises(ValueError, match="cache='lukewarm'"):
        run_bench(BenchConfig(cache="lukewarm"), tmp_path)


def test_the_ratio_is_against_the_best_library_path_of_each_repeat() -> None:
    result = BenchResult(
        BenchConfig(),
        image_bytes=1,
        write_s=1.0,
        img_s={
            "ours": [120.0, 90.0, 100.0],
            "webloader": [100.0, 100.0, 50.0],
            "imagefolder": [60.0, 45.0, 80.0],
        },
        cpu_ms={name: [1.0] * 3 for name in LOADERS},
        costs_ms={},
    )
    # Repeat by repeat over the better library path: 1.2, 0.9, 1.25.
    assert result.ratio == pytest.approx(statistics.median([1.2, 0.9, 1.25]))
    assert result.paired_ratio("ours", ["imagefolder"]) == pytest.approx(2.0)
    assert set(LIBRARY_LOADERS) == set(LOADERS) - {"ours"}
