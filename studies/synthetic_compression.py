"""Fig. 4: the parameter-free linear variant compresses each class onto a line.

    python studies/synthetic_compression.py
    python studies/synthetic_compression.py --classes 4 --noise 0.5 --iterations 30
Prints each class's share of energy on its top direction per iteration, saves the figure, and
logs both to MLflow (experiment `synthetic_compression`; MLFLOW_TRACKING_URI or ~/.cbtlab).
"""

import argparse
import sys
import tempfile
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.analysis.synthetic import compress_classes, make_class_lines, plot_compression
from cbtlab.paths import cbtlab_home, default_tracking_uri
from cbtlab.tracking import StudyTracker


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--classes", type=int, default=3)
    parser.add_argument("--per-class", type=int, default=200)
    parser.add_argument("--noise", type=float, default=0.3, help="spread across each line")
    parser.add_argument("--iterations", type=int, default=20)
    parser.add_argument("--eps", type=float, default=0.5)
    parser.add_argument("--step", type=float, default=10.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--figure", type=Path, default=cbtlab_home() / "synthetic_compression.png")
    parser.add_argument("--no-mlflow", action="store_true")
    args = parser.parse_args()
    if args.classes < 1 or args.per_class < 3 or args.iterations < 1 or args.step <= 0:
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
    return 0 if worst >= 0.99 else 1


if __name__ == "__main__":
    sys.exit(main())
