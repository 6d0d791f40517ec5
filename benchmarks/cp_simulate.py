"""Every rank of a context-parallel job computed in one process, without transfers: each
rank's ring steps (or its all-gather calls) on the K/V rows of the step's source rank, and
the backward with dK/dV added to their owners' rows. What the ring computes, minus the
transport; used to check the GPU backends' step arithmetic on one device."""

from __future__ import annotations

import torch

from attnhub.distributed import ContextShard
from attnhub.distributed.block_attention import AttentionOptions, block_backward, block_forward
from attnhub.distributed.merge import PartialSum
from attnhub.distributed.step_plan import gathered_calls, ring_step_calls


def simulate(seqlens: tuple[int, ...], world: int, q, k, v, dout, window: tuple[int, int],
             opts: AttentionOptions, strategy: str = "ring"):
    """Global (out, lse, dq, dk, dv) of q, k, v (global packed tensors) through ``world``
    simulated ranks."""
    out = torch.empty_like(q)
    lse = torch.empty(q.shape[1], q.shape[0], dtype=torch.float32, device=q.device)
    dq = torch.empty_like(q)
    dk = torch.zeros(k.shape, dtype=torch.float32, device=k.device)
    dv = torch.zeros(v.shape, dtype=torch.float32, device=v.device)
    for r in range(world):
        sh = ContextShard(tuple(seqlens), world, r)
        rows = sh.global_rows(q.device)
        ql, dl = sh.shard(q), sh.shard(dout)
        if strategy == "ring":
            blocks = [(sh.global_rows(q.device, src), ring_step_calls(sh, src, *window))
                      for src in range(world)]
        else:
            blocks = [(torch.arange(k.shape[0], device=q.device), gathered_calls(sh, *window))]
        acc = PartialSum(ql)
        for krows, calls in blocks:
            block_forward(ql, k[krows], v[krows], calls, opts, acc)
        o, lv = acc.result(q.dtype)
        dql = torch.zeros(ql.shape, dtype=torch.float32, device=q.device)
        for krows, calls in blocks:
            share = block_backward(ql, k[krows], v[krows], calls, opts, o, lv, dl, None, dql)
            if share is not None:
                dk.index_add_(0, krows, share[0])
                dv.index_add_(0, krows, share[1])
        out[rows], lse[:, rows], dq[rows] = o, lv, dql.to(q.dtype)
    return out, lse, dq, dk.to(k.dtype), dv.to(v.dtype)
