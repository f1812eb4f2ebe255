"""The recipe's components: optimiser, schedule, precision, compilation and the training step.

The worker loop (`cbtlab.train.loop`) calls these in order; each is small enough to test alone.
The paper's ImageNet recipe (the reference code's `main.py`, Appendix C) is Lion at 2e-4 with
weight decay 0.05, a 256 global batch, label smoothing 0.1, a warm-up then a cosine decay to zero
and mixed precision: `cbtlab.tune.definitions.IMAGENET_RECIPE` sets those fields.
"""

from __future__ import annotations

import contextlib
import logging
import math
import shutil
import traceback
import warnings
from collections.abc import Callable
from typing import Any

import torch
from torch import Tensor, nn

from cbtlab.config import ExperimentConfig

log = logging.getLogger(__name__)

# The classifier's parameters (CBTransformer.head); fine-tuning may treat them apart.
HEAD_PREFIX = "head."


def param_groups(
    model: nn.Module, weight_decay: float, *, backbone_lr_scale: float = 1.0, frozen_steps: int = 0
) -> list[dict[str, Any]]:
    """Weight decay on matrices only: not on biases, norms, step sizes, CLS or positions.

    With a backbone rate scale other than 1 or `frozen_steps` (the backbone's rate is 0 for
    that many optimizer steps), the head gets groups of its own, first, so that its rate is the
    one `train/lr` shows; groups carry `lr_scale` and `frozen_steps` for `warmup_cosine`."""
    skip = set(getattr(model, "no_weight_decay", set)())
    split = backbone_lr_scale != 1.0 or frozen_steps > 0
    groups: dict[tuple[bool, bool], list[nn.Parameter]] = {}
    for name, param in model.named_parameters():
        if not param.requires_grad:
            continue
        head = split and name.startswith(HEAD_PREFIX)
        decay = not (param.ndim <= 1 or name in skip)
        groups.setdefault((head, decay), []).append(param)
    kinds = [(True, True), (True, False)] if split else []
    out = []
    for head, decay in [*kinds, (False, True), (False, False)]:
        params = groups.get((head, decay), [])
        if split and not params:
            continue
        group: dict[str, Any] = {"params": params, "weight_decay": weight_decay if decay else 0.0}
        if split:
            group["lr_scale"] = 1.0 if head else backbone_lr_scale
            group["frozen_steps"] = 0 if head else frozen_steps
        out.append(group)
    return out


def build_optimizer(
    model: nn.Module, cfg: ExperimentConfig, *, frozen_steps: int = 0
) -> torch.optim.Optimizer:
    """AdamW, SGD (Nesterov) or Lion (timm's) over `param_groups`, each group at
    `train.lr` times its `lr_scale`. AdamW and SGD use torch's fused kernels where the
    parameters allow (`fused_optimizer_ok`)."""
    groups = param_groups(
        model,
        cfg.train.weight_decay,
        backbone_lr_scale=cfg.train.backbone_lr_scale,
        frozen_steps=frozen_steps,
    )
    for group in groups:
        group["lr"] = cfg.train.lr * group.get("lr_scale", 1.0)
    name, lr = cfg.train.optimizer, cfg.train.lr
    fused = fused_optimizer_ok(model)
    if name == "adamw":
        return torch.optim.AdamW(groups, lr=lr, fused=fused)
    if name == "lion":
        from timm.optim import Lion

        # Lion's update has unit size per coordinate, hence the small rates (the reference
        # uses lion_pytorch's defaults: betas (0.9, 0.99), decoupled weight decay).
        return Lion(groups, lr=lr, betas=(0.9, 0.99))
    return torch.optim.SGD(groups, lr=lr, momentum=0.9, nesterov=True, fused=fused)


def fused_optimizer_ok(model: nn.Module) -> bool:
    """Whether torch's fused AdamW / SGD can update `model`: floating-point parameters, all on
    CUDA or all on the CPU. The fused step is one kernel per parameter group and dtype where the
    default (for-each) step launches one per operation of the update rule and the plain CPU
    step loops over the tensors: on this 2-core CPU, 3.7x (AdamW) and 2.7x (SGD) faster for
    CBT-T's 1.6 M parameters (docs/performance.md); the result agrees to rounding."""
    devices = {p.device.type for p in model.parameters()}
    floating = all(p.is_floating_point() for p in model.parameters())
    return floating and len(devices) == 1 and devices <= {"cpu", "cuda"}


def warmup_cosine(
    optimizer: torch.optim.Optimizer, *, warmup_steps: int, total_steps: int, min_ratio: float
) -> torch.optim.lr_scheduler.LambdaLR:
    """Per-step linear warm-up to the base rate, then cosine decay to `min_ratio` of it; a
    group with `frozen_steps` stays at 0 for its first that many steps."""

    def factor(step: int) -> float:
        if step < warmup_steps:
            return (step + 1) / warmup_steps
        progress = (step - warmup_steps) / max(1, total_steps - warmup_steps)
        return min_ratio + (1 - min_ratio) * 0.5 * (1 + math.cos(math.pi * min(1.0, progress)))

    def group_factor(frozen: int) -> Callable[[int], float]:
        return lambda step: 0.0 if step < frozen else factor(step)

    lambdas = [group_factor(g.get("frozen_steps", 0)) for g in optimizer.param_groups]
    return torch.optim.lr_scheduler.LambdaLR(optimizer, lambdas)


def resolve_precision(precision: str, device: torch.device) -> str:
    """`train.precision` for this device: "auto" is bf16 on CUDA, fp32 elsewhere."""
    if precision == "auto":
        return "bf16" if device.type == "cuda" else "fp32"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
        raise ValueError(f"train.precision='bf16': the GPU {device} does not support bfloat16")
    return precision


def autocast(
    precision: str, device: torch.device
) -> Callable[[], contextlib.AbstractContextManager]:
    """A factory of the forward pass's autocast context (`resolve_precision` first)."""
    if precision == "fp32":
        return contextlib.nullcontext
    return lambda: torch.autocast(device.type, dtype=torch.bfloat16)


class CompileError(RuntimeError):
    """`train.compile` is on and torch.compile failed where training cannot fall back."""


def compile_model(module: nn.Module, device: torch.device, mode: str = "default") -> nn.Module:
    """`torch.compile(module, mode=mode)`, or `module` itself, with a warning, where compiling
    cannot work (no C++ compiler for Inductor on CPU). A model that fails to compile later, at
    its first forward, falls back in `TrainStep`. The CUDA-graph modes ("reduce-overhead",
    "max-autotune") record graphs on CUDA only; on a CPU they compile as "default" does."""
    if device.type == "cpu" and not any(shutil.which(cc) for cc in ("g++", "c++", "clang++")):
        _warn_eager(
            "torch.compile on CPU needs a C++ compiler (g++ or clang++), and none is on PATH"
        )
        return module
    return torch.compile(module, mode=None if mode == "default" else mode)


# Where torch.compile's own errors come from: Dynamo's and Inductor's exception types
# (BackendCompilerFailed, Unsupported, InductorError, ...), and assertions raised inside the
# compiler's code (torch 2.11's Inductor raised a bare AssertionError on CBT-T at 448 px).
_COMPILER_MODULES = ("torch._dynamo", "torch._inductor", "torch._functorch")
_COMPILER_PATHS = tuple(f"/{m.replace('.', '/')}/" for m in _COMPILER_MODULES)


def is_compile_failure(exc: BaseException) -> bool:
    """Whether `exc` is torch.compile failing to compile (not the model failing to run)."""
    if type(exc).__module__.startswith(_COMPILER_MODULES):
        return True
    if isinstance(exc, (AssertionError, NotImplementedError)):
        frames = traceback.extract_tb(exc.__traceback__)
        return any(path in frame.filename for frame in frames for path in _COMPILER_PATHS)
    return False


def compile_failure_reason(exc: BaseException) -> str:
    """The exception's type and first line, and its root cause's (Dynamo wraps the backend's
    own error in a BackendCompilerFailed, as its `inner_exception`)."""

    def first_line(error: BaseException) -> str:
        text = str(error).strip()
        return f"{type(error).__name__}: {text.splitlines()[0]}" if text else type(error).__name__

    root, seen = exc, {id(exc)}
    while (inner := getattr(root, "inner_exception", None) or root.__cause__) is not None:
        if id(inner) in seen:
            break
        root = inner
        seen.add(id(inner))
    return first_line(exc) + ("" if root is exc else f", from {first_line(root)}")


def _warn_eager(reason: str) -> None:
    message = f"train.compile=true: {reason}; training on without compiling (eager)"
    log.warning(message)
    warnings.warn(message, RuntimeWarning, stacklevel=3)


class TrainStep:
    """Forward and backward of one micro-batch; every `accum_steps`-th also steps the optimiser
    and the schedule.

    The loss of each micro-batch is scaled by 1 / accum_steps, so that the accumulated gradient
    is that of the mean loss over the whole (equal-sized) micro-batches: the same update as one
    batch of accum_steps times the size. Under DDP, the gradients are all-reduced on the last
    micro-batch only (`no_sync` on the others).
    """

    def __init__(
        self,
        wrapped: nn.Module,
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
        loss_fn: nn.Module,
        *,
        accum_steps: int = 1,
        grad_clip: float = 0.0,
        clip_params: list[nn.Parameter] | None = None,
        autocast: Callable[[], contextlib.AbstractContextManager] = contextlib.nullcontext,
        compiled: bool = False,
    ) -> None:
        self.wrapped = wrapped
        self.optimizer = optimizer
        self.scheduler = scheduler
        self.loss_fn = loss_fn
        self.accum_steps = accum_steps
        self.grad_clip = grad_clip
        # In the model's order: the clipping norm's summation order is part of the numbers.
        self.clip_params = clip_params or [
            p for group in optimizer.param_groups for p in group["params"]
        ]
        self.autocast = autocast
        self.compiled = compiled
        self.pending = 0  # micro-batches accumulated since the last optimiser step

    def __call__(self, images: Tensor, labels: Tensor) -> tuple[Tensor, Tensor, bool]:
        """(loss, logits, stepped): `stepped` is true when this micro-batch completed an
        optimiser step. Nothing here waits for the device (`grad_clip` included)."""
        last = self.pending + 1 == self.accum_steps
        while True:
            no_sync = getattr(self.wrapped, "no_sync", None)
            sync = contextlib.nullcontext() if last or no_sync is None else no_sync()
            forward_done = False
            if self.compiled:
                # Under CUDA graphs, a new step may overwrite the last step's outputs (the
                # meter and the guard have read them by now); a no-op otherwise.
                torch.compiler.cudagraph_mark_step_begin()
            try:
                with sync:
                    with self.autocast():
                        logits = self.wrapped(images)
                        loss = self.loss_fn(logits, labels)
                    forward_done = True
                    (loss / self.accum_steps).backward()
                break
            except Exception as exc:
                if not (self.compiled and is_compile_failure(exc)):
                    raise
                self._fall_back(exc, after_forward=forward_done)
        self.pending += 1
        if last:
            self.step()
        return loss, logits, last

    def _fall_back(self, exc: Exception, *, after_forward: bool) -> None:
        """Train on uncompiled after a compile failure. Compilers fail at the first forward
        (Inductor may compile the backward lazily, at the first backward): a failure in the
        backward falls back only where no gradient can be half-accumulated, i.e. at the first
        micro-batch of an optimiser step without DDP (whose reducer the failure would leave
        mid-reduction)."""
        reason = compile_failure_reason(exc)
        if after_forward and (self.pending or hasattr(self.wrapped, "no_sync")):
            raise CompileError(
                f"train.compile=true: torch.compile failed in the backward pass ({reason}); "
                "set train.compile=false to train without it"
            ) from exc
        if after_forward:  # a backward cut short: drop what it accumulated (pending is 0)
            self.optimizer.zero_grad(set_to_none=True)
        self.wrapped = getattr(self.wrapped, "_orig_mod", self.wrapped)
        self.compiled = False
        _warn_eager(f"torch.compile failed ({reason})")

    def step(self) -> None:
        if self.grad_clip > 0:
            nn.utils.clip_grad_norm_(self.clip_params, self.grad_clip)
        self.optimizer.step()
        self.scheduler.step()
        self.optimizer.zero_grad(set_to_none=True)
        self.pending = 0
