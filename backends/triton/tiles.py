"""Flat tile lists: which (sequence, block) each program of a varlen launch works on.

A launch over a packed batch gets one program per block of rows of one sequence, not a
batch x cdiv(max_seqlen) grid of mostly idle programs. With host lengths the list is built
on the host, heaviest tiles first (causal tiles near the diagonal end do more work), and
cached per layout; without host lengths no list is built: the launch takes an upper bound
of programs, each finds its own tile from the offsets (``find_tile``), and the extra ones
exit at once.
"""

from __future__ import annotations

from collections import OrderedDict

import torch
import triton
import triton.language as tl

# Sequences whose offsets find_tile reads per step: fixed, so no batch size recompiles.
FIND_CHUNK = tl.constexpr(256)


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
    if hit is None:
        hit = _CACHE[key] = _host_tiles(rows, cols, block, window, top_left, rows_are_queries,
                                        torch.device(device).type == "cuda")
        if len(_CACHE) > _CACHE_SIZE:
            _CACHE.popitem(last=False)
    else:
        _CACHE.move_to_end(key)
    # The cache holds host tensors and each call copies them (asynchronously, from pinned
    # memory): a cached device tensor allocated inside a CUDA graph pool (torch.compile's
    # "reduce-overhead" warm-up, a capture) would outlive the graph and break its pool.
    return hit[0].to(device, non_blocking=True), hit[1].to(device, non_blocking=True)


def _host_tiles(rows: tuple[int, ...], cols: tuple[int, ...], block: int,
                window: tuple[int, int], top_left: bool, rows_are_queries: bool, pin: bool
                ) -> tuple[torch.Tensor, torch.Tensor]:
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
    return (seq.pin_memory(), blk.pin_memory()) if pin else (seq, blk)


@triton.jit
def find_tile(Cu, batch, pid, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """(b, blk) of program ``pid`` when the tiles of sequences 0..batch-1 (cdiv(length,
    BLOCK) each, offsets ``Cu``: batch + 1 ints) are numbered in sequence order; b == batch
    past the last tile. Reads the offsets CHUNK sequences at a time."""
    return find_tile_in_chunks(Cu, batch, pid, tl.arange(0, CHUNK), BLOCK, CHUNK)


@triton.jit
def find_tile_in_chunks(Cu, batch, pid, offs, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    """find_tile with the chunk's positions ``offs`` (0..CHUNK-1) given: a Gluon kernel
    passes them with its layout (gl.arange), and this body then compiles as Gluon."""
    zero = pid * 0  # the loop-carried values must be int32 tensors from the start
    b = batch + zero
    blk = zero
    before = zero  # tiles of the sequences of earlier chunks
    for start in range(0, batch, CHUNK):
        idx = start + offs
        ok = idx < tl.where(before <= pid, batch, 0)  # no loads once pid's sequence is behind
        lo = tl.load(Cu + idx, mask=ok, other=0)
        hi = tl.load(Cu + idx + 1, mask=ok, other=0)
        counts = (hi - lo + BLOCK - 1) // BLOCK
        ends = before + tl.cumsum(counts, 0)
        # at most one sequence of the whole batch holds pid (empty ones hold no tile)
        hit = (ends - counts <= pid) & (pid < ends)
        b = tl.minimum(b, tl.min(tl.where(hit, idx, batch), 0))
        blk += tl.sum(tl.where(hit, pid - (ends - counts), 0), 0)
        before += tl.sum(counts, 0)
    return b, blk


@triton.jit
def program_tile(TileSeq, TileBlk, Cu, batch, BLOCK: tl.constexpr,
                 DEVICE_TILES: tl.constexpr):
    """(sequence, block) of this program (axis 0): entry pid of the host-planned list
    (TileSeq, TileBlk), or with DEVICE_TILES found from the tiled side's offsets ``Cu``;
    b >= batch means no work."""
    pid = tl.program_id(0)
    if DEVICE_TILES:
        b, blk = find_tile(Cu, batch, pid, BLOCK, FIND_CHUNK)
    else:
        b = tl.load(TileSeq + pid)
        blk = tl.load(TileBlk + pid)
    return b, blk


# CUDA's limit on a grid's y and z extents
GRID_YZ_MAX = 65535


def launch_grid(programs: int, heads: int, group: int = 1) -> tuple[int, ...]:
    """The grid of a launch of ``programs`` tiles per query head over ``heads`` query heads:
    (programs, heads), or with ``group`` > 1 (query heads per K/V head) (group, programs,
    heads // group). The second order numbers the programs of one tile whose query heads
    share a K/V head consecutively, so they run side by side and that head's K/V blocks can
    come from L2; a kernel launched on it takes its head as program_id(2) * group +
    program_id(0) and its tile from axis 1. Tile counts past CUDA's y limit keep the first
    order."""
    if group > 1 and programs <= GRID_YZ_MAX:
        return (group, programs, heads // group)
    return (programs, heads)
