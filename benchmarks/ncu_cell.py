"""Runs one bench-matrix cell's triton forward+backward four times, for a profiler: with the
command below, ncu profiles the third call's Gluon dK/dV and dQ (warm, compiled).

    ncu --clock-control none --kernel-name regex:'_hopper_(dkdv|dq)' --launch-skip 4 \\
        --launch-count 2 --section SpeedOfLight --section WarpStateStats \\
        --section SchedulerStats --section ComputeWorkloadAnalysis --section LaunchStats \\
        --section Occupancy python3 benchmarks/ncu_cell.py d64-mha
"""

from __future__ import annotations

import sys

import torch

from attnhub.bench.inputs import attnhub_runner, make_inputs
from attnhub.bench.matrix import build_matrix, profile_for


def main(name: str) -> None:
    cells = {c.name: c for c in build_matrix(profile_for("cuda"))}
    if name not in cells:
        raise SystemExit(f"no cell {name!r}; cells: {', '.join(cells)}")
    run = attnhub_runner(make_inputs(cells[name], torch.device("cuda"), True), "triton", True)
    for _ in range(4):
        run()
    torch.cuda.synchronize()


if __name__ == "__main__":
    main(sys.argv[1] if len(sys.argv) > 1 else "d64-mha")
