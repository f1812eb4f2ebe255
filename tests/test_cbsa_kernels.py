"""The CBSA Triton kernels (`cbtlab.attention.cbsa_triton`) held equal to the equations and to the
CPU forms, forward and gradients. On a machine without CUDA they run under Triton's interpreter
(conftest.py sets it), at small sizes; with CUDA, compiled on the GPU."""

from __future__ import annotations

import importlib.util
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F

import cbtlab.attention.cbsa as cbsa_module
from cbtlab.attention import CBSA
from cbtlab.attention.cbsa import cbsa_mixing
from tensor_recorder import TensorRecorder

if importlib.util.find_spec("triton") is None:
    pytest.skip("Triton is not installed", allow_module_level=True)

import cbtlab.attention.cbsa_triton as kernels

DEVICE = "cuda" if torch.cuda.is_available() else "cpu"
# Without CUDA, conftest.py sets TRITON_INTERPRET=1 before anything imports Triton.
assert DEVICE == "cuda" or kernels.INTERPRETED, "set TRITON_INTERPRET=1 before importing Triton"

ROOT = Path(__file__).resolve().parents[1]
# (max abs error) / (max abs value) allowed against float64 equations, per dtype.
TOLERANCE = {torch.float32: 2e-5, torch.float16: 5e-3, torch.bfloat16: 3e-2}


def equations(
    w: torch.Tensor,
    q0: torch.Tensor,
    step_rep: torch.Tensor,
    step_x: torch.Tensor,
    contraction: str = "softmax",
    beta: float = 1.0,
) -> torch.Tensor:
    """eta_x A^T contract(Q0 + eta_rep A W), written as in CBSA_MATH.md."""
    a = torch.softmax(q0 @ w.transpose(-1, -2) * w.shape[-1] ** -0.5, dim=-1)
    q = q0 + step_rep.view(1, -1, 1, 1) * (a @ w)
    if contraction == "softmax":
        c = F.scaled_dot_product_attention(q, q, q)
    elif contraction == "exact":
        eye = torch.eye(q.shape[-2], dtype=q.dtype)
        c = torch.cholesky_solve(q, torch.linalg.cholesky(eye + beta * q @ q.transpose(-1, -2)))
    else:
        c = q
    return step_x.view(1, -1, 1, 1) * (a.transpose(-1, -2) @ c)


def _inputs(
    b: int, k: int, n: int, p: int, m: int, seed: int = 0
) -> tuple[list[torch.Tensor], torch.Tensor]:
    gen = torch.Generator().manual_seed(seed)
    w = torch.randn(b, k, n, p, generator=gen, dtype=torch.float64)
    q0 = torch.randn(b, k, m, p, generator=gen, dtype=torch.float64) * 0.5
    steps = torch.randn(2, k, generator=gen, dtype=torch.float64)
    upstream = torch.randn(b, k, n, p, generator=gen, dtype=torch.float64)
    return [w, q0, steps[0], steps[1]], upstream


def _relative_error(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got.double() - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


@pytest.mark.parametrize(
    ("shape", "contraction", "dtype"),
    [
        ((2, 3, 50, 32, 9), "softmax", torch.float32),  # m below a block, N not a multiple
        ((1, 2, 97, 64, 20), "softmax", torch.float32),  # m over one 16-block, N split
        ((1, 1, 40, 128, 16), "softmax", torch.float32),  # head dim 128
        ((1, 2, 64, 24, 5), "softmax", torch.float32),  # head dim not a power of two
        ((1, 2, 48, 32, 16), "exact", torch.float32),
        ((2, 1, 37, 32, 4), "none", torch.float32),
        ((2, 2, 64, 32, 16), "softmax", torch.float16),
        ((2, 2, 64, 32, 16), "softmax", torch.bfloat16),
    ],
)
def test_kernels_equal_the_equations(
    shape: tuple[int, int, int, int, int], contraction: str, dtype: torch.dtype
) -> None:
    b, k, n, p, m = shape
    leaves, upstream = _inputs(b, k, n, p, m)
    want_inputs = [t.clone().requires_grad_() for t in leaves]
    want = equations(*want_inputs, contraction=contraction)
    want.backward(upstream)

    # The tokens as the layer hands them over: a head-split view of (B, N, K p).
    tokens = leaves[0].transpose(1, 2).contiguous().transpose(1, 2).to(dtype).requires_grad_()
    q0 = leaves[1].to(dtype).requires_grad_()
    steps = [t.float().requires_grad_() for t in leaves[2:]]
    on_device = [t.to(DEVICE) for t in (tokens, q0, *steps)]
    got = kernels.cbsa_mixing_kernels(*on_device, contraction=contraction)
    got.backward(upstream.to(DEVICE, dtype))

    tol = TOLERANCE[dtype]
    assert got.dtype == dtype
    assert got.stride() == tokens.stride(), "the output keeps the tokens' layout"
    assert _relative_error(got.cpu(), want) < tol
    names = ("W", "Q0", "eta_rep", "eta_x")
    for name, mine, theirs in zip(names, [tokens, q0, *steps], want_inputs, strict=True):
        assert mine.grad is not None and mine.grad.dtype == mine.dtype, name
        assert _relative_error(mine.grad.cpu(), theirs.grad) < 4 * tol, name


def test_splitting_the_tokens_does_not_change_the_result(monkeypatch: pytest.MonkeyPatch) -> None:
    """The extraction and the reductions over N merge partial results from several programs;
    one program per row must give the same numbers."""
    leaves, upstream = _inputs(1, 2, 120, 32, 16, seed=1)
    results = []
    for programs in (1, 64):
        align = max(kernels.BLOCK_NS)
        tiling = kernels.Tiling(block_m=16, chunk_align=align, min_chunk=16, programs=programs)
        monkeypatch.setattr(kernels, "TILING_OVERRIDE", tiling)
        launch = kernels._Launch.of(leaves[0].float(), leaves[1].float())
        inputs = [t.float().to(DEVICE).requires_grad_() for t in leaves]
        out = kernels.cbsa_mixing_kernels(*inputs)
        out.backward(upstream.float().to(DEVICE))
        results.append((launch.splits()[0], out.detach(), [t.grad for t in inputs]))
    (one, out_one, grads_one), (many, out_many, grads_many) = results
    assert one == 1 and many > 1
    torch.testing.assert_close(out_many, out_one, rtol=1e-5, atol=1e-6)
    for a, b in zip(grads_many, grads_one, strict=True):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


LAYER_CASES = {
    "pooled": {},
    "stop_grad": {"stop_grad_init": True},
    "learned": {"rep_init": "learned"},
    "max_pool": {"rep_pool": "max"},
    "exact": {"contraction": "exact"},
    "legacy": {"legacy_pool": True},
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_layer_with_kernels_equals_its_reference_form(case: str) -> None:
    torch.manual_seed(0)
    attn = CBSA(64, 2, num_prefix_tokens=1, rep_grid=(2, 3), **LAYER_CASES[case]).to(DEVICE)
    x = torch.randn(2, 1 + 6 * 6, 64, device=DEVICE)
    upstream = torch.randn(2, 37, 64, device=DEVICE)
    results = []
    for use_kernels in (False, True):
        attn.use_kernels = use_kernels
        attn.zero_grad()
        xi = x.clone().requires_grad_()
        out = attn.forward_reference(xi, (6, 6)) if not use_kernels else attn(xi, (6, 6))
        out.backward(upstream)
        grads = {n: p.grad.clone() for n, p in attn.named_parameters() if p.grad is not None}
        results.append((out.detach(), xi.grad, grads))
    (ref, ref_x, ref_grads), (got, got_x, got_grads) = results
    torch.testing.assert_close(got, ref, rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(got_x, ref_x, rtol=1e-4, atol=1e-5)
    assert got_grads.keys() == ref_grads.keys()
    for name, grad in ref_grads.items():
        torch.testing.assert_close(got_grads[name], grad, rtol=1e-4, atol=1e-5, msg=name)


def test_mixing_dispatches_and_matches_the_fused_form() -> None:
    """`cbsa_mixing(impl="triton")` pools the initial guess itself (its gradient reaches the
    tokens through the pooling) and equals the CPU-tuned form."""
    torch.manual_seed(0)
    w = torch.randn(2, 2, 8 * 8, 32, device=DEVICE)
    steps = torch.randn(2, 2, device=DEVICE)
    upstream = torch.randn_like(w)
    results = []
    for impl in ("fused", "triton"):
        wi, si = w.clone().requires_grad_(), steps.clone().requires_grad_()
        out = cbsa_mixing(wi, si[0], si[1], grid_size=(8, 8), rep_grid=(4, 2), impl=impl)
        out.backward(upstream)
        results.append((out.detach(), wi.grad, si.grad))
    for got, want in zip(results[1], results[0], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-5)


def test_mixing_rejects_what_the_kernels_do_not_run() -> None:
    w = torch.randn(1, 1, 16, 16)
    with pytest.raises(ValueError, match="unknown impl"):
        cbsa_mixing(w, torch.ones(1), torch.ones(1), grid_size=(4, 4), impl="cuda")
    with pytest.raises(ValueError, match="softmax"):
        cbsa_mixing(w, torch.ones(1), torch.ones(1), grid_size=(4, 4), impl="triton",
                    contract=lambda q: q)  # fmt: skip
    with pytest.raises(ValueError, match="contraction"):
        kernels.cbsa_mixing_kernels(w, w[:, :, :4], torch.ones(1), torch.ones(1), contraction="x")


def test_no_representatives_by_tokens_tensor_is_formed() -> None:
    """A (m x N) is recomputed inside the kernels, never stored: forward and backward, no
    tensor reaches m N entries (head dim 16 < m = 32, so the tokens themselves stay below)."""
    b, k, n, p, m = 1, 1, 256, 16, 32
    leaves, upstream = _inputs(b, k, n, p, m)
    inputs = [t.float().to(DEVICE).requires_grad_() for t in leaves]
    with TensorRecorder() as rec:
        kernels.cbsa_mixing_kernels(*inputs).backward(upstream.float().to(DEVICE))
    # Floating-point tensors only: the interpreter moves kernels' arguments through byte
    # buffers of its own.
    largest = rec.largest(floating_only=True)
    assert 0 < largest < m * n
    assert largest >= n * p  # the output and the tokens' gradient were seen


@pytest.mark.parametrize("autocast", [False, True])
def test_the_layer_copies_q0s_layout_once(autocast: bool) -> None:
    """The layer's Q0 is a head view of the pooled projection, (B, K, m, p) over (B, m, K p):
    it is made contiguous once (forward) and its gradient laid back once (backward), where
    each kernel's argument and each matmul of the middle had copied it (14 copies a layer,
    each a launch on a GPU)."""
    torch.manual_seed(0)
    attn = CBSA(64, 2, rep_grid=(2, 2)).to(DEVICE)
    attn.use_kernels = True
    x = torch.randn(3, 1 + 8 * 8, 64, device=DEVICE, requires_grad=True)
    with TensorRecorder() as rec:
        with torch.autocast(DEVICE, dtype=torch.bfloat16, enabled=autocast):
            out = attn(x, (8, 8))
        out.float().sum().backward()
    assert rec.ops["aten.clone"] == 2, rec.ops
    assert x.grad is not None and attn.step_rep.grad is not None


def test_custom_ops_pass_opcheck_and_compile_without_graph_breaks() -> None:
    """The ops' schemas, fake implementations and autograd wiring hold (`opcheck`), and a
    model step traces in one graph around them."""
    leaves, _ = _inputs(1, 2, 48, 32, 8)
    w, q0 = (t.float().to(DEVICE) for t in leaves[:2])
    aw, lse = torch.ops.cbtlab.cbsa_extract(w, q0, 0.2)
    cases = [
        (torch.ops.cbtlab.cbsa_extract, (w, q0, 0.2)),
        (torch.ops.cbtlab.cbsa_broadcast, (w, q0, lse, aw, 0.2)),
        (torch.ops.cbtlab.cbsa_reps_grad, (w, q0, lse, w, 0.2)),
        (torch.ops.cbtlab.cbsa_inputs_grad, (w, q0, lse, w, aw, aw, lse, 0.2)),
    ]
    for op, args in cases:
        torch.library.opcheck(op, args, test_utils=("test_schema", "test_faketensor"))

    torch.manual_seed(0)
    attn = CBSA(64, 2, rep_grid=(2, 2)).to(DEVICE)
    attn.use_kernels = True
    x = torch.randn(2, 1 + 16, 64, device=DEVICE)
    eager = attn(x, (4, 4))
    compiled = torch.compile(attn, backend="aot_eager", fullgraph=True)
    out = compiled(x, (4, 4))
    out.square().sum().backward()
    torch.testing.assert_close(out, eager)
    assert attn.qkv.weight.grad is not None and attn.step_rep.grad is not None


def test_kernels_run_in_autocast_dtype() -> None:
    """Under autocast the tokens and Q0 run in autocast's dtype; the steps keep theirs."""
    torch.manual_seed(0)
    attn = CBSA(64, 2, rep_grid=(2, 2)).to(DEVICE)
    attn.use_kernels = True
    x = torch.randn(2, 1 + 16, 64, device=DEVICE)
    with torch.autocast(DEVICE, dtype=torch.bfloat16):
        out = attn(x, (4, 4))
    out.float().square().sum().backward()
    assert out.dtype == torch.bfloat16
    assert attn.step_x.grad is not None and attn.step_x.grad.dtype == torch.float32
    ref = attn.forward_reference(x, (4, 4))
    assert _relative_error(out.float().cpu(), ref.double().detach().cpu()) < 5e-2


def test_the_layer_dispatches_by_device(monkeypatch: pytest.MonkeyPatch) -> None:
    """With `use_kernels` unset, the kernels run exactly when the tokens are on CUDA."""
    calls = []
    attn = CBSA(32, 2, rep_grid=(2, 2))
    monkeypatch.setattr(attn, "_forward_kernels", lambda x, g: calls.append("kernels") or x)
    monkeypatch.setattr(cbsa_module, "TRITON_INSTALLED", True)
    attn(torch.randn(1, 17, 32), (4, 4))
    attn.use_kernels = True
    attn(torch.randn(1, 17, 32), (4, 4))
    assert calls == ["kernels"]


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="no CUDA device is visible")
@pytest.mark.parametrize(
    ("tokens", "reps", "head_dim"),
    [(196, 64, 64), (3136, 64, 64), (3136, 256, 128), (12544, 64, 32)],
)
def test_kernels_at_image_sizes_on_the_gpu(tokens: int, reps: int, head_dim: int) -> None:
    """bf16 at the sizes models use (m up to 256, head dims 32-128), against the equations in
    float32 on the same GPU."""
    leaves, upstream = _inputs(4, 3, tokens, head_dim, reps, seed=2)
    want_inputs = [t.float().cuda().requires_grad_() for t in leaves]
    equations(*want_inputs).backward(upstream.float().cuda())
    got_inputs = [t.cuda().to(torch.bfloat16).requires_grad_() for t in leaves[:2]]
    got_inputs += [t.float().cuda().requires_grad_() for t in leaves[2:]]
    got = kernels.cbsa_mixing_kernels(*got_inputs)
    got.backward(upstream.cuda().to(torch.bfloat16))
    assert _relative_error(got, equations(*want_inputs).detach().double()) < 3e-2
    for mine, theirs in zip(got_inputs, want_inputs, strict=True):
        assert _relative_error(mine.grad, theirs.grad.double()) < 6e-2


@pytest.mark.skipif(DEVICE == "cuda", reason="with a GPU the kernels compile and run for real")
def test_kernels_compile_for_an_h200(tmp_path: Path) -> None:
    """Triton's compiler (to an sm_90 cubin, no GPU needed) accepts the kernels in the dtypes
    and head dims models use, within an H200's shared memory; the interpreter is laxer."""
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env |= {"TRITON_CACHE_DIR": str(tmp_path), "PYTHONPATH": str(ROOT / "platform")}
    cases = ["bf16:64", "fp16:32", "fp32:32"]
    result = subprocess.run(
        [sys.executable, str(ROOT / "tests" / "compile_kernels.py"), *cases],
        env=env, capture_output=True, text=True, timeout=900,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-3000:]
    lines = result.stdout.splitlines()
    assert len(lines) == 5 * len(cases), result.stdout
    assert all(line.endswith("(fits)") for line in lines), result.stdout
