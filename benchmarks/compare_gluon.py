"""Time the Triton backend's tl kernels against its Gluon kernels for sm_90 (hopper_forward.py,
hopper_backward.py) on the W1-W4 workloads, forward and forward + backward, beside torch's
FA2 in the same run; each variant's output and gradients are checked against the tl kernels.
Variants run the backend's launchers directly (bench_attention.triton_variant), so the tl
kernels are asked for by argument, not by patching the backend.

``--features`` times instead the forward of the calls the Gluon kernel took over from the
tl kernel (softcap, ALiBi, device offsets without host lengths, and combinations), Gluon
against tl on the same inputs, with the largest difference between their outputs; "plain"
(host lengths, no feature) is the row the others compare with.

    python benchmarks/compare_gluon.py --workloads W1,W3 --variants tl,gluon,bwd-m64
    python benchmarks/compare_gluon.py --features --workloads W1,W2,W3 --out /tmp/features.md
"""

from __future__ import annotations

import argparse
import itertools
import pathlib
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_attention import prefill_impls, triton_variant
from workloads import NHEADS, workload_inputs, workloads

import attnhub
from attnhub.backends.triton import forward as triton_forward
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


# name -> (attnhub features, offsets on the device without host lengths); ALiBi's slopes are
# the usual geometric series per head
FEATURE_CALLS = {
    "plain": ({}, False),  # host lengths: what "device-offsets" is to be read against
    "softcap": ({"softcap": 30.0}, False),
    "alibi": ({"alibi_slopes": "head"}, False),
    "device-offsets": ({}, True),
    "device-offsets softcap": ({"softcap": 30.0}, True),
    "softcap alibi window": ({"softcap": 30.0, "alibi_slopes": "head",
                              "window_size": (4096, 0)}, False),
}


def feature_forward(w, causal: bool, name: str, gluon: bool):
    """A zero-argument callable running forward.forward on workload ``w`` with the features of
    FEATURE_CALLS[name], the Gluon kernel on or off; returns out."""
    features, device_offsets = FEATURE_CALLS[name]
    features = dict(features, causal=causal)
    if features.get("alibi_slopes") == "head":
        features["alibi_slopes"] = (2.0 ** (-8.0 * torch.arange(1, NHEADS + 1) / NHEADS)
                                    ).float().cuda()
    q, k, v, _ = workload_inputs(w, False)
    if device_offsets:
        cu_q, cu_k = (torch.tensor([0, *itertools.accumulate(x)], dtype=torch.int32,
                                   device="cuda") for x in (w.seqlens_q, w.seqlens_k))
        offsets = (cu_q, cu_k, max(w.seqlens_q), max(w.seqlens_k))
    else:
        offsets = tuple(attnhub.VarlenInfo.from_lengths(x, "cuda")
                        for x in (w.seqlens_q, w.seqlens_k))
    problem, inputs = attnhub.normalize(q, k, v, *offsets, **features)
    assert problem.lengths_known != device_offsets
    return lambda: triton_forward.forward(problem, inputs, None, gluon=gluon)[0]


def feature_rows(names: list[str]) -> list[str]:
    """Gluon against tl forward for the FEATURE_CALLS on the workloads ``names``."""
    rows = ["| workload | causal | call | tl ms | Gluon ms | TFLOP/s (Gluon) | Gluon / tl speed "
            "| max diff |", "|---|---|---|---|---|---|---|---|"]
    for w in (x for x in workloads() if x.name in names):
        for causal, name in itertools.product((False, True), FEATURE_CALLS):
            tl_run, gluon_run = (feature_forward(w, causal, name, g) for g in (False, True))
            diff = (tl_run().float() - gluon_run().float()).abs().max().item()
            tl_ms, gluon_ms = (do_bench(r, warmup=25, rep=100, return_mode="median")
                               for r in (tl_run, gluon_run))
            flops = w.flops(causal)  # window: counted as the full mask (an upper bound)
            line = (f"| {w.name} | {causal} | {name} | {tl_ms:.3f} | {gluon_ms:.3f} | "
                    f"{flops / gluon_ms / 1e9:.1f} | {tl_ms / gluon_ms:.2f}x | {diff:.1e} |")
            print(line, flush=True)
            rows.append(line)
    return rows


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workloads", default="W1,W2,W3")
    parser.add_argument("--variants", default=",".join(VARIANTS))
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--features", action="store_true",
                        help="Gluon vs tl forward on softcap / ALiBi / device-offset calls")
    parser.add_argument("--out", default=None, help="markdown table to write")
    args = parser.parse_args()
    if args.features:
        rows = feature_rows(args.workloads.split(","))
        if args.out:
            pathlib.Path(args.out).write_text("\n".join(rows) + "\n")
        return 0
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
