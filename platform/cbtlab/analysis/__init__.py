"""Measurements of models: FLOP counts (more probes to come: coding rates, maps, rank)."""

from cbtlab.analysis.flops import count_flops

__all__ = ["count_flops"]
