"""Measurements of models: loss and accuracy over batches (the training loop's evaluation),
FLOP counts, pairwise-similarity counts (Table 4), coding rates and compression, coding rates
of tokens and representatives, extraction rank, attention maps, zero-shot segmentation,
robustness to noise in the attention projections, and the synthetic compression experiment.

`cbtlab.analysis.interpretability` runs them all on a finished run and logs to MLflow."""

from cbtlab.analysis.attention_maps import (
    cls_attention_maps,
    denormalize,
    plot_attention_overlays,
)
from cbtlab.analysis.coding_rate import coding_rate, compression_term, subspace_bases
from cbtlab.analysis.flops import count_flops
from cbtlab.analysis.probes import (
    HeadCodingRates,
    accuracy,
    correct_counts,
    evaluate,
    extraction_rank,
    head_coding_rates,
    head_representatives,
    layer_compression,
    noisy_attention_accuracy,
)
from cbtlab.analysis.segmentation import (
    ConfusionMatrix,
    SegmentationSettings,
    VOCSegmentation,
    boundary_band,
    mass_threshold,
    segmentation_ious,
    sliding_window_logits,
    zero_shot_segmentation,
)
from cbtlab.analysis.similarities import count_pairwise_similarities

__all__ = [
    "ConfusionMatrix",
    "HeadCodingRates",
    "SegmentationSettings",
    "VOCSegmentation",
    "accuracy",
    "boundary_band",
    "cls_attention_maps",
    "coding_rate",
    "compression_term",
    "correct_counts",
    "count_flops",
    "count_pairwise_similarities",
    "denormalize",
    "evaluate",
    "extraction_rank",
    "head_coding_rates",
    "head_representatives",
    "layer_compression",
    "mass_threshold",
    "noisy_attention_accuracy",
    "plot_attention_overlays",
    "segmentation_ious",
    "sliding_window_logits",
    "subspace_bases",
    "zero_shot_segmentation",
]
