"""Probes of a trained model: loss and accuracy over batches (the training loop's evaluation),
compression per layer, coding rates of tokens and representatives per head, rank of CBSA's
extraction matrix, and accuracy under noise in the attention projections (Fig. 5, Fig. 6,
Appendix A, Fig. 8 right)."""

from __future__ import annotations

import contextlib
import copy
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Any

import torch
from torch import Tensor, nn

from cbtlab.analysis.coding_rate import coding_rate, compression_term, subspace_bases
from cbtlab.attention import CBSA
from cbtlab.models import CBTransformer


@torch.no_grad()
def layer_compression(
    model: CBTransformer,
    images: Tensor,
    eps: float = 0.5,
    *,
    normalize: bool = False,
    squared_eps: bool = True,
) -> list[float]:
    """Rc of the tokens after every layer, measured against that layer's own subspaces U,
    averaged over the images. For layers whose attention has no subspace projection (ViT's
    q, k, v) the entry is NaN. `squared_eps=False`: the reference code's `p / (N eps)`."""
    model.eval()
    tokens, _ = model.forward_intermediates(images)
    out = []
    for block, z in zip(model.blocks, tokens, strict=True):
        weight = getattr(block.attn, "qkv", None)
        if weight is None or weight.weight.shape[0] != weight.weight.shape[1]:
            out.append(float("nan"))
            continue
        bases = subspace_bases(weight.weight, block.attn.num_heads)
        rc = compression_term(z, bases, eps, normalize=normalize, squared_eps=squared_eps)
        out.append(rc.mean().item())
    return out


@torch.no_grad()
def extraction_rank(
    model: CBTransformer, images: Tensor, *, rel_threshold: float = 1e-3
) -> list[list[float]]:
    """Numerical rank of A (m x N) per CBSA layer and head, averaged over the images: singular
    values above `rel_threshold` times the largest count. Non-CBSA layers give []."""
    model.eval()
    x, grid_size = model._embed(images)
    ranks: list[list[float]] = []
    for block in model.blocks:
        if isinstance(block.attn, CBSA):
            a = block.attn.extraction(block.norm1(x), grid_size).double()  # (B, K, m, N)
            s = torch.linalg.svdvals(a)  # (B, K, min(m, N))
            rank = (s > rel_threshold * s[..., :1]).sum(-1).double().mean(0)
            ranks.append(rank.tolist())
        else:
            ranks.append([])
        x = block(x, grid_size)
    return ranks


@torch.no_grad()
def head_representatives(
    model: CBTransformer, images: Tensor
) -> list[tuple[Tensor, Tensor] | None]:
    """Per layer, for CBSA layers: the tokens projected on every head's subspace,
    `W_k = LN(Z) U_k` (B, K, N, p), and the representatives extracted from them, `Q_k`
    (B, K, m, p) (after the extraction step, before the contraction). None for other layers.

    Walks the blocks as `forward_intermediates` does; no hooks."""
    model.eval()
    x, grid_size = model._embed(images)
    out: list[tuple[Tensor, Tensor] | None] = []
    for block in model.blocks:
        if isinstance(block.attn, CBSA):
            z = block.norm1(x)
            out.append((block.attn.project(z), block.attn.representatives(z, grid_size)))
        else:
            out.append(None)
        x = block(x, grid_size)
    return out


@dataclass
class HeadCodingRates:
    """Fig. 6 for one CBSA layer: per head, the coding rate of the N tokens on the head's
    subspace, R(W_k), and of its m representatives, R(Q_k), each averaged over the images."""

    layer: int
    tokens: list[float]
    representatives: list[float]


@torch.no_grad()
def head_coding_rates(
    model: CBTransformer, images: Tensor, eps: float = 0.5, *, squared_eps: bool = True
) -> list[HeadCodingRates]:
    """R(W_k) and R(Q_k) per head of every CBSA layer (CBSA_MATH.md, eq. 1 and 4).

    Each rate is `1/2 logdet(I + p / (n eps^2) X^T X)` of its own rows (n = N tokens, CLS
    included, or m representatives), per image, in float64 on the smaller Gram side;
    `squared_eps=False` takes the reference code's `p / (n eps)`. Non-CBSA layers are left
    out; the `layer` field keeps the block index."""
    rates = []
    for layer, pair in enumerate(head_representatives(model, images)):
        if pair is None:
            continue
        w, q = pair
        rates.append(
            HeadCodingRates(
                layer,
                coding_rate(w, eps, squared_eps=squared_eps).mean(0).tolist(),  # (K,)
                coding_rate(q, eps, squared_eps=squared_eps).mean(0).tolist(),
            )
        )
    return rates


def correct_counts(logits: Tensor, labels: Tensor) -> Tensor:
    """(top-1 hits, top-5 hits) of a batch as one device tensor (no host sync); top-k is
    capped at the number of classes."""
    k = min(5, logits.shape[-1])
    hits = logits.topk(k, dim=-1).indices == labels[:, None]  # (B, k)
    return torch.stack([hits[:, 0].sum(), hits.any(dim=-1).sum()])


def _on_host(sums: Tensor) -> list[float]:
    return sums.tolist()


def evaluate(
    model: nn.Module,
    batches: Any,
    loss_fn: nn.Module,
    device: torch.device,
    amp: Callable[[], Any] = contextlib.nullcontext,
    memory_format: torch.memory_format = torch.contiguous_format,
    reduce: Callable[[Tensor], list[float]] = _on_host,
) -> dict[str, float]:
    """Loss, top-1 and top-5 over the batches; `amp` gives the forward pass's autocast
    context. The sums stay on `device` until `reduce` reads them on the host: this process's
    alone by default, over all ranks in the training loop (`cbtlab.train.collectives`)."""
    model.eval()
    # (loss x samples, top-1 hits, top-5 hits, samples)
    sums = torch.zeros(4, dtype=torch.float64, device=device)
    with torch.no_grad():
        for images, labels in batches:
            images, labels = images.to(device), labels.to(device)
            with amp():
                logits = model(images.contiguous(memory_format=memory_format))
            n = labels.numel()
            loss = loss_fn(logits.float(), labels).double().reshape(1) * n
            sums += torch.cat([loss, correct_counts(logits, labels), loss.new_tensor([n])])
    loss_sum, top1, top5, count = reduce(sums)
    return {
        "val/loss": loss_sum / count,
        "val/top1": top1 / count,
        "val/top5": top5 / count,
        "val/samples": count,
    }


def accuracy(model: nn.Module, batches: Iterable[tuple[Tensor, Tensor]]) -> float:
    """Top-1 accuracy over the batches (the training loop's evaluation, on one process)."""
    device = next(model.parameters()).device
    return evaluate(model, batches, nn.CrossEntropyLoss(), device)["val/top1"]


@torch.no_grad()
def noisy_attention_accuracy(
    model: CBTransformer,
    batches: Sequence[tuple[Tensor, Tensor]],
    scales: Sequence[float],
    *,
    seed: int = 0,
) -> dict[float, float]:
    """Accuracy when every attention layer's input projection W (`attn.qkv.weight`) becomes
    `W + scale * rms(W) * G`, G ~ N(0, 1) elementwise (one draw per scale, seeded). Scale 0 is
    the clean model."""
    results = {}
    for scale in scales:
        noisy = copy.deepcopy(model)
        gen = torch.Generator().manual_seed(seed)
        for block in noisy.blocks:
            weight = block.attn.qkv.weight
            rms = weight.square().mean().sqrt()
            noise = torch.randn(weight.shape, generator=gen, dtype=weight.dtype)
            weight.add_(scale * rms * noise.to(weight.device))
        results[float(scale)] = accuracy(noisy, batches)
    return results
