"""The GPU check: train the built-in digits CBT for a few epochs on every visible GPU, through
`run_training` under a real NCCL process group (one process per GPU, no Ray needed) and, where
Ray is installed, through Ray Train; one PASS/FAIL line per check (the loss falls, ranks agree,
a checkpoint round-trips and resumes, bf16 stays finite), exit status 1 naming what failed
(2: the check could not start). Run it on a new cluster, and for every change to the GPU path.

    PYTHONPATH=platform python studies/gpu_check.py                      # every visible GPU
    PYTHONPATH=platform python studies/gpu_check.py --data-root digits_cache --no-ray
    PYTHONPATH=platform python studies/gpu_check.py --device cpu --no-ray # same code, gloo, CPU

On a machine without scikit-learn, pre-build the digits elsewhere with
`python data_pipelines/prepare_digits.py --set data.cache_dir=digits_cache`, copy the folder
over and pass `--data-root digits_cache`. See docs/gpu.md.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.train.gpu_check import gpu_check_main

if __name__ == "__main__":
    raise SystemExit(gpu_check_main())
