"""Per-step cost of the platform's training loop over a bare PyTorch loop (CBT-S, random
ImageNet-shaped batches already on the device, AdamW, bf16 autocast on CUDA); prints the ratio.

    PYTHONPATH=platform python studies/bench_loop_overhead.py --device cuda            # 256 x 224
    python studies/bench_loop_overhead.py --device cpu --batch 8 --img-size 64 --steps 4

Needs only torch and timm (a bare GPU machine, with the package from a checkout). Issue 17's
target: at most 1.05x on a GPU (`--max-ratio 1.05` exits 1 above it).
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.perf.loop_overhead import loop_overhead_main

if __name__ == "__main__":
    raise SystemExit(loop_overhead_main())
