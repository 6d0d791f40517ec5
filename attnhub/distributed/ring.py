"""Ring attention over the zigzag shard: K/V blocks travel rank r -> r + 1 while each rank
computes its queries against the block it holds; dK/dV travel back with their blocks.

Step i: rank r holds the K/V block of rank (r - i) mod world (only the KV heads, k and v
stacked into one tensor), starts sending it to r + 1 and receiving the next one from r - 1,
computes the step's calls, and waits. Steps that the mask leaves empty compute nothing; when
a window leaves every step after some step n empty on every rank, the ring stops after n
steps. Backward walks the same ring: each block's float32 dK/dV accumulator (float64 for
float64 inputs) is received from r - 1, gets this rank's share, and goes on to r + 1; after
the last step it is sent straight to the block's owner. Every sum runs in a fixed order: the
result is reproducible run to run.
"""

from __future__ import annotations

from functools import lru_cache

import torch

from .block_attention import AttentionOptions, block_backward, block_forward, finish_forward
from .merge import PartialSum, accumulation_dtype
from .step_plan import active_steps, ring_step_calls
from .transport import Exchange
from .zigzag import ContextShard


@lru_cache(maxsize=256)
def ring_length(shard: ContextShard, left: int, right: int) -> int:
    """How many ring steps any rank needs (1 + the last step that computes on some rank)."""
    last = 0
    for r in range(shard.world_size):
        view = ContextShard(shard.seqlens, shard.world_size, r)
        for i, active in enumerate(active_steps(view, left, right)):
            if active:
                last = max(last, i)
    return last + 1


class RingAttention(torch.autograd.Function):
    """(q, k, v) local shards -> (out, lse) of this rank's queries against the whole batch."""

    @staticmethod
    def forward(ctx, q, k, v, shard: ContextShard, group, window: tuple[int, int],
                opts: AttentionOptions):
        w, rank = shard.world_size, shard.rank
        steps = ring_length(shard, *window)
        kv = torch.stack([k, v])
        acc = PartialSum(q)
        for i in range(steps):
            src = (rank - i) % w
            ex = Exchange(group)
            if i + 1 < steps:
                ex.send(kv, (rank + 1) % w)
                nxt = (rank - i - 1) % w
                ex.recv(kv, (2, shard.local_info(nxt).total, *kv.shape[2:]), (rank - 1) % w)
            ex.start()
            block_forward(q, kv[0], kv[1], ring_step_calls(shard, src, *window), opts, acc)
            received = ex.wait()
            if received:
                kv = received[0]
        return finish_forward(ctx, acc, (q, k, v), (shard, group, window, opts))

    @staticmethod
    def backward(ctx, dout, dlse):
        q, k, v, out, lse = ctx.saved_tensors
        shard, group, window, opts = ctx.setup
        w, rank = shard.world_size, shard.rank
        steps = ring_length(shard, *window)
        if dout is None:
            dout = torch.zeros_like(out)
        dq = torch.zeros(q.shape, dtype=accumulation_dtype(q.dtype), device=q.device)
        kv = torch.stack([k, v])
        dkv: torch.Tensor | None = None  # the dK/dV accumulator of the block held last step
        for i in range(steps):
            src = (rank - i) % w
            block = kv
            ex = Exchange(group)
            if i + 1 < steps:
                ex.send(kv, (rank + 1) % w)
                nxt = (rank - i - 1) % w
                ex.recv(kv, (2, shard.local_info(nxt).total, *kv.shape[2:]), (rank - 1) % w)
            if i > 0:
                assert dkv is not None
                ex.send(dkv, (rank + 1) % w, tag=1)
                ex.recv(dkv, (2, shard.local_info(src).total, *kv.shape[2:]), (rank - 1) % w,
                        tag=1)
            ex.start()
            share = block_backward(q, block[0], block[1], ring_step_calls(shard, src, *window),
                                   opts, out, lse, dout, dlse, dq)
            received = ex.wait()
            if i + 1 < steps:
                kv = received.pop(0)
            if i > 0:
                dkv = received[0]
                if share is not None:
                    dkv[0].add_(share[0])
                    dkv[1].add_(share[1])
            else:
                dkv = torch.stack(share) if share is not None else torch.zeros(
                    block.shape, dtype=accumulation_dtype(block.dtype), device=block.device)
        assert dkv is not None
        if steps > 1:  # the accumulator held last belongs to rank - (steps - 1)
            ex = Exchange(group)
            ex.send(dkv, (rank - steps + 1) % w)
            ex.recv(dkv, (2, shard.total, *kv.shape[2:]), (rank + steps - 1) % w)
            dkv = ex.start().wait()[0]
        return (dq.to(q.dtype), dkv[0].to(k.dtype), dkv[1].to(v.dtype), None, None, None, None)
