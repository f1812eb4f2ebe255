"""Training and inference images/s of CBT, ViT (timm, SDPA), CRATE and ToST side by side, at
224 px and at high resolution (the paper's Table 7; `studies/throughput.py`).

A training step is forward + backward + an AdamW step on a random batch; inference is an
eval-mode forward under `torch.inference_mode`. Every model at one resolution is measured
interleaved with the others (`measure_side_by_side`), so ratios hold on a noisy machine.
Model FLOP utilisation (MFU): the model's FLOPs (`count_flops`, the paper's convention: a
training step counts 3x the forward) over the time, divided by the peak that a large matmul
reaches on the same device and dtype, measured in the same run.
"""

from __future__ import annotations

import contextlib
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F

import cbtlab.models  # noqa: F401  (registers our models with timm)
from cbtlab.analysis.flops import count_flops
from cbtlab.perf.timing import measure_side_by_side
from cbtlab.tracking.report import render_table

MODELS = (
    "cbt_tiny_patch16_224",
    "vit_tiny_patch16_224",
    "crate_conv_tiny_patch16_224",
    "tost_conv_tiny_patch16_224",
    "cbt_small_patch16_224",
    "vit_small_patch16_224",
    "crate_conv_small_patch16_224",
    "tost_conv_small_patch16_224",
)
BASELINE_OF = {"tiny": "vit_tiny_patch16_224", "small": "vit_small_patch16_224"}


@dataclass
class ThroughputSpec:
    models: Sequence[str] = MODELS
    resolutions: Sequence[int] = (224, 448)
    # Images per step at each resolution (default: 8 at 224 px, scaled by the pixel count).
    batch_at_224: int = 8
    modes: Sequence[str] = ("train", "infer")
    warmup: int = 1
    rounds: int = 3
    device: str = "cpu"
    amp: bool = False  # bf16 autocast (GPU)
    num_classes: int = 1000

    def batch(self, resolution: int) -> int:
        return max(1, round(self.batch_at_224 * (224 / resolution) ** 2))

    def validate(self) -> ThroughputSpec:
        known = set(timm.list_models())
        unknown = [m for m in self.models if m not in known]
        if unknown:
            raise ValueError(f"unknown model {unknown}; see timm.list_models() / cbtlab models")
        bad = [m for m in self.modes if m not in ("train", "infer")]
        if bad:
            raise ValueError(f"unknown mode {bad}; known: train, infer")
        for r in self.resolutions:
            if r % 16:
                raise ValueError(f"resolution {r} is not a multiple of the patch size 16")
        return self


def _size_of(model: str) -> str:
    return next((s for s in BASELINE_OF if f"_{s}_" in model), "")


def matmul_peak_flops(device: str, dtype: torch.dtype, n: int = 2048, rounds: int = 5) -> float:
    """FLOP/s of an n x n matmul: the practical peak that MFU is measured against."""
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = measure_side_by_side({"mm": lambda: a @ b}, warmup=1, rounds=rounds, device=device)
    return 2 * n**3 / timing["mm"].median_s


def _autocast(spec: ThroughputSpec) -> contextlib.AbstractContextManager[Any]:
    if not spec.amp:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(spec.device).type, dtype=torch.bfloat16)


def _cases(spec: ThroughputSpec, resolution: int) -> dict[str, Callable[[], Any]]:
    batch = spec.batch(resolution)
    gen = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 3, resolution, resolution, generator=gen).to(spec.device)
    labels = torch.randint(0, spec.num_classes, (batch,), generator=gen).to(spec.device)
    cases: dict[str, Callable[[], Any]] = {}
    for name in spec.models:
        torch.manual_seed(0)
        model = timm.create_model(name, img_size=resolution, num_classes=spec.num_classes)
        model = model.to(spec.device)
        if "train" in spec.modes:
            optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)

            def train(model: torch.nn.Module = model, opt: Any = optimizer) -> None:
                model.train()
                opt.zero_grad(set_to_none=True)
                with _autocast(spec):
                    loss = F.cross_entropy(model(images), labels)
                loss.backward()
                opt.step()

            cases[f"train:{name}"] = train
        if "infer" in spec.modes:

            def infer(model: torch.nn.Module = model) -> None:
                model.eval()
                with torch.inference_mode(), _autocast(spec):
                    model(images)

            cases[f"infer:{name}"] = infer
    return cases


def run_throughput(
    spec: ThroughputSpec, echo: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    spec.validate()
    dtype = torch.bfloat16 if spec.amp else torch.float32
    peak = matmul_peak_flops(spec.device, dtype)
    echo(f"  matmul peak on {spec.device} ({dtype}): {peak / 1e9:.1f} GFLOP/s")
    rows: list[dict[str, Any]] = []
    for resolution in spec.resolutions:
        batch = spec.batch(resolution)
        cases = _cases(spec, resolution)
        timings = measure_side_by_side(
            cases, warmup=spec.warmup, rounds=spec.rounds, device=spec.device
        )
        flops = {
            name: count_flops(timm.create_model(name, img_size=resolution), resolution)
            for name in spec.models
        }
        for case, timing in timings.items():
            mode, name = case.split(":", 1)
            per_image = flops[name] * (3 if mode == "train" else 1)
            rows.append(
                {
                    "mode": mode,
                    "model": name,
                    "resolution": resolution,
                    "batch": batch,
                    "images_per_s": batch / timing.median_s,
                    "gflops_per_image": flops[name] / 1e9,
                    "mfu": per_image * batch / timing.median_s / peak,
                }
            )
        echo(f"  {resolution} px (batch {batch}): " + ", ".join(
            f"{case} {batch / t.median_s:.1f} img/s" for case, t in timings.items()))  # fmt: skip
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    speed = {(r["mode"], r["model"], r["resolution"]): r["images_per_s"] for r in rows}
    for r in rows:
        base = BASELINE_OF.get(_size_of(r["model"]))
        ref = speed.get((r["mode"], base, r["resolution"])) if base else None
        r["x_vit"] = r["images_per_s"] / ref if ref else math.nan


def throughput_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["mode", "model", "px", "batch", "images/s", "x ViT (same size)", "GFLOPs/img",
               "MFU"]  # fmt: skip
    body = [
        [r["mode"], r["model"], str(r["resolution"]), str(r["batch"]),
         f"{r['images_per_s']:.2f}", "-" if math.isnan(r["x_vit"]) else f"{r['x_vit']:.2f}",
         f"{r['gflops_per_image']:.2f}", f"{r['mfu']:.1%}"]
        for r in rows
    ]  # fmt: skip
    return render_table(headers, body)


def throughput_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    metrics: dict[str, float] = {}
    for r in rows:
        prefix = f"{r['mode']}/{r['model']}/{r['resolution']}"
        metrics[f"{prefix}/images_per_s"] = r["images_per_s"]
        metrics[f"{prefix}/mfu"] = r["mfu"]
        if not math.isnan(r["x_vit"]):
            metrics[f"{prefix}/x_vit"] = r["x_vit"]
    return metrics


def throughput_headline(rows: Sequence[dict[str, Any]]) -> list[str]:
    return [
        f"{r['model']} {r['mode']} at {r['resolution']} px: {r['x_vit']:.2f}x ViT"
        for r in rows
        if r["model"].startswith("cbt_") and not math.isnan(r["x_vit"])
    ]
