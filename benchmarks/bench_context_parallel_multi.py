"""Context-parallel attention over N GPUs with NCCL (issue 22's scaling runs).

Launch with torchrun on one host:
    torchrun --standalone --nproc-per-node 8 benchmarks/bench_context_parallel_multi.py \\
        --seqlens 1048576 --out docs/benchmarks/cp-multi.md
    torchrun --standalone --nproc-per-node 2 benchmarks/bench_context_parallel_multi.py --check

Each rank holds only its zigzag shard (random values); forward and forward+backward of
context_parallel_attention are timed for the ring and the all-gather strategy (max over
ranks, CUDA events, medians of --reps), with the TFLOP/s of the whole job from the exact
causal pair count. --check first compares a small global batch with one GPU's result
(out, lse, dq, dk, dv under the conformance rule against the float64 reference).
"""

from __future__ import annotations

import argparse
import datetime
import os
from pathlib import Path

import torch
import torch.distributed as dist

import attnhub
from attnhub.conformance.tolerance import check
from attnhub.distributed import context_parallel_attention, zigzag_shard


def _time(fn, reps: int) -> float:
    fn()
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        dist.barrier()
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    t = torch.tensor(sorted(times)[len(times) // 2], device="cuda")
    dist.all_reduce(t, op=dist.ReduceOp.MAX)
    return float(t)


def causal_pairs(seqlens, left: int) -> int:
    """Visible (query, key) pairs of the whole batch under causal (and a left window)."""
    total = 0
    for n in seqlens:
        if left < 0 or left >= n:
            total += n * (n + 1) // 2
        else:
            total += (left + 1) * n - left * (left + 1) // 2
    return total


def run_check(group, backend, heads, kv_heads, dim) -> list[str]:
    lengths = (4096, 1000, 0, 3001, 17)
    shard = zigzag_shard(lengths, group)
    gen = torch.Generator(device="cuda").manual_seed(0)
    total = sum(lengths)
    full = [torch.randn(total, h, dim, device="cuda", generator=gen, dtype=torch.float64)
            for h in (heads, kv_heads, kv_heads)]
    dout = torch.randn(total, heads, dim, device="cuda", generator=gen, dtype=torch.float64)
    info = attnhub.VarlenInfo.from_lengths(lengths, "cuda")
    lines = []
    for causal, window in ((True, None), (True, (512, 0)), (False, (300, 200))):
        def single(dtype, be, causal=causal, window=window):
            q, k, v = (t.detach().to(dtype, copy=True).requires_grad_() for t in full)
            out, lse = attnhub.attention_forward_varlen(
                q, k, v, info, info, causal=causal, window_size=window, return_lse=True,
                backend=be)
            (out.double() * dout).sum().backward()
            return [out.detach(), lse.detach(), q.grad, k.grad, v.grad]

        oracle = single(torch.float64, "reference")
        ref = single(torch.bfloat16, backend)
        for strategy in ("ring", "all_gather"):
            q, k, v = (shard.shard(t.detach()).to(torch.bfloat16).requires_grad_() for t in full)
            out, lse = context_parallel_attention(
                q, k, v, shard, group, causal=causal, window_size=window, return_lse=True,
                backend=backend, strategy=strategy)
            (out.double() * shard.shard(dout)).sum().backward()
            got = [out, lse, q.grad, k.grad, v.grad]
            for name, g, o, r in zip(("out", "lse", "dq", "dk", "dv"), got, oracle, ref,
                                     strict=True):
                o, r = ((shard.shard(o.T).T, shard.shard(r.T).T) if name == "lse"
                        else (shard.shard(o), shard.shard(r)))
                res = check(name, g.detach(), o, r, torch.bfloat16)
                if not res.ok:
                    lines.append(f"rank {shard.rank} causal={causal} window={window} "
                                 f"{strategy} {name}: {res.failure}")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--seqlens", type=int, nargs="+", default=[1 << 20])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--left", type=int, default=-1, help="left window (-1 = causal only)")
    parser.add_argument("--backend", default=None)
    parser.add_argument("--reps", type=int, default=5)
    parser.add_argument("--check", action="store_true")
    parser.add_argument("--out", default=None)
    args = parser.parse_args()
    local_rank = int(os.environ.get("LOCAL_RANK", 0))
    torch.cuda.set_device(local_rank)
    dist.init_process_group("nccl", device_id=torch.device("cuda", local_rank))
    rank, world = dist.get_rank(), dist.get_world_size()
    lines = [f"# Context parallelism over {world} GPUs ({datetime.date.today()})", "",
             f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
             f"attnhub {attnhub.__version__}, NCCL {torch.cuda.nccl.version()}.", ""]
    if args.check:
        failures = run_check(None, args.backend, args.heads, args.kv_heads, args.dim)
        gathered = [None] * world
        dist.all_gather_object(gathered, failures)
        flat = [f for fs in gathered for f in fs]
        lines += ["## Check against one GPU", "", "\n".join(flat) if flat else
                  "out, lse, dq, dk, dv: every rank within the conformance rule "
                  "(ring and all-gather; causal, causal window 512, window (300, 200)).", ""]
    shard = zigzag_shard(args.seqlens)
    window = (args.left, 0)
    q = torch.randn(shard.total, args.heads, args.dim, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    k = torch.randn(shard.total, args.kv_heads, args.dim, device="cuda", dtype=torch.bfloat16,
                    requires_grad=True)
    v = torch.randn_like(k, requires_grad=True)
    dout = torch.randn_like(q)
    flops = 4.0 * causal_pairs(args.seqlens, args.left) * args.heads * args.dim
    lines += [f"Global lengths {args.seqlens}, {shard.total} tokens on rank {rank}, heads "
              f"{args.heads}/{args.kv_heads}, head_dim {args.dim}, bf16, causal, left window "
              f"{args.left}.", "",
              "| strategy | fwd ms | fwd TFLOP/s (job) | fwd+bwd ms | fwd+bwd TFLOP/s (job) |",
              "|---|---|---|---|---|"]
    for strategy in ("ring", "all_gather"):
        def fwd(strategy=strategy):
            with torch.no_grad():
                context_parallel_attention(q, k, v, shard, causal=True, window_size=window,
                                           backend=args.backend, strategy=strategy)

        def fwd_bwd(strategy=strategy):
            out = context_parallel_attention(q, k, v, shard, causal=True, window_size=window,
                                             backend=args.backend, strategy=strategy)
            out.backward(dout)

        try:
            tf, tb = _time(fwd, args.reps), _time(fwd_bwd, args.reps)
            lines.append(f"| {strategy} | {tf:.2f} | {flops / tf / 1e9:.0f} | {tb:.2f} | "
                         f"{3.5 * flops / tb / 1e9:.0f} |")
        except torch.OutOfMemoryError:
            lines.append(f"| {strategy} | out of memory | | | |")
            torch.cuda.empty_cache()
    if rank == 0:
        text = "\n".join(lines) + "\n"
        print(text)
        if args.out:
            Path(args.out).write_text(text)
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
