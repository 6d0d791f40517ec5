"""Sweep the Triton backward's tile sizes on one workload, letting the autotuner pick the
inner blocks, warps and stages for each; prints time, TFLOP/s and the picks, and checks the
gradients against torch's FA2 (how configs.backward_tiles / DEFAULTS were chosen).

    ATTNHUB_TRITON_AUTOTUNE=1 python benchmarks/tune_backward.py --workload W1
"""

from __future__ import annotations

import argparse
import os
import pathlib
import sys

import torch
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from bench_attention import autotune_picks, prefill_impls
from workloads import workloads

import attnhub
from attnhub.backends.triton import backward, configs


def max_grad_error(causal: bool) -> float:
    """Largest |triton - reference (fp64)| over dq, dk, dv on a small mixed-length batch."""
    lengths = [300, 1, 77, 0, 129, 520]
    info = attnhub.VarlenInfo.from_lengths(lengths, "cuda")
    g = torch.Generator(device="cuda").manual_seed(0)
    q, k, v = (torch.randn(info.total, h, 128, device="cuda", dtype=torch.bfloat16,
                           generator=g).requires_grad_() for h in (32, 8, 8))
    out = attnhub.attention_forward_varlen(q, k, v, info, info, causal=causal,
                                           backend="triton")
    dout = torch.randn_like(out)
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref_in = [t.detach().double().requires_grad_() for t in (q, k, v)]
    ref = attnhub.attention_forward_varlen(*ref_in, info, info, causal=causal,
                                           backend="reference")
    ref_grads = torch.autograd.grad(ref, ref_in, dout.double())
    return max((a.double() - b).abs().max().item() for a, b in zip(grads, ref_grads,
                                                                    strict=True))


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workload", default="W1")
    parser.add_argument("--tiles", default="64x64,128x128,128x64,64x128",
                        help="key-tile x query-tile pairs to try")
    parser.add_argument("--causal", action="store_true")
    parser.add_argument("--dkdv", default="",
                        help="comma list of inner:warps:stages[:maxnreg] dK/dV configs to try "
                             "(default: DEFAULTS')")
    parser.add_argument("--dq", default="", help="the same for dQ (applied with every --dkdv)")
    parser.add_argument("--maxnreg", default="0:0",
                        help="comma list of dkdv:dq register caps to try on the backward "
                             "kernels' head-dim-128 defaults (0: none)")
    args = parser.parse_args()
    saved = {name: dict(configs.DEFAULTS[name]) for name in ("dkdv", "dq")}
    if os.environ.get("ATTNHUB_TRITON_AUTOTUNE", "0") in ("", "0"):
        print("note: ATTNHUB_TRITON_AUTOTUNE is off: each pair runs the DEFAULTS configs")
    w = next(x for x in workloads() if x.name == args.workload)
    flops = w.flops(args.causal, backward=True)
    base = prefill_impls(w, args.causal, True, None)
    ms_fa2 = do_bench(base["torch-fa2"], warmup=25, rep=100, return_mode="median")
    print(f"{w.name} causal={args.causal} torch-fa2 fwd+bwd {ms_fa2:.3f} ms "
          f"{flops / ms_fa2 / 1e9:.1f} TFLOP/s")
    overrides = [(a, b) for a in (args.dkdv.split(",") if args.dkdv else [""])
                 for b in (args.dq.split(",") if args.dq else [""])]
    trials = [(pair, r, o) for pair in args.tiles.split(",") for r in args.maxnreg.split(",")
              for o in overrides]
    for pair, regs, (dkdv_cfg, dq_cfg) in trials:
        caps = zip(("dkdv", "dq"), (int(x) for x in regs.split(":")), strict=True)
        for name, cap in caps:
            configs.DEFAULTS[name] = {key: ((*entry[:3], cap) if key[0] == 128 else entry)
                                      for key, entry in saved[name].items()}
        key_tile, query_tile = (int(x) for x in pair.split("x"))
        for name, cfg, outer in (("dkdv", dkdv_cfg, key_tile), ("dq", dq_cfg, query_tile)):
            if cfg:
                configs.DEFAULTS[name][(128, outer)] = tuple(int(x) for x in cfg.split(":"))
        label = (f"{pair} maxnreg {regs}, dkdv {dkdv_cfg or 'default'}, "
                 f"dq {dq_cfg or 'default'}")
        configs.backward_tiles = lambda head_dim, causal, k=key_tile, q=query_tile: (k, q)
        backward._dkdv_kernel.cache.clear()
        backward._dq_kernel.cache.clear()
        try:
            ms = do_bench(base["triton"], warmup=25, rep=100, return_mode="median")
        except Exception as exc:  # out of shared memory / registers for this shape
            print(f"tiles {label}: failed: {type(exc).__name__}: "
                  f"{str(exc)[:200]}")
            continue
        err = max_grad_error(args.causal)
        print(f"tiles {label}: {ms:.3f} ms {flops / ms / 1e9:.1f} TFLOP/s "
              f"({ms_fa2 / ms:.2f}x torch-fa2), max grad error vs fp64 {err:.3f}"
              + ("  WRONG" if err > 0.1 else ""))
        for pick in autotune_picks():
            if not pick.startswith("fwd"):
                print("   ", pick)
    torch.cuda.synchronize()
    return 0


if __name__ == "__main__":
    sys.exit(main())
