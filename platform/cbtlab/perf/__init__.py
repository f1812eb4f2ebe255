"""Performance measurement: side-by-side timings, peak memory, and the scaling and throughput
studies of the paper's Table 7 (`studies/attention_scaling.py`, `studies/throughput.py`)."""

from cbtlab.perf.timing import PeakMemory, Timing, measure_side_by_side, peak_memory

__all__ = ["PeakMemory", "Timing", "measure_side_by_side", "peak_memory"]
