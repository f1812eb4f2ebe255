"""Measurements of models: FLOP counts, coding rates and compression, extraction rank,
robustness to noise in the attention projections, and the synthetic compression experiment."""

from cbtlab.analysis.coding_rate import coding_rate, compression_term, subspace_bases
from cbtlab.analysis.flops import count_flops
from cbtlab.analysis.probes import (
    accuracy,
    extraction_rank,
    layer_compression,
    noisy_attention_accuracy,
)

__all__ = [
    "accuracy",
    "coding_rate",
    "compression_term",
    "count_flops",
    "extraction_rank",
    "layer_compression",
    "noisy_attention_accuracy",
    "subspace_bases",
]
