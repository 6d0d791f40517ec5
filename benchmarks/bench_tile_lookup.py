"""Kernel time of the Triton backend with host-planned tile lists (a VarlenInfo: longest work
first) against the in-kernel tile lookup (device cu_seqlens and max_seqlen only), on
the W1-W4 workloads (benchmarks/workloads.py), forward and forward + backward, side by side
in one run.

    python benchmarks/bench_tile_lookup.py --workloads W1,W2 --out lookup.md
"""

from __future__ import annotations

import argparse
import datetime
import pathlib
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from workloads import workload_inputs, workloads

import attnhub


def time_both(w, causal: bool, backward: bool) -> tuple[float, float]:
    """(ms with a VarlenInfo, ms with device offsets + max_seqlen) for one workload and mode."""
    q, k, v, dout = workload_inputs(w, backward)
    info = attnhub.VarlenInfo.from_lengths(w.seqlens_q, "cuda")
    device_args = (info.cu_seqlens, info.cu_seqlens, info.max_seqlen, info.max_seqlen)

    def run(lengths_args):
        out = attnhub.attention_forward_varlen(q, k, v, *lengths_args, causal=causal,
                                               backend="triton")
        if backward:
            torch.autograd.grad(out, (q, k, v), dout)

    host = do_bench(lambda: run((info, info)), warmup=25, rep=200, return_mode="median")
    lookup = do_bench(lambda: run(device_args), warmup=25, rep=200, return_mode="median")
    return host, lookup


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W1,W2")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    names = args.workloads.split(",")
    rows = [f"# Triton tile lists: host-planned vs in-kernel lookup ({datetime.date.today()}, "
            f"{torch.cuda.get_device_name()}, torch {torch.__version__}, triton "
            f"{triton.__version__})", "",
            "| workload | causal | mode | host list ms | in-kernel lookup ms | lookup / host |",
            "|---|---|---|---|---|---|"]
    for w in (x for x in workloads() if x.name in names):
        for causal in (False, True):
            for backward in (False, True):
                host, lookup = time_both(w, causal, backward)
                mode = "fwd+bwd" if backward else "fwd"
                rows.append(f"| {w.name} | {causal} | {mode} | {host:.3f} | {lookup:.3f} | "
                            f"{lookup / host:.3f} |")
                print(rows[-1], flush=True)
    if args.out:
        pathlib.Path(args.out).write_text("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
