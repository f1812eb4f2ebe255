"""The performance tooling: side-by-side timing, peak memory, and the scaling and throughput
studies on tiny settings (their real figures come from the study scripts, not from tests)."""

from __future__ import annotations

import math

import pytest
import torch
from mlflow.tracking import MlflowClient

from cbtlab.attention import CBSA
from cbtlab.attention.cbsa import cbsa_mixing
from cbtlab.perf import measure_side_by_side, peak_memory
from cbtlab.perf.attention_scaling import (
    ScalingSpec,
    run_scaling,
    scaling_headline,
    scaling_table,
)
from cbtlab.perf.cli import scaling_main
from cbtlab.perf.throughput import ThroughputSpec, run_throughput, throughput_table


def test_cases_run_interleaved_after_warmup() -> None:
    calls: list[str] = []
    timings = measure_side_by_side(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2, rounds=3
    )
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert timings["a"].rounds == 3 and timings["a"].min_s <= timings["a"].median_s
    with pytest.raises(ValueError, match="rounds"):
        measure_side_by_side({"a": lambda: None}, rounds=0)


def test_peak_memory_follows_allocations_and_releases() -> None:
    def two_alive_at_once() -> None:
        a = torch.ones(1000, 250)  # 1 MB
        b = a * 2  # 1 MB, both alive
        del a
        c = b + 1  # a was released: still 2 MB at most
        del b, c

    assert peak_memory(two_alive_at_once) == 2 * 1000 * 250 * 4
    x = torch.ones(1000, 250)
    # Views and in-place results hold no new storage.
    assert peak_memory(lambda: x[:10].view(-1).add_(1)) == 0


def test_cbsa_never_holds_memory_of_order_n_squared() -> None:
    """At 16,385 tokens an N x N float matrix is 1 GiB; CBSA's forward + backward must stay
    within a small multiple of N x (m + d) floats, in both implementations."""
    n = 1 + 128 * 128
    x = torch.randn(1, n, 16, requires_grad=True)
    attn = CBSA(16, 2, rep_grid=(4, 4))
    for fused in (True, False):
        attn.fused = fused
        peak = peak_memory(lambda: attn(x, (128, 128)).sum().backward())
        assert peak < 40 * n * (16 + 2 * 16) * 4, (fused, peak)
        assert peak < n * n * 4 / 100
    # The mechanism alone (`cbsa_mixing`, one function with its own backward): 2 heads x 8.
    w = torch.randn(1, 2, 128 * 128, 8, requires_grad=True)
    steps = torch.randn(2, 2, requires_grad=True)
    upstream = torch.randn(1, 2, 128 * 128, 8)

    def mixing() -> None:
        out = cbsa_mixing(w, steps[0], steps[1], grid_size=(128, 128), rep_grid=(4, 4))
        out.backward(upstream)

    peak = peak_memory(mixing)
    assert peak < 40 * n * (16 + 2 * 8) * 4, peak
    small = torch.randn(2048, 16)
    assert peak_memory(lambda: small @ small.T) >= 2048 * 2048 * 4  # the tracker sees N x N


def test_scaling_rows_ratios_and_table() -> None:
    spec = ScalingSpec(
        sides=(4, 8), batch=1, heads=2, head_dim=8, rep_grid=(2, 2), rounds=1,
        max_quadratic_tokens=16,
    )  # fmt: skip
    rows = run_scaling(spec, echo=lambda _: None)
    seen = {(r["level"], r["attention"], r["tokens"]) for r in rows}
    assert ("mechanism", "sdpa", 16) in seen and ("mechanism", "sdpa", 64) not in seen
    assert ("layer", "softmax", 64) not in seen and ("layer", "cbsa", 64) in seen
    assert {"cbsa", "cbsa_straightforward", "linear", "tssa", "agent", "mssa"} <= {
        name for level, name, _ in seen if level == "layer"
    }
    row = {(r["level"], r["attention"], r["tokens"]): r for r in rows}
    cbsa16, cbsa64 = row[("layer", "cbsa", 16)], row[("layer", "cbsa", 64)]
    assert cbsa64["x_prev"] == pytest.approx(cbsa64["time_ms"] / cbsa16["time_ms"])
    base = row[("layer", "softmax", 16)]
    assert cbsa16["x_sdpa"] == pytest.approx(base["time_ms"] / cbsa16["time_ms"])
    assert math.isnan(cbsa64["x_sdpa"]) and math.isnan(cbsa16["x_prev"])
    assert all(r["peak_mb"] > 0 for r in rows)
    assert "cbsa_straightforward" in scaling_table(rows)
    assert any(line.startswith("cbsa (layer)") for line in scaling_headline(rows))
    with pytest.raises(ValueError, match="unknown attention"):
        ScalingSpec(layers=("nope",)).validate()


def test_scaling_cli_logs_to_mlflow(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--sides", "4", "--batch", "1", "--heads", "2", "--head-dim", "8", "--rep-grid",
            "2,2", "--rounds", "1", "--levels", "mechanism", "--tracking-uri", uri]  # fmt: skip
    assert scaling_main(argv) == 0
    out = capsys.readouterr().out
    assert "cbsa (mechanism)" in out
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("attention_scaling").experiment_id])
    assert run.data.metrics["mechanism/cbsa/16/time_ms"] > 0
    assert run.data.params["batch"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"attention_scaling.parquet", "attention_scaling.txt"} <= artifacts
    with pytest.raises(SystemExit) as exit_info:
        scaling_main(["--layers", "nope", "--no-mlflow"])
    assert exit_info.value.code == 2


def test_throughput_rows_and_ratios() -> None:
    spec = ThroughputSpec(
        models=("cbt_tiny_patch16_224", "vit_tiny_patch16_224"), resolutions=(128,),
        batch_at_224=1, rounds=1, warmup=0,
    )  # fmt: skip
    rows = run_throughput(spec, echo=lambda _: None)
    assert {(r["mode"], r["model"]) for r in rows} == {
        (mode, model) for mode in ("train", "infer") for model in spec.models
    }
    for r in rows:
        assert r["images_per_s"] > 0 and r["gflops_per_image"] > 0 and r["mfu"] > 0
        if r["model"].startswith("vit"):
            assert r["x_vit"] == pytest.approx(1.0)
    assert "cbt_tiny_patch16_224" in throughput_table(rows)
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ThroughputSpec(resolutions=(100,)).validate()


def test_loop_overhead_times_both_loops_and_the_platform_one_trains(
    capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from cbtlab.perf import loop_overhead

    batches: list[int] = []
    real = loop_overhead.train_batch

    def counted(*args, **kwargs):  # type: ignore[no-untyped-def]
        batches.append(args[-1])
        return real(*args, **kwargs)

    monkeypatch.setattr(loop_overhead, "train_batch", counted)
    argv = ["--device", "cpu", "--model", "cbt_tiny_patch16_224", "--batch", "2"]
    argv += ["--img-size", "128", "--steps", "2", "--rounds", "1"]
    assert loop_overhead.loop_overhead_main(argv) == 0
    # warm-up and one round of 2 steps each, through the worker loop's own micro-batch
    assert batches == [0, 1, 2, 3]
    out = capsys.readouterr().out
    assert "bare" in out and "platform / bare:" in out
    slow = loop_overhead.OverheadResult("m", 2, 128, "fp32", bare_ms=10.0, platform_ms=10.6)
    monkeypatch.setattr(loop_overhead, "measure_loop_overhead", lambda **kwargs: slow)
    assert loop_overhead.loop_overhead_main([*argv, "--max-ratio", "1.05"]) == 1
    assert "FAIL: above 1.05x" in capsys.readouterr().out
