"""Interpretability probes of a finished run (Fig. 5-8, Tables 5-6, Appendix A).

    python studies/interpretability_probe.py --run-id RUN_ID
    python studies/interpretability_probe.py --run-id RUN_ID --storage-path /shared/ray_results
    python studies/interpretability_probe.py --run-id RUN_ID --checkpoint PATH --voc-root VOC2012
    python studies/interpretability_probe.py --checkpoint PATH      # no MLflow run to attach to
Loads the run's checkpoint, rebuilds its model from the run's params, and logs Rc per layer,
coding rates of tokens and representatives per head, extraction ranks, CLS attention overlays,
the noise-robustness curve (and, with --voc-root, zero-shot segmentation IoUs) to a new MLflow
run nested under RUN_ID. Metric and artifact names: `cbtlab.analysis.interpretability`.
"""

import sys
from pathlib import Path

try:
    import cbtlab  # noqa: F401
except ImportError:  # a source tree with cbtlab not installed
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "platform"))

from cbtlab.analysis.interpretability import probe_main

if __name__ == "__main__":
    sys.exit(probe_main())
