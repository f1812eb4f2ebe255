"""Command lines of the performance studies (`studies/attention_scaling.py`,
`studies/throughput.py`): flags in, a printed table and an MLflow run out.

They run on a bare GPU machine (torch, timm and triton; no Ray, MLflow or Optuna) from a
checkout with `PYTHONPATH=platform`: MLflow is imported only to log, and where it is not
installed the results are printed only."""

from __future__ import annotations

import argparse
import os
import sys
from collections.abc import Sequence
from typing import Any

import torch

from cbtlab.perf.attention_scaling import (
    DTYPES,
    LAYERS,
    ScalingSpec,
    run_scaling,
    scaling_defaults,
    scaling_headline,
    scaling_metrics,
    scaling_table,
)
from cbtlab.perf.record import log_benchmark, mlflow_installed
from cbtlab.perf.step_profile import profile_throughput
from cbtlab.perf.throughput import (
    MODELS,
    ThroughputSpec,
    run_throughput,
    throughput_headline,
    throughput_metrics,
    throughput_table,
)


def _ints(text: str) -> list[int]:
    try:
        return [int(v) for v in text.split(",") if v]
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"expected comma-separated integers, got {text!r}"
        ) from None


def _names(text: str) -> list[str]:
    return [v.strip() for v in text.split(",") if v.strip()]


def _common(parser: argparse.ArgumentParser) -> None:
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--threads", type=int, default=0, help="torch threads (0: as is)")
    parser.add_argument("--rounds", type=int, default=5, help="timed rounds per case")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--tracking-uri", default="", help="MLflow URI (default: the project's)")
    parser.add_argument("--no-mlflow", action="store_true",
                        help="print only (also where MLflow is not installed)")  # fmt: skip


def _device_name(device: str) -> str:
    if torch.device(device).type == "cuda":
        return f"{device} ({torch.cuda.get_device_name(device)}, torch {torch.__version__})"
    return f"{device} ({torch.get_num_threads()} threads, torch {torch.__version__})"


def _setup(args: argparse.Namespace) -> None:
    if args.threads:
        torch.set_num_threads(args.threads)
    if args.device.startswith("cuda") and not torch.cuda.is_available():
        raise SystemExit("error: --device cuda but no CUDA device is visible")


def scaling_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Forward+backward time and peak memory of every attention mechanism "
        "against the token count, side by side.",
    )
    parser.add_argument("--sides", type=_ints, default=None,
                        help="patch-grid sides; tokens = side^2 (default: 14,28,56,112,128, "
                        "196 to 16,384 tokens, on CPU; 14,...,224, to 50,176, on CUDA)",
                        )  # fmt: skip
    parser.add_argument("--batch", type=int, default=None, help="default: 8 on CPU, 16 on CUDA")
    parser.add_argument("--heads", type=int, default=None, help="default: 3 on CPU, 6 on CUDA")
    parser.add_argument("--head-dim", type=int, default=64)
    parser.add_argument("--rep-grid", type=_ints, default=[8, 8], help="g_h,g_w (m = g_h g_w)")
    parser.add_argument("--layers", type=_names, default=list(LAYERS))
    parser.add_argument("--levels", type=_names, default=["mechanism", "layer"])
    parser.add_argument("--max-quadratic-tokens", type=int, default=None,
                        help="skip softmax/MSSA/SDPA above this many tokens "
                        "(default: 3136 on CPU, 50176 on CUDA)")  # fmt: skip
    parser.add_argument("--dtype", choices=list(DTYPES), default=None,
                        help="the mechanism tensors' dtype and the layers' autocast dtype "
                        "(default: bf16 on CUDA, fp32 on CPU)")  # fmt: skip
    _common(parser)
    args = parser.parse_args(argv)
    _setup(args)
    for key, value in scaling_defaults(args.device).items():
        if getattr(args, key) is None:
            setattr(args, key, value)
    if len(args.rep_grid) != 2:
        parser.error("--rep-grid takes two integers, e.g. 8,8")
    spec = ScalingSpec(
        sides=args.sides,
        batch=args.batch,
        heads=args.heads,
        head_dim=args.head_dim,
        rep_grid=(args.rep_grid[0], args.rep_grid[1]),
        layers=args.layers,
        levels=args.levels,
        max_quadratic_tokens=args.max_quadratic_tokens,
        warmup=args.warmup,
        rounds=args.rounds,
        device=args.device,
        dtype=args.dtype,
    )
    try:
        spec.validate()
    except ValueError as exc:
        parser.error(str(exc))
    print(f"attention scaling on {_device_name(args.device)}, {spec.dtype}, batch {spec.batch}, "
          f"{spec.heads} heads x {spec.head_dim}, m = {spec.rep_grid[0] * spec.rep_grid[1]}",
          flush=True)  # fmt: skip
    rows = run_scaling(spec, echo=lambda line: print(line, flush=True))
    return _report(
        args, "attention_scaling", rows, scaling_table(rows), scaling_metrics(rows),
        scaling_headline(rows),
    )  # fmt: skip


def _report(
    args: argparse.Namespace,
    experiment: str,
    rows: list[dict[str, Any]],
    table: str,
    metrics: dict[str, float],
    headline: list[str],
) -> int:
    """Print the table, log the run to MLflow (unless --no-mlflow), end with the headline."""
    print(table)
    _log(args, experiment, metrics, rows, table)
    for line in headline:
        print(line)
    sys.stdout.flush()
    return 0


def _log(
    args: argparse.Namespace,
    experiment: str,
    metrics: dict[str, float],
    rows: list[dict[str, Any]],
    table: str,
) -> None:
    if args.no_mlflow:
        return
    if not mlflow_installed():
        print("MLflow is not installed here: results are printed only (not logged)")
        return
    params = {k: v for k, v in vars(args).items() if k != "no_mlflow"}
    params.update(threads=torch.get_num_threads(), cpu_count=os.cpu_count())
    uri, run_id = log_benchmark(
        experiment,
        params=params,
        metrics=metrics,
        rows=rows,
        table_text=table,
        tracking_uri=args.tracking_uri,
    )
    print(f"logged to MLflow {uri}, run {run_id}")


def throughput_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Training and inference images/s of CBT, ViT, CRATE and ToST, side by side.",
    )
    parser.add_argument("--models", type=_names, default=list(MODELS))
    parser.add_argument("--resolutions", type=_ints, default=[224, 448])
    parser.add_argument("--batch", type=int, default=None,
                        help="images per step at 224 px, scaled by pixel count at other "
                        "resolutions (default: 8 on CPU, 256 on CUDA)")  # fmt: skip
    parser.add_argument("--modes", type=_names, default=["train", "infer"])
    parser.add_argument("--amp", action=argparse.BooleanOptionalAction, default=None,
                        help="bf16 autocast (default: on for CUDA, off on CPU)")  # fmt: skip
    parser.add_argument("--compile", action="store_true",
                        help="add torch.compile'd rows beside the eager ones")  # fmt: skip
    parser.add_argument("--peak-memory", action=argparse.BooleanOptionalAction, default=None,
                        help="measure each case's peak memory (default: on for CUDA; on CPU "
                        "it costs one more step per case)")  # fmt: skip
    parser.add_argument("--channels-last", action="store_true",
                        help="images and convolution weights in NHWC order, as "
                        "train.channels_last (the conv stems' layout on tensor cores)")  # fmt: skip
    parser.add_argument("--profile", type=int, default=0, metavar="TOP",
                        help="instead of timing, profile each case's step (torch.profiler): "
                        "its TOP operations by own device (CPU) time, and kernel launches "
                        "per step")  # fmt: skip
    _common(parser)
    args = parser.parse_args(argv)
    _setup(args)
    on_cuda = torch.device(args.device).type == "cuda"
    if args.batch is None:
        args.batch = 256 if on_cuda else 8
    spec = ThroughputSpec(
        models=args.models,
        resolutions=args.resolutions,
        batch_at_224=args.batch,
        modes=args.modes,
        warmup=args.warmup,
        rounds=args.rounds,
        device=args.device,
        amp=on_cuda if args.amp is None else args.amp,
        compile=args.compile,
        peak_memory=on_cuda if args.peak_memory is None else args.peak_memory,
        channels_last=args.channels_last,
    )
    try:
        spec.validate()
    except ValueError as exc:
        parser.error(str(exc))
    if args.profile < 0:
        parser.error("--profile takes the number of operations to list, e.g. 15")
    forms = ", eager and compiled" if spec.compile else ""
    print(f"throughput on {_device_name(args.device)}, "
          f"{'bf16 autocast' if spec.amp else 'fp32'}{forms}"
          f"{', channels-last' if spec.channels_last else ''}"
          f"{', profiled' if args.profile else ''}", flush=True)  # fmt: skip
    if args.profile:  # the profiler's overhead would distort the timings: one or the other
        profile_throughput(spec, top=args.profile, echo=lambda text: print(text, flush=True))
        return 0
    rows = run_throughput(spec, echo=lambda line: print(line, flush=True))
    return _report(
        args, "throughput", rows, throughput_table(rows), throughput_metrics(rows),
        throughput_headline(rows),
    )  # fmt: skip
