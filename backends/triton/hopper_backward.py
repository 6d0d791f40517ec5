"""Warp-specialised dK/dV kernel of the varlen backward for Hopper (sm_90), written in Gluon.

Serves plain calls (no softcap, ALiBi, dropout or custom mask; head dim 64; 80 and 96 read
as two column chunks, the other multiples of 8 up to 128 zero-padded to 128, as the forward
reads them; and through hopper_dkdv_wide.py the head dims 136-256, 144, 160 and 192 as
128 + a power of two, the others at width 256; fp16/bf16; host lengths or device offsets):
backward.py sends it the calls whose mask has a right bound (causal or a right window), and
with CONFIG["right_unbounded"] (on) those without one (no mask, left-only windows) too.
One program per
(key tile of 128 rows, kv head), as the tl dK/dV kernel (backward.py): it loops over the
query heads of its group and the query blocks that see its keys, so GQA gradients are
reduced in registers and nothing is written twice (deterministic). Scheduled by hand:

* a producer warp loads the program's K and V once, then streams Q and dO blocks through
  TMA into a ring of STAGES buffers (ready / empty mbarriers);
* two consumer warpgroups (three with CONFIG["block_n"] 192) own 64 key rows each and issue
  S^T = K Q^T and dP^T = V dO^T as asynchronous wgmma, then dV += P^T dO while dS^T is
  computed, then dK += dS^T Q.

Query rows past the sequence's end that a Q/dO box reads are zeroed in shared memory before
use (they are the reduction dimension of dV and dK, where 0 * NaN would leak). The same calls
take dQ from the Gluon dQ kernel (hopper_dq.py).
"""

from __future__ import annotations

import torch

from . import hopper_dkdv_wide, hopper_forward
from .hopper_forward import descriptor, gluon, lengths_served, tma_rows

if gluon is not None:
    from triton.experimental.gluon import language as gl
    from triton.experimental.gluon.language.nvidia.hopper import (
        fence_async_shared,
        mbarrier,
        tma,
        warpgroup_mma,
        warpgroup_mma_wait,
    )

    from .hopper_forward import (
        allocate_barrier,
        allocate_program_rows,
        allocate_ring,
        allocate_rows,
        block_row_statistics,
        box_coordinates,
        first_row_statistics,
        load_three_boxes,
        mma_layout,
        operand_a_layout,
        probabilities_t,
        program_tile,
        query_range,
        row_layout,
        sequence_bounds,
        warpgroup_rows,
        zero_rows_from,
    )

BLOCK_N = 128  # key rows per program (two warpgroups of 64); width 256: hopper_dkdv_wide
# (query block by head dim, stages, consumer registers, producer registers), from benchmarks
# on an H200 (docs/performance.md); 64-row query blocks spill at head dim 128 (Triton 3.6).
# block_n: key rows per program by width, 128 or 192 (three consumer warpgroups of 64 keys,
# consumer_regs_three registers each: three dependency chains per SM where the d64 dK/dV is
# latency-bound, docs/performance.md v14); 192 with 32-row query blocks ran 1.03x the time
# of 128 x 64 over the d64 tune classes (up to 1.31x on short ones; v17), so 128 ships.
# Width 256 runs hopper_dkdv_wide.py: "wide" holds its (query block, stages) by the width of
# its second column chunk (hopper_dkdv_wide.second_width: 128 at d256, 64 at d192, 32 at
# d160, 16 at d144); d192's 64 x 2: 0.95x the time of 32 x 3 on the d192 GQA tune classes
# (0.88x non-causal long, 1.02x causal short; v17). device_offsets: the widths served
# without host lengths; at width 64 the tl backward was the faster one there on short
# sequences (H200, tune classes: 0.73 against 0.78 ms on d64 GQA short, 10-12% slower on
# medium / long; docs/performance.md v13, v16). split: read head dims 80, 96 (and in the
# wide kernel 144, 160, 192) as two column chunks (hopper_forward.split_widths) rather than
# zero-padded (d192 causal forward+backward: 4.87 -> 4.31 ms medium, v16). split_block_m: the
# query block of head dims this kernel reads in two chunks (80 = 64 + 16, 96 = 64 + 32), and
# split_causal_rows (N, rows) that of their causal calls whose longest query sequence exceeds
# N tokens (or is not known): over the d96 tune classes 64 rows ran 0.95-0.97x the time of 32
# on causal medium and long calls, 1.01-1.05x on short and non-causal ones (H200, v18).
# device_offsets_above: {width: N}, device offsets also served at that width when the longest
# sequence exceeds N tokens (hopper_forward.lengths_served; hopper_dq's has the same): at
# width 64 the Gluon backward lost 7-25% on short calls (v16), and with N = 256 the d64 tune
# classes ran 0.90x the time (geometric mean; 0.83-0.93x medium and long, v17).
# prefetch: the widths whose query blocks' lse and delta are loaded one block ahead, so that
# the global loads' latency is not exposed between S^T's issue and its use (H200,
# forward+backward: d64 2.98 -> 2.38 ms, d192 7.80 -> 7.12 ms; docs/performance.md v15); width
# 256: hopper_dkdv_wide's. right_unbounded: backward.py also sends calls with no right mask
# bound (no mask, left-only windows) here, not to the tl dK/dV (non-causal forward+backward,
# H200: d128 long 33.7 -> 31.6 ms, d256 long 169 -> 110, d192 147 -> 88; v16).
CONFIG = {"block_m": {64: 64, 128: 32}, "block_n": {64: 128, 128: 128}, "stages": 3,
          "wide": {128: (32, 3), 64: (64, 2), 32: (32, 3), 16: (32, 3)},
          "consumer_regs": 240, "consumer_regs_three": 160, "producer_regs": 24,
          "device_offsets": (128, 256), "device_offsets_above": {64: 256}, "split": True,
          "split_block_m": 32,
          "split_causal_rows": (256, 64), "prefetch": (64, 128, 256), "right_unbounded": True}

if gluon is not None:

    @gluon.jit
    def _produce(loads, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr,
                 BLOCK_M: gl.constexpr, STAGES: gl.constexpr, PADDED: gl.constexpr,
                 TWO_CHUNKS: gl.constexpr, CONSUMERS: gl.constexpr):
        """Producer warp: K and V once, then Q and dO of every (head, query block), into
        buffers shaped as the descriptors' boxes; with TWO_CHUNKS the rows' columns past
        BLOCK_D too, through the second descriptors, on the same barriers. Three consumers:
        K and V as three 64-row boxes (k_smem / v_smem (3, 64, BLOCK_D))."""
        (desc_q, desc_k, desc_v, desc_do, desc_q2, desc_k2, desc_v2, desc_do2, k_smem, v_smem,
         q_smem, do_smem, k2_smem, v2_smem, q2_smem, do2_smem, kv_bar, ready, empty, k_row, kvh,
         q_row, share, lo, n_blocks) = loads
        if CONSUMERS == 3:
            load_three_boxes(desc_k, desc_v, k_row, kvh, kv_bar, k_smem, v_smem, HEAD_DIM,
                             PADDED)
        elif TWO_CHUNKS:
            mbarrier.expect(kv_bar, 2 * desc_k.block_type.nbytes + 2 * desc_k2.block_type.nbytes)
            box = box_coordinates(k_row, kvh, HEAD_DIM, PADDED)
            tma.async_copy_global_to_shared(desc_k, box, kv_bar, k_smem)
            tma.async_copy_global_to_shared(desc_v, box, kv_bar, v_smem)
            tma.async_copy_global_to_shared(desc_k2, [k_row, kvh, BLOCK_D], kv_bar, k2_smem)
            tma.async_copy_global_to_shared(desc_v2, [k_row, kvh, BLOCK_D], kv_bar, v2_smem)
        else:
            mbarrier.expect(kv_bar, 2 * desc_k.block_type.nbytes)
            box = box_coordinates(k_row, kvh, HEAD_DIM, PADDED)
            tma.async_copy_global_to_shared(desc_k, box, kv_bar, k_smem)
            tma.async_copy_global_to_shared(desc_v, box, kv_bar, v_smem)
        c = 0
        for g in range(GROUP):
            for i in range(n_blocks):
                st = c % STAGES
                use = c // STAGES
                box = box_coordinates(q_row + lo + i * BLOCK_M, share * GROUP + g, HEAD_DIM,
                                      PADDED)
                mbarrier.wait(empty.index(st), (use & 1) ^ 1, pred=use > 0)
                if TWO_CHUNKS:
                    mbarrier.expect(ready.index(st), 2 * desc_q.block_type.nbytes
                                    + 2 * desc_q2.block_type.nbytes)
                else:
                    mbarrier.expect(ready.index(st), 2 * desc_q.block_type.nbytes)
                tma.async_copy_global_to_shared(desc_q, box, ready.index(st), q_smem.index(st))
                tma.async_copy_global_to_shared(desc_do, box, ready.index(st),
                                                do_smem.index(st))
                if TWO_CHUNKS:
                    box2 = [q_row + lo + i * BLOCK_M, share * GROUP + g, BLOCK_D]
                    tma.async_copy_global_to_shared(desc_q2, box2, ready.index(st),
                                                    q2_smem.index(st))
                    tma.async_copy_global_to_shared(desc_do2, box2, ready.index(st),
                                                    do2_smem.index(st))
                c += 1

    @gluon.jit
    def _consume(args, WG: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                 BLOCK_D: gl.constexpr, BLOCK_D2: gl.constexpr, BLOCK_M: gl.constexpr,
                 STAGES: gl.constexpr, WINDOW_LEFT: gl.constexpr, WINDOW_RIGHT: gl.constexpr,
                 PREFETCH: gl.constexpr, CONSUMERS: gl.constexpr):
        """Consumer warpgroup WG: dK and dV of key rows [n0 + 64 WG, + 64). Rows are BLOCK_D
        wide, HEAD_DIM of them data and the rest zeros (TMA's fill past the head dim); with
        BLOCK_D2 (HEAD_DIM = BLOCK_D + BLOCK_D2, hopper_forward.split_widths) their last
        BLOCK_D2 columns sit in the second buffers: S^T and dP^T sum two matmuls each, and
        dK and dV are two accumulators each. With PREFETCH each query block's lse and delta
        are loaded during the block before."""
        (k_smem, v_smem, q_smem, do_smem, k2_smem, v2_smem, q2_smem, do2_smem, kv_bar, ready,
         empty, Lse, Delta, DK, DV, q_start, sq, k_start, sk, n0, offset, share, lo, n_blocks,
         full_lo, full_hi, qk_scale, sm_scale, window_left, window_right, total_q, stride_dkt,
         stride_dkh, stride_dvt, stride_dvh) = args
        ROWS: gl.constexpr = 64
        dtype: gl.constexpr = q_smem.dtype
        S_LAYOUT: gl.constexpr = mma_layout(BLOCK_M)
        G_LAYOUT: gl.constexpr = mma_layout(BLOCK_D)
        A_LAYOUT: gl.constexpr = operand_a_layout(BLOCK_D)
        COL_S: gl.constexpr = gl.SliceLayout(0, S_LAYOUT)
        r0 = n0 + WG * ROWS
        k_rows = warpgroup_rows(k_smem, WG, CONSUMERS)
        v_rows = warpgroup_rows(v_smem, WG, CONSUMERS)
        kj = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, S_LAYOUT))
        s_init = gl.zeros([ROWS, BLOCK_M], gl.float32, S_LAYOUT)
        dk = gl.zeros([ROWS, BLOCK_D], gl.float32, G_LAYOUT)
        dv = gl.zeros([ROWS, BLOCK_D], gl.float32, G_LAYOUT)
        TWO_CHUNKS: gl.constexpr = BLOCK_D2 > 0
        # wgmma groups still running when S^T (then dP^T) is waited for: the other
        # matrix's one or two, then dV's
        PENDING: gl.constexpr = 2 if TWO_CHUNKS else 1
        if TWO_CHUNKS:
            G2_LAYOUT: gl.constexpr = mma_layout(BLOCK_D2)
            k2_rows = k2_smem.slice(WG * ROWS, ROWS)
            v2_rows = v2_smem.slice(WG * ROWS, ROWS)
            dk2 = gl.zeros([ROWS, BLOCK_D2], gl.float32, G2_LAYOUT)
            dv2 = gl.zeros([ROWS, BLOCK_D2], gl.float32, G2_LAYOUT)
        lse2_next, delta_next = first_row_statistics(Lse, Delta, share * GROUP, lo, total_q,
                                                     q_start, sq, BLOCK_M, COL_S, PREFETCH)
        mbarrier.wait(kv_bar, 0)
        # the last query block crosses the sequence's end: its rows past it are zeroed
        tail = sq - (lo + (n_blocks - 1) * BLOCK_M)
        c = 0
        for g in range(GROUP):
            h = share * GROUP + g
            for i in range(n_blocks):
                st = c % STAGES
                qs = lo + i * BLOCK_M
                mbarrier.wait(ready.index(st), (c // STAGES) & 1)
                if (i == n_blocks - 1) & (tail < BLOCK_M):
                    # each warpgroup zeroes the rows itself (the same values: no handshake
                    # between them, which once per head could run a phase ahead)
                    zero_rows_from(q_smem.index(st), tail, BLOCK_M, BLOCK_D)
                    zero_rows_from(do_smem.index(st), tail, BLOCK_M, BLOCK_D)
                    if TWO_CHUNKS:
                        zero_rows_from(q2_smem.index(st), tail, BLOCK_M, BLOCK_D2)
                        zero_rows_from(do2_smem.index(st), tail, BLOCK_M, BLOCK_D2)
                    fence_async_shared()
                    gl.thread_barrier()
                q_buf = q_smem.index(st)
                do_buf = do_smem.index(st)
                st_acc = warpgroup_mma(k_rows, q_buf.permute((1, 0)), s_init, use_acc=False,
                                       is_async=True)
                if TWO_CHUNKS:
                    st_acc = warpgroup_mma(k2_rows, q2_smem.index(st).permute((1, 0)), st_acc,
                                           is_async=True)
                dpt = warpgroup_mma(v_rows, do_buf.permute((1, 0)), s_init, use_acc=False,
                                    is_async=True)
                if TWO_CHUNKS:
                    dpt = warpgroup_mma(v2_rows, do2_smem.index(st).permute((1, 0)), dpt,
                                        is_async=True)
                qi = qs + gl.arange(0, BLOCK_M, layout=COL_S)
                q_ok = qi < sq
                lse2, delta, lse2_next, delta_next = block_row_statistics(
                    Lse, Delta, h, share * GROUP + GROUP - 1, qs, lo, i == n_blocks - 1, qi,
                    q_ok, total_q, q_start, sq, lse2_next, delta_next, BLOCK_M, COL_S, PREFETCH)
                s = warpgroup_mma_wait(num_outstanding=PENDING, deps=(st_acc, ))
                pt = probabilities_t(s, qk_scale, lse2, qs, qi, q_ok, kj, offset, full_lo,
                                     full_hi, window_left, window_right, BLOCK_M,
                                     WINDOW_LEFT, WINDOW_RIGHT)
                p16 = gl.convert_layout(pt.to(dtype), A_LAYOUT)
                dv = warpgroup_mma(p16, do_buf, dv, is_async=True)
                if TWO_CHUNKS:
                    dv2 = warpgroup_mma(p16, do2_smem.index(st), dv2, is_async=True)
                dp = warpgroup_mma_wait(num_outstanding=PENDING, deps=(dpt, ))
                dst = pt * (dp - delta[None, :])
                ds16 = gl.convert_layout(dst.to(dtype), A_LAYOUT)
                dk = warpgroup_mma(ds16, q_buf, dk, is_async=True)
                if TWO_CHUNKS:
                    dk2 = warpgroup_mma(ds16, q2_smem.index(st), dk2, is_async=True)
                    dk, dk2 = warpgroup_mma_wait(num_outstanding=0, deps=(dk, dk2))
                    dv, dv2 = warpgroup_mma_wait(num_outstanding=0, deps=(dv, dv2))
                else:
                    dk = warpgroup_mma_wait(num_outstanding=0, deps=(dk, ))
                    dv = warpgroup_mma_wait(num_outstanding=0, deps=(dv, ))
                mbarrier.arrive(empty.index(st))
                c += 1

        OUT_LAYOUT: gl.constexpr = gl.BlockedLayout([1, 8], [32 * 8 // BLOCK_D, BLOCK_D // 8],
                                                    [4, 1], [1, 0])
        rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, OUT_LAYOUT))
        cols = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, OUT_LAYOUT))
        ok = (rows < sk)[:, None]
        if BLOCK_D != HEAD_DIM:
            ok = ok & (cols < HEAD_DIM)[None, :]
        rows64 = (k_start + rows).to(gl.int64)[:, None]
        dk_out = gl.convert_layout((dk * sm_scale).to(DK.dtype.element_ty), OUT_LAYOUT)
        gl.store(DK + rows64 * stride_dkt + share * stride_dkh + cols[None, :], dk_out, mask=ok)
        dv_out = gl.convert_layout(dv.to(DV.dtype.element_ty), OUT_LAYOUT)
        gl.store(DV + rows64 * stride_dvt + share * stride_dvh + cols[None, :], dv_out, mask=ok)
        if TWO_CHUNKS:  # the last BLOCK_D2 columns
            OUT2_LAYOUT: gl.constexpr = row_layout(BLOCK_D2)
            rows2 = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, OUT2_LAYOUT))
            cols2 = BLOCK_D + gl.arange(0, BLOCK_D2, layout=gl.SliceLayout(0, OUT2_LAYOUT))
            ok2 = (rows2 < sk)[:, None]
            rows2_64 = (k_start + rows2).to(gl.int64)[:, None]
            dk2_out = gl.convert_layout((dk2 * sm_scale).to(DK.dtype.element_ty), OUT2_LAYOUT)
            gl.store(DK + rows2_64 * stride_dkt + share * stride_dkh + cols2[None, :], dk2_out,
                     mask=ok2)
            dv2_out = gl.convert_layout(dv2.to(DV.dtype.element_ty), OUT2_LAYOUT)
            gl.store(DV + rows2_64 * stride_dvt + share * stride_dvh + cols2[None, :], dv2_out,
                     mask=ok2)

    @gluon.jit(do_not_specialize=["total_q", "batch"])
    def _hopper_dkdv_kernel(desc_q, desc_k, desc_v, desc_do, desc_q2, desc_k2, desc_v2,
                            desc_do2, Lse, Delta, DK, DV, CuQ, CuK,
                            TileSeq, TileBlk, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                            total_q, batch, qk_scale, sm_scale, window_left, window_right,
                            GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                            BLOCK_D: gl.constexpr, BLOCK_D2: gl.constexpr,
                            BLOCK_M: gl.constexpr,
                            BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                            CONSUMER_REGS: gl.constexpr,
                            PRODUCER_REGS: gl.constexpr, TOP_LEFT: gl.constexpr,
                            WINDOW_LEFT: gl.constexpr, WINDOW_RIGHT: gl.constexpr,
                            SPLIT: gl.constexpr, DEVICE_TILES: gl.constexpr,
                            PREFETCH: gl.constexpr):
        # GROUP query heads per program: the SPLIT-th share of kv head kvh's (group_split.py)
        share = gl.program_id(1)
        kvh = share // SPLIT
        b, blk = program_tile(CuK, TileSeq, TileBlk, batch, gl.program_id(0), BLOCK_N,
                              DEVICE_TILES)
        if DEVICE_TILES:  # noqa: SIM102 (a constexpr branch: host tiles have no extra programs)
            if b >= batch:
                return
        n0 = blk * BLOCK_N
        q_start, sq, k_start, sk, offset = sequence_bounds(CuQ, CuK, b, TOP_LEFT)

        lo, n_blocks, full_lo, full_hi = query_range(n0, sq, offset, window_left,
                                                     window_right, BLOCK_M, BLOCK_N,
                                                     WINDOW_LEFT, WINDOW_RIGHT)

        PADDED: gl.constexpr = BLOCK_D != HEAD_DIM
        CONSUMERS: gl.constexpr = BLOCK_N // 64  # warpgroups of 64 key rows
        k_smem, k_box = allocate_program_rows(desc_k, BLOCK_N, BLOCK_D, PADDED)
        v_smem, v_box = allocate_program_rows(desc_v, BLOCK_N, BLOCK_D, PADDED)
        q_smem, q_box = allocate_rows(desc_q, [STAGES, BLOCK_M, BLOCK_D], PADDED)
        do_smem, do_box = allocate_rows(desc_do, [STAGES, BLOCK_M, BLOCK_D], PADDED)
        TWO_CHUNKS: gl.constexpr = BLOCK_D2 > 0
        if TWO_CHUNKS:  # the rows' last BLOCK_D2 columns (desc_*2 boxes)
            k2_smem, k2_box = allocate_rows(desc_k2, [BLOCK_N, BLOCK_D2], True)
            v2_smem, v2_box = allocate_rows(desc_v2, [BLOCK_N, BLOCK_D2], True)
            q2_smem, q2_box = allocate_rows(desc_q2, [STAGES, BLOCK_M, BLOCK_D2], True)
            do2_smem, do2_box = allocate_rows(desc_do2, [STAGES, BLOCK_M, BLOCK_D2], True)
        else:  # placeholders the partitions never read
            k2_smem, v2_smem, q2_smem, do2_smem = k_smem, v_smem, q_smem, do_smem
            k2_box, v2_box, q2_box, do2_box = k_box, v_box, q_box, do_box
        kv_bar = allocate_barrier(1)
        ready, empty = allocate_ring(STAGES, CONSUMERS)
        fence_async_shared()

        # runtime values travel as one tuple each (the partitions unpack it); constexprs
        # stay arguments of their own, and the partition lists literal
        args = (k_smem, v_smem, q_smem, do_smem, k2_smem, v2_smem, q2_smem, do2_smem, kv_bar,
                ready, empty, Lse, Delta, DK, DV, q_start, sq, k_start, sk, n0, offset, share,
                lo, n_blocks, full_lo, full_hi, qk_scale, sm_scale, window_left, window_right,
                total_q, stride_dkt, stride_dkh, stride_dvt, stride_dvh)
        loads = (desc_q, desc_k, desc_v, desc_do, desc_q2, desc_k2, desc_v2, desc_do2, k_box,
                 v_box, q_box, do_box, k2_box, v2_box, q2_box, do2_box, kv_bar, ready, empty,
                 k_start + n0, kvh, q_start, share, lo, n_blocks)
        if CONSUMERS == 3:
            gl.warp_specialize([
                (_consume, (args, 0, GROUP, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, STAGES,
                            WINDOW_LEFT, WINDOW_RIGHT, PREFETCH, CONSUMERS)),
                (_consume, (args, 1, GROUP, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, STAGES,
                            WINDOW_LEFT, WINDOW_RIGHT, PREFETCH, CONSUMERS)),
                (_consume, (args, 2, GROUP, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, STAGES,
                            WINDOW_LEFT, WINDOW_RIGHT, PREFETCH, CONSUMERS)),
                (_produce, (loads, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, STAGES, PADDED,
                            TWO_CHUNKS, CONSUMERS)),
            ], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_consume, (args, 0, GROUP, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, STAGES,
                            WINDOW_LEFT, WINDOW_RIGHT, PREFETCH, CONSUMERS)),
                (_consume, (args, 1, GROUP, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, STAGES,
                            WINDOW_LEFT, WINDOW_RIGHT, PREFETCH, CONSUMERS)),
                (_produce, (loads, GROUP, HEAD_DIM, BLOCK_D, BLOCK_M, STAGES, PADDED,
                            TWO_CHUNKS, CONSUMERS)),
            ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def block_n(head_dim: int) -> int:
    """Key rows per program at ``head_dim``'s width (the launch's key tiles): 64 a consumer
    warpgroup, CONFIG["block_n"] (192: three warpgroups) where the rows are one chunk,
    BLOCK_N for two-chunk head dims, hopper_dkdv_wide.BLOCK_N at width 256."""
    if hopper_forward.block_d(head_dim) == hopper_dkdv_wide.WIDTH:
        return hopper_dkdv_wide.BLOCK_N
    return hopper_forward.rows_per_program(head_dim, CONFIG, "block_n", BLOCK_N)


def query_block(head_dim: int, causal: bool = False, max_seqlen_q: int = 0) -> int:
    """Query rows per block of this module's kernel (widths 64 and 128): CONFIG["block_m"] at
    the head dim's width; for head dims read as two column chunks CONFIG["split_block_m"], or
    CONFIG["split_causal_rows"]'s rows for a ``causal`` call whose longest query sequence
    ``max_seqlen_q`` (0: not known) exceeds its bound."""
    if hopper_forward.split_widths(head_dim, CONFIG["split"]) is None:
        return CONFIG["block_m"][hopper_forward.block_d(head_dim)]
    bound, rows = CONFIG["split_causal_rows"]
    if causal and not 0 < max_seqlen_q <= bound:
        return rows
    return CONFIG["split_block_m"]


def supports(problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
             plain: bool) -> bool:
    """Whether this kernel computes dK/dV of a call: the conditions of
    hopper_forward.supports, a head dim read at a width of its own CONFIG["block_m"] (64 or
    128, the others zero-padded as the forward reads them) or at width 256
    (hopper_dkdv_wide), lengths it takes (hopper_forward.lengths_served), and dO laid out like
    Q."""
    width = hopper_forward.block_d(problem.head_dim)
    return ((width in CONFIG["block_m"] or width == hopper_dkdv_wide.WIDTH)
            and lengths_served(problem, width, CONFIG)
            and hopper_forward.supports(problem, q, k, v, plain)
            and tma_rows(dout, problem.head_dim))


def dkdv(problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
         lse: torch.Tensor, delta: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
         cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
         tiles: tuple[int, torch.Tensor, torch.Tensor, bool], qk_scale: float, *,
         split: int = 1, record: bool = False):
    """Writes ``dk`` and ``dv`` (total_k, nheads_k, d) over the key tiles of BLOCK_N rows;
    ``tiles``: forward.launch_tiles' (programs, tile_seq, tile_blk, device_tiles) for the
    keys, a host-planned list or (device_tiles) an upper bound of programs that find their
    tiles from cu_seqlens_k; lse and delta: float32 (nheads, total_q). Width 256 runs
    hopper_dkdv_wide.py's kernel (its rows as a 128-column box and a second of
    hopper_dkdv_wide.second_width, 64-key tiles), the
    others this module's. With ``record``, returns the replay.LaunchRecord or None: replays
    take REPLAY_ARGS, with q, k, v and dout for the descriptors."""
    d = problem.head_dim
    width = hopper_forward.block_d(d)
    left, right = problem.window
    programs, tile_seq, tile_blk, device_tiles = tiles
    if width == hopper_dkdv_wide.WIDTH:
        kernel = hopper_dkdv_wide._hopper_dkdv_wide_kernel
        box, rows = hopper_dkdv_wide.HALF, hopper_dkdv_wide.BLOCK_N
        second = hopper_dkdv_wide.second_width(d, CONFIG["split"])
        block_m, stages = CONFIG["wide"][second]
        own = dict(HALF=box, HALF2=second, STAGES=stages)
    else:
        chunks = hopper_forward.split_widths(d, CONFIG["split"])
        box, second = chunks if chunks is not None else (width, 0)
        kernel, rows = _hopper_dkdv_kernel, block_n(d)
        block_m = query_block(d, problem.causal, problem.max_seqlen_q)
        own = dict(BLOCK_D=box, BLOCK_D2=second, STAGES=CONFIG["stages"])
    grid = (programs, problem.nheads_k * split)
    kv_rows = hopper_forward.box_rows(rows)
    descriptors = (descriptor(q, d, block_m, box), descriptor(k, d, kv_rows, box),
                   descriptor(v, d, kv_rows, box), descriptor(dout, d, block_m, box))
    seconds = ((descriptor(q, d, block_m, second), descriptor(k, d, rows, second),
                descriptor(v, d, rows, second), descriptor(dout, d, block_m, second))
               if second else (None,) * 4)
    args = (*descriptors, *seconds, lse, delta, dk, dv, cu_seqlens_q, cu_seqlens_k,
            tile_seq, tile_blk, dk.stride(0), dk.stride(1), dv.stride(0), dv.stride(1),
            problem.total_q, problem.batch, qk_scale, problem.scale, left, right)
    kwargs = dict(
        GROUP=problem.group_size // split, SPLIT=split, HEAD_DIM=d, BLOCK_M=block_m,
        BLOCK_N=rows, **own,
        CONSUMER_REGS=CONFIG["consumer_regs_three" if rows == 192 else "consumer_regs"],
        PRODUCER_REGS=CONFIG["producer_regs"], TOP_LEFT=problem.mask_alignment == "top_left",
        WINDOW_LEFT=left >= 0, WINDOW_RIGHT=right >= 0, DEVICE_TILES=device_tiles,
        PREFETCH=width in CONFIG["prefetch"], num_warps=4)
    if record:
        from .replay import LaunchRecord

        if not second:
            return LaunchRecord.launch(kernel, grid, args, kwargs, REPLAY_ARGS)
        record = LaunchRecord.launch(kernel, grid, args, kwargs, REPLAY_TWO_CHUNK_ARGS)
        return None if record is None else record.repeating(0, 1, 2, 3)
    kernel[grid](*args, **kwargs)
    return None


# The arguments a replay of either dK/dV kernel's launch replaces (replay.LaunchRecord).
REPLAY_ARGS = ("desc_q", "desc_k", "desc_v", "desc_do", "Lse", "Delta", "DK", "DV", "CuQ", "CuK")
# head dims read in two chunks (hopper_forward.split_widths, and every width-256 launch):
# q, k, v and dout again, for the second chunks' descriptors (the record repeats them:
# LaunchRecord.repeating)
REPLAY_TWO_CHUNK_ARGS = (*REPLAY_ARGS, "desc_q2", "desc_k2", "desc_v2", "desc_do2")
