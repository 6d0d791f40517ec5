"""Benchmark the workloads W1-W4 (benchmarks/workloads.py, docs/performance.md) side by
side in one run: attnhub's triton backend, torch's bundled FlashAttention-2 (the aten op,
called directly) and, when importable, FA4 (flash_attn.cute). Prints TFLOP/s and ratios,
writes a markdown table.

    python benchmarks/bench_attention.py --out docs/benchmarks/latest.md

Timing: triton.testing.do_bench (CUDA events, median) after warm-up, on random data.
"""

from __future__ import annotations

import argparse
import datetime
import importlib.metadata
import os
import pathlib
import sys

import torch
import triton
from triton.testing import do_bench

sys.path.insert(0, str(pathlib.Path(__file__).resolve().parent))
from workloads import HEAD_DIM, NHEADS, NHEADS_K, Workload, workload_inputs, workloads

import attnhub
from attnhub.bench.direct import direct_kernels_for
from attnhub.bench.inputs import CellInputs, attnhub_runner
from attnhub.bench.matrix import Cell


def _version(name: str) -> str:
    try:
        return importlib.metadata.version(name)
    except importlib.metadata.PackageNotFoundError:
        return "-"


def copy_bandwidth_gbs() -> float:
    """Device-to-device copy of 2 GiB: bytes read + written over time."""
    x = torch.empty(2**30, dtype=torch.bfloat16, device="cuda").normal_()
    y = torch.empty_like(x)
    ms = do_bench(lambda: y.copy_(x), warmup=25, rep=200, return_mode="median")
    return 2 * x.numel() * x.element_size() / (ms * 1e-3) / 1e9


def _fa4():
    try:
        from flash_attn.cute import flash_attn_varlen_func
    except Exception as exc:  # not installed, or no matching GPU
        print(f"FA4 not available: {type(exc).__name__}: {exc}")
        return None
    return flash_attn_varlen_func


def prefill_impls(w: Workload, causal: bool, backward: bool, fa4, sinks: bool = False):
    """name -> zero-argument callable running one forward (+ backward) of the workload: the
    triton backend through attnhub, torch's FA2 and FA4 called directly (attnhub.bench's
    direct calls). ``sinks``: the Triton calls carry attention sinks (with their gradient in
    backward)."""
    q, k, v, dout = workload_inputs(w, backward)
    sink_logits = (torch.randn(NHEADS, device="cuda").requires_grad_(backward) if sinks
                   else None)
    info_q = attnhub.VarlenInfo.from_lengths(w.seqlens_q, "cuda")
    info_k = attnhub.VarlenInfo.from_lengths(w.seqlens_k, "cuda")
    cell = Cell(w.name, "workload", w.name, w.seqlens_q, w.seqlens_k, NHEADS, NHEADS_K,
                HEAD_DIM, "bfloat16", causal=causal)
    x = CellInputs(cell, q, k, v, dout, info_q, info_k, None, None, backward)
    impls = {"triton": attnhub_runner(x, "triton", backward)}
    if sinks:
        def triton_run():
            out = attnhub.attention_forward_varlen(q, k, v, info_q, info_k, causal=causal,
                                                   backend="triton", sinks=sink_logits)
            if backward:
                torch.autograd.grad(out, (q, k, v, sink_logits), dout)
            return out

        impls["triton"] = triton_run
    direct = {d.backend: d for d in direct_kernels_for(["torch-flash", "fa4"]) if d.name is None}
    impls["torch-fa2"] = direct["torch-flash"].build(x, backward)
    if fa4 is not None:
        impls["fa4"] = direct["fa4"].build(x, backward)
    return impls


def decode_impls(w: Workload):
    """W4: one query token per sequence over a paged KV cache."""
    g = torch.Generator(device="cuda").manual_seed(0)
    ps = w.page_size or 16
    pages_per_seq = -(-max(w.seqlens_k) // ps)
    num_pages = pages_per_seq * len(w.seqlens_k)
    kpool = torch.randn(num_pages, ps, NHEADS_K, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                        generator=g)
    vpool = torch.randn_like(kpool)
    table = torch.randperm(num_pages, device="cuda", generator=g).to(torch.int32)
    table = table.view(len(w.seqlens_k), pages_per_seq)
    q = torch.randn(len(w.seqlens_q), NHEADS, HEAD_DIM, device="cuda", dtype=torch.bfloat16,
                    generator=g)
    info_q = attnhub.VarlenInfo.from_lengths(w.seqlens_q, "cuda")
    info_k = attnhub.VarlenInfo.from_lengths(w.seqlens_k, "cuda")
    k_packed = kpool[table.long()].reshape(-1, NHEADS_K, HEAD_DIM)
    v_packed = vpool[table.long()].reshape(-1, NHEADS_K, HEAD_DIM)

    def triton_run():
        return attnhub.attention_forward_varlen(q, kpool, vpool, info_q, info_k,
                                                block_table=table, backend="triton")

    def fa2_packed_run():  # torch's FA2 has no paged KV: the same cache, gathered beforehand
        return torch.ops.aten._flash_attention_forward(
            q, k_packed, v_packed, info_q.cu_seqlens, info_k.cu_seqlens, 1, max(w.seqlens_k),
            0.0, False, False, scale=HEAD_DIM ** -0.5)[0]

    return {"triton": triton_run, "torch-fa2 (gathered kv)": fa2_packed_run}


def triton_variant(w: Workload, causal: bool, backward: bool, *, gluon: bool = True,
                   tma: bool = True, gluon_backward: bool = True, **features):
    """A zero-argument callable running the Triton backend's launchers on the workload
    directly (attnhub.normalize, then backends/triton forward.forward and backward.backward),
    with the shipped kernel choices turned off where asked: how benchmarks compare variants
    without patching the backend. ``features``: attnhub arguments (softcap=..., ...); a
    dropout call uses a fixed seed so that runs compare. Returns (out[, dq, dk, dv])."""
    from attnhub.backends.triton import backward as triton_backward
    from attnhub.backends.triton import forward as triton_forward

    q, k, v, dout = workload_inputs(w, False)
    info_q = attnhub.VarlenInfo.from_lengths(w.seqlens_q, "cuda")
    info_k = attnhub.VarlenInfo.from_lengths(w.seqlens_k, "cuda")
    problem, inputs = attnhub.normalize(q, k, v, info_q, info_k, causal=causal, **features)
    seed = (torch.zeros(2, dtype=torch.int64, device="cuda") if problem.dropout_p > 0
            else None)

    def run():
        out, lse = triton_forward.forward(problem, inputs, seed, gluon=gluon, tma=tma)
        if not backward:
            return (out,)
        grads = triton_backward.backward(problem, inputs, out, lse, dout, None, seed,
                                         gluon=gluon_backward)
        return (out, *grads[:3])

    return run


def autotune_picks() -> list[str]:
    """The Triton autotuner's choice per kernel and key, when it was allowed to choose."""
    if os.environ.get("ATTNHUB_TRITON_AUTOTUNE", "0") in ("", "0"):
        return []
    from attnhub.backends.triton import backward, forward

    picks = []
    for name, kernel in (("fwd", forward._fwd_kernel), ("dkdv", backward._dkdv_kernel),
                         ("dq", backward._dq_kernel)):
        for key, cfg in kernel.cache.items():
            picks.append(f"{name} {key}: {cfg}")
    return picks


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default=None, help="write the markdown table here")
    parser.add_argument("--workloads", default="W1,W2,W3,W4")
    parser.add_argument("--modes", default="fwd,fwd+bwd")
    parser.add_argument("--no-fa4", action="store_true")
    parser.add_argument("--sinks", action="store_true",
                        help="the Triton calls carry attention sinks (random logits, with their "
                             "gradient in fwd+bwd); FA2 and FA4 run the same calls without")
    args = parser.parse_args()
    if not torch.cuda.is_available():
        print("needs a CUDA GPU")
        return 2
    wanted = set(args.workloads.split(","))
    modes = args.modes.split(",")
    fa4 = None if args.no_fa4 else _fa4()
    dev = torch.cuda.get_device_name()
    header = (f"device {dev}, date {datetime.date.today().isoformat()}, torch "
              f"{torch.__version__}, triton {triton.__version__}, flash-attn-4 "
              f"{_version('flash-attn-4')}, attnhub {attnhub.__version__}"
              + (", triton with attention sinks (W1-W3)" if args.sinks else ""))
    print(header)
    bw = copy_bandwidth_gbs()
    print(f"measured copy bandwidth: {bw:.0f} GB/s")
    rows = []
    for w in workloads():
        if w.name not in wanted:
            continue
        if w.page_size is not None:
            impls = decode_impls(w)
            kv_bytes = 2 * sum(w.seqlens_k) * NHEADS_K * HEAD_DIM * 2
            ref = impls["torch-fa2 (gathered kv)"]()
            err = (impls["triton"]() - ref).abs().max().item()
            for name, fn in impls.items():
                ms = do_bench(fn, warmup=25, rep=200, return_mode="median")
                gbs = kv_bytes / (ms * 1e-3) / 1e9
                rows.append((w.name, "-", "fwd", name, ms, None, gbs / bw))
                print(f"{w.name} decode {name:<24} {ms * 1e3:8.1f} us  {gbs:7.0f} GB/s  "
                      f"{100 * gbs / bw:5.1f}% of copy bandwidth  (max |triton - fa2| {err:.2e})")
            continue
        for causal in (False, True):
            for mode in modes:
                backward = mode == "fwd+bwd"
                impls = prefill_impls(w, causal, backward, fa4, args.sinks)
                if not backward and not args.sinks:  # sinks change the output
                    ref = impls["torch-fa2"]()
                    err = (impls["triton"]() - ref).abs().max().item()
                    print(f"{w.name} causal={causal} max |triton - fa2| = {err:.2e}")
                flops = w.flops(causal, backward)
                for name, fn in impls.items():
                    ms = do_bench(fn, warmup=25, rep=100, return_mode="median")
                    rows.append((w.name, causal, mode, name, ms, flops / (ms * 1e-3) / 1e12,
                                 None))
                    print(f"{w.name} causal={causal!s:<5} {mode:<7} {name:<10} {ms:8.3f} ms "
                          f"{rows[-1][5]:7.1f} TFLOP/s")
                torch.cuda.empty_cache()
    lines = [f"# Benchmark: {header}", "", f"Measured copy bandwidth {bw:.0f} GB/s.", "",
             "| workload | causal | mode | impl | ms | TFLOP/s | vs torch-fa2 | vs fa4 |",
             "|---|---|---|---|---|---|---|---|"]
    index = {(r[0], r[1], r[2], r[3]): r for r in rows}
    for r in rows:
        if r[5] is None:
            lines.append(f"| {r[0]} | - | {r[2]} | {r[3]} | {r[4]:.4f} | - | "
                         f"{100 * r[6]:.1f}% of bandwidth | - |")
            continue
        fa2 = index.get((r[0], r[1], r[2], "torch-fa2"))
        f4 = index.get((r[0], r[1], r[2], "fa4"))
        lines.append(f"| {r[0]} | {r[1]} | {r[2]} | {r[3]} | {r[4]:.3f} | {r[5]:.1f} | "
                     f"{r[5] / fa2[5]:.2f}x | " + (f"{r[5] / f4[5]:.2f}x |" if f4 else "- |"))
    tuned = autotune_picks()
    if tuned:
        lines += ["", "Autotuner picks (ATTNHUB_TRITON_AUTOTUNE=1):", ""]
        lines += [f"* {t}" for t in tuned]
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        pathlib.Path(args.out).parent.mkdir(parents=True, exist_ok=True)
        pathlib.Path(args.out).write_text(text)
    return 0


if __name__ == "__main__":
    sys.exit(main())
