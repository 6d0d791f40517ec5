"""Host overhead per call: BatchPlan.run() against the plain API (attention_forward_varlen
with a VarlenInfo) and FlashInfer-style wrapper.run(), on a tiny batch where the GPU time is
small, so the per-call time is the host path's cost.

Run on a GPU: python benchmarks/bench_plan.py [--calls 2000] > docs/benchmarks/plan-run.md
"""

from __future__ import annotations

import argparse
import datetime
import time

import torch

import attnhub
import attnhub.compat.flashinfer as flashinfer


def _per_call_us(fn, calls: int) -> float:
    for _ in range(50):
        fn()
    torch.cuda.synchronize()
    start = time.perf_counter()
    for _ in range(calls):
        fn()
    torch.cuda.synchronize()
    return (time.perf_counter() - start) / calls * 1e6


def main() -> None:
    parser = argparse.ArgumentParser()
    parser.add_argument("--calls", type=int, default=2000)
    parser.add_argument("--backend", default=None)
    args = parser.parse_args()
    dev, dtype, h, hk, d = "cuda", torch.bfloat16, 32, 8, 128
    lengths = [64] * 8
    info = attnhub.VarlenInfo.from_lengths(lengths, dev)
    q = torch.randn(info.total, h, d, device=dev, dtype=dtype)
    k = torch.randn(info.total, hk, d, device=dev, dtype=dtype)
    v = torch.randn_like(k)
    p = attnhub.plan(info, info, nheads=h, nheads_k=hk, head_dim=d, dtype=dtype, device=dev,
                     causal=True, backend=args.backend)
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(torch.empty(1, device=dev))
    w.plan(info.cu_seqlens, info.cu_seqlens, h, hk, d, causal=True, q_data_type=dtype)
    rows = [
        ("attention_forward_varlen (VarlenInfo)", lambda: attnhub.attention_forward_varlen(
            q, k, v, info, info, causal=True, backend=args.backend)),
        ("BatchPlan.run", lambda: p.run(q, k, v)),
        ("flashinfer wrapper run", lambda: w.run(q, k, v)),
    ]
    graph = torch.cuda.CUDAGraph()
    gp = attnhub.plan(info.cu_seqlens_host, info.cu_seqlens_host, nheads=h, nheads_k=hk,
                      head_dim=d, dtype=dtype, device=dev, causal=True, max_seqlen_q=64,
                      max_seqlen_k=64, backend=args.backend, cuda_graph=True)
    gp.run(q, k, v)
    torch.cuda.synchronize()
    with torch.cuda.graph(graph):
        gp.run(q, k, v)
    rows.append(("CUDA graph replay of BatchPlan.run", graph.replay))
    print(f"# plan/run host overhead\n\n{torch.cuda.get_device_name()}, torch {torch.__version__}"
          f", {datetime.date.today()}; backend {p.backend.name}; 8 x 64 tokens, bf16, "
          f"heads {h}/{hk}, head_dim {d}, causal; {args.calls} calls\n")
    print("| path | us per call |\n|---|---|")
    for name, fn in rows:
        print(f"| {name} | {_per_call_us(fn, args.calls):.1f} |")


if __name__ == "__main__":
    main()
