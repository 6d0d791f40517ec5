"""Warp-specialised dK/dV kernel for wide head dims (129-256), Hopper (sm_90), in Gluon.

The narrow kernel (hopper_backward.py) gives each consumer warpgroup 64 keys and all of their
dK/dV columns. At width 256 those two float32 accumulators alone would take 256 registers a
thread. Here one program owns 64 keys, and its two consumer warpgroups split the columns:
warpgroup w accumulates dK and dV columns [128 w, 128 w + 128), 128 registers a thread.

Warpgroup 0 computes S^T = K Q^T and P^T, warpgroup 1 dP^T = V dO^T and dS^T, each over all
256 columns. They pass P^T and dS^T through shared memory, per stage of the Q/dO ring, with
one mbarrier each way: the minimal matmul work. (A variant where both warpgroups computed
the whole S^T and dP^T, never waiting on each other, did 1.5x the matmul work, spilled at
32-row query blocks and ran 1.26-1.27x slower on the H200: docs/performance.md.)

Every row lives in shared memory as two column chunks, TMA boxes (rows, 1, width) of the
(rows, heads, head_dim) tensors: columns [0, 128), and from column 128 either the head dim's
remaining power of two (144, 160, 192 = 128 + 16, 32, 64: hopper_forward.split_widths, with
CONFIG["split"]) or 128 more, TMA filling the columns past the head dim with zeros (the other
head dims 136-248 read as 256, with nothing copied). Warpgroup 1 then owns the second chunk's
dK / dV columns, and S^T and dP^T reduce over 128 + the second chunk's width.

Serves the calls of hopper_backward.supports at width 256, launched by hopper_backward.dkdv:
plain, causal or right-bounded, one program per (key tile of 64 rows, kv head), looping over
the group's query heads and the query blocks that see its keys (GQA reduced in registers;
deterministic). Query rows past a sequence's end are zeroed in shared memory before use, as
in the narrow kernel.
"""

from __future__ import annotations

from .hopper_forward import gluon

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
        allocate_ring,
        allocate_rows,
        block_row_statistics,
        first_row_statistics,
        mma_layout,
        operand_a_layout,
        probabilities_t,
        program_tile,
        query_range,
        row_layout,
        sequence_bounds,
        zero_rows_from,
    )

WIDTH = 256  # the head-dim width served (the head dims hopper_forward.block_d reads as 256)
HALF = 128  # columns of the first chunk (warpgroup 0's share of dK and dV)
BLOCK_N = 64  # key rows per program (both warpgroups' rows)


def second_width(head_dim: int, split: bool) -> int:
    """Columns of the second chunk (warpgroup 1's share of dK and dV) at ``head_dim`` (129-256):
    the power of two holding the columns past HALF when ``split`` (hopper_backward's
    CONFIG["split"]) and hopper_forward.split_widths reads the head dim as HALF + that,
    otherwise HALF (zero-filled past the head dim)."""
    from .hopper_forward import split_widths

    chunks = split_widths(head_dim, split)
    return chunks[1] if chunks is not None and chunks[0] == HALF else HALF


if gluon is not None:

    @gluon.constexpr_function
    def _share(wg, first, second):
        """The width of warpgroup ``wg``'s columns of dK and dV."""
        return first if wg == 0 else second

    @gluon.jit
    def _produce(desc_q, desc_k, desc_v, desc_do, desc_q2, desc_k2, desc_v2, desc_do2, k_box,
                 v_box, q_box, do_box, k2_box, v2_box, q2_box, do2_box, kv_bar, ready, empty,
                 k_row, kvh, q_row, share, lo, n_blocks, GROUP: gl.constexpr,
                 BLOCK_M: gl.constexpr, HALF: gl.constexpr, STAGES: gl.constexpr):
        """Producer warp: both chunks of K and V once, then both chunks of Q and dO of every
        (head, query block); the first chunks through desc_*, the second (from column HALF)
        through desc_*2, on the same barriers."""
        mbarrier.expect(kv_bar, 2 * desc_k.block_type.nbytes + 2 * desc_k2.block_type.nbytes)
        tma.async_copy_global_to_shared(desc_k, [k_row, kvh, 0], kv_bar, k_box)
        tma.async_copy_global_to_shared(desc_v, [k_row, kvh, 0], kv_bar, v_box)
        tma.async_copy_global_to_shared(desc_k2, [k_row, kvh, HALF], kv_bar, k2_box)
        tma.async_copy_global_to_shared(desc_v2, [k_row, kvh, HALF], kv_bar, v2_box)
        n = 0
        for g in range(GROUP):
            for i in range(n_blocks):
                st = n % STAGES
                use = n // STAGES
                row = q_row + lo + i * BLOCK_M
                head = share * GROUP + g
                mbarrier.wait(empty.index(st), (use & 1) ^ 1, pred=use > 0)
                mbarrier.expect(ready.index(st), 2 * desc_q.block_type.nbytes
                                + 2 * desc_q2.block_type.nbytes)
                tma.async_copy_global_to_shared(desc_q, [row, head, 0], ready.index(st),
                                                q_box.index(st))
                tma.async_copy_global_to_shared(desc_do, [row, head, 0], ready.index(st),
                                                do_box.index(st))
                tma.async_copy_global_to_shared(desc_q2, [row, head, HALF], ready.index(st),
                                                q2_box.index(st))
                tma.async_copy_global_to_shared(desc_do2, [row, head, HALF], ready.index(st),
                                                do2_box.index(st))
                n += 1

    @gluon.jit
    def _allocate_signals(STAGES: gl.constexpr):
        """STAGES mbarriers, each completed by one warpgroup's arrival."""
        bars = gl.allocate_shared_memory(gl.int64, [STAGES, 1], mbarrier.MBarrierLayout())
        for i in gl.static_range(STAGES):
            mbarrier.init(bars.index(i), count=1)
        return bars

    @gluon.jit
    def _store_half(dk, dv, DK, DV, k_start, sk, n0, share, sm_scale, stride_dkt, stride_dkh,
                    stride_dvt, stride_dvh, WG: gl.constexpr, HEAD_DIM: gl.constexpr,
                    BLOCK_N: gl.constexpr, HALF: gl.constexpr, W: gl.constexpr):
        """Writes warpgroup WG's W columns of dK (scaled) and dV, from column HALF WG, for key
        rows [n0, + BLOCK_N) below sk, columns below HEAD_DIM."""
        OUT_LAYOUT: gl.constexpr = row_layout(W)
        rows = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, OUT_LAYOUT))
        cols = WG * HALF + gl.arange(0, W, layout=gl.SliceLayout(0, OUT_LAYOUT))
        ok = (rows < sk)[:, None] & (cols < HEAD_DIM)[None, :]
        rows64 = (k_start + rows).to(gl.int64)[:, None]
        dk_out = gl.convert_layout((dk * sm_scale).to(DK.dtype.element_ty), OUT_LAYOUT)
        gl.store(DK + rows64 * stride_dkt + share * stride_dkh + cols[None, :], dk_out, mask=ok)
        dv_out = gl.convert_layout(dv.to(DV.dtype.element_ty), OUT_LAYOUT)
        gl.store(DV + rows64 * stride_dvt + share * stride_dvh + cols[None, :], dv_out, mask=ok)

    @gluon.jit
    def _consume(k_smem, v_smem, q_smem, do_smem, k2_smem, v2_smem, q2_smem, do2_smem, pf_smem,
                 pb_smem, ds_smem, kv_bar, ready, empty, p_ready, ds_ready, Lse, Delta, DK, DV,
                 q_start, sq, k_start, sk, n0, offset,
                 share, lo, n_blocks, full_lo, full_hi, qk_scale, sm_scale, window_left,
                 window_right, total_q, stride_dkt, stride_dkh, stride_dvt, stride_dvh,
                 WG: gl.constexpr, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr, HALF: gl.constexpr,
                 HALF2: gl.constexpr, STAGES: gl.constexpr, WINDOW_LEFT: gl.constexpr,
                 WINDOW_RIGHT: gl.constexpr, PREFETCH: gl.constexpr):
        """Consumer warpgroup WG: dK and dV's columns of chunk WG ([0, HALF) in k_smem / q_smem
        and the others, [HALF, + HALF2) in k2_smem / q2_smem and the others). Warpgroup 0
        computes S^T and P^T, warpgroup 1 dP^T and dS^T, each over all columns; they pass
        P^T (float32 for dS^T, and in the input dtype as the dV operand) and dS^T through
        shared memory buffers of the ring's stage (p_ready / ds_ready: the ring's empty
        barrier already waits for both before a stage is refilled). With PREFETCH each
        query block's lse and delta are loaded during the block before."""
        dtype: gl.constexpr = q_smem.dtype
        S_LAYOUT: gl.constexpr = mma_layout(BLOCK_M)
        W: gl.constexpr = _share(WG, HALF, HALF2)
        G_LAYOUT: gl.constexpr = mma_layout(W)
        A_LAYOUT: gl.constexpr = operand_a_layout(W)
        COL_S: gl.constexpr = gl.SliceLayout(0, S_LAYOUT)
        if WG == 0:
            a0 = k_smem
            a1 = k2_smem
        else:
            a0 = v_smem
            a1 = v2_smem
        kj = n0 + gl.arange(0, BLOCK_N, layout=gl.SliceLayout(1, S_LAYOUT))
        s_init = gl.zeros([BLOCK_N, BLOCK_M], gl.float32, S_LAYOUT)
        dk = gl.zeros([BLOCK_N, W], gl.float32, G_LAYOUT)
        dv = gl.zeros([BLOCK_N, W], gl.float32, G_LAYOUT)
        lse2_next, delta_next = first_row_statistics(Lse, Delta, share * GROUP, lo, total_q,
                                                     q_start, sq, BLOCK_M, COL_S, PREFETCH)
        mbarrier.wait(kv_bar, 0)
        tail = sq - (lo + (n_blocks - 1) * BLOCK_M)
        n = 0
        for g in range(GROUP):
            h = share * GROUP + g
            for i in range(n_blocks):
                st = n % STAGES
                phase = (n // STAGES) & 1
                qs = lo + i * BLOCK_M
                mbarrier.wait(ready.index(st), phase)
                if (i == n_blocks - 1) & (tail < BLOCK_M):
                    zero_rows_from(q_smem.index(st), tail, BLOCK_M, HALF)
                    zero_rows_from(do_smem.index(st), tail, BLOCK_M, HALF)
                    zero_rows_from(q2_smem.index(st), tail, BLOCK_M, HALF2)
                    zero_rows_from(do2_smem.index(st), tail, BLOCK_M, HALF2)
                    fence_async_shared()
                    gl.thread_barrier()
                if WG == 0:  # S^T = K Q^T
                    b0 = q_smem.index(st)
                    b1 = q2_smem.index(st)
                    q_half = b0
                    do_half = do_smem.index(st)
                else:  # dP^T = V dO^T
                    b0 = do_smem.index(st)
                    b1 = do2_smem.index(st)
                    q_half = q2_smem.index(st)
                    do_half = b1
                acc = warpgroup_mma(a0, b0.permute((1, 0)), s_init, use_acc=False,
                                    is_async=True)
                acc = warpgroup_mma(a1, b1.permute((1, 0)), acc, is_async=True)
                qi = qs + gl.arange(0, BLOCK_M, layout=COL_S)
                q_ok = qi < sq
                lse2, delta, lse2_next, delta_next = block_row_statistics(
                    Lse, Delta, h, share * GROUP + GROUP - 1, qs, lo, i == n_blocks - 1, qi,
                    q_ok, total_q, q_start, sq, lse2_next, delta_next, BLOCK_M, COL_S, PREFETCH)
                if WG == 0:
                    s = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                    pt = probabilities_t(s, qk_scale, lse2, qs, qi, q_ok, kj, offset, full_lo,
                                         full_hi, window_left, window_right, BLOCK_M,
                                         WINDOW_LEFT, WINDOW_RIGHT)
                    pt_in = pt.to(dtype)
                    pf_smem.index(st).store(pt)
                    pb_smem.index(st).store(pt_in)
                    fence_async_shared()
                    gl.thread_barrier()
                    mbarrier.arrive(p_ready.index(st))
                    dv = warpgroup_mma(gl.convert_layout(pt_in, A_LAYOUT), do_half, dv,
                                       is_async=True)
                    mbarrier.wait(ds_ready.index(st), phase)
                    dk = warpgroup_mma(ds_smem.index(st), q_half, dk, is_async=True)
                else:
                    dp = warpgroup_mma_wait(num_outstanding=0, deps=(acc, ))
                    mbarrier.wait(p_ready.index(st), phase)
                    pt = pf_smem.index(st).load(S_LAYOUT)
                    dst_in = (pt * (dp - delta[None, :])).to(dtype)
                    ds_smem.index(st).store(dst_in)
                    fence_async_shared()
                    gl.thread_barrier()
                    mbarrier.arrive(ds_ready.index(st))
                    dk = warpgroup_mma(gl.convert_layout(dst_in, A_LAYOUT), q_half, dk,
                                       is_async=True)
                    dv = warpgroup_mma(pb_smem.index(st), do_half, dv, is_async=True)
                dk = warpgroup_mma_wait(num_outstanding=0, deps=(dk, ))
                dv = warpgroup_mma_wait(num_outstanding=0, deps=(dv, ))
                mbarrier.arrive(empty.index(st))
                n += 1

        _store_half(dk, dv, DK, DV, k_start, sk, n0, share, sm_scale, stride_dkt, stride_dkh,
                    stride_dvt, stride_dvh, WG, HEAD_DIM, BLOCK_N, HALF, W)

    @gluon.jit(do_not_specialize=["total_q", "batch"])
    def _hopper_dkdv_wide_kernel(desc_q, desc_k, desc_v, desc_do, desc_q2, desc_k2, desc_v2,
                                 desc_do2, Lse, Delta, DK, DV, CuQ, CuK, TileSeq, TileBlk,
                                 stride_dkt, stride_dkh, stride_dvt,
                                 stride_dvh, total_q, batch, qk_scale, sm_scale, window_left,
                                 window_right, GROUP: gl.constexpr, HEAD_DIM: gl.constexpr,
                                 BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                                 HALF: gl.constexpr, HALF2: gl.constexpr,
                                 STAGES: gl.constexpr, CONSUMER_REGS: gl.constexpr,
                                 PRODUCER_REGS: gl.constexpr,
                                 TOP_LEFT: gl.constexpr, WINDOW_LEFT: gl.constexpr,
                                 WINDOW_RIGHT: gl.constexpr, SPLIT: gl.constexpr,
                                 DEVICE_TILES: gl.constexpr, PREFETCH: gl.constexpr):
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

        k_smem, k_box = allocate_rows(desc_k, [BLOCK_N, HALF], True)
        v_smem, v_box = allocate_rows(desc_v, [BLOCK_N, HALF], True)
        q_smem, q_box = allocate_rows(desc_q, [STAGES, BLOCK_M, HALF], True)
        do_smem, do_box = allocate_rows(desc_do, [STAGES, BLOCK_M, HALF], True)
        k2_smem, k2_box = allocate_rows(desc_k2, [BLOCK_N, HALF2], True)
        v2_smem, v2_box = allocate_rows(desc_v2, [BLOCK_N, HALF2], True)
        q2_smem, q2_box = allocate_rows(desc_q2, [STAGES, BLOCK_M, HALF2], True)
        do2_smem, do2_box = allocate_rows(desc_do2, [STAGES, BLOCK_M, HALF2], True)
        kv_bar = allocate_barrier(1)
        ready, empty = allocate_ring(STAGES)
        fence_async_shared()

        EX_LAYOUT: gl.constexpr = gl.NVMMASharedLayout.get_default_for([BLOCK_N, BLOCK_M],
                                                                      desc_q.dtype)
        F_LAYOUT: gl.constexpr = gl.SwizzledSharedLayout(1, 1, 1, [1, 0])
        pf_smem = gl.allocate_shared_memory(gl.float32, [STAGES, BLOCK_N, BLOCK_M], F_LAYOUT)
        pb_smem = gl.allocate_shared_memory(desc_q.dtype, [STAGES, BLOCK_N, BLOCK_M], EX_LAYOUT)
        ds_smem = gl.allocate_shared_memory(desc_q.dtype, [STAGES, BLOCK_N, BLOCK_M], EX_LAYOUT)
        p_ready = _allocate_signals(STAGES)  # warpgroup 0's P^T per stage
        ds_ready = _allocate_signals(STAGES)  # warpgroup 1's dS^T per stage
        fence_async_shared()
        gl.warp_specialize([
            (_consume, (k_smem, v_smem, q_smem, do_smem, k2_smem, v2_smem, q2_smem, do2_smem,
                        pf_smem, pb_smem, ds_smem, kv_bar, ready, empty, p_ready, ds_ready, Lse,
                        Delta, DK, DV, q_start, sq,
                        k_start, sk, n0, offset, share, lo, n_blocks, full_lo, full_hi,
                        qk_scale, sm_scale, window_left, window_right, total_q, stride_dkt,
                        stride_dkh, stride_dvt, stride_dvh, 0, GROUP, HEAD_DIM, BLOCK_M,
                        BLOCK_N, HALF, HALF2, STAGES, WINDOW_LEFT, WINDOW_RIGHT, PREFETCH)),
            (_consume, (k_smem, v_smem, q_smem, do_smem, k2_smem, v2_smem, q2_smem, do2_smem,
                        pf_smem, pb_smem, ds_smem, kv_bar, ready, empty, p_ready, ds_ready, Lse,
                        Delta, DK, DV, q_start, sq,
                        k_start, sk, n0, offset, share, lo, n_blocks, full_lo, full_hi,
                        qk_scale, sm_scale, window_left, window_right, total_q, stride_dkt,
                        stride_dkh, stride_dvt, stride_dvh, 1, GROUP, HEAD_DIM, BLOCK_M,
                        BLOCK_N, HALF, HALF2, STAGES, WINDOW_LEFT, WINDOW_RIGHT, PREFETCH)),
            (_produce, (desc_q, desc_k, desc_v, desc_do, desc_q2, desc_k2, desc_v2, desc_do2,
                        k_box, v_box, q_box, do_box, k2_box, v2_box, q2_box, do2_box, kv_bar,
                        ready, empty, k_start + n0, kvh, q_start, share, lo, n_blocks, GROUP,
                        BLOCK_M, HALF, STAGES)),
        ], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])
