"""Training and inference images/s of CBT, ViT (timm, SDPA), CRATE and ToST side by side, at
224 px and at high resolution (the paper's Table 7; `studies/throughput.py`).

A training step is forward + backward + an AdamW step on a random batch; inference is an
eval-mode forward under `torch.inference_mode` of the model as deployed, its BatchNorms folded
into their convolutions (`timm.utils.reparameterize_model`; the conv stems'). Every model at
one resolution is measured interleaved with the others (`measure_side_by_side`; on CUDA each
call timed by CUDA events), so ratios hold on a noisy machine. With `compile`, each model also
runs `torch.compile`d (its forward; default mode), in rows of its own beside the eager ones; a
model that fails to compile (or, on CUDA, any case that runs out of memory) becomes a row with
the reason as its note.
Model FLOP utilisation (MFU): the model's FLOPs (`count_flops`, `torch.utils.flop_counter`, the
paper's convention: a training step counts 3x the forward) over the time, divided by the peak
that a large matmul reaches on the same device and dtype, measured in the same run. Peak
memory (`peak_memory`, optional: on by default on CUDA, where the allocator keeps it for free;
on CPU it costs one more step per case, and compiled cases are not measured there).
"""

from __future__ import annotations

import contextlib
import math
import time
from collections import Counter
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import timm
import torch
import torch.nn.functional as F
from timm.utils import reparameterize_model

import cbtlab.models  # noqa: F401  (registers our models with timm)
from cbtlab.analysis.flops import count_flops
from cbtlab.perf.timing import first_call, measure_side_by_side, peak_memory
from cbtlab.tables import render_table
from cbtlab.train.recipe import fused_optimizer_ok

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
    compile: bool = False  # add torch.compile'd rows beside the eager ones
    peak_memory: bool = False  # measure each case's peak memory (one more call per case)
    # Images and convolution weights in channels-last (NHWC) order, as `train.channels_last`.
    channels_last: bool = False
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


def matmul_peak_flops(
    device: str, dtype: torch.dtype, n: int | None = None, rounds: int = 5
) -> float:
    """FLOP/s of an n x n matmul: the practical peak that MFU is measured against. `n`: 2048
    on CPU, 8192 on CUDA (smaller matmuls leave an H200 short of its peak)."""
    if n is None:
        n = 8192 if torch.device(device).type == "cuda" else 2048
    a = torch.randn(n, n, device=device, dtype=dtype)
    b = torch.randn(n, n, device=device, dtype=dtype)
    timing = measure_side_by_side({"mm": lambda: a @ b}, warmup=1, rounds=rounds, device=device)
    return 2 * n**3 / timing["mm"].median_s


def _autocast(spec: ThroughputSpec) -> contextlib.AbstractContextManager[Any]:
    if not spec.amp:
        return contextlib.nullcontext()
    return torch.autocast(torch.device(spec.device).type, dtype=torch.bfloat16)


def _forms(spec: ThroughputSpec) -> tuple[str, ...]:
    return ("eager", "compiled") if spec.compile else ("eager",)


def _cases(spec: ThroughputSpec, resolution: int) -> dict[str, Callable[[], Any]]:
    """One case per mode, form and model, keyed `mode:form:model`."""
    batch = spec.batch(resolution)
    gen = torch.Generator().manual_seed(0)
    layout = torch.channels_last if spec.channels_last else torch.contiguous_format
    images = torch.randn(batch, 3, resolution, resolution, generator=gen)
    images = images.to(spec.device, memory_format=layout)
    labels = torch.randint(0, spec.num_classes, (batch,), generator=gen).to(spec.device)
    cases: dict[str, Callable[[], Any]] = {}
    for form in _forms(spec):
        for name in spec.models:
            torch.manual_seed(0)
            model = timm.create_model(name, img_size=resolution, num_classes=spec.num_classes)
            model = model.to(spec.device, memory_format=layout)
            # The compiled module shares the model's parameters and compiles on first call.
            run = torch.compile(model) if form == "compiled" else model
            if "train" in spec.modes:
                optimizer = torch.optim.AdamW(
                    model.parameters(), lr=1e-4, fused=fused_optimizer_ok(model)
                )

                def train(run: torch.nn.Module = run, opt: Any = optimizer) -> None:
                    run.train()
                    opt.zero_grad(set_to_none=True)
                    with _autocast(spec):
                        loss = F.cross_entropy(run(images), labels)
                    loss.backward()
                    opt.step()

                cases[f"train:{form}:{name}"] = train
            if "infer" in spec.modes:
                # Deployed as for inference: an eval-mode copy with every BatchNorm folded into
                # its convolution (the conv stems'; `ConvNorm.fuse`).
                deployed = reparameterize_model(model.eval())
                model.train()
                infer_run = torch.compile(deployed) if form == "compiled" else deployed

                def infer(run: torch.nn.Module = infer_run) -> None:
                    with torch.inference_mode(), _autocast(spec):
                        run(images)

                cases[f"infer:{form}:{name}"] = infer
    return cases


def warm_cases(
    spec: ThroughputSpec, resolution: int, echo: Callable[[str], None] = print
) -> tuple[dict[str, Callable[[], Any]], dict[str, str]]:
    """The cases at `resolution` (`_cases`), each called once alone (compilation happens
    there), and for each "" or the reason it failed: a compile error, or running out of CUDA
    memory, leaves the case out with the reason as its note. Each compiled case's outcome and
    compile time is echoed as it ends."""
    if spec.compile:
        # The models of another resolution are gone: so are their graphs, lest same-class
        # models (T and S, train and eval) reach Dynamo's recompile limit and run eager.
        torch.compiler.reset()
    cases = _cases(spec, resolution)
    failed: dict[str, str] = {}
    for case, fn in cases.items():
        compiled = ":compiled:" in case
        start = time.perf_counter()
        graphs_before, breaks_before = _dynamo_counts()
        failed[case] = first_call(
            fn,
            spec.device,
            catch=(Exception,) if compiled else (torch.cuda.OutOfMemoryError,),
        )
        if compiled:  # compilation's cost, and progress through the longest phase
            outcome = f"failed: {failed[case]}" if failed[case] else "compiled"
            graphs, breaks = _dynamo_counts()
            echo(f"  {case} at {resolution} px: {outcome} in "
                 f"{time.perf_counter() - start:.0f} s, "
                 f"{_graphs_summary(graphs - graphs_before, breaks - breaks_before)}")  # fmt: skip
    return cases, failed


def _dynamo_counts() -> tuple[int, Counter[str]]:
    """Dynamo's running totals: graphs compiled, and graph breaks by reason."""
    from torch._dynamo.utils import counters

    return counters["stats"]["unique_graphs"], Counter(counters["graph_break"])


def _graphs_summary(graphs: int, breaks: Counter[str]) -> str:
    """How many graphs a compilation made, and its graph breaks with the commonest one's
    reason (its first line): a model compiled whole is "1 graph"; each break costs speed and
    rules out CUDA graphs."""
    text = f"{graphs} graph" + ("s" if graphs != 1 else "")
    total = sum(breaks.values())
    if total:
        reason, _ = breaks.most_common(1)[0]
        text += f", {total} graph break{'s' if total != 1 else ''} ({reason.splitlines()[0]})"
    return text


def run_throughput(
    spec: ThroughputSpec, echo: Callable[[str], None] = print
) -> list[dict[str, Any]]:
    spec.validate()
    dtype = torch.bfloat16 if spec.amp else torch.float32
    peak = matmul_peak_flops(spec.device, dtype)
    echo(f"  matmul peak on {spec.device} ({dtype}): {peak / 1e9:.1f} GFLOP/s")
    rows: list[dict[str, Any]] = []
    on_cuda = torch.device(spec.device).type == "cuda"
    for resolution in spec.resolutions:
        batch = spec.batch(resolution)
        cases, failed = warm_cases(spec, resolution, echo)
        timings = measure_side_by_side(
            {case: fn for case, fn in cases.items() if not failed[case]},
            warmup=max(spec.warmup - 1, 0),
            rounds=spec.rounds,
            device=spec.device,
        )
        flops = {
            name: count_flops(timm.create_model(name, img_size=resolution), resolution)
            for name in spec.models
        }
        for case, fn in cases.items():
            mode, form, name = case.split(":", 2)
            timing = timings.get(case)
            seconds = timing.median_s if timing else math.nan
            per_image = flops[name] * (3 if mode == "train" else 1)
            # PeakMemory (CPU) would intercept a compiled function's ops: CUDA only there.
            measure_memory = (
                timing is not None and spec.peak_memory and (on_cuda or form == "eager")
            )
            rows.append(
                {
                    "mode": mode,
                    "form": form,
                    "model": name,
                    "resolution": resolution,
                    "batch": batch,
                    "images_per_s": batch / seconds,
                    "gflops_per_image": flops[name] / 1e9,
                    "mfu": per_image * batch / seconds / peak,
                    "peak_mb": peak_memory(fn, spec.device) / 2**20 if measure_memory else math.nan,
                    "note": failed[case],
                }
            )
        echo(f"  {resolution} px (batch {batch}): " + ", ".join(
            f"{case} {batch / timings[case].median_s:.1f} img/s" if case in timings
            else f"{case} failed" for case in cases))  # fmt: skip
    _add_ratios(rows)
    return rows


def _add_ratios(rows: list[dict[str, Any]]) -> None:
    """`x_vit`, `mfu_vit` and `memory_vit`: each row's images/s, MFU and peak memory over
    those of timm's ViT of the same size, in the same mode and form at the same resolution."""
    by_key = {(r["mode"], r["form"], r["model"], r["resolution"]): r for r in rows}
    for r in rows:
        base = BASELINE_OF.get(_size_of(r["model"]))
        ref = by_key.get((r["mode"], r["form"], base, r["resolution"])) if base else None
        for key, of in (("x_vit", "images_per_s"), ("mfu_vit", "mfu"), ("memory_vit", "peak_mb")):
            r[key] = r[of] / ref[of] if ref else math.nan


def _num(v: float, fmt: str) -> str:
    return "-" if math.isnan(v) else format(v, fmt)


def throughput_table(rows: Sequence[dict[str, Any]]) -> str:
    headers = ["mode", "form", "model", "px", "batch", "images/s", "x ViT (same size)",
               "GFLOPs/img", "MFU", "peak MiB", "note"]  # fmt: skip
    body = [
        [r["mode"], r["form"], r["model"], str(r["resolution"]), str(r["batch"]),
         _num(r["images_per_s"], ".2f"), _num(r["x_vit"], ".2f"), f"{r['gflops_per_image']:.2f}",
         _num(r["mfu"], ".1%"), _num(r["peak_mb"], ".0f"), r["note"]]
        for r in rows
    ]  # fmt: skip
    return render_table(headers, body)


def throughput_metrics(rows: Sequence[dict[str, Any]]) -> dict[str, float]:
    """MLflow metrics, e.g. `train/cbt_tiny_patch16_224/224/images_per_s` (eager) and
    `train_compiled/cbt_tiny_patch16_224/224/images_per_s`."""
    metrics: dict[str, float] = {}
    for r in rows:
        mode = r["mode"] if r["form"] == "eager" else f"{r['mode']}_{r['form']}"
        prefix = f"{mode}/{r['model']}/{r['resolution']}"
        for key in ("images_per_s", "mfu", "peak_mb", "x_vit"):
            if not math.isnan(r[key]):
                metrics[f"{prefix}/{key}"] = float(r[key])
    return metrics


def throughput_headline(rows: Sequence[dict[str, Any]]) -> list[str]:
    """CBT against ViT of the same size: images/s, and MFU and peak memory where measured."""
    lines = []
    for r in rows:
        if not r["model"].startswith("cbt_") or math.isnan(r["x_vit"]):
            continue
        form = "" if r["form"] == "eager" else f" {r['form']}"
        line = f"{r['model']} {r['mode']}{form} at {r['resolution']} px: {r['x_vit']:.2f}x ViT"
        line += f"; MFU {r['mfu']:.1%} ({r['mfu_vit']:.2f}x ViT's)"
        if not math.isnan(r["memory_vit"]):
            line += f"; peak memory {r['memory_vit']:.2f}x ViT's"
        lines.append(line)
    return lines
