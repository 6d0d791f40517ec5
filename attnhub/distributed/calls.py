"""StepCall: one attnhub call covering whole query and key tensors, built from pieces.

Pieces with the same window and increasing rows on both sides become the sequences of one
varlen call; the rows between them become filler sequences with zero keys (their output
is 0, lse -inf) or zero queries (no work), so no row is copied or gathered.
"""

from __future__ import annotations

from dataclasses import dataclass

from ..varlen_info import VarlenInfo
from .pieces import Piece


@dataclass(frozen=True)
class StepCall:
    """One dispatch call: layouts of the query and key sides, ``causal`` and ``window_size``
    as attention_forward_varlen takes them, and the pieces it computes."""

    info_q: VarlenInfo
    info_k: VarlenInfo
    causal: bool
    window_size: tuple[int, int] | None
    pieces: tuple[Piece, ...]


def pack_calls(pieces: list[Piece], total_q: int, total_k: int) -> list[StepCall]:
    """Group ``pieces`` into as few calls as their windows and row overlaps allow."""
    chains: dict[tuple[int, int], list[list[Piece]]] = {}
    for p in sorted(pieces, key=lambda x: (x.q0, x.k0)):
        lanes = chains.setdefault(p.window, [])
        for lane in lanes:
            last = lane[-1]
            if last.q1 <= p.q0 and last.k1 <= p.k0:
                lane.append(p)
                break
        else:
            lanes.append([p])
    calls = []
    for window, lanes in sorted(chains.items()):
        for lane in lanes:
            calls.append(_call(lane, window, total_q, total_k))
    return calls


def _call(lane: list[Piece], window: tuple[int, int], total_q: int, total_k: int) -> StepCall:
    cq, ck = [0], [0]

    def gap(q_to: int, k_to: int) -> None:
        if q_to > cq[-1]:  # queries with no key in this call
            cq.append(q_to)
            ck.append(ck[-1])
        if k_to > ck[-1]:  # keys no query of this call reads
            cq.append(cq[-1])
            ck.append(k_to)

    for p in lane:
        gap(p.q0, p.k0)
        cq.append(p.q1)
        ck.append(p.k1)
    gap(total_q, total_k)
    left, right = window
    causal = right == 0
    window_size = None if (left, right) in ((-1, -1), (-1, 0)) else (left, right)
    return StepCall(VarlenInfo(cq), VarlenInfo(ck), causal, window_size, tuple(lane))
