"""Where a step's time goes: each case of the throughput study (`throughput.py`) run a few times
under `torch.profiler`, its operations ranked by the time they take themselves.

On CUDA that is the device time of the kernels each operation launches (`aten::copy_`, the
stem's BatchNorm backward, the CBSA kernels' custom ops, ...), with the kernel launches per step
and the kernel time no operation claims; on a CPU, each operation's own CPU time and the aten
calls per step: the view of the H200 profile that issue 19 was planned from. Run it beside the
throughput table when a ratio falls short (`studies/throughput.py --profile 15`).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass, field, replace
from typing import Any

import torch
from torch.autograd import DeviceType
from torch.profiler import ProfilerActivity, profile

from cbtlab.perf.throughput import ThroughputSpec, warm_cases
from cbtlab.tables import render_table


@dataclass
class OpTime:
    name: str
    calls_per_step: float
    ms_per_step: float
    share: float  # of the step's device (CUDA) or CPU time


@dataclass
class StepProfile:
    case: str  # mode:form:model, as in the throughput study
    resolution: int
    batch: int
    device: str
    ms_per_step: float  # summed kernel time (CUDA) or operations' own CPU time, per step
    launches_per_step: float  # CUDA kernels (and copies) per step; on CPU, aten calls
    unattributed_ms_per_step: float  # kernel time no operation claims (CUDA); 0 on CPU
    ops: list[OpTime] = field(default_factory=list)
    note: str = ""  # why the case was not profiled, if it was not


def profile_step(fn: Callable[[], Any], device: str, steps: int = 3, top: int = 15) -> StepProfile:
    """Profile `steps` calls of `fn` (after the caller's warm-up); the `top` operations by own
    time. Returns a StepProfile whose case, resolution and batch the caller fills in."""
    on_cuda = torch.device(device).type == "cuda"
    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if on_cuda else [])
    with profile(activities=activities) as prof:
        for _ in range(steps):
            fn()
        if on_cuda:
            torch.cuda.synchronize(device)
    return summarize_profile(prof.events(), prof.key_averages(), device, steps=steps, top=top)


def summarize_profile(
    events: Sequence[Any], averages: Sequence[Any], device: str, steps: int, top: int
) -> StepProfile:
    """A StepProfile from the profiler's events and their per-name averages (`FunctionEvent`s
    and `FunctionEventAvg`s) over `steps` steps."""
    ops = [e for e in averages if e.device_type == DeviceType.CPU]
    if torch.device(device).type == "cuda":
        # A record_function range (the optimizer's step, a compiled region) also shows as a
        # device-side annotation spanning the kernels inside it: not a kernel, left out as
        # torch's own table does, lest those kernels count twice.
        kernels = [
            e for e in events if e.device_type == DeviceType.CUDA and not e.is_user_annotation
        ]
        total_us = float(sum(e.time_range.elapsed_us() for e in kernels))
        launches = len(kernels)
        # An operation's own device time is that of the kernels it launched itself (aten::linear
        # holds aten::addmm, whose kernel is addmm's): summed, each kernel counts once.
        own = {e.key: float(e.self_device_time_total) for e in ops}
        unattributed_us = max(total_us - sum(own.values()), 0.0)
    else:
        own = {e.key: float(e.self_cpu_time_total) for e in ops}
        total_us = sum(own.values())
        launches = sum(e.count for e in ops if e.key.startswith("aten::"))
        unattributed_us = 0.0
    counts = {e.key: e.count for e in ops}
    ranked = sorted((k for k in own if own[k] > 0), key=lambda k: -own[k])[:top]
    return StepProfile(
        case="",
        resolution=0,
        batch=0,
        device=device,
        ms_per_step=total_us / 1e3 / steps,
        launches_per_step=launches / steps,
        unattributed_ms_per_step=unattributed_us / 1e3 / steps,
        ops=[
            OpTime(
                name=key,
                calls_per_step=counts[key] / steps,
                ms_per_step=own[key] / 1e3 / steps,
                share=own[key] / total_us if total_us else 0.0,
            )
            for key in ranked
        ],
    )


def profile_throughput(
    spec: ThroughputSpec, top: int = 15, steps: int = 3, echo: Callable[[str], None] = print
) -> list[StepProfile]:
    """Every case of a `ThroughputSpec` (each mode, form and model at each resolution), warmed
    up by one call (compiling, for compiled forms) and profiled over `steps` more: the very
    steps that the throughput study times."""
    spec.validate()
    profiles: list[StepProfile] = []
    for resolution in spec.resolutions:
        cases, failed = warm_cases(spec, resolution, echo)
        for case, fn in cases.items():
            where = {"case": case, "resolution": resolution, "batch": spec.batch(resolution)}
            if failed[case]:
                nan = float("nan")
                result = StepProfile(
                    device=spec.device,
                    ms_per_step=nan,
                    launches_per_step=nan,
                    unattributed_ms_per_step=nan,
                    note=failed[case],
                    **where,
                )
            else:
                result = replace(profile_step(fn, spec.device, steps=steps, top=top), **where)
            profiles.append(result)
            echo(profile_table([result]) + "\n")
    return profiles


def profile_table(profiles: Sequence[StepProfile]) -> str:
    """One block per profiled case: its totals, then its operations by own time."""
    blocks = []
    for p in profiles:
        where = "CUDA" if torch.device(p.device).type == "cuda" else "CPU"
        head = f"{p.case} at {p.resolution} px (batch {p.batch})"
        if p.note:
            blocks.append(f"{head}: not profiled: {p.note}")
            continue
        launches = "kernel launches" if where == "CUDA" else "aten calls"
        lines = [
            f"{head}: {p.ms_per_step:.2f} ms of {where} time per step, "
            f"{p.launches_per_step:.0f} {launches} per step"
            + (
                f", {p.unattributed_ms_per_step:.2f} ms of it in kernels no operation claims"
                if where == "CUDA"
                else ""
            )
        ]
        rows = [
            [op.name[:60], f"{op.calls_per_step:.0f}", f"{op.ms_per_step:.3f}", f"{op.share:.1%}"]
            for op in p.ops
        ]
        lines.append(render_table(["operation", "calls/step", "ms/step", "share"], rows))
        blocks.append("\n".join(lines))
    return "\n\n".join(blocks)
