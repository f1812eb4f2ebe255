"""The recipe's components alone: optimisers, parameter groups, the schedule, precision,
compilation errors and the accumulated training step."""

from __future__ import annotations

import contextlib
import copy
import socket
from typing import Any

import pytest
import torch
import torch.distributed as dist
from torch import Tensor, nn

from cbtlab.config import ExperimentConfig
from cbtlab.models import build_model
from cbtlab.train.recipe import (
    CompileError,
    TrainStep,
    autocast,
    build_optimizer,
    compile_model,
    fused_optimizer_ok,
    is_compile_failure,
    param_groups,
    resolve_precision,
    warmup_cosine,
)

TINY = {"model.embed_dim": 24, "model.depth": 1, "model.num_heads": 3, "model.rep_grid": "2x2"}


def _cfg(**overrides: object) -> ExperimentConfig:
    return ExperimentConfig().with_overrides({**TINY, **overrides})


@pytest.mark.parametrize("name", ["adamw", "sgd", "lion"])
def test_every_optimizer_lowers_the_loss_on_a_fixed_batch(name: str) -> None:
    torch.manual_seed(0)
    cfg = _cfg(**{"train.optimizer": name, "train.lr": 1e-3 if name == "lion" else 1e-2})
    model = build_model(cfg.model)
    optimizer = build_optimizer(model, cfg)
    if name == "lion":
        from timm.optim import Lion

        assert isinstance(optimizer, Lion)
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    losses = []
    for _ in range(5):
        loss = nn.functional.cross_entropy(model(x), y)
        optimizer.zero_grad()
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    assert losses[-1] < losses[0]


@pytest.mark.parametrize("name", ["adamw", "sgd"])
def test_adamw_and_sgd_step_fused_and_agree_with_the_plain_step(name: str) -> None:
    """On one device the fused step runs (one kernel per group, not one per tensor and
    operation) and follows the plain step to rounding; parameters split across devices or
    of an integer dtype keep the plain step."""
    cfg = _cfg(**{"train.optimizer": name, "train.lr": 1e-2, "train.weight_decay": 0.05})
    torch.manual_seed(0)
    fused_model = build_model(cfg.model)
    plain_model = copy.deepcopy(fused_model)
    fused = build_optimizer(fused_model, cfg)
    plain = build_optimizer(plain_model, cfg)
    for group in plain.param_groups:
        group["fused"] = False
    assert all(group["fused"] for group in fused.param_groups)
    x, y = torch.randn(16, 1, 16, 16), torch.randint(0, 10, (16,))
    for _ in range(5):
        for model, optimizer in ((fused_model, fused), (plain_model, plain)):
            optimizer.zero_grad()
            nn.functional.cross_entropy(model(x), y).backward()
            optimizer.step()
    for got, want in zip(fused_model.parameters(), plain_model.parameters(), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)

    assert not fused_optimizer_ok(nn.Sequential(nn.Linear(2, 2), nn.Linear(2, 2, device="meta")))
    counts = nn.Linear(2, 2)
    counts.register_parameter("steps", nn.Parameter(torch.zeros(2, dtype=torch.long), False))
    assert not fused_optimizer_ok(counts)


def test_the_head_gets_groups_of_its_own_only_when_fine_tuning() -> None:
    model = build_model(_cfg().model)
    plain = param_groups(model, 0.05)
    assert len(plain) == 2 and "lr_scale" not in plain[0]
    cfg = _cfg(**{"train.backbone_lr_scale": 0.1, "train.lr": 1e-3})
    optimizer = build_optimizer(model, cfg, frozen_steps=3)
    head = {id(model.head.weight), id(model.head.bias)}
    groups = optimizer.param_groups
    assert {id(p) for g in groups[:2] for p in g["params"]} == head  # the head first
    assert [g["lr"] for g in groups] == pytest.approx([1e-3, 1e-3, 1e-4, 1e-4])
    assert sum(len(g["params"]) for g in groups) == len(list(model.parameters()))
    scheduler = warmup_cosine(optimizer, warmup_steps=0, total_steps=10, min_ratio=0.0)
    for _ in range(3):  # the backbone's rate is 0 for the frozen steps
        assert scheduler.get_last_lr()[2:] == [0.0, 0.0] and scheduler.get_last_lr()[0] > 0
        optimizer.step()
        scheduler.step()
    assert scheduler.get_last_lr()[2] == pytest.approx(0.1 * scheduler.get_last_lr()[0])


def test_precision_auto_is_bf16_on_cuda_only() -> None:
    cpu = torch.device("cpu")
    assert resolve_precision("auto", cpu) == "fp32"
    assert resolve_precision("auto", torch.device("cuda")) == "bf16"
    assert resolve_precision("bf16", cpu) == "bf16"
    with autocast("fp32", cpu)():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.float32
    with autocast("bf16", cpu)():
        assert torch.ones(2, 2).matmul(torch.ones(2, 2)).dtype == torch.bfloat16


class _BackendFailed(RuntimeError):
    """Stands for Dynamo's BackendCompilerFailed: an exception type of the compiler's."""


_BackendFailed.__module__ = "torch._dynamo.exc"


def test_compile_failures_are_told_from_the_models_own_errors() -> None:
    assert is_compile_failure(_BackendFailed("no backend"))
    assert not is_compile_failure(ValueError("a shape"))
    # A bare assertion inside the compiler's code (as Inductor raised on CBT-T at 448 px) is
    # the compiler's; the same assertion from elsewhere is the model's.
    for filename, expected in (("/site/torch/_inductor/fake.py", True), ("/mine.py", False)):
        try:
            exec(compile("raise AssertionError('index')", filename, "exec"))
        except AssertionError as exc:
            assert is_compile_failure(exc) is expected, filename


def test_compile_without_a_cpp_compiler_warns_and_stays_eager(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setattr("shutil.which", lambda name: None)
    module = nn.Linear(2, 2)
    with pytest.warns(RuntimeWarning, match="C\\+\\+ compiler.*eager"):
        assert compile_model(module, torch.device("cpu")) is module


@pytest.mark.parametrize(
    ("mode", "passed"), [("default", None), ("reduce-overhead", "reduce-overhead")]
)
def test_compile_model_passes_the_mode(
    monkeypatch: pytest.MonkeyPatch, mode: str, passed: str | None
) -> None:
    """train.compile_mode reaches torch.compile ("default" as torch's own default)."""
    seen = []
    monkeypatch.setattr("shutil.which", lambda name: "/usr/bin/g++")
    monkeypatch.setattr(torch, "compile", lambda module, mode=None: seen.append(mode) or module)
    compile_model(nn.Linear(2, 2), torch.device("cpu"), mode)
    assert seen == [passed]


def _failing_backend(gm: torch.fx.GraphModule, example_inputs: list) -> None:
    raise AssertionError("the compiler could not")


def _one_step(model: nn.Module, *, compiled: nn.Module | None = None) -> nn.Module:
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = warmup_cosine(optimizer, warmup_steps=0, total_steps=2, min_ratio=1.0)
    step = TrainStep(
        compiled or model,
        optimizer,
        scheduler,
        nn.CrossEntropyLoss(),
        compiled=compiled is not None,
    )
    torch.manual_seed(1)
    step(torch.randn(8, 6), torch.randint(0, 3, (8,)))
    assert step.compiled is False  # fell back (or never compiled)
    return model


def test_a_model_that_fails_to_compile_trains_eagerly_with_a_warning() -> None:
    torch.manual_seed(0)
    eager = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3))
    twin = copy.deepcopy(eager)
    _one_step(eager)
    compiled = torch.compile(twin, backend=_failing_backend)
    with pytest.warns(RuntimeWarning, match="torch.compile failed .*could not.*eager"):
        _one_step(twin, compiled=compiled)
    for (name, a), b in zip(eager.state_dict().items(), twin.state_dict().values(), strict=True):
        assert torch.equal(a, b), name


class _FailsBackwardOnce(torch.autograd.Function):
    """The identity, whose first backward fails as a lazily compiled backward would, after
    leaving a gradient behind."""

    failures = 0

    @staticmethod
    def forward(ctx: Any, x: Tensor, weight: Tensor) -> Tensor:
        ctx.save_for_backward(weight)
        return x * 1.0

    @staticmethod
    def backward(ctx: Any, grad: Tensor) -> tuple[Tensor, None]:
        (weight,) = ctx.saved_tensors
        if _FailsBackwardOnce.failures == 0:
            _FailsBackwardOnce.failures += 1
            weight.grad = torch.full_like(weight, 1e6)  # a half-accumulated gradient
            raise _BackendFailed("backward did not compile")
        return grad, None


class _Model(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.linear = nn.Linear(6, 3)

    def forward(self, x: Tensor) -> Tensor:
        return self.linear(_FailsBackwardOnce.apply(x, self.linear.weight))


@pytest.mark.parametrize("pending", [0, 1])
def test_a_backward_that_fails_to_compile(pending: int, monkeypatch: pytest.MonkeyPatch) -> None:
    """At an optimiser step's first micro-batch, the half-accumulated gradient is dropped and
    the step trains as eager; later in an accumulation, gradients cannot be told apart and the
    step stops, naming the flag."""
    monkeypatch.setattr(_FailsBackwardOnce, "failures", 0)
    torch.manual_seed(0)
    model = _Model()
    reference = copy.deepcopy(model)
    monkeypatch.setattr(_FailsBackwardOnce, "failures", 1)  # the reference never fails
    x, y = torch.randn(8, 6), torch.randint(0, 3, (8,))
    (nn.CrossEntropyLoss()(reference(x), y) / 4).backward()  # 4 micro-batches a step
    monkeypatch.setattr(_FailsBackwardOnce, "failures", 0)
    optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
    scheduler = warmup_cosine(optimizer, warmup_steps=0, total_steps=2, min_ratio=1.0)
    step = TrainStep(model, optimizer, scheduler, nn.CrossEntropyLoss(), compiled=True)
    step.accum_steps, step.pending = 4, pending
    if pending:
        with pytest.raises(CompileError, match=r"backward pass .*train\.compile=false"):
            step(x, y)
        return
    with pytest.warns(RuntimeWarning, match="backward did not compile"):
        step(x, y)
    assert torch.equal(model.linear.weight.grad, reference.linear.weight.grad)


def _train_steps(model: nn.Module, batches: list, accum: int, wrap: bool = False) -> nn.Module:
    optimizer = torch.optim.AdamW(model.parameters(), lr=0.01, weight_decay=0.05)
    scheduler = warmup_cosine(optimizer, warmup_steps=1, total_steps=4, min_ratio=0.1)
    wrapped = nn.parallel.DistributedDataParallel(model) if wrap else model
    step = TrainStep(
        wrapped,
        optimizer,
        scheduler,
        nn.CrossEntropyLoss(label_smoothing=0.1),
        accum_steps=accum,
        grad_clip=0.5,
    )
    stepped = []
    for x, y in batches:
        stepped.append(step(x, y)[2])
    assert stepped == [(i + 1) % accum == 0 for i in range(len(batches))]
    return model


@contextlib.contextmanager
def _one_rank_group():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        port = probe.getsockname()[1]
    dist.init_process_group("gloo", init_method=f"tcp://127.0.0.1:{port}", rank=0, world_size=1)
    try:
        yield
    finally:
        dist.destroy_process_group()


@pytest.mark.parametrize("ddp", [False, True])
def test_accumulating_half_batches_gives_the_full_batch_update(ddp: bool) -> None:
    """float64, so that only the order of the sums differs: accum=2 on halves == accum=1."""
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 8), nn.GELU(), nn.Linear(8, 3)).double()
    x, y = torch.randn(3, 16, 6, dtype=torch.float64), torch.randint(0, 3, (3, 16))
    full = [(x[i], y[i]) for i in range(3)]
    halves = [(x[i, h], y[i, h]) for i in range(3) for h in (slice(0, 8), slice(8, 16))]
    context = _one_rank_group() if ddp else contextlib.nullcontext()
    with context:
        one = _train_steps(_copy(model), full, accum=1, wrap=ddp)
        two = _train_steps(_copy(model), halves, accum=2, wrap=ddp)
    for a, b in zip(one.parameters(), two.parameters(), strict=True):
        torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)
    moved = [
        not torch.equal(a, b) for a, b in zip(one.parameters(), model.parameters(), strict=True)
    ]
    assert all(moved)


def _copy(model: nn.Module) -> nn.Module:
    import copy

    return copy.deepcopy(model)


@pytest.mark.parametrize("attention", ["cbsa", "mssa", "tssa", "agent", "linear", "softmax"])
def test_every_attention_runs_forward_and_backward_under_bf16_autocast(attention: str) -> None:
    # CBSA's fused form has a hand-written backward: it must see one dtype.
    cfg = _cfg(**{"model.attention": attention, "model.depth": 2})
    torch.manual_seed(0)
    model = build_model(cfg.model)
    x = torch.randn(4, 1, 16, 16)
    with torch.no_grad():
        reference = model(x)
    with autocast("bf16", torch.device("cpu"))():
        logits = model(x)
    assert logits.dtype == torch.bfloat16
    torch.testing.assert_close(logits.float(), reference, rtol=0, atol=0.05)
    logits.float().logsumexp(-1).mean().backward()
    assert all(p.grad is not None and torch.isfinite(p.grad).all() for p in model.parameters())
