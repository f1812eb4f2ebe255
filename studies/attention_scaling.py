"""Forward+backward time and peak memory of every attention mechanism against the token count
(196 to 16,384 tokens, m = 64 representatives), side by side in one run; logged to MLflow.

    python studies/attention_scaling.py                      # CPU: ~4 min on 2 cores
    python studies/attention_scaling.py --device cuda --max-quadratic-tokens 16384

The last lines give CBSA's growth from 3,136 to 12,544 tokens and its speed-up over SDPA.
"""

from cbtlab.perf.cli import scaling_main

if __name__ == "__main__":
    raise SystemExit(scaling_main())
