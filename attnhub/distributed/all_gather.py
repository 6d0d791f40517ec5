"""The all-gather variant: every rank gathers the whole K/V batch (KV heads only), computes
its queries against it in the global packed order, and sends the dK/dV of every other rank's
rows back with one reduce-scatter (gloo: all-reduce; deterministic mode: all-to-all and a sum
in rank order). Fewer, larger transfers than the ring; K/V of the whole batch on every rank.
The gathered K/V is not kept for backward: it is gathered again there.
"""

from __future__ import annotations

import torch

from .block_attention import AttentionOptions, block_backward, block_forward, finish_forward
from .merge import PartialSum, accumulation_dtype
from .step_plan import gathered_calls
from .transport import all_gather_rows, reduce_rows
from .zigzag import ContextShard


def _gather_kv(shard: ContextShard, group, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    rows = [shard.local_info(r).total for r in range(shard.world_size)]
    parts = all_gather_rows(torch.stack([k, v], dim=1), rows, group)
    kv = shard.unshard(parts)
    return kv[:, 0].contiguous(), kv[:, 1].contiguous()


class AllGatherAttention(torch.autograd.Function):
    """(q, k, v) local shards -> (out, lse) of this rank's queries against the whole batch."""

    @staticmethod
    def forward(ctx, q, k, v, shard: ContextShard, group, window: tuple[int, int],
                opts: AttentionOptions):
        k_all, v_all = _gather_kv(shard, group, k, v)
        acc = PartialSum(q)
        block_forward(q, k_all, v_all, gathered_calls(shard, *window), opts, acc)
        return finish_forward(ctx, acc, (q, k, v), (shard, group, window, opts))

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        shard, group, window, opts = ctx.setup
        if dout is None:
            dout = torch.zeros_like(out)
        k_all, v_all = _gather_kv(shard, group, k, v)
        dq = torch.zeros(q.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
        share = block_backward(q, k_all, v_all, gathered_calls(shard, *window), opts, out, lse,
                               dout, dlse, dq)
        if share is None:
            share = (torch.zeros(k_all.shape, dtype=accumulation_dtype(k.dtype), device=k.device),
                     torch.zeros(v_all.shape, dtype=accumulation_dtype(v.dtype), device=v.device))
        dkv_all = torch.stack(share, dim=1)
        w = shard.world_size
        parts = [dkv_all.index_select(0, shard.global_rows(dkv_all.device, r)) for r in range(w)]
        rows = [shard.local_info(r).total for r in range(w)]
        dkv = reduce_rows(parts, rows, shard.rank, group, opts.deterministic)
        return (dq.to(q.dtype), dkv[:, 0].to(k.dtype), dkv[:, 1].to(v.dtype), None, None, None,
                None)
