"""Which calls each step of context-parallel attention makes (host data, cached).

A ring step pairs this rank's query chunks with the key chunks of one source rank; the
all-gather variant pairs them with every sequence's whole key range. Each (query chunk,
key chunk) pair becomes a piece (attnhub.distributed.pieces), empty pairs are dropped, and
the pieces are packed into as few calls as their windows allow (attnhub.distributed.calls).
Under a plain causal mask every ring step is one call; with a window, sequences whose chunk
pairs need different windows are computed by separate calls of the step.
"""

from __future__ import annotations

from functools import lru_cache

from .calls import StepCall, pack_calls
from .pieces import Piece, band_piece, merge_full
from .zigzag import ContextShard


@lru_cache(maxsize=1024)
def ring_step_calls(shard: ContextShard, src: int, left: int, right: int
                    ) -> tuple[StepCall, ...]:
    """The calls of the ring step where ``shard.rank`` holds the K/V block of rank ``src``.
    (left, right): the global window, causal folded in as right = 0, -1 = unbounded."""
    q_info, k_info = shard.local_info(), shard.local_info(src)
    pieces: list[Piece] = []
    if src == shard.rank and left < 0 and right <= 0:
        # The local rows of a sequence are in position order on both sides, so plain causal
        # (or no mask) over the concatenated chunks is the exact mask: one piece each.
        for s, n in enumerate(q_info.seqlens):
            if n:
                row = q_info.cu_seqlens_host[s]
                pieces.append(Piece(row, row + n, row, row + n, (-1, right)))
    else:
        q_spans, k_spans = shard.spans(), shard.spans(src)
        for s in range(len(shard.seqlens)):
            q_row = q_info.cu_seqlens_host[s]
            for q_span in q_spans[s]:
                k_row = k_info.cu_seqlens_host[s]
                for k_span in k_spans[s]:
                    piece = band_piece(q_row, q_span, k_row, k_span, left, right)
                    if piece is not None:
                        pieces.append(piece)
                    k_row += k_span[1] - k_span[0]
                q_row += q_span[1] - q_span[0]
        pieces = merge_full(pieces)
    return tuple(pack_calls(pieces, q_info.total, k_info.total))


@lru_cache(maxsize=256)
def gathered_calls(shard: ContextShard, left: int, right: int) -> tuple[StepCall, ...]:
    """The calls of this rank's queries against the whole K/V batch in global packed order
    (the all-gather variant)."""
    q_info, g_info = shard.local_info(), shard.global_info
    pieces: list[Piece] = []
    for s, spans in enumerate(shard.spans()):
        q_row = q_info.cu_seqlens_host[s]
        for q_span in spans:
            piece = band_piece(q_row, q_span, g_info.cu_seqlens_host[s], (0, g_info.seqlens[s]),
                               left, right)
            if piece is not None:
                pieces.append(piece)
            q_row += q_span[1] - q_span[0]
    return tuple(pack_calls(pieces, q_info.total, g_info.total))


def active_steps(shard: ContextShard, left: int, right: int) -> tuple[bool, ...]:
    """Per ring step i (source rank (rank - i) mod world), whether it computes anything."""
    w = shard.world_size
    return tuple(bool(ring_step_calls(shard, (shard.rank - i) % w, left, right))
                 for i in range(w))
