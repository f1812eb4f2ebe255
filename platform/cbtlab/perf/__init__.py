"""The benchmarks: side-by-side timings and peak memory (`timing`), the attention scaling and
throughput studies of the paper's Table 7 (`attention_scaling`, `throughput`), the worker
loop's and Ray Train's overheads (`loop_overhead`, `ray_overhead`) and the loader's throughput
(`loader`); `record` logs a benchmark to MLflow."""

from cbtlab.perf.timing import PeakMemory, Timing, measure_side_by_side, peak_memory

__all__ = ["PeakMemory", "Timing", "measure_side_by_side", "peak_memory"]
