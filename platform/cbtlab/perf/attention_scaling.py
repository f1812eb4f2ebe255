"""Forward + backward time and peak memory of every attention mechanism against the token
count, at a fixed representative count, measured side by side (`studies/attention_scaling.py`).

Two levels are measured:
- "mechanism": the token mixing alone on projected per-head tensors (B, K, N, p) in the spec's
  dtype, the operation PyTorch's `scaled_dot_product_attention(q, k, v)` performs for softmax
  attention. `sdpa` is that call; on CUDA in bf16/fp16 it is restricted to the flash kernel
  (the row's note says which backend ran: "flash", or "default" where flash is not available).
  `cbsa` is `cbsa_mixing` with its default dispatch (the Triton kernels on CUDA, the CPU-tuned
  fused form on CPU); `cbsa_fused` (CUDA only) forces the CPU-tuned fused form on the GPU;
  `cbsa_straightforward` is the same equations written in plain torch, the reference that
  `cbsa` must never be slower than.
- "layer": every registered attention layer with its projections, on tokens (B, N, d), under
  autocast of the spec's dtype (none for fp32); the softmax layer (`softmax`, timm ViT's
  qkv + SDPA) is the baseline.
Every case runs forward, then backward from the same dense upstream gradient (fixed random
numbers, as a layer inside a network receives; `.sum()`'s gradient would be one number
broadcast, which each backward pass first copies out). Each row's `x_sdpa` is the baseline's
time over the row's time at the same level and token count (how many times faster than SDPA);
`x_straightforward` is, for CBSA's rows, `cbsa_straightforward`'s time over the row's;
`x_prev` is the row's time over its own time at the previous token count (4.0 is linear for a
2x larger grid side).
Quadratic mechanisms beyond `max_quadratic_tokens` are skipped: on a CPU one call at 12,544
tokens takes minutes. A case that runs out of CUDA memory is reported as a row with a note.
"""

from __future__ import annotations

import contextlib
import inspect
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cbtlab.attention import create_attention
from cbtlab.attention.cbsa import cbsa_mixing
from cbtlab.attention.common import pool_grid
from cbtlab.perf.timing import first_call, measure_side_by_side, peak_memory
from cbtlab.tables import render_table

LAYERS = ("cbsa", "linear", "tssa", "agent", "linear_attention", "mssa", "softmax")
QUADRATIC = frozenset({"softmax", "mssa", "sdpa"})
BASELINE = {"mechanism": "sdpa", "layer": "softmax"}
REFERENCE = "cbsa_straightforward"
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
# Issue 18's goals for the mechanism on an H200: x faster than SDPA at these token counts.
SDPA_GOALS = {3136: 10.0, 12544: 50.0}


def scaling_defaults(device: str) -> dict[str, Any]:
    """The defaults that depend on the device. CPU: 196 to 16,384 tokens, quadratic mechanisms
    up to 3,136, fp32. CUDA: 196 to 50,176 tokens, all of them for every mechanism, bf16, and
    issue 18's shape (B = 16, K = 6 heads; the layer's width d = 384, ViT-S's)."""
    if torch.device(device).type == "cuda":
        return {"sides": [14, 28, 56, 112, 224], "max_quadratic_tokens": 50176,
                "dtype": "bf16", "batch": 16, "heads": 6}  # fmt: skip
    return {"sides": [14, 28, 56, 112, 128], "max_quadratic_tokens": 3136,
            "dtype": "fp32", "batch": 8, "heads": 3}  # fmt: skip


@dataclass
class ScalingSpec:
    sides: Sequence[int] = (14, 28, 56, 112, 128)  # grid sides: 196 ... 16,384 tokens
    batch: int = 8
    heads: int = 3
    head_dim: int = 64
    rep_grid: tuple[int, int] = (8, 8)
    layers: Sequence[str] = LAYERS
    levels: Sequence[str] = ("mechanism", "layer")
    max_quadratic_tokens: int = 3136
    warmup: int = 1
    rounds: int = 5
    device: str = "cpu"
    dtype: str = "fp32"  # the mechanism tensors' dtype; the layers' autocast dtype
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> ScalingSpec:
        unknown = [name for name in self.layers if name not in LAYERS]
        if unknown:
            raise ValueError(f"unknown attention {unknown}; known: {', '.join(LAYERS)}")
        bad_levels = [lv for lv in self.levels if lv not in BASELINE]
        if bad_levels:
            raise ValueError(f"unknown level {bad_levels}; known: mechanism, layer")
        if self.dtype not in DTYPES:
            raise ValueError(f"unknown dtype {self.dtype!r}; known: {', '.join(DTYPES)}")
        for side in self.sides:
            if side < max(self.rep_grid):
                raise ValueError(f"grid side {side} is smaller than the rep grid {self.rep_grid}")
        return self

    @property
    def on_cuda(self) -> bool:
        return torch.device(self.device).type == "cuda"


def _randn(spec: ScalingSpec, gen: torch.Generator, *shape: int, dtype: torch.dtype) -> Any:
    # Drawn on the CPU from one seeded generator: the same numbers on every device.
    return torch.randn(*shape, generator=gen).to(device=spec.device, dtype=dtype)


def _sdpa_case(
    spec: ScalingSpec, qkv: Sequence[torch.Tensor], upstream: torch.Tensor
) -> tuple[Callable[[], Any], str]:
    """SDPA's case and the backend it runs on: flash on CUDA in half precision when PyTorch
    has it for this device and shape, otherwise PyTorch's own choice ("default")."""

    def default() -> None:
        F.scaled_dot_product_attention(*qkv).backward(upstream)

    if not spec.on_cuda or DTYPES[spec.dtype] == torch.float32:
        return default, "default"
    try:
        from torch.nn.attention import SDPBackend, sdpa_kernel
    except ImportError:  # torch < 2.3
        return default, "default (no torch.nn.attention)"

    def flash() -> None:
        with sdpa_kernel(SDPBackend.FLASH_ATTENTION):
            F.scaled_dot_product_attention(*qkv).backward(upstream)

    try:
        flash()
    except torch.cuda.OutOfMemoryError:
        torch.cuda.empty_cache()  # flash exists; the first call will report the shortage
    except RuntimeError:  # "No available kernel": no flash for this GPU, dtype or shape
        return default, "default (flash unavailable)"
    return flash, "flash"


def _mechanisms(
    spec: ScalingSpec, side: int
) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    b, k, p, n = spec.batch, spec.heads, spec.head_dim, side * side
    dtype = DTYPES[spec.dtype]
    gen = torch.Generator().manual_seed(spec.seed)
    qkv = [_randn(spec, gen, b, k, n, p, dtype=dtype).requires_grad_() for _ in range(3)]
    steps = _randn(spec, gen, 2, k, dtype=dtype).requires_grad_()
    upstream = _randn(spec, gen, b, k, n, p, dtype=dtype)
    grid = (side, side)

    def mixing(**impl: str) -> Callable[[], None]:
        def run() -> None:
            out = cbsa_mixing(
                qkv[0], steps[0], steps[1], grid_size=grid, rep_grid=spec.rep_grid, **impl
            )
            out.backward(upstream)

        return run

    def straightforward() -> None:
        w = qkv[0]
        q0 = pool_grid(w, grid, spec.rep_grid, "avg")
        a = torch.softmax(q0 @ w.transpose(-1, -2) * p**-0.5, dim=-1)
        q = q0 + steps[0].view(1, k, 1, 1) * (a @ w)
        c = F.scaled_dot_product_attention(q, q, q)
        (steps[1].view(1, k, 1, 1) * (a.transpose(-1, -2) @ c)).backward(upstream)

    cases: dict[str, Callable[[], Any]] = {"cbsa": mixing()}
    notes: dict[str, str] = {}
    # The CPU-tuned form on the GPU, where `cbsa_mixing` chooses its implementation.
    if spec.on_cuda and "impl" in inspect.signature(cbsa_mixing).parameters:
        cases["cbsa_fused"] = mixing(impl="fused")
        notes["cbsa_fused"] = "impl fused"
    cases[REFERENCE] = straightforward
    if n <= spec.max_quadratic_tokens:
        cases["sdpa"], notes["sdpa"] = _sdpa_case(spec, qkv, upstream)
    return cases, notes


def _autocast(spec: ScalingSpec) -> contextlib.AbstractContextManager[Any]:
    if DTYPES[spec.dtype] == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(spec.device).type, dtype=DTYPES[spec.dtype])


def _layers(spec: ScalingSpec, side: int) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    d, n = spec.heads * spec.head_dim, side * side
    gen = torch.Generator().manual_seed(spec.seed)
    x = _randn(spec, gen, spec.batch, n, d, dtype=torch.float32).requires_grad_()
    upstream = _randn(spec, gen, spec.batch, n, d, dtype=torch.float32)
    # The upstream gradient in the dtype the layer's output has (autocast's, or float32).
    grads = {torch.float32: upstream, DTYPES[spec.dtype]: upstream.to(DTYPES[spec.dtype])}

    def backward(out: torch.Tensor) -> None:
        out.backward(grads.get(out.dtype, upstream.to(out.dtype)))

    cases: dict[str, Callable[[], Any]] = {}
    for name in spec.layers:
        if name in QUADRATIC and n > spec.max_quadratic_tokens:
            continue
        torch.manual_seed(spec.seed)
        layer = create_attention(
            name, d, spec.heads, num_prefix_tokens=0, rep_grid=spec.rep_grid
        ).to(spec.device)

        def run(layer: torch.nn.Module = layer) -> None:
            with _autocast(spec):
                out = layer(x, (side, side))
            backward(out)

        cases[name] = run
        if name == "cbsa":

            def reference(layer: torch.nn.Module = layer) -> None:
                with _autocast(spec):
                    out = layer.forward_reference(x, (side, side))
                backward(out)

            cases[REFERENCE] = reference
    return cases, {}


def run_scaling(spec: ScalingSpec, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Measure every level, mechanism and token count of `spec`; returns one row each."""
    spec.validate()
    rows: list[dict[str, Any]] = []
    builders = {"mechanism": _mechanisms, "layer": _layers}
    for level in spec.levels:
        for side in spec.sides:
            tokens = side * side
            cases, notes = builders[level](spec, side)
            # The first warm-up call of each case, alone: a case that runs out of memory is
            # left out of the timing and reported.
            failed = {name: first_call(fn, spec.device) for name, fn in cases.items()}
            ok = {name: fn for name, fn in cases.items() if not failed[name]}
            timings = measure_side_by_side(
                ok, warmup=max(spec.warmup - 1, 0), rounds=spec.rounds, device=spec.device
            )
            for name, fn in cases.items():
                timing = timings.get(name)
                rows.append(
                    {
                        "level": level,
                        "attention": name,
                        "tokens": tokens,
                        "time_ms": timing.median_s * 1e3 if timing else math.nan,
                        "min_ms": timing.min_s * 1e3 if timing else math.nan,
                        "peak_mb": peak_memory(fn, spec.device) / 2**20 if timing else math.nan,
                        "note": failed[name] or notes.get(name, ""),
                    }
                )
            echo(f"  {level:9s} {tokens:6d} tokens: " + ", ".join(
                f"{name} {timings[name].median_s * 1e3:.2f} ms" if name in timings
                else f"{name} failed ({failed[name]})" for name in cases))  # fmt: skip
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    by_key = {(r["level"], r["attention"], r["tokens"]): r for r in rows}
    for r in rows:
        level, name, tokens = r["level"], r["attention"], r["tokens"]
        base = by_key.get((level, BASELINE[level], tokens))
        r["x_sdpa"] = base["time_ms"] / r["time_ms"] if base else math.nan
        ref = by_key.get((level, REFERENCE, tokens))
        is_cbsa = name.startswith("cbsa") and name != REFERENCE
        r["x_straightforward"] = ref["time_ms"] / r["time_ms"] if ref and is_cbsa else math.nan
        earlier = [
            other
            for (lv, other_name, n), other in by_key.items()
            if lv == level and other_name == name and n < tokens
        ]
        prev = max(earlier, key=lambda o: o["tokens"], default=None)
        r["x_prev"] = r["time_ms"] / prev["time_ms"] if prev else math.nan


def _num(v: float, fmt: str) -> str:
    return "-" if math.isnan(v) else format(v, fmt)


def scaling_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["level", "attention", "tokens", "fwd+bwd ms", "peak MiB", "x faster than SDPA",
               f"x faster than {REFERENCE}", "time / time at previous tokens", "note"]  # fmt: skip
    body = [
        [r["level"], r["attention"], str(r["tokens"]), _num(r["time_ms"], ".2f"),
         _num(r["peak_mb"], ".1f"), _num(r["x_sdpa"], ".1f"), _num(r["x_straightforward"], ".2f"),
         _num(r["x_prev"], ".2f"), r["note"]]
        for r in rows
    ]  # fmt: skip
    return render_table(headers, body)


def scaling_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics, e.g. `mechanism/cbsa/3136/time_ms`."""
    metrics: dict[str, float] = {}
    for r in rows:
        prefix = f"{r['level']}/{r['attention']}/{r['tokens']}"
        for key in ("time_ms", "peak_mb", "x_sdpa", "x_straightforward", "x_prev"):
            if not math.isnan(r[key]):
                metrics[f"{prefix}/{key}"] = float(r[key])
    return metrics


def _verdict(value: float, goal: float) -> str:
    return f"goal >= {goal:g}x: {'met' if value >= goal else 'NOT met'}"


def scaling_headline(rows: Sequence[dict[str, Any]]) -> list[str]:
    """Per level, CBSA's time growth for 4x the tokens and its speed-up over SDPA; then, for the
    mechanism, issue 18's goals: x faster than SDPA at 3,136 and 12,544 tokens, and never slower
    than the plain-torch equations at any token count."""
    measured = [r for r in rows if not math.isnan(r["time_ms"])]
    time_of = {(r["level"], r["attention"], r["tokens"]): r["time_ms"] for r in measured}
    lines = []
    for level in dict.fromkeys(r["level"] for r in rows):
        cbsa = {n: t for (lv, name, n), t in time_of.items() if lv == level and name == "cbsa"}
        base = {
            n: t for (lv, name, n), t in time_of.items() if (lv, name) == (level, BASELINE[level])
        }
        parts = [
            f"time({b})/time({a}) = {cbsa[b] / cbsa[a]:.2f}"
            for a, b in ((784, 3136), (3136, 12544))
            if a in cbsa and b in cbsa
        ]
        parts += [f"{base[n] / cbsa[n]:.1f}x faster than SDPA at {n}" for n in (784, 3136)
                  if n in base and n in cbsa]  # fmt: skip
        lines.append(f"cbsa ({level}): " + ("; ".join(parts) or "784 / 3,136 tokens not measured"))
    mech = {
        r["tokens"]: r for r in measured if (r["level"], r["attention"]) == ("mechanism", "cbsa")
    }
    for n, goal in SDPA_GOALS.items():
        if n not in mech:
            continue
        x = mech[n]["x_sdpa"]
        vs_sdpa = (
            "SDPA not measured"
            if math.isnan(x)
            else f"{x:.1f}x faster than SDPA ({_verdict(x, goal)})"
        )
        vs_ref = mech[n]["x_straightforward"]
        lines.append(f"cbsa (mechanism) at {n:,} tokens: {vs_sdpa}; "
                     f"{_num(vs_ref, '.2f')}x {REFERENCE}")  # fmt: skip
    vs_ref = {
        n: r["x_straightforward"] for n, r in mech.items() if not math.isnan(r["x_straightforward"])
    }
    if vs_ref:
        worst = min(vs_ref, key=vs_ref.__getitem__)
        lines.append(
            f"cbsa (mechanism) against {REFERENCE} at every token count (goal: never slower): "
            f"{'met' if vs_ref[worst] >= 1.0 else 'NOT met'}, slowest {vs_ref[worst]:.2f}x at "
            f"{worst:,} tokens"
        )
    return lines
