"""Sweep the Triton forward's query tile (BLOCK_M) on the W1-W4 workloads, letting the
autotuner pick the key block, warps and stages for each; prints time, TFLOP/s against torch's
FA2 in the same run, and the picks (how configs.forward_block_m / DEFAULTS were chosen).

    ATTNHUB_TRITON_AUTOTUNE=1 python benchmarks/tune_forward.py --workloads W1,W2 --tiles 64,128
"""

from __future__ import annotations

import argparse
import pathlib
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_attention import autotune_picks, prefill_impls
from workloads import workloads

from attnhub.backends.triton import configs, forward


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W1,W2,W3")
    parser.add_argument("--tiles", default="64,128", help="query tiles (BLOCK_M) to try")
    args = parser.parse_args()
    names = args.workloads.split(",")
    for w in (x for x in workloads() if x.name in names):
        for causal in (False, True):
            flops = w.flops(causal, backward=False)
            base = prefill_impls(w, causal, False, None)
            ms_fa2 = do_bench(base["torch-fa2"], warmup=25, rep=100, return_mode="median")
            print(f"{w.name} causal={causal} torch-fa2 fwd {ms_fa2:.3f} ms "
                  f"{flops / ms_fa2 / 1e9:.1f} TFLOP/s")
            for tile in (int(x) for x in args.tiles.split(",")):
                configs.forward_block_m = lambda head_dim, m=tile: m
                forward._fwd_kernel.cache.clear()
                ms = do_bench(base["triton"], warmup=25, rep=100, return_mode="median")
                print(f"  BLOCK_M {tile}: {ms:.3f} ms {flops / ms / 1e9:.1f} TFLOP/s "
                      f"({ms_fa2 / ms:.2f}x torch-fa2)")
                for pick in autotune_picks():
                    if pick.startswith("fwd"):
                        print("   ", pick.split(": ", 1)[-1])
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
