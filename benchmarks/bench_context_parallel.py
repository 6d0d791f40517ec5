"""One rank's share of context-parallel attention, simulated on one GPU: for a global packed
batch zigzag-sharded over --world ranks, rank --rank's ring steps are computed one after the
other (its K/V block of each step is that source rank's shard, so the calls are exactly the
ones the ring makes) with no transfer. Per step: forward time of the step's calls, the time of
the lse merge that folds it into the running result, and backward time; TFLOP/s from the
exact visible-pair count. Also the load balance over ranks (host-only, from the step plans).

First (unless --no-check), every rank of a small job is simulated on the GPU and out, lse,
dq, dk, dv are compared with the float64 reference under the conformance rule, for the ring
and the all-gather plans: the GPU backends' step arithmetic (merged-statistics backward
included), without the transport.

Run on one H200 (< 2 min with the defaults):
    python benchmarks/bench_context_parallel.py --out docs/benchmarks/cp-steps.md
Host-only load-balance table (no GPU): python benchmarks/bench_context_parallel.py --plan-only
"""

from __future__ import annotations

import argparse
import datetime
import sys
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parent))
from cp_simulate import simulate
from cp_workload import rank_work, visible_pairs

from attnhub.distributed import ContextShard
from attnhub.distributed.block_attention import (
    AttentionOptions,
    _prepare,
    block_backward,
)
from attnhub.distributed.merge import PartialSum
from attnhub.distributed.step_plan import ring_step_calls

CONFIGS = [  # (label, global per-sequence lengths, world)
    ("1 x 1M tokens, world 8 (128k per rank)", (1 << 20,), 8),
    ("1 x 128k tokens, world 8 (16k per rank)", (1 << 17,), 8),
    ("8 x 16k tokens packed, world 4 (32k per rank)", (1 << 14,) * 8, 4),
]
BALANCE_ONLY = [  # uneven lengths: the load-balance table only
    ("100003 + 31337 + 4097 + 7 + 0 tokens, world 8", (100003, 31337, 4097, 7, 0), 8),
    ("100003 + 31337 + 4097 + 7 + 0 tokens, world 3", (100003, 31337, 4097, 7, 0), 3),
]


def _events():
    return torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)


def bench_rank(seqlens, world, rank, heads, kv_heads, dim, dtype, backend, window, reps):
    """Per step: (src, pairs, forward ms, merge ms, backward ms), medians over reps."""
    left, right = window
    shard = ContextShard(tuple(seqlens), world, rank)
    dev = "cuda"
    q = torch.randn(shard.total, heads, dim, device=dev, dtype=dtype)
    blocks = {}
    for src in range(world):
        n = shard.local_info(src).total
        blocks[src] = (torch.randn(n, kv_heads, dim, device=dev, dtype=dtype),
                       torch.randn(n, kv_heads, dim, device=dev, dtype=dtype))
    opts = AttentionOptions(scale=dim ** -0.5, softcap=0.0, deterministic=False,
                            requires_grad=True, backend=backend)
    rows = {src: ([], [], []) for src in range(world)}
    for rep in range(reps + 1):
        acc = PartialSum(q)
        for i in range(world):
            src = (rank - i) % world
            calls = ring_step_calls(shard, src, left, right)
            k, v = blocks[src]
            t_fwd = t_merge = 0.0
            for call in calls:
                problem, inputs, be = _prepare(q, k, v, call, opts)
                a, b = _events()
                a.record()
                res = be.forward(problem, inputs)
                b.record()
                c, d = _events()
                c.record()
                acc.add(res.out, res.lse)
                d.record()
                torch.cuda.synchronize()
                t_fwd += a.elapsed_time(b)
                t_merge += c.elapsed_time(d)
            if rep:
                rows[src][0].append(t_fwd)
                rows[src][1].append(t_merge)
        out, lse = acc.result(dtype)
        dout = torch.randn_like(out)
        dq = torch.zeros(q.shape, dtype=torch.float32, device=dev)
        for i in range(world):
            src = (rank - i) % world
            k, v = blocks[src]
            a, b = _events()
            a.record()
            block_backward(q, k, v, ring_step_calls(shard, src, left, right), opts, out, lse,
                           dout, None, dq)
            b.record()
            torch.cuda.synchronize()
            if rep:
                rows[src][2].append(a.elapsed_time(b))
    med = lambda xs: sorted(xs)[len(xs) // 2] if xs else 0.0  # noqa: E731
    result = []
    for i in range(world):
        src = (rank - i) % world
        pairs = visible_pairs(ring_step_calls(shard, src, left, right))
        f, m, bw = rows[src]
        result.append((i, src, len(ring_step_calls(shard, src, left, right)), pairs, med(f),
                       med(m), med(bw)))
    return result


def check_steps(backend: str | None, heads: int, kv_heads: int, dim: int,
                device: str = "cuda", lengths: tuple[int, ...] = (4096, 1000, 0, 3001, 17),
                world: int = 4) -> list[str]:
    """Conformance of a simulated ``world``-rank job against the float64 reference (lines of
    a markdown table)."""
    import dataclasses

    import attnhub
    from attnhub.conformance.tolerance import check

    info = attnhub.VarlenInfo.from_lengths(lengths, device)
    gen = torch.Generator(device=device).manual_seed(0)
    total = sum(lengths)
    full = [torch.randn(total, h, dim, device=device, generator=gen, dtype=torch.float64)
            for h in (heads, kv_heads, kv_heads, heads)]
    lines = ["| mask | strategy | backend (global call) | out | lse | dq | dk | dv |",
             "|---|---|---|---|---|---|---|---|"]
    for causal, window in ((True, None), (True, (512, 0)), (False, (300, 200))):
        left, right = (-1, 0) if window is None else window

        def single(dtype, be, causal=causal, window=window):
            q, k, v = (t.detach().to(dtype, copy=True).requires_grad_() for t in full[:3])
            out, lse = attnhub.attention_forward_varlen(
                q, k, v, info, info, causal=causal, window_size=window, return_lse=True,
                backend=be)
            (out.double() * full[3]).sum().backward()
            return [out.detach(), lse.detach(), q.grad, k.grad, v.grad]

        oracle, ref = single(torch.float64, "reference"), single(torch.bfloat16, backend)
        q, k, v, dout = (t.to(torch.bfloat16) for t in full)
        opts = AttentionOptions(scale=dim ** -0.5, softcap=0.0, deterministic=False,
                                requires_grad=True, backend=backend)
        problem, _ = attnhub.normalize(q, k, v, info, info, causal=causal, window_size=window)
        chosen = attnhub.select(dataclasses.replace(problem, requires_grad=True), backend)
        for strategy in ("ring", "all_gather"):
            got = simulate(lengths, world, q, k, v, dout, (left, right), opts, strategy)
            cells = []
            for name, g, o, r in zip(("out", "lse", "dq", "dk", "dv"), got, oracle, ref,
                                     strict=True):
                res = check(name, g, o, r, torch.bfloat16)
                cells.append(f"{res.error:.1e} {'ok' if res.ok else 'FAIL'}")
            lines.append(f"| causal={causal} window={window} | {strategy} | {chosen.name} | "
                         + " | ".join(cells) + " |")
    return lines


def balance_table(configs, window) -> list[str]:
    lines = ["| workload | world | visible pairs per rank: max / mean "
             "| tokens per rank: max / min |",
             "|---|---|---|---|"]
    for label, seqlens, world in configs:
        work = rank_work(tuple(seqlens), world, *window)
        toks = [ContextShard(tuple(seqlens), world, r).total for r in range(world)]
        lines.append(f"| {label} | {world} | {max(work) / (sum(work) / world):.4f} | "
                     f"{max(toks)} / {min(toks)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--heads", type=int, default=32)
    parser.add_argument("--kv-heads", type=int, default=8)
    parser.add_argument("--dim", type=int, default=128)
    parser.add_argument("--backend", default=None, help="force a backend (default: dispatch)")
    parser.add_argument("--rank", type=int, default=0, help="the simulated rank")
    parser.add_argument("--window", type=int, nargs=2, default=(-1, 0),
                        help="global (left, right); default causal (-1 0)")
    parser.add_argument("--reps", type=int, default=2)
    parser.add_argument("--plan-only", action="store_true", help="load balance only, no GPU")
    parser.add_argument("--no-check", action="store_true", help="skip the conformance check")
    parser.add_argument("--out", default=None, help="also write the markdown here")
    args = parser.parse_args()
    window = tuple(args.window)
    lines = [f"# Context parallelism: one rank's ring steps on one GPU ({datetime.date.today()})",
             "", f"Window {window} (causal = (-1, 0)), heads {args.heads}/{args.kv_heads}, "
             f"head_dim {args.dim}, bf16, simulated rank {args.rank}.", "",
             "## Load balance (host-only, from the step plans)", "",
             *balance_table(CONFIGS + BALANCE_ONLY, window), ""]
    if not args.plan_only:
        import attnhub
        lines.insert(3, f"{torch.cuda.get_device_name()}, torch {torch.__version__}, "
                        f"attnhub {attnhub.__version__}.")
        if not args.no_check:
            table = check_steps(args.backend, args.heads, args.kv_heads, args.dim)
            lines += ["## Simulated 4-rank job against the float64 reference "
                      "(max abs error, conformance rule)", "", *table, ""]
            print("\n".join(table), flush=True)
        for label, seqlens, world in CONFIGS:
            res = bench_rank(seqlens, world, args.rank, args.heads, args.kv_heads, args.dim,
                             torch.bfloat16, args.backend, window, args.reps)
            lines += [f"## {label}", "",
                      "| step | source rank | calls | visible pairs | fwd ms | fwd TFLOP/s | "
                      "merge ms | merge / fwd | bwd ms | bwd TFLOP/s |",
                      "|---|---|---|---|---|---|---|---|---|---|"]
            tot = [0.0, 0.0, 0.0]
            for step, src, ncalls, pairs, f, m, bw in res:
                flops = 4.0 * pairs * args.heads * args.dim
                lines.append(f"| {step} | {src} | {ncalls} | {pairs:.3e} | {f:.3f} | "
                             f"{flops / f / 1e9 if f else 0:.0f} | {m:.3f} | "
                             f"{m / f if f else 0:.3f} | {bw:.3f} | "
                             f"{2.5 * flops / bw / 1e9 if bw else 0:.0f} |")
                tot = [tot[0] + f, tot[1] + m, tot[2] + bw]
            lines += ["", f"Total: forward {tot[0]:.2f} ms, merges {tot[1]:.2f} ms "
                      f"({tot[1] / tot[0]:.1%} of forward), backward {tot[2]:.2f} ms.", ""]
            print("\n".join(lines[-len(res) - 6:]), flush=True)
    text = "\n".join(lines) + "\n"
    print(text)
    if args.out:
        Path(args.out).write_text(text)


if __name__ == "__main__":
    main()
