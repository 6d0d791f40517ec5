"""`attnhub bench`: run the matrix (or merge earlier runs) and write bench.md, bench.json
and bench.png into the output folder."""

from __future__ import annotations

import json
import os
import sys
import time
from dataclasses import dataclass
from typing import Any

import torch

from . import plot
from .matrix import build_matrix, profile_for, select_cells
from .report import build_report, environment, merge_reports, render_markdown
from .runner import AUTO, BenchConfig, as_dicts, implementation_labels, run_matrix

# device_time_ms / host_time_us budgets per profile: the CPU cells take tens to hundreds of
# milliseconds per call, so a few timed calls per measurement suffice there.
TIMING = {
    "gpu": {"warmup_ms": 25.0, "rep_ms": 100.0, "host_calls": 200, "host_rounds": 5},
    "cpu": {"warmup_ms": 10.0, "rep_ms": 60.0, "host_calls": 5, "host_rounds": 3},
}


@dataclass
class BenchRequest:
    """The command's arguments (see ``attnhub bench --help``)."""

    device: str
    output: str
    backends: list[str] | None = None
    quick: bool = False
    cells: list[str] | None = None
    part: tuple[int, int] | None = None
    direct: bool = True
    offsets: str = "varlen-info"
    seed: int = 0
    time_limit_s: float | None = None
    progress: bool = True
    command: str = ""


def plan_cells(request: BenchRequest) -> list:
    """The cells the request selects, in matrix order (``part`` k/n: every n-th from k)."""
    device = torch.device(request.device)
    cells = select_cells(build_matrix(profile_for(device.type), request.seed), request.quick,
                         request.cells)
    if request.part is not None:
        k, n = request.part
        cells = cells[k - 1::n]
    return cells


def timing_description(device: torch.device) -> str:
    timer = ("triton.testing.do_bench median, CUDA events, L2 flushed between calls"
             if device.type == "cuda" else "wall clock with a synchronize after each call, median")
    return (f"{timer}, after warm-up; a cell's implementations timed in 3 interleaved rounds "
            "of alternating order, median of the rounds")


def run_bench(request: BenchRequest) -> dict[str, Any]:
    """Run the request's cells and return the report (see attnhub.bench.report)."""
    device = torch.device(request.device)
    profile = profile_for(device.type)
    cells = plan_cells(request)
    backends = request.backends
    auto = True
    if backends is not None:
        auto = AUTO in backends
        backends = [b for b in backends if b != AUTO]
    start = time.monotonic()
    cfg = BenchConfig(device=device, backends=backends, auto=auto, direct=request.direct,
                      offsets=request.offsets, seed=request.seed,
                      deadline=None if request.time_limit_s is None
                      else start + request.time_limit_s, **TIMING[profile.name])
    results = run_matrix(cells, cfg, progress=request.progress)
    meta = environment(device)
    meta.update(profile=profile.name, quick=request.quick, offsets=request.offsets,
                seed=request.seed, timing=timing_description(device), left_out=cfg.left_out,
                command=request.command, wall_s=time.monotonic() - start)
    return build_report(meta, cells, implementation_labels(cfg), as_dicts(results))


def write_outputs(report: dict[str, Any], output: str) -> list[str]:
    """bench.json, bench.png (when matplotlib imports) and bench.md in ``output``; returns
    the paths written."""
    os.makedirs(output, exist_ok=True)
    written = []
    path = os.path.join(output, "bench.json")
    with open(path, "w") as f:
        json.dump(report, f, indent=1)
        f.write("\n")
    written.append(path)
    png = None
    if plot.matplotlib_available():
        png = "bench.png"
        plot.draw(report, os.path.join(output, png))
        written.append(os.path.join(output, png))
    else:
        print(f"attnhub bench: {plot.MISSING_MATPLOTLIB}", file=sys.stderr)
    path = os.path.join(output, "bench.md")
    with open(path, "w") as f:
        f.write(render_markdown(report, png))
    written.append(path)
    return written


def merge_files(paths: list[str]) -> dict[str, Any]:
    """The report merged from earlier runs' bench.json files."""
    reports = []
    for path in paths:
        with open(path) as f:
            reports.append(json.load(f))
    return merge_reports(reports)


def summary(report: dict[str, Any]) -> str:
    """Counts by status, for the terminal."""
    counts: dict[str, int] = {}
    for m in report["results"]:
        counts[m["status"]] = counts.get(m["status"], 0) + 1
    parts = ", ".join(f"{n} {status}" for status, n in sorted(counts.items()))
    return (f"{len(report['cells'])} cells x {len(report['implementations'])} "
            f"implementations: {parts} in {report['meta'].get('wall_s', 0.0):.0f} s")
