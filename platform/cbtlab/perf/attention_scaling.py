"""Forward + backward time and peak memory of every attention mechanism against the token
count, at a fixed representative count, measured side by side (`studies/attention_scaling.py`).

Two levels are measured:
- "mechanism": the token mixing alone on projected per-head tensors (B, K, N, p), the
  operation PyTorch's `scaled_dot_product_attention(q, k, v)` performs for softmax attention.
  CBSA here is `cbsa_mixing` (the fused form, pooling of the initial guess included) and, for
  reference, the same equations written straightforwardly.
- "layer": every registered attention layer with its projections, on tokens (B, N, d); the
  softmax layer (`softmax`, timm ViT's qkv + SDPA) is the baseline.
Every case runs forward, then backward from the same dense upstream gradient (fixed random
numbers, as a layer inside a network receives; `.sum()`'s gradient would be one number
broadcast, which each backward pass first copies out). Each row's `x_sdpa` is the baseline's
time over the row's time at the same level and token count (how many times faster than SDPA);
`x_prev` is the row's time over its own time at the previous token count (4.0 is linear for a
2x larger grid side).
Quadratic mechanisms beyond `max_quadratic_tokens` are skipped: on a CPU one call at 12,544
tokens takes minutes.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.nn.functional as F

from cbtlab.attention import create_attention
from cbtlab.attention.cbsa import cbsa_mixing
from cbtlab.attention.common import pool_grid
from cbtlab.perf.timing import measure_side_by_side, peak_memory
from cbtlab.tracking.report import render_table

LAYERS = ("cbsa", "linear", "tssa", "agent", "linear_attention", "mssa", "softmax")
QUADRATIC = frozenset({"softmax", "mssa", "sdpa"})
BASELINE = {"mechanism": "sdpa", "layer": "softmax"}


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
    seed: int = 0
    extra: dict[str, Any] = field(default_factory=dict)

    def validate(self) -> ScalingSpec:
        unknown = [name for name in self.layers if name not in LAYERS]
        if unknown:
            raise ValueError(f"unknown attention {unknown}; known: {', '.join(LAYERS)}")
        bad_levels = [lv for lv in self.levels if lv not in BASELINE]
        if bad_levels:
            raise ValueError(f"unknown level {bad_levels}; known: mechanism, layer")
        for side in self.sides:
            if side < max(self.rep_grid):
                raise ValueError(f"grid side {side} is smaller than the rep grid {self.rep_grid}")
        return self


def _mechanisms(spec: ScalingSpec, side: int) -> dict[str, Callable[[], Any]]:
    b, k, p, n = spec.batch, spec.heads, spec.head_dim, side * side
    gen = torch.Generator().manual_seed(spec.seed)
    qkv = [
        torch.randn(b, k, n, p, generator=gen).to(spec.device).requires_grad_() for _ in range(3)
    ]
    steps = torch.randn(2, k, generator=gen).to(spec.device).requires_grad_()
    upstream = torch.randn(b, k, n, p, generator=gen).to(spec.device)
    grid = (side, side)

    def fused() -> None:
        out = cbsa_mixing(qkv[0], steps[0], steps[1], grid_size=grid, rep_grid=spec.rep_grid)
        out.backward(upstream)

    def straightforward() -> None:
        w = qkv[0]
        q0 = pool_grid(w, grid, spec.rep_grid, "avg")
        a = torch.softmax(q0 @ w.transpose(-1, -2) * p**-0.5, dim=-1)
        q = q0 + steps[0].view(1, k, 1, 1) * (a @ w)
        c = F.scaled_dot_product_attention(q, q, q)
        (steps[1].view(1, k, 1, 1) * (a.transpose(-1, -2) @ c)).backward(upstream)

    def sdpa() -> None:
        F.scaled_dot_product_attention(*qkv).backward(upstream)

    return {"cbsa": fused, "cbsa_straightforward": straightforward, "sdpa": sdpa}


def _layers(spec: ScalingSpec, side: int) -> dict[str, Callable[[], Any]]:
    d, n = spec.heads * spec.head_dim, side * side
    gen = torch.Generator().manual_seed(spec.seed)
    x = torch.randn(spec.batch, n, d, generator=gen).to(spec.device).requires_grad_()
    upstream = torch.randn(spec.batch, n, d, generator=gen).to(spec.device)
    cases: dict[str, Callable[[], Any]] = {}
    for name in spec.layers:
        torch.manual_seed(spec.seed)
        layer = create_attention(
            name, d, spec.heads, num_prefix_tokens=0, rep_grid=spec.rep_grid
        ).to(spec.device)

        def run(layer: torch.nn.Module = layer) -> None:
            layer(x, (side, side)).backward(upstream)

        cases[name] = run
        if name == "cbsa":

            def reference(layer: torch.nn.Module = layer) -> None:
                layer.forward_reference(x, (side, side)).backward(upstream)

            cases["cbsa_straightforward"] = reference
    return cases


def run_scaling(spec: ScalingSpec, echo: Callable[[str], None] = print) -> list[dict[str, Any]]:
    """Measure every level, mechanism and token count of `spec`; returns one row each."""
    spec.validate()
    rows: list[dict[str, Any]] = []
    builders = {"mechanism": _mechanisms, "layer": _layers}
    for level in spec.levels:
        for side in spec.sides:
            tokens = side * side
            cases = {
                name: fn
                for name, fn in builders[level](spec, side).items()
                if name not in QUADRATIC or tokens <= spec.max_quadratic_tokens
            }
            timings = measure_side_by_side(
                cases, warmup=spec.warmup, rounds=spec.rounds, device=spec.device
            )
            for name, fn in cases.items():
                rows.append(
                    {
                        "level": level,
                        "attention": name,
                        "tokens": tokens,
                        "time_ms": timings[name].median_s * 1e3,
                        "min_ms": timings[name].min_s * 1e3,
                        "peak_mb": peak_memory(fn, spec.device) / 2**20,
                    }
                )
            echo(f"  {level:9s} {tokens:6d} tokens: " + ", ".join(
                f"{name} {timings[name].median_s * 1e3:.1f} ms" for name in cases))  # fmt: skip
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    by_key = {(r["level"], r["attention"], r["tokens"]): r for r in rows}
    for r in rows:
        base = by_key.get((r["level"], BASELINE[r["level"]], r["tokens"]))
        r["x_sdpa"] = base["time_ms"] / r["time_ms"] if base else math.nan
        earlier = [
            other
            for (lv, name, tokens), other in by_key.items()
            if lv == r["level"] and name == r["attention"] and tokens < r["tokens"]
        ]
        prev = max(earlier, key=lambda o: o["tokens"], default=None)
        r["x_prev"] = r["time_ms"] / prev["time_ms"] if prev else math.nan


def scaling_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["level", "attention", "tokens", "fwd+bwd ms", "peak MiB", "x faster than SDPA",
               "time / time at previous tokens"]  # fmt: skip

    def num(v: float, fmt: str) -> str:
        return "-" if math.isnan(v) else format(v, fmt)

    body = [
        [r["level"], r["attention"], str(r["tokens"]), f"{r['time_ms']:.1f}",
         f"{r['peak_mb']:.1f}", num(r["x_sdpa"], ".1f"), num(r["x_prev"], ".2f")]
        for r in rows
    ]  # fmt: skip
    return render_table(headers, body)


def scaling_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics, e.g. `mechanism/cbsa/3136/time_ms`."""
    metrics: dict[str, float] = {}
    for r in rows:
        prefix = f"{r['level']}/{r['attention']}/{r['tokens']}"
        for key in ("time_ms", "peak_mb", "x_sdpa", "x_prev"):
            if not math.isnan(r[key]):
                metrics[f"{prefix}/{key}"] = float(r[key])
    return metrics


def scaling_headline(rows: Sequence[dict[str, Any]]) -> list[str]:
    """CBSA's time growth for 4x the tokens and its speed-up over SDPA, per level."""
    time_of = {(r["level"], r["attention"], r["tokens"]): r["time_ms"] for r in rows}
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
        lines.append(f"cbsa ({level}): " + "; ".join(parts))
    return lines
