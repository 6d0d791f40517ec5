"""Time the Triton backend's tl kernels against its Gluon kernels for sm_90 (hopper_forward.py,
hopper_backward.py) on the W1-W4 workloads, forward and forward + backward, beside torch's
FA2 in the same run; each variant's output and gradients are checked against the tl kernels.
Variants run the backend's launchers directly (bench_attention.triton_variant), so the tl
kernels are asked for by argument, not by patching the backend.

    python benchmarks/compare_gluon.py --workloads W1,W3 --variants tl,gluon,bwd-m64
"""

from __future__ import annotations

import argparse
import pathlib
import sys

from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_attention import prefill_impls, triton_variant
from workloads import workloads

from attnhub.backends.triton import hopper_backward, hopper_forward

# name -> (forward in Gluon, dK/dV in Gluon, forward config changes, backward config changes)
VARIANTS = {
    "tl": (False, False, {}, {}),
    "gluon-fwd": (True, False, {}, {}),
    "gluon": (True, True, {}, {}),
    "bwd-m64": (True, True, {}, {"block_m": {64: 64, 128: 64}}),
    "bwd-2stages": (True, True, {}, {"stages": 2}),
}
FWD_DEFAULT = dict(hopper_forward.CONFIG)
BWD_DEFAULT = dict(hopper_backward.CONFIG)


def variant_run(name: str, w, causal: bool, backward: bool):
    """Sets the variant's Gluon launch tables (from the shipped ones) and returns its run."""
    gluon, gluon_backward, fwd, bwd = VARIANTS[name]
    hopper_forward.CONFIG.update(FWD_DEFAULT, **fwd)
    hopper_backward.CONFIG.update(BWD_DEFAULT, **bwd)
    return triton_variant(w, causal, backward, gluon=gluon, gluon_backward=gluon_backward)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W1,W2,W3")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--out", default=None, help="markdown table to write")
    args = parser.parse_args()
    rows = ["| workload | causal | mode | variant | ms | TFLOP/s | vs torch-fa2 | max diff |",
            "|---|---|---|---|---|---|---|---|"]
    for w in (x for x in workloads() if x.name in args.workloads.split(",")):
        for causal in (False, True):
            ref = [t.float() for t in variant_run("tl", w, causal, True)()]
            for mode in args.modes.split(","):
                bwd = mode == "fwd+bwd"
                impls = prefill_impls(w, causal, bwd, None)
                flops = w.flops(causal, backward=bwd)
                ms_fa2 = do_bench(impls["torch-fa2"], warmup=25, rep=100, return_mode="median")
                rows.append(f"| {w.name} | {causal} | {mode} | torch-fa2 | {ms_fa2:.3f} | "
                            f"{flops / ms_fa2 / 1e9:.1f} | 1.00x | |")
                for name in args.variants.split(","):
                    check = variant_run(name, w, causal, True)
                    diff = max((a.float() - b).abs().max().item()
                               for a, b in zip(check(), ref, strict=True))
                    del check
                    run = variant_run(name, w, causal, bwd)
                    ms = do_bench(run, warmup=25, rep=100, return_mode="median")
                    line = (f"| {w.name} | {causal} | {mode} | {name} | {ms:.3f} | "
                            f"{flops / ms / 1e9:.1f} | {ms_fa2 / ms:.2f}x | {diff:.1e} |")
                    print(line, flush=True)
                    rows.append(line)
    if args.out:
        pathlib.Path(args.out).write_text("\n".join(rows) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
