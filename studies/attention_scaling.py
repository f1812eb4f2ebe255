"""Forward+backward time and peak memory of every attention mechanism against the token count
(m = 64 representatives), side by side in one run; logged to MLflow where it is installed.

    python studies/attention_scaling.py                      # CPU: 196 to 16,384 tokens, ~4 min
    PYTHONPATH=platform python studies/attention_scaling.py --device cuda --levels mechanism \\
        --no-mlflow                                          # a bare GPU machine: torch, triton

On CUDA the defaults are bf16 (`--dtype`), CUDA-event timing, 196 to 50,176 tokens, B = 16,
K = 6 heads; the mechanism level sets flash SDPA against `cbsa_mixing` (its default dispatch,
and the CPU-tuned fused form as `cbsa_fused`) and the plain-torch equations. The last lines
give CBSA's growth with the token count, its speed-up over SDPA at 3,136 and 12,544 tokens
and over the plain-torch equations, against the goals of issue 18.
"""

from cbtlab.perf.cli import scaling_main

if __name__ == "__main__":
    raise SystemExit(scaling_main())
