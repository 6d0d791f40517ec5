"""Flat tile lists: which (sequence, block) each program of a varlen launch works on.

A launch over a packed batch gets one program per block of rows of one sequence, not a
batch x cdiv(max_seqlen) grid of mostly idle programs. With host lengths the list is built
on the host, heaviest tiles first (causal tiles near the diagonal end do more work), and
cached per layout; without host lengths it is built on the device with no synchronisation,
as an upper bound whose extra programs exit at once.
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class Schedule:
    """A plan's precomputed forward tile list: (tile_seq, tile_block) int32 on the device."""

    fwd: tuple[torch.Tensor, torch.Tensor]


_CACHE: OrderedDict[tuple, tuple[torch.Tensor, torch.Tensor]] = OrderedDict()
_CACHE_SIZE = 64


def _band(length_rows: int, length_cols: int, start: int, stop: int, offset: int,
          window: tuple[int, int], rows_are_queries: bool) -> int:
    """How many of the other side's positions the rows [start, stop) can see (work estimate)."""
    left, right = window if rows_are_queries else (window[1], window[0])
    off = offset if rows_are_queries else -offset
    lo = max(0, start + off - left) if left >= 0 else 0
    hi = min(length_cols, stop - 1 + off + right + 1) if right >= 0 else length_cols
    return max(0, hi - lo)


def host_tiles(rows: tuple[int, ...], cols: tuple[int, ...], block: int, window: tuple[int, int],
               top_left: bool, rows_are_queries: bool, device: torch.device
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile_seq, tile_block) int32 on ``device``, longest work first. ``rows``: lengths on
    the tiled side; ``cols``: lengths on the other side."""
    key = (rows, cols, block, window, top_left, rows_are_queries, device)
    hit = _CACHE.get(key)
    if hit is not None:
        _CACHE.move_to_end(key)
        return hit
    work = []
    for b, (n, m) in enumerate(zip(rows, cols, strict=True)):
        sq, sk = (n, m) if rows_are_queries else (m, n)
        offset = 0 if top_left else sk - sq
        for t in range(-(-n // block)):
            w = _band(n, m, t * block, min(n, (t + 1) * block), offset, window, rows_are_queries)
            work.append((w, b, t))  # tiles with no work still write their zeros
    work.sort(key=lambda x: -x[0])
    seq = torch.tensor([b for _, b, _ in work], dtype=torch.int32)
    blk = torch.tensor([t for _, _, t in work], dtype=torch.int32)
    result = (seq.to(device, non_blocking=True), blk.to(device, non_blocking=True))
    _CACHE[key] = result
    if len(_CACHE) > _CACHE_SIZE:
        _CACHE.popitem(last=False)
    return result


def device_tiles(cu_seqlens: torch.Tensor, total: int, block: int
                 ) -> tuple[torch.Tensor, torch.Tensor]:
    """(tile_seq, tile_block) built on the device from offsets alone: cdiv(total, block) +
    batch entries (an upper bound); entries past the real tiles have tile_seq == batch."""
    batch = cu_seqlens.shape[0] - 1
    lengths = (cu_seqlens[1:] - cu_seqlens[:-1]).to(torch.int64)
    counts = (lengths + block - 1) // block
    ends = torch.cumsum(counts, 0)
    upper = -(-total // block) + batch
    idx = torch.arange(upper, device=cu_seqlens.device, dtype=torch.int64)
    seq = torch.searchsorted(ends, idx, right=True)
    starts = ends - counts
    blk = idx - starts[seq.clamp(max=max(batch - 1, 0))] if batch > 0 else idx
    return seq.to(torch.int32), blk.to(torch.int32)
