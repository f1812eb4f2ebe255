"""The performance tooling: side-by-side timing, peak memory, and the scaling and throughput
studies on tiny settings (their real figures come from the study scripts, not from tests)."""

from __future__ import annotations

import dataclasses
import math
import re
from collections import Counter
from types import SimpleNamespace
from typing import Any

import pytest
import torch
from mlflow.tracking import MlflowClient
from torch import nn

from cbtlab.attention import CBSA
from cbtlab.attention.cbsa import cbsa_mixing
from cbtlab.perf import attention_scaling, measure_side_by_side, peak_memory
from cbtlab.perf.attention_scaling import (
    ScalingSpec,
    run_scaling,
    scaling_defaults,
    scaling_headline,
    scaling_metrics,
    scaling_table,
)
from cbtlab.perf.cli import scaling_main, throughput_main
from cbtlab.perf.step_profile import profile_table, profile_throughput, summarize_profile
from cbtlab.perf.throughput import (
    ThroughputSpec,
    _dynamo_counts,
    _graphs_summary,
    run_throughput,
    throughput_headline,
    throughput_metrics,
    throughput_table,
)
from cbtlab.perf.timing import first_call

needs_cuda = pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device is visible")


def test_cases_run_interleaved_after_warmup() -> None:
    calls: list[str] = []
    timings = measure_side_by_side(
        {"a": lambda: calls.append("a"), "b": lambda: calls.append("b")}, warmup=2, rounds=3
    )
    assert calls == ["a", "a", "b", "b"] + ["a", "b"] * 3
    assert timings["a"].rounds == 3 and timings["a"].min_s <= timings["a"].median_s
    with pytest.raises(ValueError, match="rounds"):
        measure_side_by_side({"a": lambda: None}, rounds=0)


def test_on_cuda_each_call_is_timed_by_cuda_events(monkeypatch: pytest.MonkeyPatch) -> None:
    """The CUDA branch, with the CUDA calls replaced by a fake device whose clock only the
    cases advance: the times must be the events' (in seconds), read after a synchronise, and
    owe nothing to the host's clock."""
    gpu_ms = [0.0]
    synced = [False]
    stream = object()

    class Event:
        def __init__(self, enable_timing: bool = False) -> None:
            assert enable_timing
            self.at: float | None = None

        def record(self, on: object = None) -> None:
            assert on is stream
            self.at = gpu_ms[0]
            synced[0] = False

        def elapsed_time(self, end: Event) -> float:
            assert synced[0], "elapsed_time read before the device synchronised"
            assert self.at is not None and end.at is not None
            return end.at - self.at

    def synchronize(device: Any = None) -> None:
        synced[0] = True

    monkeypatch.setattr(torch.cuda, "Event", Event)
    monkeypatch.setattr(torch.cuda, "current_stream", lambda device=None: stream)
    monkeypatch.setattr(torch.cuda, "synchronize", synchronize)
    work = {"a": iter([2.0, 9.0, 3.0]), "b": iter([5.0, 5.0, 7.0])}

    def case(name: str) -> Any:
        def run() -> None:
            gpu_ms[0] += next(work[name])

        return run

    timings = measure_side_by_side(
        {"a": case("a"), "b": case("b")}, warmup=0, rounds=3, device="cuda"
    )
    assert timings["a"].median_s == pytest.approx(3e-3)
    assert (timings["a"].min_s, timings["a"].max_s) == pytest.approx((2e-3, 9e-3))
    assert timings["b"].median_s == pytest.approx(5e-3)


def test_first_call_reports_what_it_catches_and_raises_the_rest() -> None:
    calls: list[int] = []
    assert first_call(lambda: calls.append(1)) == "" and calls == [1]

    def out_of_memory() -> None:
        raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 9 GiB\nmore")

    assert (
        first_call(out_of_memory) == "OutOfMemoryError: CUDA out of memory. Tried to allocate 9 GiB"
    )

    def broken() -> None:
        raise ValueError("a bug")

    with pytest.raises(ValueError, match="a bug"):
        first_call(broken)
    assert first_call(broken, catch=(Exception,)) == "ValueError: a bug"

    def fails_to_compile() -> None:
        raise RuntimeError("backend='inductor' raised:\nAssertionError: lowering\n\nmore")

    reason = first_call(fails_to_compile, catch=(Exception,))
    assert reason == "RuntimeError: backend='inductor' raised: AssertionError: lowering"


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
    reference16 = row[("layer", "cbsa_straightforward", 16)]
    assert cbsa16["x_straightforward"] == pytest.approx(reference16["time_ms"] / cbsa16["time_ms"])
    assert math.isnan(reference16["x_straightforward"]) and math.isnan(base["x_straightforward"])
    assert row[("mechanism", "sdpa", 16)]["note"] == "default"  # CPU: PyTorch's own choice
    assert ("mechanism", "cbsa_fused", 16) not in seen  # only on CUDA
    assert all(r["peak_mb"] > 0 for r in rows)
    assert "cbsa_straightforward" in scaling_table(rows)
    assert any(line.startswith("cbsa (layer)") for line in scaling_headline(rows))
    with pytest.raises(ValueError, match="unknown attention"):
        ScalingSpec(layers=("nope",)).validate()
    with pytest.raises(ValueError, match="unknown dtype"):
        ScalingSpec(dtype="fp8").validate()


def test_scaling_runs_in_the_chosen_dtype(monkeypatch: pytest.MonkeyPatch) -> None:
    """bf16: the mechanism's tensors are bf16, and the layers run under bf16 autocast."""
    seen: dict[str, Any] = {}
    real_mixing, real_create = attention_scaling.cbsa_mixing, attention_scaling.create_attention

    def mixing(w: torch.Tensor, *args: Any, **kwargs: Any) -> torch.Tensor:
        seen["mixing"] = (w.dtype, args[0].dtype)
        return real_mixing(w, *args, **kwargs)

    def create(*args: Any, **kwargs: Any) -> nn.Module:
        layer = real_create(*args, **kwargs)
        layer.register_forward_pre_hook(
            lambda *_: seen.__setitem__(
                "layer", (torch.is_autocast_enabled("cpu"), torch.get_autocast_dtype("cpu"))
            )
        )
        return layer

    monkeypatch.setattr(attention_scaling, "cbsa_mixing", mixing)
    monkeypatch.setattr(attention_scaling, "create_attention", create)
    spec = ScalingSpec(
        sides=(4,), batch=1, heads=2, head_dim=8, rep_grid=(2, 2), rounds=1, warmup=0,
        layers=("cbsa",), dtype="bf16",
    )  # fmt: skip
    rows = run_scaling(spec, echo=lambda _: None)
    assert seen == {"mixing": (torch.bfloat16,) * 2, "layer": (True, torch.bfloat16)}
    assert all(r["time_ms"] > 0 for r in rows)
    run_scaling(dataclasses.replace(spec, dtype="fp32"), echo=lambda _: None)
    assert seen["mixing"] == (torch.float32,) * 2 and seen["layer"][0] is False


def test_a_case_out_of_memory_is_a_row_with_a_note(monkeypatch: pytest.MonkeyPatch) -> None:
    real = attention_scaling._mechanisms

    def short_of_memory(spec: ScalingSpec, side: int) -> Any:
        cases, notes = real(spec, side)

        def sdpa() -> None:
            raise torch.cuda.OutOfMemoryError("CUDA out of memory. Tried to allocate 1 GiB")

        return {**cases, "sdpa": sdpa}, notes

    monkeypatch.setattr(attention_scaling, "_mechanisms", short_of_memory)
    spec = ScalingSpec(
        sides=(4,), batch=1, heads=2, head_dim=8, rep_grid=(2, 2), rounds=1,
        levels=("mechanism",),
    )  # fmt: skip
    rows = {r["attention"]: r for r in run_scaling(spec, echo=lambda _: None)}
    sdpa, cbsa = rows["sdpa"], rows["cbsa"]
    assert sdpa["note"].startswith("OutOfMemoryError: CUDA out of memory")
    assert math.isnan(sdpa["time_ms"]) and math.isnan(sdpa["peak_mb"])
    assert math.isnan(cbsa["x_sdpa"]) and cbsa["time_ms"] > 0
    assert not any(
        key.startswith("mechanism/sdpa/") for key in scaling_metrics(list(rows.values()))
    )
    assert "OutOfMemoryError" in scaling_table(list(rows.values()))


def test_scaling_headline_states_the_goals() -> None:
    """Issue 18's goals at 3,136 and 12,544 tokens (x SDPA) and at every token count (x the
    plain-torch equations), from rows of given times."""
    times = {  # tokens: (sdpa, cbsa, cbsa_straightforward) in ms
        784: (1.0, 2.0, 1.0),
        3136: (24.0, 2.0, 3.0),
        12544: (90.0, 3.0, 6.0),
    }
    rows = [
        {"level": "mechanism", "attention": name, "tokens": n, "time_ms": t}
        for n, ts in times.items()
        for name, t in zip(("sdpa", "cbsa", "cbsa_straightforward"), ts, strict=True)
    ]
    attention_scaling._add_ratios(rows)
    lines = scaling_headline(rows)
    assert lines[1:] == [
        "cbsa (mechanism) at 3,136 tokens: 12.0x faster than SDPA (goal >= 10x: met); "
        "1.50x cbsa_straightforward",
        "cbsa (mechanism) at 12,544 tokens: 30.0x faster than SDPA (goal >= 50x: NOT met); "
        "2.00x cbsa_straightforward",
        "cbsa (mechanism) against cbsa_straightforward at every token count (goal: never "
        "slower): NOT met, slowest 0.50x at 784 tokens",
    ]
    assert "12.0x faster than SDPA at 3136" in lines[0]


def test_device_defaults() -> None:
    """CPU keeps its defaults; CUDA goes to 50,176 tokens in bf16 at issue 18's shape."""
    assert scaling_defaults("cpu") == {"sides": [14, 28, 56, 112, 128],
        "max_quadratic_tokens": 3136, "dtype": "fp32", "batch": 8, "heads": 3}  # fmt: skip
    cuda = scaling_defaults("cuda:0")
    assert [s * s for s in cuda["sides"]] == [196, 784, 3136, 12544, 50176]
    assert (cuda["max_quadratic_tokens"], cuda["dtype"], cuda["batch"], cuda["heads"]) == (
        50176,
        "bf16",
        16,
        6,
    )


def test_scaling_cli_logs_to_mlflow(tmp_path, capsys) -> None:  # type: ignore[no-untyped-def]
    uri = f"sqlite:///{tmp_path / 'mlflow.db'}"
    argv = ["--sides", "4", "--batch", "1", "--heads", "2", "--head-dim", "8", "--rep-grid",
            "2,2", "--rounds", "1", "--levels", "mechanism", "--tracking-uri", uri]  # fmt: skip
    assert scaling_main(argv) == 0
    out = capsys.readouterr().out
    assert "cbsa (mechanism)" in out and "fp32, batch 1" in out
    assert "results are printed only" not in out
    client = MlflowClient(uri)
    (run,) = client.search_runs([client.get_experiment_by_name("attention_scaling").experiment_id])
    assert run.data.metrics["mechanism/cbsa/16/time_ms"] > 0
    assert run.data.metrics["mechanism/cbsa/16/x_straightforward"] > 0
    assert run.data.params["batch"] == "1"
    artifacts = {a.path for a in client.list_artifacts(run.info.run_id)}
    assert {"attention_scaling.parquet", "attention_scaling.txt"} <= artifacts
    with pytest.raises(SystemExit) as exit_info:
        scaling_main(["--layers", "nope", "--no-mlflow"])
    assert exit_info.value.code == 2


def test_throughput_rows_and_ratios(monkeypatch: pytest.MonkeyPatch) -> None:
    """Eager and compiled rows side by side. Compiling is replaced here (Inductor takes minutes
    on a CPU): CBT's compilation fails as Inductor's did on the H200 (a row with the reason, no
    crash), ViT is compiled by Dynamo alone (`backend="eager"`), into one graph."""

    class FailsToCompile(nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            raise AssertionError("Inductor could not lower this graph")

    compiled: list[tuple[str, bool]] = []

    def fake_compile(model: nn.Module) -> nn.Module:
        batch_norms = any(isinstance(m, nn.BatchNorm2d) for m in model.modules())
        compiled.append((type(model).__name__, batch_norms))
        if "VisionTransformer" in type(model).__name__:
            return real_compile(model, backend="eager")
        return FailsToCompile()

    real_compile = torch.compile
    monkeypatch.setattr(torch, "compile", fake_compile)
    spec = ThroughputSpec(
        models=("cbt_tiny_patch16_224", "vit_tiny_patch16_224"), resolutions=(128,),
        batch_at_224=1, rounds=1, warmup=0, compile=True, peak_memory=True,
    )  # fmt: skip
    echoed: list[str] = []
    rows = run_throughput(spec, echo=echoed.append)
    # Each compiled case's first call is told as it ends: compiled or failed, its time, and
    # the graphs Dynamo made of it.
    firsts = [line.strip() for line in echoed]
    told = [line.rsplit(" in ", 1) for line in firsts if line.startswith(("train:c", "infer:c"))]
    assert [(first, rest.split(" s, ")[1]) for first, rest in told] == [
        ("train:compiled:cbt_tiny_patch16_224 at 128 px: failed: AssertionError: Inductor could "
         "not lower this graph", "0 graphs"),
        ("infer:compiled:cbt_tiny_patch16_224 at 128 px: failed: AssertionError: Inductor could "
         "not lower this graph", "0 graphs"),
        ("train:compiled:vit_tiny_patch16_224 at 128 px: compiled", "1 graph"),
        ("infer:compiled:vit_tiny_patch16_224 at 128 px: compiled", "1 graph"),
    ], echoed  # fmt: skip
    # Training runs the model, inference the deployed copy: CBT's stem BatchNorms folded.
    assert sorted(compiled) == [
        ("CBTransformer", False), ("CBTransformer", True),
        ("VisionTransformer", False), ("VisionTransformer", False),
    ]  # fmt: skip
    row = {(r["mode"], r["form"], r["model"]): r for r in rows}
    assert set(row) == {
        (mode, form, model)
        for mode in ("train", "infer")
        for form in ("eager", "compiled")
        for model in spec.models
    }
    for (_, form, model), r in row.items():
        assert r["gflops_per_image"] > 0
        if (form, model) == ("compiled", "cbt_tiny_patch16_224"):
            assert r["note"] == "AssertionError: Inductor could not lower this graph"
            assert math.isnan(r["images_per_s"]) and math.isnan(r["x_vit"])
            continue
        assert r["images_per_s"] > 0 and r["mfu"] > 0 and r["note"] == ""
        if model.startswith("vit"):
            assert r["x_vit"] == pytest.approx(1.0)
        # Peak memory: eager rows; on CPU not for compiled ones.
        assert r["peak_mb"] > 0 if form == "eager" else math.isnan(r["peak_mb"])
    cbt_train = row[("train", "eager", "cbt_tiny_patch16_224")]
    vit_train = row[("train", "eager", "vit_tiny_patch16_224")]
    assert cbt_train["memory_vit"] == pytest.approx(cbt_train["peak_mb"] / vit_train["peak_mb"])
    assert "Inductor could not lower" in throughput_table(rows)
    metrics = throughput_metrics(rows)
    assert "train_compiled/vit_tiny_patch16_224/128/images_per_s" in metrics
    assert "train/cbt_tiny_patch16_224/128/images_per_s" in metrics
    assert not any(k.startswith("train_compiled/cbt") for k in metrics)
    headline = throughput_headline(rows)
    assert [line.split(":")[0] for line in headline] == [
        "cbt_tiny_patch16_224 train at 128 px",
        "cbt_tiny_patch16_224 infer at 128 px",
    ]
    with pytest.raises(ValueError, match="multiple of the patch size"):
        ThroughputSpec(resolutions=(100,)).validate()


def test_a_compilation_with_a_graph_break_is_told_so() -> None:
    """What the throughput benchmark tells of a compilation, from Dynamo's own counts: a
    function that prints between two operations compiles into two graphs with one break, and
    the break's reason is named (torch 2.11's untraceable autocast question was such a break,
    in every CBT layer)."""

    def prints_midway(x: torch.Tensor) -> torch.Tensor:
        x = x.sin()
        print("midway")
        return x.cos()

    torch._dynamo.reset()
    graphs, breaks = _dynamo_counts()
    torch.compile(prints_midway, backend="eager")(torch.ones(3))
    after_graphs, after_breaks = _dynamo_counts()
    told = _graphs_summary(after_graphs - graphs, after_breaks - breaks)
    assert re.fullmatch(r"2 graphs, 1 graph break \(\w[^\n]*\)", told), told
    assert _graphs_summary(1, Counter()) == "1 graph"


def test_throughput_channels_last_runs_nhwc(monkeypatch: pytest.MonkeyPatch) -> None:
    """--channels-last: every case gets NHWC images and a model whose stem weights are NHWC,
    training and the deployed inference copy alike."""
    import timm

    seen: list[tuple[bool, bool, bool]] = []
    create = timm.create_model

    def create_and_watch(*args: Any, **kwargs: Any) -> nn.Module:
        model = create(*args, **kwargs)

        def watch(module: nn.Module, inputs: tuple[torch.Tensor]) -> None:
            if inputs[0].is_meta:  # count_flops's own copy
                return
            conv = next(m for m in module.modules() if isinstance(m, nn.Conv2d))
            nhwc = torch.channels_last
            seen.append((module.training, inputs[0].is_contiguous(memory_format=nhwc),
                         conv.weight.is_contiguous(memory_format=nhwc)))  # fmt: skip

        model.register_forward_pre_hook(watch)
        return model

    monkeypatch.setattr(timm, "create_model", create_and_watch)
    spec = ThroughputSpec(
        models=("cbt_tiny_patch16_224",), resolutions=(128,), batch_at_224=2, rounds=1,
        warmup=0, channels_last=True,
    )  # fmt: skip
    run_throughput(spec, echo=lambda _: None)
    assert {training for training, _, _ in seen} == {True, False}  # train and infer ran
    assert all(images and weights for _, images, weights in seen), seen


@pytest.mark.gpu
@needs_cuda
@pytest.mark.parametrize("dtype", ["bf16", "fp32"])
def test_scaling_on_cuda(dtype: str) -> None:
    """On a GPU: flash SDPA in bf16 (PyTorch's choice in fp32), the fused form beside the
    default dispatch, every case timed by CUDA events, peak memory from the allocator."""
    spec = ScalingSpec(
        sides=(8, 16), batch=2, heads=2, head_dim=64, rep_grid=(4, 4), rounds=2,
        max_quadratic_tokens=256, device="cuda", dtype=dtype,
    )  # fmt: skip
    rows = run_scaling(spec, echo=lambda _: None)
    mech = {(r["attention"], r["tokens"]): r for r in rows if r["level"] == "mechanism"}
    assert {name for name, _ in mech} == {"cbsa", "cbsa_fused", "cbsa_straightforward", "sdpa"}
    assert mech[("sdpa", 64)]["note"] == ("flash" if dtype == "bf16" else "default")
    assert mech[("cbsa_fused", 64)]["note"] == "impl fused"
    for r in rows:
        assert r["time_ms"] > 0 and r["peak_mb"] > 0, r


@pytest.mark.gpu
@needs_cuda
def test_throughput_on_cuda() -> None:
    """On a GPU, eager and compiled, bf16 autocast: every row is measured or says why not."""
    spec = ThroughputSpec(
        models=("cbt_tiny_patch16_224", "vit_tiny_patch16_224"), resolutions=(224,),
        batch_at_224=16, modes=("train",), rounds=2, device="cuda", amp=True, compile=True,
        peak_memory=True,
    )  # fmt: skip
    rows = run_throughput(spec, echo=lambda _: None)
    assert len(rows) == 4
    for r in rows:
        if r["form"] == "eager" or not r["note"]:
            assert r["images_per_s"] > 0 and 0 < r["mfu"] < 1 and r["peak_mb"] > 0, r
        else:
            assert math.isnan(r["images_per_s"]), r


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


def test_the_step_profile_ranks_operations_by_their_own_time(
    monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`--profile` runs the study's very steps under torch.profiler instead of timing them:
    per case, its operations by own time (CPU here), calls per step, and a compiled case that
    fails to compile is told, not profiled."""

    def fails_to_compile(model: nn.Module) -> nn.Module:
        class Fails(nn.Module):
            def forward(self, x: torch.Tensor) -> torch.Tensor:
                raise AssertionError("Inductor could not lower this graph")

        return Fails()

    monkeypatch.setattr(torch, "compile", fails_to_compile)
    spec = ThroughputSpec(
        models=("cbt_tiny_patch16_224", "vit_tiny_patch16_224"), resolutions=(128,),
        batch_at_224=1, modes=("train",), compile=True,
    )  # fmt: skip
    shown: list[str] = []
    profiles = profile_throughput(spec, top=6, steps=2, echo=shown.append)
    by_case = {p.case: p for p in profiles}
    assert set(by_case) == {
        f"train:{form}:{model}" for form in ("eager", "compiled") for model in spec.models
    }
    for model in spec.models:
        failed = by_case[f"train:compiled:{model}"]
        assert failed.note.startswith("AssertionError: Inductor") and not failed.ops
        p = by_case[f"train:eager:{model}"]
        assert p.resolution == 128 and p.batch == spec.batch(128) and p.note == ""
        assert len(p.ops) == 6
        times = [op.ms_per_step for op in p.ops]
        assert times == sorted(times, reverse=True) and times[-1] > 0
        assert 0 < sum(op.share for op in p.ops) <= 1 + 1e-9
        assert all(op.calls_per_step > 0 for op in p.ops)
        # Two steps were profiled: the per-step figures are halves of what the profiler saw.
        assert p.ops[0].share == pytest.approx(p.ops[0].ms_per_step / p.ms_per_step)
        assert p.launches_per_step > 1000  # aten calls of a forward, backward and AdamW step
        assert any(op.name in ("aten::mm", "aten::addmm", "aten::bmm") for op in p.ops)
    text = "\n".join(shown)
    assert f"train:eager:cbt_tiny_patch16_224 at 128 px (batch {spec.batch(128)}): " in text
    assert "not profiled: AssertionError" in text and "calls/step" in text
    assert profile_table([by_case["train:eager:vit_tiny_patch16_224"]]).count("aten::") == 6

    assert throughput_main(
        ["--models", "vit_tiny_patch16_224", "--resolutions", "64", "--modes", "infer",
         "--profile", "3", "--no-mlflow"]
    ) == 0  # fmt: skip
    out = capsys.readouterr().out
    assert "profiled" in out and "infer:eager:vit_tiny_patch16_224 at 64 px" in out
    assert "images/s" not in out  # profiled instead of timed
    with pytest.raises(SystemExit) as exit_info:
        throughput_main(["--profile", "-1", "--no-mlflow"])
    assert exit_info.value.code == 2


def test_the_cuda_profile_counts_each_kernel_once() -> None:
    """On CUDA the step's time is its kernels' (each once: a record_function range's device-side
    annotation spans kernels and is not one), an operation's share is the time of the kernels it
    launched itself, and what no operation claims is told apart."""
    from torch.autograd import DeviceType

    def kernel(us: float, annotation: bool = False) -> SimpleNamespace:
        span = SimpleNamespace(elapsed_us=lambda: us)
        return SimpleNamespace(
            device_type=DeviceType.CUDA, is_user_annotation=annotation, time_range=span
        )

    def op(name: str, count: int, device_us: float) -> SimpleNamespace:
        return SimpleNamespace(
            key=name, count=count, device_type=DeviceType.CPU, self_device_time_total=device_us,
            self_cpu_time_total=1.0,
        )  # fmt: skip

    # Two steps: addmm's 2 kernels of 300 us, copy_'s 4 of 50 us, 100 us of a compiled
    # region's kernels, all inside an optimizer-step annotation of 900 us.
    events = [kernel(300), kernel(300), *(kernel(50) for _ in range(4)), kernel(100)]
    events.append(kernel(900, annotation=True))
    averages = [
        op("aten::addmm", 2, 600.0), op("aten::copy_", 4, 200.0), op("aten::linear", 2, 0.0),
        op("Optimizer.step#AdamW.step", 2, 0.0), op("cudaLaunchKernel", 7, 0.0),
    ]  # fmt: skip
    p = summarize_profile(events, averages, "cuda", steps=2, top=5)
    assert p.ms_per_step == pytest.approx(0.45)  # (600 + 200 + 100) us over 2 steps
    assert p.launches_per_step == 3.5
    assert p.unattributed_ms_per_step == pytest.approx(0.05)
    assert [(o.name, o.calls_per_step, o.ms_per_step) for o in p.ops] == [
        ("aten::addmm", 1.0, pytest.approx(0.3)),
        ("aten::copy_", 2.0, pytest.approx(0.1)),
    ]
    assert [o.share for o in p.ops] == [pytest.approx(600 / 900), pytest.approx(200 / 900)]
    assert "kernels no operation claims" in profile_table([p]).splitlines()[0]
