"""CBSA: shapes, gradients, the math of CSBA_MATH.md, and linear cost in the token count."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch.utils.flop_counter import FlopCounterMode

import cbtlab.attention.cbsa as cbsa_module
from cbtlab.attention import CBSA, create_attention
from cbtlab.attention.cbsa import cbsa_mixing, pool_grid
from tensor_recorder import TensorRecorder


def reference_cbsa(attn: CBSA, x: torch.Tensor, grid: tuple[int, int]) -> torch.Tensor:
    """CBSA written head by head and sample by sample, straight from the equations."""
    b = x.shape[0]
    k, p, s = attn.num_heads, attn.head_dim, attn.head_dim**-0.5
    u = attn.qkv.weight  # (K*p, d)
    outs = []
    for i in range(b):
        heads = []
        for h in range(k):
            w = x[i] @ u[h * p : (h + 1) * p].T  # (N, p)
            patches = w[attn.num_prefix_tokens :].T.reshape(p, *grid)  # (p, H, W)
            q0 = F.adaptive_avg_pool2d(patches[None], attn.rep_grid)[0].reshape(p, -1).T  # (m, p)
            a = torch.softmax(s * q0 @ w.T, dim=-1)  # (m, N)
            q = q0 + attn.step_rep[h] * a @ w
            c = torch.softmax(s * q @ q.T, dim=-1) @ q
            heads.append(attn.step_x[h] * a.T @ c)  # (N, p)
        outs.append(torch.cat(heads, dim=-1))
    return attn.proj(torch.stack(outs))


GRIDS = [
    ((4, 4), (2, 2)),
    ((4, 4), (1, 1)),
    ((4, 4), (4, 4)),
    ((6, 10), (2, 5)),
    ((6, 10), (3, 2)),
    ((5, 7), (2, 3)),
]


@pytest.mark.parametrize(("patch_grid", "rep_grid"), GRIDS)
def test_shape_and_gradients(patch_grid: tuple[int, int], rep_grid: tuple[int, int]) -> None:
    torch.manual_seed(0)
    attn = CBSA(24, 3, num_prefix_tokens=1, rep_grid=rep_grid)
    n = 1 + patch_grid[0] * patch_grid[1]
    x = torch.randn(2, n, 24, requires_grad=True)
    out = attn(x, patch_grid)
    assert out.shape == (2, n, 24)
    assert torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad is not None and x.grad.abs().sum() > 0
    for name, param in attn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, name


@pytest.mark.parametrize(("patch_grid", "rep_grid"), GRIDS)
def test_matches_equations(patch_grid: tuple[int, int], rep_grid: tuple[int, int]) -> None:
    torch.manual_seed(1)
    attn = CBSA(24, 3, num_prefix_tokens=1, rep_grid=rep_grid).double()
    x = torch.randn(2, 1 + patch_grid[0] * patch_grid[1], 24, dtype=torch.float64)
    torch.testing.assert_close(attn(x, patch_grid), reference_cbsa(attn, x, patch_grid))


def test_pool_uses_patch_tokens_only() -> None:
    """The CLS token must not enter the initial guess: changing it changes Q0 not at all."""
    tokens = torch.randn(1, 1, 16, 4)
    pooled = pool_grid(tokens, (4, 4), (2, 2), "avg")
    expected = tokens[0, 0].reshape(2, 2, 2, 2, 4).permute(0, 2, 1, 3, 4).reshape(4, 4, 4).mean(1)
    torch.testing.assert_close(pooled[0, 0], expected)
    with pytest.raises(ValueError, match="exceeds"):
        pool_grid(tokens, (4, 4), (5, 4), "avg")


def test_exact_contraction_solves_the_linear_system() -> None:
    torch.manual_seed(2)
    attn = CBSA(16, 2, rep_grid=(2, 2), contraction="exact", contraction_beta=0.5).double()
    q = torch.randn(3, 2, 4, 8, dtype=torch.float64)
    gram = torch.eye(4, dtype=torch.float64) + 0.5 * q @ q.transpose(-1, -2)
    torch.testing.assert_close(attn.contract(q), torch.linalg.inv(gram) @ q)


def test_zero_step_init_gives_the_output_bias_only() -> None:
    attn = CBSA(16, 2, rep_grid=(2, 2), step_init="zero")
    out = attn(torch.randn(2, 17, 16), (4, 4))
    torch.testing.assert_close(out, attn.proj.bias.expand_as(out))


def test_stop_grad_init_changes_the_gradient() -> None:
    torch.manual_seed(3)
    x = torch.randn(2, 17, 16)
    grads = []
    for stop in (False, True):
        torch.manual_seed(4)
        attn = CBSA(16, 2, rep_grid=(2, 2), stop_grad_init=stop)
        attn(x, (4, 4)).sum().backward()
        grads.append(attn.qkv.weight.grad.clone())
    assert not torch.allclose(grads[0], grads[1])


@pytest.mark.parametrize("fused", [True, False])
def test_no_n_by_n_tensor_is_formed(fused: bool) -> None:
    n_side = 128  # 16,384 patch tokens + CLS
    n = 1 + n_side * n_side
    attn = CBSA(16, 2, rep_grid=(4, 4))
    attn.fused = fused
    x = torch.randn(1, n, 16, requires_grad=True)
    with TensorRecorder() as rec:
        attn(x, (n_side, n_side)).sum().backward()
    largest = rec.largest()
    assert largest <= 2 * 16 * n, f"an op produced {largest} elements (N = {n})"
    assert not any(s[-2:] == (n, n) for s in rec.shapes if len(s) >= 2)


def _flops(m_grid: tuple[int, int], side: int) -> int:
    attn = create_attention("cbsa", 32, 2, rep_grid=m_grid)
    x = torch.randn(1, 1 + side * side, 32)
    with FlopCounterMode(display=False) as counter:
        attn(x, (side, side))
    return counter.get_total_flops()


def test_representative_count_sets_the_cost() -> None:
    """FLOPs grow with m and linearly (not quadratically) with N."""
    f1, f4, f16 = (_flops(g, 16) for g in ((1, 1), (2, 2), (4, 4)))
    assert f1 < f4 < f16
    # The m-dependent part (extraction + broadcast) scales with m.
    assert (f16 - f1) / (f4 - f1) == pytest.approx(5.0, rel=0.05)
    small, big = _flops((4, 4), 16), _flops((4, 4), 64)  # 16x the tokens
    assert big / small < 17


def test_overlapping_pool_windows() -> None:
    """3x3 windows every 2 patches on a 7x7 grid: 3x3 overlapping windows, each averaged."""
    tokens = torch.randn(2, 3, 49, 4)
    pooled = pool_grid(tokens, (7, 7), (3, 3), "avg", kernel=3, stride=2)
    grid = tokens.reshape(2, 3, 7, 7, 4)
    for i in range(3):
        for j in range(3):
            window = grid[:, :, 2 * i : 2 * i + 3, 2 * j : 2 * j + 3].mean(dim=(2, 3))
            torch.testing.assert_close(pooled[:, :, 3 * i + j], window)
    with pytest.raises(ValueError, match="give a 3x3 grid, not the representative grid 2x2"):
        pool_grid(tokens, (7, 7), (2, 2), "avg", kernel=3, stride=2)
    attn = CBSA(12, 3, rep_grid=(3, 3), rep_pool_kernel=3, rep_pool_stride=2)
    assert attn(torch.randn(2, 50, 12), (7, 7)).shape == (2, 50, 12)


def test_learned_initial_queries_ignore_the_input() -> None:
    torch.manual_seed(5)
    attn = CBSA(12, 3, rep_grid=(2, 2), rep_init="learned")
    w = torch.randn(2, 3, 17, 4)
    q0 = attn.initial_guess(w, (4, 4))
    assert q0.shape == (2, 3, 4, 4)
    torch.testing.assert_close(q0[0], attn.rep_queries)
    attn(torch.randn(2, 17, 12), (4, 4)).sum().backward()
    assert attn.rep_queries.grad is not None and attn.rep_queries.grad.abs().sum() > 0


def test_legacy_pooling_pools_the_first_grid_tokens() -> None:
    """The reference code's quirk: the CLS token and all patches but the last are pooled."""
    attn = CBSA(8, 2, rep_grid=(1, 1), legacy_pool=True)
    w = torch.randn(1, 2, 17, 4)
    torch.testing.assert_close(attn.initial_guess(w, (4, 4))[:, :, 0], w[:, :, :16].mean(2))
    attn.legacy_pool = False
    torch.testing.assert_close(attn.initial_guess(w, (4, 4))[:, :, 0], w[:, :, 1:].mean(2))


FUSED_CASES = [
    {},
    {"rep_pool": "max"},
    {"rep_init": "learned"},
    {"legacy_pool": True},
    {"contraction": "exact"},
    {"contraction": "none"},
    {"stop_grad_init": True},
    {"rep_grid": (3, 3), "rep_pool_kernel": 3, "rep_pool_stride": 2},
    {"rep_grid": (2, 5)},
    {"rep_grid": (3, 5)},
    {"num_prefix_tokens": 0},
]


@pytest.mark.parametrize("options", FUSED_CASES, ids=lambda o: ",".join(map(str, o)) or "default")
@pytest.mark.parametrize("batch", [1, 3, 150])
def test_fused_form_equals_the_reference_form(
    options: dict, batch: int, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Output and every gradient agree in float64, for every option; batch 150 on 61 tokens
    runs the fused form in several chunks of samples."""
    monkeypatch.setattr(cbsa_module, "FUSED_MIN_TOKENS_PER_REP", 0)  # fused at any size
    torch.manual_seed(0)
    kwargs = {"num_prefix_tokens": 1, "rep_grid": (2, 2), **options}
    grid = (7, 7) if "rep_pool_kernel" in options else (6, 10)
    attn = CBSA(24, 3, **kwargs).double()
    n = kwargs["num_prefix_tokens"] + grid[0] * grid[1]
    # 7 samples per chunk: batch 150 runs in 22 chunks, the last one short.
    monkeypatch.setattr(cbsa_module, "CHUNK_ELEMENTS", 7 * 3 * attn.num_representatives * n)
    x = torch.randn(batch, n, 24, dtype=torch.float64, requires_grad=True)
    results = []
    for fused in (False, True):
        attn.fused = fused
        attn.zero_grad()
        x.grad = None
        out = attn(x, grid)
        (out * torch.linspace(-1, 1, out.numel(), dtype=out.dtype).view_as(out)).sum().backward()
        grads = {"x": x.grad.clone()}
        grads.update({k: p.grad.clone() for k, p in attn.named_parameters() if p.grad is not None})
        results.append((out.detach(), grads))
    (ref, ref_grads), (fused_out, fused_grads) = results
    torch.testing.assert_close(fused_out, ref, rtol=1e-10, atol=1e-10)
    assert ref_grads.keys() == fused_grads.keys()
    for name in ref_grads:
        torch.testing.assert_close(fused_grads[name], ref_grads[name], rtol=1e-9, atol=1e-9)


MIXING_CASES = [
    ((4, 10), (2, 5), False),  # equal tiles: pooled inside the extraction
    ((5, 7), (2, 3), False),  # unequal tiles: adaptive pooling, then the extraction
    ((4, 10), (2, 5), True),  # a given Q0
]


def _sdpa_contraction(q: torch.Tensor) -> torch.Tensor:
    """The softmax contraction as any callable: `cbsa_mixing` differentiates it by autograd."""
    return F.scaled_dot_product_attention(q, q, q)


@pytest.mark.parametrize(("grid", "rep_grid", "given_q0"), MIXING_CASES)
@pytest.mark.parametrize("chunk_rows", [10, 3])
@pytest.mark.parametrize("generic_contraction", [False, True])
def test_mixing_equals_the_reference_core(
    grid: tuple[int, int],
    rep_grid: tuple[int, int],
    given_q0: bool,
    chunk_rows: int,
    generic_contraction: bool,
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    """`cbsa_mixing` (the mechanism without projections) against the equations, output and
    every gradient (through the pooling too), in one chunk and in chunks of 3 rows, the last
    one short (5 x 2 = 10 rows); with the written-out softmax contraction and through autograd."""
    n, m = grid[0] * grid[1], rep_grid[0] * rep_grid[1]
    monkeypatch.setattr(cbsa_module, "CHUNK_ELEMENTS", chunk_rows * m * n)
    torch.manual_seed(0)
    b, k, p = 5, 2, 8
    w = torch.randn(b, k, n, p, dtype=torch.float64, requires_grad=True)
    given = torch.randn(b, k, rep_grid[0] * rep_grid[1], p, dtype=torch.float64)
    given.requires_grad_()
    steps = torch.randn(2, k, dtype=torch.float64, requires_grad=True)

    def initial_guess() -> torch.Tensor:
        return given if given_q0 else pool_grid(w, grid, rep_grid, "avg")

    def reference() -> torch.Tensor:
        q0 = initial_guess()
        a = torch.softmax(q0 @ w.transpose(-1, -2) * p**-0.5, dim=-1)
        q = q0 + steps[0].view(1, k, 1, 1) * (a @ w)
        c = F.scaled_dot_product_attention(q, q, q)
        return steps[1].view(1, k, 1, 1) * (a.transpose(-1, -2) @ c)

    def mixing() -> torch.Tensor:
        q0 = given if given_q0 else None
        extra = {"contract": _sdpa_contraction} if generic_contraction else {}
        return cbsa_mixing(w, steps[0], steps[1], grid_size=grid, rep_grid=rep_grid, q0=q0, **extra)

    weights = torch.randn(b, k, n, p, dtype=torch.float64)
    inputs = (w, steps, given) if given_q0 else (w, steps)
    outs, grads = [], []
    for fn in (reference, mixing):
        out = fn()
        outs.append(out.detach())
        grads.append(torch.autograd.grad((out * weights).sum(), inputs))
    torch.testing.assert_close(outs[1], outs[0])
    for got, want in zip(grads[1], grads[0], strict=True):
        torch.testing.assert_close(got, want)


def test_tile_pool_equals_adaptive_pooling() -> None:
    """The two-stage tile mean and its one-pass backward against PyTorch's pooling, on tokens
    that do not lie contiguously (the patches after a CLS token). 2 x 5 tiles a 6 x 10 grid
    evenly (3 x 2 tiles), so `pool_grid` takes the tile path."""
    torch.manual_seed(0)
    x = torch.randn(3, 1 + 6 * 10, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(3, 10, 5, dtype=torch.float64)
    results = []
    for pool in (
        lambda t: pool_grid(t.unsqueeze(1), (6, 10), (2, 5), "avg")[:, 0],
        lambda t: (
            F.adaptive_avg_pool2d(t.transpose(1, 2).reshape(3, 5, 6, 10), (2, 5))
            .flatten(2)
            .transpose(1, 2)
        ),
    ):
        out = pool(x[:, 1:])
        (grad,) = torch.autograd.grad((out * weights).sum(), x)
        results.append((out, grad))
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert results[0][1][:, 0].abs().sum() == 0  # the CLS token gets no gradient


@pytest.mark.parametrize(
    ("grid", "out", "kernel", "stride"),
    [
        ((14, 14), (8, 8), 0, 0),
        ((7, 9), (3, 4), 0, 0),
        ((9, 9), (4, 4), 3, 2),
        ((8, 8), (3, 3), 4, 2),
    ],
)
def test_window_pooling_equals_torch_pooling(
    grid: tuple[int, int], out: tuple[int, int], kernel: int, stride: int
) -> None:
    """Uneven (adaptive) and overlapping windows pool by two matrix products: the result and
    the gradient equal PyTorch's pooling, on tokens after a CLS token, also when the first
    call ran under inference mode (the window weights are kept for later calls)."""
    torch.manual_seed(0)
    h, w = grid
    x = torch.randn(2, 3, 1 + h * w, 5, dtype=torch.float64, requires_grad=True)
    weights = torch.randn(2, 3, out[0] * out[1], 5, dtype=torch.float64)

    def torch_pool(t: torch.Tensor) -> torch.Tensor:
        planes = t.transpose(-1, -2).reshape(6, 5, h, w)
        pooled = (
            F.avg_pool2d(planes, kernel, stride) if kernel else F.adaptive_avg_pool2d(planes, out)
        )
        return pooled.reshape(2, 3, 5, -1).transpose(-1, -2)

    with torch.inference_mode():
        first = pool_grid(x[:, :, 1:], grid, out, "avg", kernel=kernel, stride=stride)
    results = []
    for pool in (
        lambda t: pool_grid(t, grid, out, "avg", kernel=kernel, stride=stride),
        torch_pool,
    ):
        pooled = pool(x[:, :, 1:])
        (grad,) = torch.autograd.grad((pooled * weights).sum(), x)
        results.append((pooled, grad))
    torch.testing.assert_close(first, results[1][0].detach())
    torch.testing.assert_close(results[0][0], results[1][0])
    torch.testing.assert_close(results[0][1], results[1][1])
    assert results[0][1][:, :, 0].abs().sum() == 0  # the CLS token gets no gradient


def test_the_fused_form_runs_from_its_token_threshold(monkeypatch: pytest.MonkeyPatch) -> None:
    attn = CBSA(24, 3, rep_grid=(2, 2))  # m = 4: fused from 24 tokens
    calls: list[int] = []
    monkeypatch.setattr(attn, "_forward_fused", lambda x, grid: calls.append(x.shape[1]) or x)
    attn(torch.randn(1, 1 + 16, 24), (4, 4))
    attn(torch.randn(1, 1 + 36, 24), (6, 6))
    assert calls == [37]


def test_fused_form_traces_without_graph_breaks() -> None:
    """torch.compile sees one graph: the custom autograd functions and the chunk loop trace."""
    attn = CBSA(24, 3, rep_grid=(2, 2))
    x = torch.randn(3, 1 + 36, 24, requires_grad=True)
    explanation = torch._dynamo.explain(attn)(x, (6, 6))
    assert explanation.graph_break_count == 0, explanation.break_reasons


def test_fused_forms_run_in_bf16_under_autocast() -> None:
    """The layer's fused form and the mechanism meet one dtype in their hand-written backward
    passes under autocast, and stay close to float32."""
    torch.manual_seed(0)
    attn = CBSA(48, 3, rep_grid=(2, 2))
    x = torch.randn(2, 1 + 8 * 8, 48, requires_grad=True)
    w = torch.randn(2, 3, 8 * 8, 16, requires_grad=True)
    steps = torch.randn(2, 3, requires_grad=True)
    cases = {
        "layer": (lambda: attn(x, (8, 8)), x),
        "mechanism": (lambda: cbsa_mixing(w, steps[0], steps[1], grid_size=(8, 8)), w),
    }
    for name, (fn, leaf) in cases.items():
        reference = fn()
        (grad_ref,) = torch.autograd.grad(reference.square().sum(), leaf)
        with torch.autocast("cpu", dtype=torch.bfloat16):
            out = fn()
        assert out.dtype == torch.bfloat16, name
        (grad,) = torch.autograd.grad(out.float().square().sum(), leaf)
        assert grad.dtype == torch.float32, name
        torch.testing.assert_close(out.float(), reference, rtol=0.05, atol=0.05)
        torch.testing.assert_close(grad, grad_ref, rtol=0.1, atol=0.1 * grad_ref.abs().max())
