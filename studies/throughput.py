"""Training and inference images/s of CBT, ViT (timm, SDPA), CRATE and ToST at T and S sizes,
at 224 px and at high resolution, side by side in one run (the paper's Table 7); logged to
MLflow, with model FLOP utilisation against a measured matmul peak.

    python studies/throughput.py                                   # CPU, 224 and 448 px
    python studies/throughput.py --resolutions 224,448,896 --device cuda --batch 128

The last lines give CBT's throughput as a multiple of ViT's at the same size and resolution.
"""

from cbtlab.perf.cli import throughput_main

if __name__ == "__main__":
    raise SystemExit(throughput_main())
