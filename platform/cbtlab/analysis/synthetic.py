"""The synthetic experiment of Fig. 4: the linear variant, iterated forward with no learned
parameters, compresses each class of 3-D data onto a 1-D subspace.

Each class is drawn around its own line through the origin (a random unit direction, unit
spread along it, `noise` across it). One step on a class's tokens X (N x p) is the linear
variant's update with U = I and a fixed step eta:

    X <- X - eta * beta * X (I + beta X^T X)^-1,    beta = p / (N eps^2),

i.e. gradient descent on the coding rate R(X): along an eigen-direction of X^T X with
eigenvalue lambda the tokens shrink by 1 - eta beta / (1 + beta lambda), so weak directions
shrink faster than the principal one and the class's energy concentrates on one direction.
"""

from __future__ import annotations

import argparse
import tempfile
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import torch
from torch import Tensor

from cbtlab.paths import cbtlab_home, default_tracking_uri
from cbtlab.tracking import StudyTracker


@dataclass
class CompressionRun:
    before: Tensor  # (N, p) the data
    after: Tensor  # (N, p) after the iterations
    labels: Tensor  # (N,)
    energy: list[list[float]]  # per iteration (0 = before), per class: top singular energy share


def make_class_lines(
    num_classes: int = 3, per_class: int = 200, dim: int = 3, noise: float = 0.3, seed: int = 0
) -> tuple[Tensor, Tensor]:
    """Points around `num_classes` random lines through the origin: (N, dim), labels (N,)."""
    gen = torch.Generator().manual_seed(seed)
    xs, labels = [], []
    for c in range(num_classes):
        direction = torch.randn(dim, generator=gen, dtype=torch.float64)
        direction /= direction.norm()
        t = torch.randn(per_class, 1, generator=gen, dtype=torch.float64)
        xs.append(
            t * direction + noise * torch.randn(per_class, dim, generator=gen, dtype=torch.float64)
        )
        labels.append(torch.full((per_class,), c))
    return torch.cat(xs), torch.cat(labels)


def top_energy_share(x: Tensor) -> float:
    """sigma_1^2 / sum sigma_i^2 of the tokens x (N, p): 1 means they lie on one line."""
    s = torch.linalg.svdvals(x)
    return (s[0] ** 2 / s.square().sum()).item()


def linear_variant_step(x: Tensor, *, eps: float, step: float) -> Tensor:
    n, p = x.shape
    beta = p / (n * eps**2)
    gram = torch.eye(p, dtype=x.dtype) + beta * x.T @ x
    return x - step * beta * torch.linalg.solve(gram, x.T).T  # X (I + beta X^T X)^-1


def compress_classes(
    x: Tensor, labels: Tensor, *, iterations: int = 20, eps: float = 0.5, step: float = 10.0
) -> CompressionRun:
    """Iterate the linear variant on every class's tokens; record each class's energy share."""
    classes = labels.unique().tolist()
    current = x.clone()
    energy = [[top_energy_share(current[labels == c]) for c in classes]]
    for _ in range(iterations):
        for c in classes:
            mask = labels == c
            current[mask] = linear_variant_step(current[mask], eps=eps, step=step)
        energy.append([top_energy_share(current[labels == c]) for c in classes])
    return CompressionRun(x, current, labels, energy)


def plot_compression(run: CompressionRun, path: str) -> None:
    """Before / after scatter (3-D, each class scaled to unit RMS) and the energy curves."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig = plt.figure(figsize=(13, 4.2))
    for i, (data, title) in enumerate(((run.before, "before"), (run.after, "after"))):
        ax = fig.add_subplot(1, 3, i + 1, projection="3d")
        for c in run.labels.unique().tolist():
            pts = data[run.labels == c]
            pts = pts / pts.square().sum(-1).mean().sqrt()
            ax.scatter(*pts.T.numpy(), s=4, label=f"class {c}")
        ax.set_title(f"{title} ({len(run.energy) - 1 if i else 0} iterations)")
    ax = fig.add_subplot(1, 3, 3)
    for c, series in enumerate(zip(*run.energy, strict=True)):
        ax.plot(series, label=f"class {c}")
    ax.axhline(0.99, color="gray", linestyle="--", linewidth=1)
    ax.set_xlabel("iteration")
    ax.set_ylabel("energy on the top direction")
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def synthetic_main(argv: Sequence[str] | None = None, prog: str | None = None) -> int:
    """`cbtlab study synthetic`: print each class's share of energy on its top direction per
    iteration, save the figure and log both to MLflow (experiment `synthetic_compression`);
    exit 1 if a class ends below 0.99."""
    parser = argparse.ArgumentParser(
        prog=prog,
        description="Fig. 4: the parameter-free linear variant compresses each class onto a line.",
    )
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.3, help="spread across each line")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--eps", type=float, default=0.5)
    parser.add_argument("--step", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, default=cbtlab_home() / "synthetic_compression.png")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args(argv)
    if args.classes < 1 or args.per_class < 3 or args.iterations < 1 or not args.step > 0:
        parser.error("--classes >= 1, --per-class >= 3, --iterations >= 1 and --step > 0")
    x, labels = make_class_lines(args.classes, args.per_class, 3, args.noise, args.seed)
    run = compress_classes(x, labels, iterations=args.iterations, eps=args.eps, step=args.step)
    print("iteration  " + "  ".join(f"class {c}" for c in range(args.classes)))
    for i, shares in enumerate(run.energy):
        print(f"{i:9d}  " + "  ".join(f"{s:7.4f}" for s in shares))
    args.figure.parent.mkdir(parents=True, exist_ok=True)
    plot_compression(run, str(args.figure))
    print(f"figure: {args.figure}")
    worst = min(run.energy[-1])
    print(f"lowest final share: {worst:.4f} ({'>=' if worst >= 0.99 else '<'} 0.99)")
    if not args.no_mlflow:
        _log_synthetic_run(run, args)
    return 0 if worst >= 0.99 else 1


def _log_synthetic_run(run: CompressionRun, args: argparse.Namespace) -> None:
    tracker = StudyTracker(default_tracking_uri(), "synthetic_compression")
    run_id = tracker.start_run("synthetic_compression", params=vars(args), tags={})
    for i, shares in enumerate(run.energy):
        tracker.log_metrics(run_id, {f"energy/class_{c}": s for c, s in enumerate(shares)}, i)
    with tempfile.TemporaryDirectory() as tmp:
        target = Path(tmp) / "synthetic_compression.png"
        target.write_bytes(args.figure.read_bytes())
        tracker.client.log_artifact(run_id, str(target))
    tracker.end_run(run_id, "FINISHED")
    print(f"MLflow run {run_id} in {default_tracking_uri()}")
