"""Training and inference images/s of CBT, ViT (timm, SDPA), CRATE and ToST at T and S sizes,
at 224 px and at high resolution, side by side in one run (the paper's Table 7); logged to
MLflow where it is installed, with model FLOP utilisation against a measured matmul peak.

    python studies/throughput.py                                   # CPU, 224 and 448 px
    PYTHONPATH=platform python studies/throughput.py --device cuda --modes train --compile \\
        --models cbt_tiny_patch16_224,vit_tiny_patch16_224 --no-mlflow   # a bare GPU machine

On CUDA the defaults are bf16 autocast, CUDA-event timing, batch 256 at 224 px (64 at 448 px)
and peak memory from the allocator; `--compile` adds torch.compile'd rows beside the eager
ones (a model that fails to compile is a row with the reason). The last lines give CBT's
images/s, MFU and peak memory as multiples of ViT's at the same size and resolution.
"""

from cbtlab.perf.cli import throughput_main

if __name__ == "__main__":
    raise SystemExit(throughput_main())
