"""What the platform's training loop costs per step over a bare PyTorch loop
(`studies/bench_loop_overhead.py`).

Both sides train the same model on the same device-resident random batches (ImageNet-shaped by
default: 3 x 224 x 224, 1,000 classes), with AdamW and the same autocast:
- bare: `loss = CE(model(x), y); loss.backward(); opt.step(); opt.zero_grad()`;
- platform: the worker loop's own micro-batch, `cbtlab.train.loop.train_batch` (the recipe's
  `TrainStep` with its schedule, the epoch's sums kept on the device, the divergence guard and
  its check every `DivergenceGuard.every` micro-batches), on the recipe's optimiser groups.
The data path is left out on both sides (the batches are already on the device): this measures
the loop's own work and host syncs. The sides alternate round after round
(`measure_side_by_side`), each round `steps` steps ended by a device sync; the ratio is
platform / bare of the median round. It runs where only torch and timm are installed.
"""

from __future__ import annotations

import argparse
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

import cbtlab.models  # noqa: F401  (registers the models with timm)
from cbtlab.config import ExperimentConfig
from cbtlab.perf.timing import measure_side_by_side
from cbtlab.train.loop import train_batch
from cbtlab.train.metrics import DivergenceGuard, EpochMeter
from cbtlab.train.recipe import TrainStep, autocast, build_optimizer, resolve_precision


@dataclass(frozen=True)
class OverheadResult:
    model: str
    batch: int
    img_size: int
    precision: str
    bare_ms: float
    platform_ms: float

    @property
    def ratio(self) -> float:
        return self.platform_ms / self.bare_ms


def _bare_steps(
    model: nn.Module, batches: list, amp: Callable[[], Any], steps: int
) -> Callable[[], None]:
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-4)
    loss_fn = nn.CrossEntropyLoss()

    def run() -> None:
        for i in range(steps):
            images, labels = batches[i % len(batches)]
            with amp():
                loss = loss_fn(model(images), labels)
            loss.backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)

    return run


def _platform_steps(
    model: nn.Module,
    batches: list,
    amp: Callable[[], Any],
    steps: int,
    device: torch.device,
    grad_clip: float,
) -> Callable[[], None]:
    cfg = ExperimentConfig().with_overrides({"train.grad_clip": grad_clip})
    optimizer = build_optimizer(model, cfg)
    scheduler = torch.optim.lr_scheduler.LambdaLR(optimizer, lambda step: 1.0)
    step = TrainStep(
        model,
        optimizer,
        scheduler,
        nn.CrossEntropyLoss(),
        grad_clip=grad_clip,
        clip_params=list(model.parameters()),
        autocast=amp,
    )
    meter, guard = EpochMeter(device), DivergenceGuard(device)
    index = 0

    def run() -> None:
        nonlocal index
        for i in range(steps):
            images, labels = batches[i % len(batches)]
            train_batch(step, meter, guard, images, labels, 0, index)
            index += 1

    return run


def measure_loop_overhead(
    *,
    model_name: str = "cbt_small_patch16_224",
    batch: int = 256,
    img_size: int = 224,
    num_classes: int = 1000,
    device: torch.device | str = "cpu",
    precision: str = "auto",
    steps: int = 20,
    rounds: int = 5,
    warmup: int = 1,
    grad_clip: float = 0.0,
    channels_last: bool = False,
) -> OverheadResult:
    """Median milliseconds per step of the bare loop and of the platform's (see the module
    docstring)."""
    import timm

    device = torch.device(device)
    precision = resolve_precision(precision, device)
    amp = autocast(precision, device)
    fmt = torch.channels_last if channels_last else torch.contiguous_format
    generator = torch.Generator().manual_seed(0)
    batches = [
        (
            torch.randn(batch, 3, img_size, img_size, generator=generator)
            .to(device)
            .contiguous(memory_format=fmt),
            torch.randint(0, num_classes, (batch,), generator=generator).to(device),
        )
        for _ in range(2)
    ]
    models = []
    for _ in range(2):  # one model each, the same weights
        torch.manual_seed(0)
        model = timm.create_model(model_name, img_size=img_size, num_classes=num_classes)
        models.append(model.to(device, memory_format=fmt).train())
    cases = {
        "bare": _bare_steps(models[0], batches, amp, steps),
        "platform": _platform_steps(models[1], batches, amp, steps, device, grad_clip),
    }
    timings = measure_side_by_side(cases, warmup=warmup, rounds=rounds, device=device)
    return OverheadResult(
        model=model_name,
        batch=batch,
        img_size=img_size,
        precision=precision,
        bare_ms=timings["bare"].median_s / steps * 1e3,
        platform_ms=timings["platform"].median_s / steps * 1e3,
    )


def loop_overhead_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Per-step cost of the platform's training loop over a bare PyTorch loop.",
        formatter_class=argparse.ArgumentDefaultsHelpFormatter,
    )
    parser.add_argument("--device", default="cuda" if torch.cuda.is_available() else "cpu")
    parser.add_argument("--model", default="cbt_small_patch16_224")
    parser.add_argument("--batch", type=int, default=256)
    parser.add_argument("--img-size", type=int, default=224)
    parser.add_argument("--precision", default="auto", choices=("auto", "fp32", "bf16"))
    parser.add_argument("--steps", type=int, default=20, help="steps per timed round")
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--grad-clip", type=float, default=0.0, help="platform side only")
    parser.add_argument("--channels-last", action="store_true")
    parser.add_argument("--max-ratio", type=float, default=None, help="exit 1 above this ratio")
    args = parser.parse_args(argv)
    result = measure_loop_overhead(
        model_name=args.model,
        batch=args.batch,
        img_size=args.img_size,
        device=args.device,
        precision=args.precision,
        steps=args.steps,
        rounds=args.rounds,
        grad_clip=args.grad_clip,
        channels_last=args.channels_last,
    )
    print(
        f"{result.model} batch {result.batch} at {result.img_size} px, {result.precision} on "
        f"{args.device}: bare {result.bare_ms:.2f} ms/step, platform {result.platform_ms:.2f} "
        f"ms/step"
    )
    print(f"platform / bare: {result.ratio:.3f}x per step")
    if args.max_ratio is not None and result.ratio > args.max_ratio:
        print(f"FAIL: above {args.max_ratio}x")
        return 1
    return 0
