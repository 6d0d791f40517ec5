"""Host time per call of the bench matrix's tiny cell on the GPU machine, forward and
forward+backward: torch's FA2 called directly (the aten op, and through autograd),
attnhub -> torch-flash (VarlenInfo and device offsets), attnhub -> triton and attnhub's
automatic choice; then, for forward+backward, torch.profiler tables of the aten op through
autograd and of attnhub -> torch-flash, and a cProfile of the latter.

    python benchmarks/host_time_tiny.py [--profile-dir DIR]

Each figure is ``attnhub.timing.host_time_us`` with 20 and with 200 calls per round (best
of 7 rounds), microseconds per call.
"""

from __future__ import annotations

import argparse
import cProfile
import pstats

import torch

from attnhub.bench.direct import direct_kernels_for
from attnhub.bench.inputs import attnhub_runner, make_inputs
from attnhub.bench.matrix import build_matrix, profile_for
from attnhub.timing import host_time_us


def runners(cell, backward: bool) -> dict:
    dev = torch.device("cuda")
    x = make_inputs(cell, dev, backward)
    mode = "fwd+bwd" if backward else "fwd"
    runs = {d.label: d.build(x, backward) for d in direct_kernels_for(["torch-flash"])
            if mode in d.modes and d.unsupported(cell) is None}
    runs["attnhub torch-flash info"] = attnhub_runner(x, "torch-flash", backward)
    runs["attnhub torch-flash tensors"] = attnhub_runner(x, "torch-flash", backward, "tensors")
    runs["attnhub triton info"] = attnhub_runner(x, "triton", backward)
    runs["attnhub auto info"] = attnhub_runner(x, None, backward)
    return runs


def profile_backward(runs: dict, profile_dir: str | None) -> None:
    for name in ("torch-flash aten (autograd)", "attnhub torch-flash info"):
        fn = runs[name]
        activities = [torch.profiler.ProfilerActivity.CPU, torch.profiler.ProfilerActivity.CUDA]
        with torch.profiler.profile(activities=activities) as prof:
            for _ in range(5):
                fn()
            torch.cuda.synchronize()
        print(f"== torch.profiler: {name}")
        print(prof.key_averages().table(sort_by="cpu_time_total", row_limit=30))
    fn = runs["attnhub torch-flash info"]
    prof = cProfile.Profile()
    prof.enable()
    for _ in range(300):
        fn()
    prof.disable()
    torch.cuda.synchronize()
    if profile_dir:
        prof.dump_stats(f"{profile_dir}/tiny_fwdbwd.prof")
    pstats.Stats(prof).sort_stats("tottime").print_stats(30)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--profile-dir", default=None, help="where to write the cProfile dump")
    args = parser.parse_args()
    cell = {c.name: c for c in build_matrix(profile_for("cuda"))}["tiny"]
    dev = torch.device("cuda")
    print(f"device {torch.cuda.get_device_name()}, torch {torch.__version__}")
    for backward in (False, True):
        runs = runners(cell, backward)
        for name, fn in runs.items():
            for calls in (20, 200):
                us = host_time_us(fn, dev, calls=calls, rounds=7)
                print(f"{'fwd+bwd' if backward else 'fwd'} {name} calls={calls}: {us:.1f} us",
                      flush=True)
        if backward:
            profile_backward(runs, args.profile_dir)


if __name__ == "__main__":
    main()
