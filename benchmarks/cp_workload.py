"""Shared by the context-parallel benchmarks: exact work counts of the step plans.

``visible_pairs`` counts the (query, key) pairs a call's pieces compute, from their windows;
4 * pairs * nheads * head_dim is the forward's matmul FLOPs.
"""

from __future__ import annotations

import torch

from attnhub.distributed import ContextShard
from attnhub.distributed.calls import StepCall
from attnhub.distributed.step_plan import ring_step_calls


def visible_pairs(calls: tuple[StepCall, ...]) -> int:
    """(query, key) pairs under the mask, summed over the calls' pieces."""
    total = 0
    for call in calls:
        for p in call.pieces:
            lq, lk = p.q1 - p.q0, p.k1 - p.k0
            left, right = p.window
            i = torch.arange(lq, dtype=torch.int64)
            lo = (i + lk - lq - left).clamp(min=0) if left >= 0 else torch.zeros_like(i)
            hi = (i + lk - lq + right).clamp(max=lk - 1) if right >= 0 else torch.full_like(
                i, lk - 1)
            total += int((hi - lo + 1).clamp(min=0).sum())
    return total


def rank_work(seqlens: tuple[int, ...], world: int, left: int, right: int) -> list[int]:
    """Visible pairs each rank computes over a whole ring."""
    return [sum(visible_pairs(ring_step_calls(ContextShard(seqlens, world, r), src, left, right))
                for src in range(world)) for r in range(world)]
