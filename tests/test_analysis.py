"""Coding rates, probes of trained models, and the synthetic compression experiment."""

from __future__ import annotations

import math
from pathlib import Path

import pytest
import torch

from cbtlab.analysis import (
    accuracy,
    coding_rate,
    compression_term,
    extraction_rank,
    layer_compression,
    noisy_attention_accuracy,
    subspace_bases,
)
from cbtlab.analysis.synthetic import compress_classes, make_class_lines, plot_compression
from cbtlab.config import ExperimentConfig
from cbtlab.data import eval_batches, prepare_dataset, read_split
from cbtlab.data.transforms import build_transforms
from cbtlab.train import run_training


def _direct_rate(x: torch.Tensor, eps: float) -> float:
    n, p = x.shape
    alpha = p / (n * eps**2)
    return 0.5 * torch.logdet(torch.eye(p, dtype=torch.float64) + alpha * x.T @ x).item()


@pytest.mark.parametrize(("n", "p"), [(50, 8), (6, 20)])  # both Gram sides
def test_coding_rate_matches_direct_logdet(n: int, p: int) -> None:
    x = torch.randn(n, p, dtype=torch.float64, generator=torch.Generator().manual_seed(n))
    got = coding_rate(x, 0.5).item()
    assert got == pytest.approx(_direct_rate(x, 0.5), rel=1e-6)
    # the N x N side gives the same value
    alpha = p / (n * 0.25)
    other = 0.5 * torch.logdet(torch.eye(n, dtype=torch.float64) + alpha * x @ x.T).item()
    assert got == pytest.approx(other, rel=1e-6)
    # the reference code's measurement uses p / (N eps)
    ref = 0.5 * torch.logdet(torch.eye(p, dtype=torch.float64) + p / (n * 0.01) * x.T @ x).item()
    assert coding_rate(x, 0.01, squared_eps=False).item() == pytest.approx(ref, rel=1e-6)


def test_compression_term_sums_the_heads_of_the_layer() -> None:
    from cbtlab.attention import CBSA

    torch.manual_seed(0)
    attn = CBSA(12, 3)
    z = torch.randn(2, 17, 12)
    bases = subspace_bases(attn.qkv.weight.detach(), 3)
    heads = attn.project(z).detach().double()  # (B, K, N, p)
    expected = sum(coding_rate(heads[:, k], 0.5) for k in range(3))
    torch.testing.assert_close(compression_term(z, bases, 0.5), expected)
    unit = z / z.norm(dim=-1, keepdim=True)
    torch.testing.assert_close(
        compression_term(z, bases, normalize=True), compression_term(unit, bases)
    )


@pytest.fixture(scope="module")
def trained(digits_root: Path):
    """A small CBT trained 3 epochs on the digits, and the validation batches."""
    cfg = ExperimentConfig().with_overrides(
        {"model.embed_dim": 48, "model.depth": 2, "train.epochs": 3, "train.num_workers": 1}
    )
    model = run_training(cfg, report=lambda metrics, state: None).eval()
    val = read_split(prepare_dataset(cfg.data), "val")
    eval_tf = build_transforms(
        img_size=cfg.model.img_size, mean=val.extra["mean"], std=val.extra["std"]
    ).eval
    batches = list(eval_batches(val, rank=0, world_size=1, batch_size=120, transform=eval_tf))
    return model, batches


def test_probes_on_a_digits_trained_cbt(trained) -> None:
    model, batches = trained
    images = batches[0][0][:32]
    for normalize in (False, True):
        rc = layer_compression(model, images, normalize=normalize)
        assert len(rc) == 2 and all(math.isfinite(v) and v > 0 for v in rc)
    ranks = extraction_rank(model, images)
    assert [len(r) for r in ranks] == [3, 3]
    assert all(1 <= r <= 16 for layer in ranks for r in layer)  # m = 4 x 4


def test_noise_zero_is_the_clean_accuracy_and_large_noise_hurts(trained) -> None:
    model, batches = trained
    clean = accuracy(model, batches)
    curve = noisy_attention_accuracy(model, batches, [0.0, 0.1, 20.0])
    assert curve[0.0] == clean
    assert curve[20.0] < clean - 0.2
    assert accuracy(model, batches) == clean  # the model itself is untouched


def test_synthetic_classes_collapse_onto_lines(tmp_path: Path) -> None:
    x, labels = make_class_lines(num_classes=4, per_class=150, noise=0.4, seed=3)
    run = compress_classes(x, labels, iterations=20)
    assert min(run.energy[0]) < 0.9  # the data did not start on lines
    assert min(run.energy[-1]) >= 0.99
    figure = tmp_path / "fig.png"
    plot_compression(run, str(figure))
    assert figure.stat().st_size > 10_000
