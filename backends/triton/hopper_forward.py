"""Warp-specialised varlen forward for Hopper (sm_90), written in Gluon.

The forward without dropout, custom mask or pages (head dim 64, 128 or 256; a sum of two
powers of two, 80, 96, 144, 160 or 192, read as two column chunks; any other multiple of 8 in
between read zero-padded to the next of 64 / 128 / 256; fp16/bf16; causal, windows, softcap,
ALiBi and attention sinks allowed) of the Triton backend on an H100/H200. One program per
(query tile of 128 rows, query head), as the tl kernel (forward.py), but scheduled by hand:

* a producer warp streams K and V blocks through TMA into a ring of STAGES shared buffers,
  one mbarrier per buffer and direction (ready / empty), K and V apart so QK^T starts before
  V has landed;
* two consumer warpgroups (8 warps, 64 query rows each) issue QK^T of block j and P V of
  block j - 1 as asynchronous wgmma, and compute block j's softmax while P V still runs
  (FlashAttention-3's intra-warpgroup overlap, Shah et al. 2024, section 3.2).

Without host lengths (device cu_seqlens and max_seqlen only) the launch takes the tl kernel's
upper bound of programs: each finds its (sequence, block) from cu_seqlens_q before the
partitions split (tiles.find_tile_in_chunks), so producer and consumers share it, and the
extra programs exit. Head dim 256 streams 64-key blocks (CONFIG). GQA calls with a right key
bound launch the query heads of one K/V head side by side (tiles.launch_grid, grouped_heads).

Semantics match forward.py exactly (softcap through the same tanh, softcap.py, in the same
base-2 units as forward.score_tile, ALiBi on every block; bottom-right or top-left
alignment, windows, lse in natural log, rows that see no key: zeros and lse -inf, or lse =
the sink with sinks). Rows past a sequence's end that a K/V box reads are masked in the
scores and zeroed in V before P V, so no sequence reads another's values
(tests/test_triton_loads.py). Needs ``triton.experimental.gluon`` with Hopper's wgmma
(Triton 3.5+); the tl kernel serves every other call.
"""

from __future__ import annotations

import functools

import torch

from .softcap import mode as softcap_mode

try:
    from triton.experimental import gluon
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )
    from triton.experimental.gluon.nvidia.hopper import TensorDescriptor

    from .softcap import tanh_half
    from .tiles import FIND_CHUNK, find_tile_in_chunks, launch_grid
except ImportError:  # no Gluon (Triton < 3.5): the tl kernel serves every call
    gluon = None

BLOCK_M = 128  # query rows per program (two consumer warpgroups of 64); see block_m()
# (key block per padded head dim, stages, consumer registers, producer registers), from
# benchmarks on an H200 (docs/performance.md); head dim 256 takes 64-key blocks so that the
# 64 x 256 fp32 accumulator (128 registers a thread) and the scores fit the consumers'
# registers and Q plus two K and V stages fit shared memory (192 KiB). split: read head dims
# 80-192 as two column chunks (split_widths). block_m: query rows per program by width, 128
# or 192 (three consumer warpgroups of 64 rows, as FA3 tiles head dim 64, with
# consumer_regs_three registers each; Q as three 64-row boxes): at head dim 64 192 rows took
# 0.87-0.95x the time of 128 on medium and long lengths and non-causal short ones, and
# 1.13-1.14x on causal short ones (sequences 1-256; H200, docs/performance.md v17), whence
# causal_short_rows: width -> (longest query sequence, rows) for causal calls whose every
# query sequence is at most that long (a host length or a given max_seqlen). grouped_heads:
# GQA calls with a right key bound launch on tiles.launch_grid's (group, programs, K/V heads)
# (grouped_heads()): 0.93-0.99x the time on the causal GQA matrix cells, nothing gained
# without a mask (H200, docs/performance.md v21).
CONFIG = {"block_n": {64: 128, 128: 128, 256: 64}, "block_m": {64: 192, 128: 128, 256: 128},
          "causal_short_rows": {64: (256, 128)},
          "stages": 2, "consumer_regs": 240, "consumer_regs_three": 160, "producer_regs": 24,
          "split": True, "grouped_heads": True}
HEAD_DIMS = (64, 128, 256)  # other head dims are read zero-padded to the next of these
# width -> the longest query sequence below which the tl forward serves instead: at width
# 128 with every sequence 1-256 tokens long the tl kernel took 0.265 ms against 0.286 (H200,
# 16k tokens, GQA 4 and 8; docs/performance.md); not measured at the other widths
TL_BELOW = {128: 256}
# widths at which softcap calls with device offsets only (no host lengths) take the tl
# forward: the Gluon kernel ran 0.76-0.81x the tl one on W2 and 0.93-0.95x on W1 (H200,
# d128, docs/benchmarks/2026-12-03-h200-gluon-next.md; the cause is not found)
TL_SOFTCAP_DEVICE_OFFSETS = (128,)
# ALiBi's distances |i + sk - sq - j| are formed from float32 positions, exact (equal to the
# tl kernel's integer distances) while every sequence is at most this long
ALIBI_MAX_SEQLEN = 1 << 24

if gluon is not None:

    @gluon.jit
    def box_coordinates(row, head, HEAD_DIM: gl.constexpr, PADDED: gl.constexpr):
        """A TMA box's coordinates: (row, head * HEAD_DIM) in the (rows, heads * HEAD_DIM)
        view, or (row, head, 0) in the (rows, heads, HEAD_DIM) view when PADDED."""
        if PADDED:
            return [row, head, 0]
        else:
            return [row, head * HEAD_DIM]

    @gluon.constexpr_function
    def _swizzle(cols):
        """The NVMMA swizzle of 16-bit rows ``cols`` wide: 128 bytes, or the row itself when
        narrower (TMA's default for such boxes)."""
        return min(128, cols * 2)

    @gluon.constexpr_function
    def _box_shape(shape):
        return [*shape[:-1], 1, shape[-1]]

    @gluon.jit
    def allocate_rows(desc, SHAPE: gl.constexpr, PADDED: gl.constexpr):
        """(rows, boxes): a shared buffer of SHAPE (..., rows, BLOCK_D) for the consumers,
        and the same memory shaped as ``desc``'s boxes for the producer's copies: itself, or
        (..., rows, 1, BLOCK_D) when PADDED (a unit dimension changes nothing in the
        swizzled layout, so the bytes are the same)."""
        if PADDED:
            ROWS_LAYOUT: gl.constexpr = gl.NVMMASharedLayout(
                swizzle_byte_width=_swizzle(SHAPE[len(SHAPE) - 1]), element_bitwidth=16,
                rank=2)
            rows = gl.allocate_shared_memory(desc.dtype, SHAPE, ROWS_LAYOUT)
            boxes = rows._reinterpret(desc.dtype, _box_shape(SHAPE), desc.layout)
        else:
            rows = gl.allocate_shared_memory(desc.dtype, SHAPE, desc.layout)
            boxes = rows
        return rows, boxes

    @gluon.jit
    def allocate_program_rows(desc, ROWS: gl.constexpr, BLOCK_D: gl.constexpr,
                              PADDED: gl.constexpr):
        """allocate_rows for a program's ROWS rows read once (64 a consumer warpgroup): shaped
        (3, 64, BLOCK_D) for 192, three 64-row boxes since no 192-row box or shared tile
        lowers (load_three_boxes fills them), else (ROWS, BLOCK_D)."""
        if ROWS == 192:
            rows, boxes = allocate_rows(desc, [3, 64, BLOCK_D], PADDED)
        else:
            rows, boxes = allocate_rows(desc, [ROWS, BLOCK_D], PADDED)
        return rows, boxes

    @gluon.jit
    def warpgroup_rows(buf, WG: gl.constexpr, CONSUMERS: gl.constexpr):
        """Consumer warpgroup WG's 64 rows of a buffer from allocate_program_rows."""
        return buf.index(WG) if CONSUMERS == 3 else buf.slice(WG * 64, 64)

    @gluon.jit
    def load_three_boxes(desc_a, desc_b, row, head, bar, buf_a, buf_b, HEAD_DIM: gl.constexpr,
                         PADDED: gl.constexpr):
        """Rows [row, row + 192) of head ``head`` of two tensors (desc_a, desc_b: 64-row
        boxes) as three boxes each into buf_a / buf_b (3, 64, ...), all on ``bar``, whose
        expected bytes this sets: a three-consumer kernel's 192 rows, since no 192-row box
        or shared tile lowers."""
        mbarrier.expect(bar, 6 * desc_a.block_type.nbytes)
        for c in gl.static_range(3):
            box = box_coordinates(row + c * 64, head, HEAD_DIM, PADDED)
            tma.async_copy_global_to_shared(desc_a, box, bar, buf_a.index(c))
            tma.async_copy_global_to_shared(desc_b, box, bar, buf_b.index(c))

    @gluon.jit
    def _load_rows(desc, desc2, box, box2, bar, buf, buf2, SPLIT: gl.constexpr):
        """The rows of TMA box ``box`` through ``desc`` into ``buf``, and with SPLIT those of
        ``box2`` (their columns past the first chunk) through ``desc2`` into ``buf2``, all on
        ``bar``, whose expected bytes this sets."""
        if SPLIT:
            mbarrier.expect(bar, desc.block_type.nbytes + desc2.block_type.nbytes)
            tma.async_copy_global_to_shared(desc, box, bar, buf)
            tma.async_copy_global_to_shared(desc2, box2, bar, buf2)
        else:
            mbarrier.expect(bar, desc.block_type.nbytes)
            tma.async_copy_global_to_shared(desc, box, bar, buf)

    @gluon.jit
    def _produce(loads, HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, PADDED: gl.constexpr, SPLIT: gl.constexpr,
                 CONSUMERS: gl.constexpr):
        """Producer warp: Q once, then K and V of blocks 0..n_blocks-1 into the ring (buffers
        shaped as the descriptors' boxes); with SPLIT, each row's columns past BLOCK_D too,
        through the second descriptors into the second buffers, on the same barriers. Three
        consumers: Q as three 64-row boxes (q_smem (3, 64, BLOCK_D))."""
        (desc_q, desc_k, desc_v, desc_q2, desc_k2, desc_v2, q_smem, k_smem, v_smem, q2_smem,
         k2_smem, v2_smem, q_bar, k_ready, v_ready, k_empty, v_empty, q_row, q_head, k_row,
         kv_head, n_blocks) = loads
        if CONSUMERS == 3:
            mbarrier.expect(q_bar, 3 * desc_q.block_type.nbytes)
            for c in gl.static_range(3):
                tma.async_copy_global_to_shared(
                    desc_q, box_coordinates(q_row + c * 64, q_head, HEAD_DIM, PADDED), q_bar,
                    q_smem.index(c))
        else:
            _load_rows(desc_q, desc_q2, box_coordinates(q_row, q_head, HEAD_DIM, PADDED),
                       [q_row, q_head, BLOCK_D], q_bar, q_smem, q2_smem, SPLIT)
        for j in range(n_blocks):
            st = j % STAGES
            use = j // STAGES
            box = box_coordinates(k_row + j * BLOCK_N, kv_head, HEAD_DIM, PADDED)
            box2 = [k_row + j * BLOCK_N, kv_head, BLOCK_D]
            mbarrier.wait(k_empty.index(st), (use & 1) ^ 1, pred=use > 0)
            _load_rows(desc_k, desc_k2, box, box2, k_ready.index(st), k_smem.index(st),
                       k2_smem.index(st), SPLIT)
            mbarrier.wait(v_empty.index(st), (use & 1) ^ 1, pred=use > 0)
            _load_rows(desc_v, desc_v2, box, box2, v_ready.index(st), v_smem.index(st),
                       v2_smem.index(st), SPLIT)

    @gluon.jit
    def program_tile(CuQ, TileSeq, TileBlk, batch, pid, BLOCK_M: gl.constexpr,
                     DEVICE_TILES: gl.constexpr):
        """(sequence, query block) of program ``pid``: from the host-planned list, or
        (DEVICE_TILES: an upper bound of programs) found from cu_seqlens_q, where the extra
        programs get sequence ``batch`` (the caller returns). Called before the partitions
        split, so that the producer and both consumers take the same tile."""
        if DEVICE_TILES:
            offs = gl.arange(0, FIND_CHUNK,
                             layout=gl.BlockedLayout([1], [32], [gl.num_warps()], [0]))
            b, blk = find_tile_in_chunks(CuQ, batch, pid, offs, BLOCK_M, FIND_CHUNK)
        else:
            b = gl.load(TileSeq + pid)
            blk = gl.load(TileBlk + pid)
        return b, blk

    @gluon.jit
    def sequence_bounds(CuQ, CuK, b, TOP_LEFT: gl.constexpr):
        """(first query row, sq, first key row, sk, mask offset) of sequence b; the offset
        aligns the mask bottom-right (sk - sq) or top-left (0)."""
        q_start = gl.load(CuQ + b)
        sq = gl.load(CuQ + b + 1) - q_start
        k_start = gl.load(CuK + b)
        sk = gl.load(CuK + b + 1) - k_start
        offset = 0 if TOP_LEFT else sk - sq
        return q_start, sq, k_start, sk, offset

    @gluon.jit
    def in_window(visible, rel, window_left, window_right, WINDOW_LEFT: gl.constexpr,
                  WINDOW_RIGHT: gl.constexpr):
        """``visible`` narrowed to the window: rel = i + offset - j within [-right, left]."""
        if WINDOW_LEFT:
            visible = visible & (rel <= window_left)
        if WINDOW_RIGHT:
            visible = visible & (rel >= -window_right)
        return visible

    @gluon.jit
    def key_range(m0, sk, offset, window_left, window_right, BLOCK_M: gl.constexpr,
                  BLOCK_N: gl.constexpr, WINDOW_LEFT: gl.constexpr, WINDOW_RIGHT: gl.constexpr):
        """(lo, n_blocks, full_lo, full_hi) of query rows [m0, m0 + BLOCK_M): they see key
        blocks lo, lo + BLOCK_N, ... (n_blocks of them), and every row sees the keys
        [full_lo, full_hi) (blocks inside need no mask)."""
        lo = sk * 0  # tensors, not Python ints: the partitions take them as arguments
        hi = sk
        full_lo = sk * 0
        full_hi = sk
        if WINDOW_RIGHT:
            hi = gl.minimum(sk, m0 + BLOCK_M + offset + window_right)
            full_hi = gl.minimum(sk, gl.maximum(m0 + offset + window_right + 1, 0))
        if WINDOW_LEFT:
            lo = gl.maximum(0, m0 + offset - window_left) // BLOCK_N * BLOCK_N
            full_lo = gl.maximum(m0 + BLOCK_M - 1 + offset - window_left, 0)
        n_blocks = (gl.maximum(hi - lo, 0) + BLOCK_N - 1) // BLOCK_N
        return lo, n_blocks, full_lo, full_hi

    @gluon.jit
    def release_blocks(ready, empty, start, stop, STAGES: gl.constexpr):
        """Ring uses [start, stop) released unread, by a consumer warpgroup with no rows of
        its own in the sequence: each is waited for first, so that its arrivals stay in step
        with the other warpgroup's (an early arrival would count toward an earlier use)."""
        for n in range(start, stop):
            st = n % STAGES
            mbarrier.wait(ready.index(st), (n // STAGES) & 1)
            mbarrier.arrive(empty.index(st))

    @gluon.jit
    def query_range(n0, sq, offset, window_left, window_right, BLOCK_M: gl.constexpr,
                    BLOCK_N: gl.constexpr, WINDOW_LEFT: gl.constexpr,
                    WINDOW_RIGHT: gl.constexpr):
        """(lo, n_blocks, full_lo, full_hi) of key rows [n0, n0 + BLOCK_N), key_range's mirror
        for the dK/dV kernels: query blocks lo, lo + BLOCK_M, ... (n_blocks of them) see
        them, and the query rows [full_lo, full_hi) see all of them (blocks inside need no
        mask)."""
        lo = sq * 0  # tensors, not Python ints: the partitions take them as arguments
        hi = sq
        full_lo = sq * 0
        full_hi = sq
        if WINDOW_RIGHT:
            lo = gl.maximum(0, n0 - offset - window_right) // BLOCK_M * BLOCK_M
            full_lo = gl.maximum(n0 + BLOCK_N - 1 - offset - window_right, 0)
        if WINDOW_LEFT:
            hi = gl.minimum(sq, n0 + BLOCK_N - offset + window_left)
            full_hi = gl.minimum(sq, gl.maximum(n0 - offset + window_left + 1, 0))
        n_blocks = (gl.maximum(hi - lo, 0) + BLOCK_M - 1) // BLOCK_M
        return lo, n_blocks, full_lo, full_hi

    @gluon.jit
    def row_statistics(Lse, Delta, h, total_q, q_start, qi, q_ok):
        """(lse * log2 e, delta) of head h's query rows qi (0 past the sequence), lse +inf
        for rows that see no key, so that their probabilities are 0."""
        # pointer + 64-bit head offset + 32-bit row offsets: the rows' offsets stay 32-bit
        lse = gl.load(Lse + h.to(gl.int64) * total_q + q_start + qi, mask=q_ok, other=0.0)
        delta = gl.load(Delta + h.to(gl.int64) * total_q + q_start + qi, mask=q_ok,
                        other=0.0)
        lse2 = gl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
        return lse2, delta

    @gluon.jit
    def first_row_statistics(Lse, Delta, h, lo, total_q, q_start, sq, BLOCK_M: gl.constexpr,
                             LAYOUT: gl.constexpr, PREFETCH: gl.constexpr):
        """What a dK/dV program passes block_row_statistics for its first query block (head
        h's at lo): with PREFETCH that block's row_statistics, zeros without."""
        if PREFETCH:
            qi = lo + gl.arange(0, BLOCK_M, layout=LAYOUT)
            lse2, delta = row_statistics(Lse, Delta, h, total_q, q_start, qi, qi < sq)
        else:
            lse2 = gl.zeros([BLOCK_M], gl.float32, LAYOUT)
            delta = gl.zeros([BLOCK_M], gl.float32, LAYOUT)
        return lse2, delta

    @gluon.jit
    def block_row_statistics(Lse, Delta, h, last_head, qs, lo, last, qi, q_ok, total_q,
                             q_start, sq, ahead_lse2, ahead_delta, BLOCK_M: gl.constexpr,
                             LAYOUT: gl.constexpr, PREFETCH: gl.constexpr):
        """(lse2, delta) of head h's query block at qs (rows qi, q_ok) in a dK/dV program's
        loop, and the pair to pass for its next block. With PREFETCH the pair passed in
        (``ahead_*``) is this block's, loaded during the block before, and the next block's
        is loaded now: block qs + BLOCK_M, or with ``last`` (qs is the head's last block)
        head h + 1's first block at lo, none (zeros) after ``last_head``. Without, this
        block's is loaded now and ``ahead_*`` passes through."""
        if PREFETCH:
            lse2, delta = ahead_lse2, ahead_delta
            h_next = gl.where(last, h + 1, h)
            qn = gl.where(last, lo, qs + BLOCK_M) + gl.arange(0, BLOCK_M, layout=LAYOUT)
            ahead_lse2, ahead_delta = row_statistics(Lse, Delta, h_next, total_q, q_start, qn,
                                                     (qn < sq) & (h_next <= last_head))
        else:
            lse2, delta = row_statistics(Lse, Delta, h, total_q, q_start, qi, q_ok)
        return lse2, delta, ahead_lse2, ahead_delta

    @gluon.jit
    def probabilities_t(s, qk_scale, lse2, qs, qi, q_ok, kj, offset, full_lo, full_hi,
                        window_left, window_right, BLOCK_M: gl.constexpr,
                        WINDOW_LEFT: gl.constexpr, WINDOW_RIGHT: gl.constexpr):
        """P^T (keys kj, queries qi of the block starting at qs) from S^T: exp2(S^T qk_scale
        - lse2), 0 outside the mask and past the sequence (checked only for blocks outside
        the fully visible rows [full_lo, full_hi))."""
        pt = gl.exp2(s * qk_scale - lse2[None, :])
        if (qs < full_lo) | (qs + BLOCK_M > full_hi):
            visible = in_window(q_ok[None, :], qi[None, :] + offset - kj[:, None],
                                window_left, window_right, WINDOW_LEFT, WINDOW_RIGHT)
            pt = gl.where(visible, pt, 0.0)
        return pt

    @gluon.constexpr_function
    def mma_layout(cols):
        """One warpgroup's wgmma accumulator layout over (64 rows, ``cols``)."""
        return gl.NVMMADistributedLayout(version=[3, 0], warps_per_cta=[4, 1],
                                         instr_shape=[16, cols, 16])

    @gluon.constexpr_function
    def operand_a_layout(cols):
        """Registers holding the A operand of a wgmma whose accumulator is
        mma_layout(cols) (16-bit elements)."""
        return gl.DotOperandLayout(operand_index=0, parent=mma_layout(cols), k_width=2)

    @gluon.jit
    def allocate_barrier(count: gl.constexpr):
        """One mbarrier in shared memory, initialised to expect ``count`` arrivals."""
        bar = gl.allocate_shared_memory(gl.int64, [1], mbarrier.MBarrierLayout())
        mbarrier.init(bar, count=count)
        return bar

    @gluon.jit
    def allocate_ring(STAGES: gl.constexpr, CONSUMERS: gl.constexpr = 2):
        """(ready, empty) mbarriers of a ring of STAGES buffers: ``ready`` completed by the
        producer's TMA copies, ``empty`` by every consumer warpgroup's arrival."""
        ready = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        empty = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(ready.index(i), count=1)
            mbarrier.init(empty.index(i), count=CONSUMERS)
        return ready, empty

    @gluon.constexpr_function
    def row_layout(head_dim):
        """One warpgroup's blocked layout over (rows, head_dim): 8 contiguous elements (16
        bytes) a thread, a warp across at most 256 columns."""
        cols = min(head_dim // 8, 32)
        return gl.BlockedLayout([1, 8], [32 // cols, cols], [4, 1], [1, 0])

    @gluon.jit
    def zero_rows_from(buf, valid, ROWS: gl.constexpr, HEAD_DIM: gl.constexpr):
        """Rows ``valid``.. of a (ROWS, HEAD_DIM) shared buffer set to zero, by one warpgroup
        (each thread rewrites what it read). They belong to the next sequence: the matmul
        that reduces over them multiplies them by 0, but 0 * inf or NaN would not be 0. The
        caller fences (fence_async_shared) and synchronises before wgmma reads them."""
        layout: gl.constexpr = row_layout(HEAD_DIM)
        x = buf.load(layout)
        rows = gl.arange(0, ROWS, layout=gl.SliceLayout(1, layout))
        buf.store(gl.where((rows < valid)[:, None], x, gl.zeros_like(x)))

    @gluon.jit
    def _masked(s, ks, m0, sk, offset, window_left, window_right, S_LAYOUT: gl.constexpr,
                BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, WINDOW_LEFT: gl.constexpr,
                WINDOW_RIGHT: gl.constexpr):
        """Scores ``s`` of the key block starting at ``ks`` with invisible keys at -inf."""
        kj = ks + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))
        qi = m0 + gl.arange(0, BLOCK_M, layout=gl.SliceLayout(1, S_LAYOUT))
        kj2 = kj[None, :]
        visible = in_window(kj2 < sk, qi[:, None] + offset - kj2, window_left, window_right,
                            WINDOW_LEFT, WINDOW_RIGHT)
        return gl.where(visible, s, float("-inf"))

    @gluon.jit
    def _in_base2(x, qk_scale, BASE2: gl.constexpr):
        """Raw scores (or their row maxima) ``x`` in base-2 units: already there when BASE2
        (softcap or ALiBi: _base2_scores made them), else x * qk_scale (the plain path folds
        the scale into the exponent's FMA)."""
        if BASE2:
            return x
        else:
            return x * qk_scale

    @gluon.jit
    def _base2_scores(s, ks, r0, offset, qk_scale, tanh_scale, softcap2, slope2,
                      S_LAYOUT: gl.constexpr, ROWS: gl.constexpr, BLOCK_N: gl.constexpr,
                      HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr):
        """Raw q.k scores ``s`` of query rows r0.. and keys ks.. in base-2 units as
        forward.score_tile makes them: cap * tanh(scale * s / cap) * log2(e) with softcap
        (tanh_scale = scale / cap, softcap2 = cap * log2(e)), else s * qk_scale; with ALiBi
        minus slope2 * |i + offset - j| (slope2 = slope * log2(e)) on every block."""
        if HAS_SOFTCAP:
            s = tanh_half(s * tanh_scale, HAS_SOFTCAP == 2) * softcap2
        elif HAS_ALIBI:
            s = s * qk_scale
        if HAS_ALIBI:
            # |i + offset - j| from float positions, exact while sequences are at most
            # ALIBI_MAX_SEQLEN long (supports() asks for it): per element one float
            # subtraction instead of an integer subtraction and a conversion
            kj = (ks + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(0, S_LAYOUT))).to(gl.float32)
            qi = (r0 + offset + gl.arange(0, ROWS, layout=gl.SliceLayout(1, S_LAYOUT))).to(
                gl.float32)
            s = s - slope2 * gl.abs(qi[:, None] - kj[None, :])
        return s

    @gluon.jit
    def _consume(args, WG: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr,
                 BLOCK_D2: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, WINDOW_LEFT: gl.constexpr, WINDOW_RIGHT: gl.constexpr,
                 HAS_SINKS: gl.constexpr, HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr,
                 CONSUMERS: gl.constexpr):
        """Consumer warpgroup WG (of CONSUMERS): query rows [m0 + WG * 64, + 64) of the tile,
        online softmax over the key blocks, then O and lse (with head h's sink logit joined
        to the denominator when HAS_SINKS, as forward.add_sink). Scores are softcapped
        (HAS_SOFTCAP) and biased (HAS_ALIBI: every block) before the mask, as in
        forward.score_tile. Q, K and V rows are BLOCK_D wide, HEAD_DIM of them data and the
        rest zeros (TMA's fill past the head dim), so scores and O's first HEAD_DIM columns
        are exact. With BLOCK_D2 (SPLIT: HEAD_DIM = BLOCK_D + BLOCK_D2, two powers of two)
        the rows' last BLOCK_D2 columns sit in the second buffers: the scores sum two
        matmuls, and O is two accumulators."""
        (q_smem, k_smem, v_smem, q2_smem, k2_smem, v2_smem, q_bar, k_ready, v_ready, k_empty,
         v_empty, v_zeroed, Out, Lse, Sinks, q_start, sq, h, m0, sk, offset, lo, n_blocks,
         full_lo, full_hi, qk_scale, tanh_scale, softcap2, slope2, window_left, window_right,
         stride_ot, stride_oh, total_q) = args
        ROWS: gl.constexpr = BLOCK_M // CONSUMERS
        SPLIT: gl.constexpr = BLOCK_D2 > 0
        # scores turned into base-2 units before the max
        BASE2: gl.constexpr = HAS_SOFTCAP or HAS_ALIBI
        dtype: gl.constexpr = q_smem.dtype
        S_LAYOUT: gl.constexpr = mma_layout(BLOCK_N)
        O_LAYOUT: gl.constexpr = mma_layout(BLOCK_D)
        P_LAYOUT: gl.constexpr = operand_a_layout(BLOCK_D)
        ROW_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
        ROW_O: gl.constexpr = gl.SliceLayout(1, O_LAYOUT)
        r0 = m0 + WG * ROWS
        q_rows = warpgroup_rows(q_smem, WG, CONSUMERS)
        if SPLIT:
            O2_LAYOUT: gl.constexpr = mma_layout(BLOCK_D2)
            P2_LAYOUT: gl.constexpr = operand_a_layout(BLOCK_D2)
            q2_rows = q2_smem.slice(WG * ROWS, ROWS)
            acc2 = gl.zeros([ROWS, BLOCK_D2], gl.float32, O2_LAYOUT)

        m_i = gl.full([ROWS], float("-inf"), gl.float32, ROW_S)
        l_i = gl.zeros([ROWS], gl.float32, ROW_S)
        acc = gl.zeros([ROWS, BLOCK_D], gl.float32, O_LAYOUT)
        s_init = gl.zeros([ROWS, BLOCK_N], gl.float32, S_LAYOUT)
        # a warpgroup whose rows all lie past the sequence's end (short sequences) skips the
        # work and releases the blocks unread
        n_mine = gl.where(r0 < sq, n_blocks, 0)
        if n_mine > 0:
            mbarrier.wait(q_bar, 0)
            # block 0: QK^T and softmax, its P V waits for the next iteration
            mbarrier.wait(k_ready.index(0), 0)
            s = warpgroup_mma(q_rows, k_smem.index(0).permute((1, 0)), s_init, use_acc=False,
                              is_async=True)
            if SPLIT:
                s = warpgroup_mma(q2_rows, k2_smem.index(0).permute((1, 0)), s, is_async=True)
            s = warpgroup_mma_wait(num_outstanding=0, deps=(s, ))
            mbarrier.arrive(k_empty.index(0))
            s = _base2_scores(s, lo, r0, offset, qk_scale, tanh_scale, softcap2, slope2,
                              S_LAYOUT, ROWS, BLOCK_N, HAS_SOFTCAP, HAS_ALIBI)
            if (lo < full_lo) | (lo + BLOCK_N > full_hi):
                s = _masked(s, lo, r0, sk, offset, window_left, window_right, S_LAYOUT,
                            ROWS, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
            m_blk = _in_base2(gl.max(s, 1), qk_scale, BASE2)
            m_use = gl.where(m_blk == float("-inf"), 0.0, m_blk)
            p = gl.exp2(_in_base2(s, qk_scale, BASE2) - m_use[:, None])
            l_i = gl.sum(p, 1)
            m_i = m_blk
            p_op = gl.convert_layout(p.to(dtype), P_LAYOUT)
            if SPLIT:
                p2_op = gl.convert_layout(p.to(dtype), P2_LAYOUT)
            for j in range(1, n_mine):
                st = j % STAGES
                ks = lo + j * BLOCK_N
                pst = (j - 1) % STAGES
                mbarrier.wait(k_ready.index(st), (j // STAGES) & 1)
                mbarrier.wait(v_ready.index(pst), ((j - 1) // STAGES) & 1)
                s = warpgroup_mma(q_rows, k_smem.index(st).permute((1, 0)), s_init,
                                  use_acc=False, is_async=True)
                if SPLIT:
                    s = warpgroup_mma(q2_rows, k2_smem.index(st).permute((1, 0)), s,
                                      is_async=True)
                    acc = warpgroup_mma(p_op, v_smem.index(pst), acc, is_async=True)
                    acc2 = warpgroup_mma(p2_op, v2_smem.index(pst), acc2, is_async=True)
                    s = warpgroup_mma_wait(num_outstanding=2, deps=(s, ))
                else:
                    acc = warpgroup_mma(p_op, v_smem.index(pst), acc, is_async=True)
                    s = warpgroup_mma_wait(num_outstanding=1, deps=(s, ))
                mbarrier.arrive(k_empty.index(st))
                s = _base2_scores(s, ks, r0, offset, qk_scale, tanh_scale, softcap2, slope2,
                                  S_LAYOUT, ROWS, BLOCK_N, HAS_SOFTCAP, HAS_ALIBI)
                if (ks < full_lo) | (ks + BLOCK_N > full_hi):
                    s = _masked(s, ks, r0, sk, offset, window_left, window_right, S_LAYOUT,
                                ROWS, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT)
                m_new = gl.maximum(m_i, _in_base2(gl.max(s, 1), qk_scale, BASE2))
                m_use = gl.where(m_new == float("-inf"), 0.0, m_new)
                alpha = gl.exp2(m_i - m_use)
                p = gl.exp2(_in_base2(s, qk_scale, BASE2) - m_use[:, None])
                l_i = l_i * alpha + gl.sum(p, 1)
                m_i = m_new
                if SPLIT:
                    acc, acc2 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc2))
                    acc2 = acc2 * gl.convert_layout(alpha, gl.SliceLayout(1, O2_LAYOUT))[:, None]
                    p2_op = gl.convert_layout(p.to(dtype), P2_LAYOUT)
                else:
                    acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                mbarrier.arrive(v_empty.index(pst))
                acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
                p_op = gl.convert_layout(p.to(dtype), P_LAYOUT)
            last = n_mine - 1
            lst = last % STAGES
            mbarrier.wait(v_ready.index(lst), (last // STAGES) & 1)
            tail = sk - (lo + last * BLOCK_N)
            if tail < BLOCK_N:  # warpgroup 0 zeroes the rows past the end, the others wait
                if WG == 0:
                    zero_rows_from(v_smem.index(lst), tail, BLOCK_N, BLOCK_D)
                    if SPLIT:
                        zero_rows_from(v2_smem.index(lst), tail, BLOCK_N, BLOCK_D2)
                    fence_async_shared()
                    gl.thread_barrier()
                    mbarrier.arrive(v_zeroed)
                else:
                    mbarrier.wait(v_zeroed, 0)
            acc = warpgroup_mma(p_op, v_smem.index(lst), acc, is_async=True)
            if SPLIT:
                acc2 = warpgroup_mma(p2_op, v2_smem.index(lst), acc2, is_async=True)
                acc, acc2 = warpgroup_mma_wait(num_outstanding=0, deps=(acc, acc2))
            else:
                acc = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
            mbarrier.arrive(v_empty.index(lst))
        for j in range(n_mine, n_blocks):  # the K and V rings in the producer's order
            st = j % STAGES
            mbarrier.wait(k_ready.index(st), (j // STAGES) & 1)
            mbarrier.arrive(k_empty.index(st))
            mbarrier.wait(v_ready.index(st), (j // STAGES) & 1)
            mbarrier.arrive(v_empty.index(st))

        if HAS_SINKS:
            sink2 = gl.load(Sinks + h) * 1.4426950408889634
            m_new = gl.maximum(m_i, sink2)
            m_new = gl.where(m_new == float("-inf"), 0.0, m_new)
            alpha = gl.exp2(m_i - m_new)
            l_i = l_i * alpha + gl.exp2(sink2 - m_new)
            acc = acc * gl.convert_layout(alpha, ROW_O)[:, None]
            if SPLIT:
                acc2 = acc2 * gl.convert_layout(alpha, gl.SliceLayout(1, O2_LAYOUT))[:, None]
            m_i = m_new
        seen = l_i > 0.0
        inv = gl.convert_layout(1.0 / gl.where(seen, l_i, 1.0), ROW_O)
        out = (acc * inv[:, None]).to(dtype)
        lse = gl.where(seen, (m_i + gl.log2(gl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                       float("-inf"))
        # 16-byte stores after a layout change through shared memory
        OUT_LAYOUT: gl.constexpr = row_layout(BLOCK_D)
        out = gl.convert_layout(out, OUT_LAYOUT)
        rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, OUT_LAYOUT))
        cols = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, OUT_LAYOUT))
        ptrs = Out + (q_start + rows).to(gl.int64)[:, None] * stride_ot + h * stride_oh \
            + cols[None, :]
        if BLOCK_D == HEAD_DIM or SPLIT:
            gl.store(ptrs, out, mask=(rows < sq)[:, None])
        else:
            gl.store(ptrs, out, mask=(rows < sq)[:, None] & (cols < HEAD_DIM)[None, :])
        if SPLIT:  # the last BLOCK_D2 columns
            OUT2_LAYOUT: gl.constexpr = row_layout(BLOCK_D2)
            inv2 = gl.convert_layout(1.0 / gl.where(seen, l_i, 1.0),
                                     gl.SliceLayout(1, O2_LAYOUT))
            out2 = gl.convert_layout((acc2 * inv2[:, None]).to(dtype), OUT2_LAYOUT)
            rows2 = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, OUT2_LAYOUT))
            cols2 = BLOCK_D + gl.arange(0, BLOCK_D2, layout=gl.SliceLayout(0, OUT2_LAYOUT))
            gl.store(Out + (q_start + rows2).to(gl.int64)[:, None] * stride_ot
                     + h * stride_oh + cols2[None, :], out2, mask=(rows2 < sq)[:, None])
        lse_rows = r0 + gl.arange(0, ROWS, layout=ROW_S)
        gl.store(Lse + h.to(gl.int64) * total_q + q_start + lse_rows, lse, mask=lse_rows < sq)

    @gluon.jit(do_not_specialize=["total_q", "batch"])
    def _hopper_fwd_kernel(desc_q, desc_k, desc_v, desc_q2, desc_k2, desc_v2, Out, Lse, CuQ,
                           CuK, TileSeq, TileBlk, Sinks, Alibi, stride_ot, stride_oh,
                           stride_ab, total_q, batch, qk_scale, tanh_scale, softcap2,
                           window_left, window_right, GROUP: gl.constexpr,
                           HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr,
                           BLOCK_D2: gl.constexpr, BLOCK_M: gl.constexpr,
                           BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                           CONSUMER_REGS: gl.constexpr,
                           PRODUCER_REGS: gl.constexpr,
                           TOP_LEFT: gl.constexpr, WINDOW_LEFT: gl.constexpr,
                           WINDOW_RIGHT: gl.constexpr, HAS_SINKS: gl.constexpr,
                           HAS_SOFTCAP: gl.constexpr, HAS_ALIBI: gl.constexpr,
                           DEVICE_TILES: gl.constexpr, GROUPED: gl.constexpr):
        if GROUPED:  # tiles.launch_grid's (group, programs, K/V heads)
            h = gl.program_id(2) * GROUP + gl.program_id(0)
            pid = gl.program_id(1)
        else:
            h = gl.program_id(1)
            pid = gl.program_id(0)
        b, blk = program_tile(CuQ, TileSeq, TileBlk, batch, pid, BLOCK_M, DEVICE_TILES)
        if DEVICE_TILES:  # noqa: SIM102 (a constexpr branch: host tiles have no extra programs)
            if b >= batch:
                return
        m0 = blk * BLOCK_M
        q_start, sq, k_start, sk, offset = sequence_bounds(CuQ, CuK, b, TOP_LEFT)
        if HAS_ALIBI:  # slopes (nheads,) (stride_ab 0) or (batch, nheads)
            slope2 = gl.load(Alibi + b * stride_ab + h) * 1.4426950408889634
        else:
            slope2 = qk_scale * 0.0

        lo, n_blocks, full_lo, full_hi = key_range(m0, sk, offset, window_left, window_right,
                                                   BLOCK_M, BLOCK_N, WINDOW_LEFT,
                                                   WINDOW_RIGHT)

        PADDED: gl.constexpr = BLOCK_D != HEAD_DIM
        SPLIT: gl.constexpr = BLOCK_D2 > 0
        CONSUMERS: gl.constexpr = BLOCK_M // 64  # warpgroups of 64 query rows
        q_smem, q_box = allocate_program_rows(desc_q, BLOCK_M, BLOCK_D, PADDED)
        k_smem, k_box = allocate_rows(desc_k, [STAGES, BLOCK_N, BLOCK_D], PADDED)
        v_smem, v_box = allocate_rows(desc_v, [STAGES, BLOCK_N, BLOCK_D], PADDED)
        if SPLIT:  # the rows' last BLOCK_D2 columns (desc_*2 boxes)
            q2_smem, q2_box = allocate_rows(desc_q2, [BLOCK_M, BLOCK_D2], True)
            k2_smem, k2_box = allocate_rows(desc_k2, [STAGES, BLOCK_N, BLOCK_D2], True)
            v2_smem, v2_box = allocate_rows(desc_v2, [STAGES, BLOCK_N, BLOCK_D2], True)
        else:  # placeholders the partitions never read
            q2_smem, k2_smem, v2_smem = q_smem, k_smem, v_smem
            q2_box, k2_box, v2_box = q_box, k_box, v_box
        q_bar = allocate_barrier(1)
        k_ready, k_empty = allocate_ring(STAGES, CONSUMERS)
        v_ready, v_empty = allocate_ring(STAGES, CONSUMERS)
        v_zeroed = allocate_barrier(1)
        fence_async_shared()

        # runtime values travel as one tuple each (the partitions unpack it); constexprs
        # stay arguments of their own, and the partition lists literal
        args = (q_smem, k_smem, v_smem, q2_smem, k2_smem, v2_smem, q_bar, k_ready, v_ready,
                k_empty, v_empty, v_zeroed, Out, Lse, Sinks, q_start, sq, h, m0, sk, offset, lo,
                n_blocks, full_lo, full_hi, qk_scale, tanh_scale, softcap2, slope2, window_left,
                window_right, stride_ot, stride_oh, total_q)
        loads = (desc_q, desc_k, desc_v, desc_q2, desc_k2, desc_v2, q_box, k_box, v_box, q2_box,
                 k2_box, v2_box, q_bar, k_ready, v_ready, k_empty, v_empty, q_start + m0, h,
                 k_start + lo, h // GROUP, n_blocks)
        if CONSUMERS == 3:
            gl.warp_specialize([
                (_consume, (args, 0, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, BLOCK_N, STAGES,
                            WINDOW_LEFT, WINDOW_RIGHT, HAS_SINKS, HAS_SOFTCAP, HAS_ALIBI,
                            CONSUMERS)),
                (_consume, (args, 1, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, BLOCK_N, STAGES,
                            WINDOW_LEFT, WINDOW_RIGHT, HAS_SINKS, HAS_SOFTCAP, HAS_ALIBI,
                            CONSUMERS)),
                (_consume, (args, 2, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, BLOCK_N, STAGES,
                            WINDOW_LEFT, WINDOW_RIGHT, HAS_SINKS, HAS_SOFTCAP, HAS_ALIBI,
                            CONSUMERS)),
                (_produce, (loads, HEAD_DIM, BLOCK_D, BLOCK_N, STAGES, PADDED, SPLIT,
                            CONSUMERS)),
            ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_consume, (args, 0, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, BLOCK_N, STAGES,
                            WINDOW_LEFT, WINDOW_RIGHT, HAS_SINKS, HAS_SOFTCAP, HAS_ALIBI,
                            CONSUMERS)),
                (_consume, (args, 1, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, BLOCK_N, STAGES,
                            WINDOW_LEFT, WINDOW_RIGHT, HAS_SINKS, HAS_SOFTCAP, HAS_ALIBI,
                            CONSUMERS)),
                (_produce, (loads, HEAD_DIM, BLOCK_D, BLOCK_N, STAGES, PADDED, SPLIT,
                            CONSUMERS)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def available() -> bool:
    """Whether this Triton ships Gluon's Hopper language (the kernels can be built)."""
    return gluon is not None


@functools.cache
def is_sm90(index: int | None) -> bool:
    return torch.cuda.get_device_capability(index) == (9, 0)


def tma_rows(t: torch.Tensor, head_dim: int) -> bool:
    """Whether (rows, heads, head_dim) ``t`` can be read as (rows, heads * head_dim) TMA
    boxes: heads contiguous in a row, 16-byte aligned base and row stride, boxes at least
    16 bytes wide and at most 256 elements, TMA's box limit (the tl kernels' descriptors too:
    forward.tma_ready). An empty ``t`` (no key rows at all) has no descriptor."""
    size = t.element_size()
    return (t.shape[0] > 0 and head_dim <= 256 and t.stride(2) == 1 and t.stride(1) == head_dim
            and t.data_ptr() % 16 == 0 and (t.stride(0) * size) % 16 == 0
            and head_dim * size >= 16)


def block_d(head_dim: int) -> int | None:
    """The width the forward reads a head dim at: itself in HEAD_DIMS, else the next of
    them (TMA fills the columns past the head dim with zeros), for multiples of 8 (16-byte
    rows) between 64 and 256; None for the others."""
    if head_dim in HEAD_DIMS:
        return head_dim
    if 64 < head_dim < 256 and head_dim % 8 == 0:
        return 128 if head_dim < 128 else 256
    return None


def supports(problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, plain: bool) -> bool:
    """Whether this kernel serves a call (host lengths or device offsets) whose features the
    caller has checked (``plain``: forward.forward's gluon_features, or the backward's own
    conditions for hopper_backward): an sm_90 GPU, fp16/bf16, a head dim ``block_d`` reads,
    Q/K/V as packed rows whose heads lie contiguous (TMA boxes); with ALiBi, sequences of at
    most ALIBI_MAX_SEQLEN tokens."""
    return (plain and serves(problem, q.device)
            and all(tma_rows(t, problem.head_dim) for t in (q, k, v)))


def serves(problem, device: torch.device) -> bool:
    """supports' conditions on the problem and ``device`` alone (not Q/K/V's layout)."""
    if gluon is None or device.type != "cuda":
        return False
    if block_d(problem.head_dim) is None or problem.dtype not in (torch.float16,
                                                                  torch.bfloat16):
        return False
    if problem.total_k == 0 or problem.total_q == 0 or not is_sm90(device.index):
        return False
    return problem.alibi is None or max(problem.max_seqlen_q,
                                        problem.max_seqlen_k) <= ALIBI_MAX_SEQLEN


def rows_per_program(head_dim: int, config: dict, key: str, two_chunk_rows: int) -> int:
    """A Gluon kernel's rows per program at ``head_dim`` (its launch tiles): ``config[key]`` at
    the head dim's width (128, or 192 for three consumer warpgroups of 64 rows), and
    ``two_chunk_rows`` for head dims it reads as two column chunks (split_widths with
    config["split"]), whose kernels keep two warpgroups."""
    if split_widths(head_dim, config["split"]) is not None:
        return two_chunk_rows
    return config[key][block_d(head_dim)]


def box_rows(rows: int) -> int:
    """Rows of the TMA boxes that load a program's ``rows`` rows: 192 as three boxes of 64
    (allocate_program_rows), the others as one."""
    return 64 if rows == 192 else rows


def block_m(head_dim: int, causal: bool = False, max_seqlen_q: int = 0) -> int:
    """Query rows per program at ``head_dim`` (the launch's query tiles): rows_per_program of
    CONFIG["block_m"], or CONFIG["causal_short_rows"]'s rows for a ``causal`` call whose
    longest query sequence ``max_seqlen_q`` (0: not known) is at most its bound."""
    rows = rows_per_program(head_dim, CONFIG, "block_m", BLOCK_M)
    short = CONFIG["causal_short_rows"].get(block_d(head_dim))
    if causal and short is not None and 0 < max_seqlen_q <= short[0]:
        return min(rows, short[1])
    return rows


def grouped_heads(problem) -> int:
    """Query heads per K/V head that tiles.launch_grid puts side by side for ``problem``: its
    GQA group when its keys end at a right bound (causal, windows) and CONFIG["grouped_heads"]
    is on, else 1 (the heads-outer order)."""
    if CONFIG["grouped_heads"] and problem.window[1] >= 0:
        return problem.group_size
    return 1


def problem_block_m(problem) -> int:
    """block_m for ``problem``: causal when its window ends at the diagonal."""
    return block_m(problem.head_dim, problem.window[1] == 0, problem.max_seqlen_q)


def lengths_served(problem, width: int, config: dict) -> bool:
    """Whether a Gluon backward kernel whose CONFIG is ``config`` takes ``problem``'s lengths:
    host lengths always; device offsets only (flash_attn's cu_seqlens tensors) at the widths
    of config["device_offsets"], and at a width of config["device_offsets_above"] when the
    call's longest sequence (max_seqlen, queries or keys) exceeds its value."""
    if problem.lengths_known or width in config["device_offsets"]:
        return True
    above = config["device_offsets_above"].get(width)
    return above is not None and max(problem.max_seqlen_q, problem.max_seqlen_k) > above


def tl_is_faster(problem) -> bool:
    """Whether the tl forward was measured faster on calls like this one: every query
    sequence short enough (TL_BELOW at the call's width, host lengths or a given
    max_seqlen), or softcap with device offsets only (TL_SOFTCAP_DEVICE_OFFSETS)."""
    width = block_d(problem.head_dim)
    if problem.softcap and not problem.lengths_known and width in TL_SOFTCAP_DEVICE_OFFSETS:
        return True
    return 0 < problem.max_seqlen_q <= TL_BELOW.get(width, 0)


def split_widths(head_dim: int, allowed: bool = True) -> tuple[int, int] | None:
    """(first, second) when a Gluon kernel reads ``head_dim`` as two column chunks whose
    widths are powers of two (96 = 64 + 32, 192 = 128 + 64, 80, 144, 160), instead of
    zero-padded to the next of HEAD_DIMS (a quarter to a half of the matmul work on zeros);
    None for the others, or when the kernel's ``allowed`` (its CONFIG["split"]) is off."""
    if not allowed or head_dim in HEAD_DIMS or block_d(head_dim) is None:
        return None
    first = 1 << (head_dim.bit_length() - 1)
    second = head_dim - first
    if first < 64 or second < 16 or second & (second - 1):
        return None
    return first, second


def descriptor(t: torch.Tensor, head_dim: int, rows: int, width: int | None = None):
    """Gluon TMA descriptor of (rows, heads, head_dim) ``t`` as (rows, heads * head_dim),
    loading (rows, head_dim) boxes into the default NVMMA shared layout; with a ``width``
    above head_dim, of ``t`` itself, loading (rows, 1, width) boxes whose columns past the
    head dim TMA fills with zeros."""
    gl_dtype = gl.bfloat16 if t.dtype == torch.bfloat16 else gl.float16
    if width is not None and width != head_dim:
        layout = gl.NVMMASharedLayout.get_default_for([rows, 1, width], gl_dtype)
        return TensorDescriptor(t, list(t.shape), list(t.stride()), [rows, 1, width], layout)
    flat = t.as_strided((t.shape[0], t.shape[1] * head_dim), (t.stride(0), 1))
    layout = gl.NVMMASharedLayout.get_default_for([rows, head_dim], gl_dtype)
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [rows, head_dim],
                            layout)


def forward(problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, out: torch.Tensor,
            lse: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
            tiles: tuple[int, torch.Tensor, torch.Tensor, bool],
            scalars: tuple[float, float, float], sinks: torch.Tensor | None = None,
            alibi: torch.Tensor | None = None, *, record: bool = False):
    """Writes ``out`` (total_q, nheads, d) and ``lse`` (nheads, total_q) float32 over the
    query tiles of problem_block_m(problem) rows; ``tiles``: forward.launch_tiles'
    (programs, tile_seq, tile_blk, device_tiles), a host-planned list or (device_tiles) an
    upper bound of programs that find their tiles from cu_seqlens_q; ``scalars``: (scale *
    log2 e, scale / softcap, softcap * log2 e) as forward.score_scalars; ``sinks``: float32
    (nheads,) sink logits, or None; ``alibi``: float32 slopes (nheads,) or (batch, nheads), or
    None. With ``record``, returns the replay.LaunchRecord or None: replays take (q, k, v, out,
    lse, cu_seqlens_q, cu_seqlens_k), then the slopes and the sinks where the call has them,
    q, k and v for their descriptors."""
    d = problem.head_dim
    width = block_d(d)
    left, right = problem.window
    block_n = CONFIG["block_n"][width]
    rows = problem_block_m(problem)
    programs, tile_seq, tile_blk, device_tiles = tiles
    grid = launch_grid(programs, problem.nheads, grouped_heads(problem))
    split = split_widths(d, CONFIG["split"])
    first, second = split if split is not None else (width, 0)
    q_rows = box_rows(rows)
    descriptors = (descriptor(q, d, q_rows, first), descriptor(k, d, block_n, first),
                   descriptor(v, d, block_n, first))
    seconds = ((descriptor(q, d, rows, second), descriptor(k, d, block_n, second),
                descriptor(v, d, block_n, second)) if second else (None, None, None))
    args = (*descriptors, *seconds, out, lse, cu_seqlens_q, cu_seqlens_k, tile_seq, tile_blk,
            sinks if sinks is not None else lse, alibi if alibi is not None else cu_seqlens_q,
            out.stride(0), out.stride(1),
            alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0,
            problem.total_q, problem.batch, *scalars, left, right)
    kwargs = dict(
        GROUP=problem.group_size, HEAD_DIM=d, BLOCK_D=first, BLOCK_D2=second, BLOCK_M=rows,
        BLOCK_N=block_n, STAGES=CONFIG["stages"],
        CONSUMER_REGS=CONFIG["consumer_regs_three" if rows == 192 else "consumer_regs"],
        PRODUCER_REGS=CONFIG["producer_regs"],
        TOP_LEFT=problem.mask_alignment == "top_left", WINDOW_LEFT=left >= 0,
        WINDOW_RIGHT=right >= 0, HAS_SINKS=sinks is not None,
        HAS_SOFTCAP=softcap_mode(problem.softcap), HAS_ALIBI=alibi is not None,
        DEVICE_TILES=device_tiles, GROUPED=len(grid) == 3, num_warps=4)
    if record:
        from .replay import LaunchRecord, present

        names = (*REPLAY_ARGS, *present(Alibi=alibi, Sinks=sinks)[0])
        if not second:
            return LaunchRecord.launch(_hopper_fwd_kernel, grid, args, kwargs, names)
        record = LaunchRecord.launch(_hopper_fwd_kernel, grid, args, kwargs,
                                     (*names, *SECOND_CHUNK_ARGS))
        return None if record is None else record.repeating(0, 1, 2)
    _hopper_fwd_kernel[grid](*args, **kwargs)
    return None


# The arguments a replay of the kernel's launch replaces (replay.LaunchRecord). With
# DEVICE_TILES the tile arguments are unread placeholders; batch and the scalars come from
# the problem, the same at every replay.
REPLAY_ARGS = ("desc_q", "desc_k", "desc_v", "Out", "Lse", "CuQ", "CuK")
# head dims read in two chunks (split_widths): q, k and v again, for the second chunks'
# descriptors, after every other slot (the record repeats them: LaunchRecord.repeating)
SECOND_CHUNK_ARGS = ("desc_q2", "desc_k2", "desc_v2")
