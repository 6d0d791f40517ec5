"""Compare the Triton forward's kernels and loads (the Gluon kernel, the tl kernel with TMA
descriptors or pointer loads for fully visible key blocks) and launch configs (key block,
stages, warps, register cap; Gluon key block and register split) on the W1-W4 workloads,
optionally with one feature on, against torch's FA2 in the same run; each output is checked
against the pointer-load baseline. How the TMA loads, the Gluon kernel and DEFAULTS["fwd"]
were chosen (docs/performance.md, v5 and v7).

    python benchmarks/tune_forward_variants.py --workloads W1,W2 --configs 64:3,64:2:8:128
"""

from __future__ import annotations

import argparse
import pathlib
import sys
import traceback

from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
import torch
from bench_attention import prefill_impls, triton_variant
from workloads import HEAD_DIM, NHEADS, workloads

from attnhub.backends.triton import configs, hopper_forward

FEATURES = {
    "none": {},
    "softcap": {"softcap": 30.0},
    "alibi": {"alibi_slopes": "slopes"},
    "window": {"window_size": (256, 0)},
    "dropout": {"dropout_p": 0.1},
}

# name -> (forward.forward's tma and gluon arguments, Gluon config changes): how K/V of fully
# visible blocks are read in the tl kernel, or the warp-specialised Gluon kernel
# (hopper_forward.py; --configs do not apply to it). The Gluon schedules measured in v7 and
# dropped (ping-pong turns, direct stores from the wgmma layout, 3 stages) left the kernel
# with their results (docs/performance.md).
VARIANTS = {
    "pointers": ({"tma": False, "gluon": False}, {}),
    "tma": ({"tma": True, "gluon": False}, {}),
    "gluon": ({"tma": True, "gluon": True}, {}),
    "gluon-n64": ({"tma": True, "gluon": True}, {"block_n": 64}),
    "gluon-regs232": ({"tma": True, "gluon": True}, {"consumer_regs": 232, "producer_regs": 40}),
}
GLUON_DEFAULT = dict(hopper_forward.CONFIG)
FWD_DEFAULT = dict(configs.DEFAULTS["fwd"])


def features(name: str) -> dict:
    kwargs = dict(FEATURES[name])
    if "alibi_slopes" in kwargs:
        kwargs["alibi_slopes"] = torch.rand(NHEADS, device="cuda", dtype=torch.float32) * 0.1
    return kwargs


def set_variant(name: str, block_n: int, stages: int, warps: int, maxnreg: int = 0) -> dict:
    """Sets the variant's launch tables (restored from the shipped ones first) and returns
    its forward.forward arguments."""
    kernel_args, changes = VARIANTS[name]
    hopper_forward.CONFIG.update(GLUON_DEFAULT, **changes)
    configs.DEFAULTS["fwd"].update(FWD_DEFAULT)
    configs.DEFAULTS["fwd"][(128, configs.forward_block_m(HEAD_DIM))] = (block_n, warps,
                                                                         stages, maxnreg)
    return kernel_args


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W1,W2,W3")
    parser.add_argument("--variants", default="tma,gluon")
    parser.add_argument("--configs", default="64:3,128:2",
                        help="key block:stages[:warps[:maxnreg]] (8 warps unless given)")
    parser.add_argument("--feature", default="none", choices=sorted(FEATURES))
    parser.add_argument("--block-m", type=int, default=0, help="query tile (default: 128)")
    parser.add_argument("--out", default=None, help="markdown table to write")
    args = parser.parse_args()
    names = args.workloads.split(",")
    pairs = []
    for c in args.configs.split(","):
        given = [int(x) for x in c.split(":")]
        pairs.append((*given, *(8, 0)[len(given) - 2:]))
    if args.block_m:
        configs.forward_block_m = lambda head_dim: args.block_m
    rows = ["| workload | causal | variant | key block | stages | warps | maxnreg | ms | TFLOP/s "
            "| vs torch-fa2 | max diff |", "|---|---|---|---|---|---|---|---|---|---|---|"]
    for w in (x for x in workloads() if x.name in names):
        for causal in (False, True):
            flops = w.flops(causal, backward=False)
            fa2 = prefill_impls(w, causal, False, None)["torch-fa2"]
            kwargs = features(args.feature)
            ms_fa2 = do_bench(fa2, warmup=25, rep=100, return_mode="median")
            print(f"{w.name} causal={causal} torch-fa2 {ms_fa2:.3f} ms "
                  f"{flops / ms_fa2 / 1e9:.1f} TFLOP/s", flush=True)
            base = set_variant("pointers", 64, 3, 8)
            ref = triton_variant(w, causal, False, **base, **kwargs)()[0].float()
            for variant in args.variants.split(","):
                for block_n, stages, warps, maxnreg in pairs:
                    run = triton_variant(w, causal, False, **kwargs,
                                         **set_variant(variant, block_n, stages, warps,
                                                       maxnreg))
                    try:
                        diff = (run()[0].float() - ref).abs().max().item()
                        ms = do_bench(run, warmup=25, rep=100, return_mode="median")
                    except Exception as exc:  # a variant Triton cannot compile: say so
                        traceback.print_exc(limit=1)
                        print(f"  {variant} {block_n}:{stages}:{warps}:{maxnreg} failed: "
                              f"{type(exc).__name__}")
                        rows.append(f"| {w.name} | {causal} | {variant} | {block_n} | "
                                    f"{stages} | {warps} | {maxnreg} | failed | | | |")
                        continue
                    tf = flops / ms / 1e9
                    print(f"  {variant:8s} {block_n:3d}:{stages}:{warps}:{maxnreg} {ms:.3f} ms "
                          f"{tf:.1f} TFLOP/s {ms_fa2 / ms:.2f}x fa2, max diff {diff:.2e}",
                          flush=True)
                    rows.append(f"| {w.name} | {causal} | {variant} | {block_n} | {stages} | "
                                f"{warps} | {maxnreg} | {ms:.3f} | {tf:.1f} | "
                                f"{ms_fa2 / ms:.2f}x | {diff:.1e} |")
    if args.out:
        pathlib.Path(args.out).write_text("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
