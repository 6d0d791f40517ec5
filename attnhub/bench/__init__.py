"""`attnhub bench`: a workload matrix timed on the current device, every backend side by side.

matrix (the cells and their FLOP counts), inputs (random tensors of a cell), direct (external
kernels called without attnhub), runner (the measurements), report (JSON and markdown), plot
(the PNG), command (the CLI's entry). See docs/benchmarks.md.
"""

from .command import BenchRequest, merge_files, run_bench, write_outputs
from .matrix import Cell, build_matrix, profile_for, select_cells, visible_pairs
from .runner import BenchConfig, Measurement, run_matrix

__all__ = [
    "BenchConfig",
    "BenchRequest",
    "Cell",
    "Measurement",
    "build_matrix",
    "merge_files",
    "profile_for",
    "run_bench",
    "run_matrix",
    "select_cells",
    "visible_pairs",
    "write_outputs",
]
