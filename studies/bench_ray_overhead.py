"""Ray Train's overhead: the same training (model, data, epochs, seed, 2 gloo DDP workers)
through Ray Train's TorchTrainer and as a plain PyTorch job (torch.multiprocessing + DDP),
alternating, in one run (a few minutes on the 2-core CPU machine).

    python studies/bench_ray_overhead.py                   # 8 epochs, 2 runs of each (~5 min)
    python studies/bench_ray_overhead.py --quick           # 3 epochs, 1 run of each
    python studies/bench_ray_overhead.py --epochs 20 --set model.depth=6

Prints each run's wall time and steady-state seconds per epoch; the last line is
`ray/plain time ratio: X per steady-state epoch (...); wall with start-up Y`.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.perf.ray_overhead import overhead_main

if __name__ == "__main__":
    raise SystemExit(overhead_main())
