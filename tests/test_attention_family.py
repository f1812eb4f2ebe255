"""Every attention variant: the registry contract, and the math of the unified family."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from cbtlab.attention import ATTENTION_REGISTRY, CBSA, MSSA, TSSA, LinearVariant, create_attention
from cbtlab.attention.family import AgentAttention, KernelLinearAttention, SoftmaxAttention

OPTIONS = {"num_prefix_tokens": 1, "rep_grid": (2, 3), "eps": 0.5}


@pytest.mark.parametrize("name", sorted(ATTENTION_REGISTRY))
def test_every_variant_shape_finite_and_gradients(name: str) -> None:
    torch.manual_seed(0)
    attn = create_attention(name, 24, 3, **OPTIONS)
    x = torch.randn(2, 1 + 4 * 6, 24, requires_grad=True)
    out = attn(x, (4, 6))
    assert out.shape == x.shape and torch.isfinite(out).all()
    out.square().sum().backward()
    assert x.grad.abs().sum() > 0
    for pname, param in attn.named_parameters():
        assert param.grad is not None and param.grad.abs().sum() > 0, f"{name}.{pname}"


def _heads(t: torch.Tensor, k: int) -> torch.Tensor:
    b, n, c = t.shape
    return t.view(b, n, k, c // k).transpose(1, 2)


def test_softmax_contraction_on_all_tokens_is_mssa() -> None:
    """With the tokens as their own representatives (A = I), CBSA's update is MSSA's."""
    torch.manual_seed(1)
    mssa = MSSA(24, 3).double()
    cbsa = CBSA(24, 3, rep_grid=(1, 1)).double()
    x = torch.randn(2, 10, 24, dtype=torch.float64)
    w = _heads(mssa.qkv(x), 3)
    head_out = cbsa.contract(w)  # softmax_r(s W W^T) W with Q = W
    expected = mssa.proj(head_out.transpose(1, 2).reshape(2, 10, 24))
    torch.testing.assert_close(mssa(x, (3, 3)), expected)
    # and MSSA is the explicit formula
    s = 8**-0.5
    manual = torch.softmax(s * w @ w.transpose(-1, -2), -1) @ w
    torch.testing.assert_close(head_out, manual)


def test_exact_contraction_is_the_gradient_of_the_coding_rate() -> None:
    torch.manual_seed(2)
    beta = 0.7
    q = torch.randn(2, 3, 5, 8, dtype=torch.float64, requires_grad=True)
    eye = torch.eye(8, dtype=torch.float64)
    rate = 0.5 * torch.logdet(eye + beta * q.transpose(-1, -2) @ q).sum()
    (grad,) = torch.autograd.grad(rate, q)
    attn = CBSA(24, 3, contraction="exact", contraction_beta=beta).double()
    torch.testing.assert_close(attn.contract(q.detach()), grad / beta)


def test_linear_variant_is_the_spectral_shrinkage() -> None:
    torch.manual_seed(3)
    attn = LinearVariant(12, 2, eps=0.5).double()
    x = torch.randn(2, 7, 12, dtype=torch.float64)
    w = _heads(attn.qkv(x), 2)  # (B, K, N, p)
    n, p = 7, 6
    beta = p / (n * 0.5**2)
    lam, vecs = torch.linalg.eigh(w.transpose(-1, -2) @ w)  # second moment's spectrum
    shrunk = w @ vecs @ torch.diag_embed(1 / (1 + beta * lam)) @ vecs.transpose(-1, -2)
    dw = attn.step.view(1, 2, 1, 1) * shrunk
    torch.testing.assert_close(attn(x, (2, 3)), attn.proj(dw.transpose(1, 2).reshape(2, 7, 12)))


def test_tssa_matches_its_formula() -> None:
    torch.manual_seed(4)
    attn = TSSA(12, 3).double()
    with torch.no_grad():
        attn.temp.copy_(torch.tensor([[0.5], [1.0], [2.0]]))
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    w = _heads(attn.qkv(x), 3)
    out = torch.zeros_like(w)
    for b in range(2):
        energy = torch.stack([(F.normalize(w[b, k], dim=0) ** 2).sum(-1) for k in range(3)])
        pi = torch.softmax(energy * attn.temp, dim=0)  # (K, N): each token over heads
        for k in range(3):
            moment = (pi[k] / (pi[k].sum() + 1e-8)) @ w[b, k] ** 2  # (p,)
            out[b, k] = -(w[b, k] * pi[k, :, None]) / (1 + moment)
    expected = attn.proj(out.transpose(1, 2).reshape(2, 9, 12))
    torch.testing.assert_close(attn(x, (2, 4)), expected)


def test_agent_attention_matches_its_formula() -> None:
    torch.manual_seed(5)
    attn = AgentAttention(12, 2, rep_grid=(2, 2)).double()
    x = torch.randn(1, 17, 12, dtype=torch.float64)
    w = _heads(attn.qkv(x), 2)
    s = 6**-0.5
    patches = w[:, :, 1:].transpose(-1, -2).reshape(2, 6, 4, 4)
    q0 = F.adaptive_avg_pool2d(patches, (2, 2)).reshape(1, 2, 6, 4).transpose(-1, -2)
    a = torch.softmax(s * q0 @ w.transpose(-1, -2), -1)
    dw = torch.softmax(s * w @ q0.transpose(-1, -2), -1) @ (a @ w)
    torch.testing.assert_close(attn(x, (4, 4)), attn.proj(dw.transpose(1, 2).reshape(1, 17, 12)))


def test_kernel_linear_attention_matches_quadratic_form() -> None:
    torch.manual_seed(6)
    attn = KernelLinearAttention(12, 2).double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(2, 9, 3, 2, 6).permute(2, 0, 3, 1, 4).unbind(0)
    sim = (F.elu(q) + 1) @ (F.elu(k) + 1).transpose(-1, -2)  # (B, K, N, N), positive
    out = (sim / sim.sum(-1, keepdim=True)) @ v
    torch.testing.assert_close(
        attn(x, (2, 4)), attn.proj(out.transpose(1, 2).reshape(2, 9, 12)), rtol=1e-5, atol=1e-6
    )


def test_softmax_attention_matches_explicit_attention() -> None:
    torch.manual_seed(7)
    attn = SoftmaxAttention(12, 2).double()
    x = torch.randn(2, 9, 12, dtype=torch.float64)
    q, k, v = attn.qkv(x).view(2, 9, 3, 2, 6).permute(2, 0, 3, 1, 4).unbind(0)
    out = torch.softmax(q @ k.transpose(-1, -2) / 6**0.5, -1) @ v
    torch.testing.assert_close(attn(x, (2, 4)), attn.proj(out.transpose(1, 2).reshape(2, 9, 12)))


def test_cbsa_gradcheck_float64() -> None:
    torch.manual_seed(8)
    attn = CBSA(8, 2, rep_grid=(2, 2)).double()
    x = torch.randn(1, 17, 8, dtype=torch.float64, requires_grad=True)
    assert torch.autograd.gradcheck(lambda t: attn(t, (4, 4)), (x,))


def test_unknown_variant_is_a_clear_error() -> None:
    with pytest.raises(ValueError, match="known: agent, cbsa"):
        create_attention("flash", 8, 2)
