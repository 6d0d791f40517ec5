"""Warp-specialised dQ kernel of the varlen backward for Hopper (sm_90), written in Gluon.

Serves plain calls (no softcap, ALiBi, dropout, custom mask or sinks; any causal or window
mask; head dim 64, 128 or 256, the others read as the forward reads them: two column chunks
(hopper_forward.split_widths) or zero-padded; fp16/bf16; host lengths or device offsets).
One program per
(query tile of BLOCK_M rows, query head), as the forward: it loops over the key blocks its
rows see, so dQ is reduced in registers and written once (deterministic). Scheduled as the
Gluon forward (hopper_forward.py):

* a producer warp loads the tile's Q and dO once, then streams K and V blocks through TMA into
  a ring of STAGES buffers (ready / empty mbarriers);
* two consumer warpgroups own BLOCK_M / 2 query rows each and issue S = Q K^T and
  dP = dO V^T as asynchronous wgmma, form P = exp2(S log2 e scale - lse log2 e) and
  dS = P (dP - delta) in registers, then dQ += dS K.

Key rows past the sequence's end that a K/V box reads are masked out of dS with a select
(never a product: they may hold inf or NaN) and zeroed in K's shared buffer before dS K
reduces over them (0 * NaN would leak). Query rows past the end compute garbage that stays
in their own rows of dQ, which are not stored.
"""

from __future__ import annotations

import torch

from . import hopper_forward
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
        box_coordinates,
        in_window,
        key_range,
        load_three_boxes,
        mma_layout,
        operand_a_layout,
        program_tile,
        release_blocks,
        row_layout,
        row_statistics,
        sequence_bounds,
        warpgroup_rows,
        zero_rows_from,
    )

BLOCK_M = 128  # query rows per program (two warpgroups of 64); see block_m()
# (key block by head dim, stages, consumer registers, producer registers): swept on an H200
# (benchmarks/sweep_configs.py, docs/performance.md v11). device_offsets: the widths served
# without host lengths, and device_offsets_above the widths served above a longest sequence
# (as hopper_backward's: at width 64 the tl backward is faster there on short calls).
# split: read head dims 80-192 as two column chunks (hopper_forward.split_widths). block_m:
# query rows per program by width, 128 or 192 (three consumer warpgroups of 64 rows with
# consumer_regs_three registers each, Q and dO as three 64-row boxes): at width 64, 192 took
# 0.97-0.98x the time of 128 on the d64 matrix cells' forward+backward (H200, v17).
CONFIG = {"block_n": {64: 64, 128: 128, 256: 32}, "block_m": {64: 192, 128: 128, 256: 128},
          "stages": 2, "consumer_regs": 240, "consumer_regs_three": 160, "producer_regs": 24,
          "device_offsets": (128, 256), "device_offsets_above": {64: 256},
          "split": True}

if gluon is not None:

    @gluon.jit
    def _produce(loads, HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, PADDED: gl.constexpr, TWO_CHUNKS: gl.constexpr,
                 CONSUMERS: gl.constexpr):
        """Producer warp: Q and dO once, then K and V of blocks 0..n_blocks-1 into the ring
        (buffers shaped as the descriptors' boxes); with TWO_CHUNKS the rows' columns past
        BLOCK_D too, through the second descriptors, on the same barriers. Three consumers:
        Q and dO as three 64-row boxes (q_smem / do_smem (3, 64, BLOCK_D))."""
        (desc_q, desc_do, desc_k, desc_v, desc_q2, desc_do2, desc_k2, desc_v2, q_smem, do_smem,
         k_smem, v_smem, q2_smem, do2_smem, k2_smem, v2_smem, q_bar, ready, empty, q_row,
         q_head, k_row, kv_head, n_blocks) = loads
        if CONSUMERS == 3:
            load_three_boxes(desc_q, desc_do, q_row, q_head, q_bar, q_smem, do_smem, HEAD_DIM,
                             PADDED)
        elif TWO_CHUNKS:
            mbarrier.expect(q_bar, 2 * desc_q.block_type.nbytes + 2 * desc_q2.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_q2, [q_row, q_head, BLOCK_D], q_bar, q2_smem)
            tma.async_copy_global_to_shared(desc_do2, [q_row, q_head, BLOCK_D], q_bar,
                                            do2_smem)
        else:
            mbarrier.expect(q_bar, 2 * desc_q.block_type.nbytes)
        if CONSUMERS != 3:
            box = box_coordinates(q_row, q_head, HEAD_DIM, PADDED)
            tma.async_copy_global_to_shared(desc_q, box, q_bar, q_smem)
            tma.async_copy_global_to_shared(desc_do, box, q_bar, do_smem)
        for j in range(n_blocks):
            st = j % STAGES
            use = j // STAGES
            box = box_coordinates(k_row + j * BLOCK_N, kv_head, HEAD_DIM, PADDED)
            mbarrier.wait(empty.index(st), (use & 1) ^ 1, pred=use > 0)
            if TWO_CHUNKS:
                mbarrier.expect(ready.index(st), 2 * desc_k.block_type.nbytes
                                + 2 * desc_k2.block_type.nbytes)
                box2 = [k_row + j * BLOCK_N, kv_head, BLOCK_D]
                tma.async_copy_global_to_shared(desc_k2, box2, ready.index(st),
                                                k2_smem.index(st))
                tma.async_copy_global_to_shared(desc_v2, box2, ready.index(st),
                                                v2_smem.index(st))
            else:
                mbarrier.expect(ready.index(st), 2 * desc_k.block_type.nbytes)
            tma.async_copy_global_to_shared(desc_k, box, ready.index(st), k_smem.index(st))
            tma.async_copy_global_to_shared(desc_v, box, ready.index(st), v_smem.index(st))

    @gluon.jit
    def _consume(args, WG: gl.constexpr, HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr,
                 BLOCK_D2: gl.constexpr, BLOCK_M: gl.constexpr, BLOCK_N: gl.constexpr,
                 STAGES: gl.constexpr, WINDOW_LEFT: gl.constexpr, WINDOW_RIGHT: gl.constexpr,
                 CONSUMERS: gl.constexpr):
        """Consumer warpgroup WG (of CONSUMERS): dQ of query rows [m0 + WG * 64, + 64). Rows
        are BLOCK_D wide, HEAD_DIM of them data and the rest zeros (TMA's fill past the
        head dim); with BLOCK_D2 (HEAD_DIM = BLOCK_D + BLOCK_D2) their last BLOCK_D2 columns
        sit in the second buffers: S and dP sum two matmuls each, dQ is two accumulators."""
        (q_smem, do_smem, k_smem, v_smem, q2_smem, do2_smem, k2_smem, v2_smem, q_bar, ready,
         empty, k_zeroed, Lse, Delta, DQ, q_start, sq, h, m0, sk, offset, lo, n_blocks,
         full_lo, full_hi, qk_scale, sm_scale, window_left, window_right, stride_dqt,
         stride_dqh, total_q) = args
        ROWS: gl.constexpr = BLOCK_M // CONSUMERS
        dtype: gl.constexpr = q_smem.dtype
        S_LAYOUT: gl.constexpr = mma_layout(BLOCK_N)
        G_LAYOUT: gl.constexpr = mma_layout(BLOCK_D)
        A_LAYOUT: gl.constexpr = operand_a_layout(BLOCK_D)
        ROW_S: gl.constexpr = gl.SliceLayout(1, S_LAYOUT)
        COL_S: gl.constexpr = gl.SliceLayout(0, S_LAYOUT)
        r0 = m0 + WG * ROWS
        q_rows = warpgroup_rows(q_smem, WG, CONSUMERS)
        do_rows = warpgroup_rows(do_smem, WG, CONSUMERS)
        qi = r0 + gl.arange(0, ROWS, layout=ROW_S)
        q_ok = qi < sq
        lse2, delta = row_statistics(Lse, Delta, h, total_q, q_start, qi, q_ok)
        s_init = gl.zeros([ROWS, BLOCK_N], gl.float32, S_LAYOUT)
        dq = gl.zeros([ROWS, BLOCK_D], gl.float32, G_LAYOUT)
        TWO_CHUNKS: gl.constexpr = BLOCK_D2 > 0
        # wgmma groups still running when S is waited for: dP's one or two
        PENDING: gl.constexpr = 2 if TWO_CHUNKS else 1
        if TWO_CHUNKS:
            G2_LAYOUT: gl.constexpr = mma_layout(BLOCK_D2)
            q2_rows = q2_smem.slice(WG * ROWS, ROWS)
            do2_rows = do2_smem.slice(WG * ROWS, ROWS)
            dq2 = gl.zeros([ROWS, BLOCK_D2], gl.float32, G2_LAYOUT)
        mbarrier.wait(q_bar, 0)
        tail = sk - (lo + (n_blocks - 1) * BLOCK_N)
        # a warpgroup with no rows in the sequence (short sequences) skips the work
        n_mine = gl.where(r0 < sq, n_blocks, 0)
        for j in range(n_mine):
            st = j % STAGES
            ks = lo + j * BLOCK_N
            mbarrier.wait(ready.index(st), (j // STAGES) & 1)
            k_buf = k_smem.index(st)
            if (j == n_blocks - 1) & (tail < BLOCK_N):  # warpgroup 0 zeroes, the others wait
                if WG == 0:
                    zero_rows_from(k_buf, tail, BLOCK_N, BLOCK_D)
                    if TWO_CHUNKS:
                        zero_rows_from(k2_smem.index(st), tail, BLOCK_N, BLOCK_D2)
                    fence_async_shared()
                    gl.thread_barrier()
                    mbarrier.arrive(k_zeroed)
                else:
                    mbarrier.wait(k_zeroed, 0)
            s = warpgroup_mma(q_rows, k_buf.permute((1, 0)), s_init, use_acc=False,
                              is_async=True)
            if TWO_CHUNKS:
                s = warpgroup_mma(q2_rows, k2_smem.index(st).permute((1, 0)), s, is_async=True)
            dp = warpgroup_mma(do_rows, v_smem.index(st).permute((1, 0)), s_init,
                               use_acc=False, is_async=True)
            if TWO_CHUNKS:
                dp = warpgroup_mma(do2_rows, v2_smem.index(st).permute((1, 0)), dp,
                                   is_async=True)
            s = warpgroup_mma_wait(num_outstanding=PENDING, deps=(s, ))
            p = gl.exp2(s * qk_scale - lse2[:, None])
            dp = warpgroup_mma_wait(num_outstanding=0, deps=(dp, ))
            ds = p * (dp - delta[:, None])
            if (ks < full_lo) | (ks + BLOCK_N > full_hi):
                kj = ks + gl.arange(0, BLOCK_N, layout=COL_S)
                visible = in_window((kj < sk)[None, :], qi[:, None] + offset - kj[None, :],
                                    window_left, window_right, WINDOW_LEFT, WINDOW_RIGHT)
                ds = gl.where(visible, ds, 0.0)
            ds16 = gl.convert_layout(ds.to(dtype), A_LAYOUT)
            dq = warpgroup_mma(ds16, k_buf, dq, is_async=True)
            if TWO_CHUNKS:
                dq2 = warpgroup_mma(ds16, k2_smem.index(st), dq2, is_async=True)
                dq, dq2 = warpgroup_mma_wait(num_outstanding=0, deps=(dq, dq2))
            else:
                dq = warpgroup_mma_wait(num_outstanding=0, deps=(dq, ))
            mbarrier.arrive(empty.index(st))

        release_blocks(ready, empty, n_mine, n_blocks, STAGES)

        OUT_LAYOUT: gl.constexpr = row_layout(BLOCK_D)
        out = gl.convert_layout((dq * sm_scale).to(DQ.dtype.element_ty), OUT_LAYOUT)
        rows = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, OUT_LAYOUT))
        cols = gl.arange(0, BLOCK_D, layout=gl.SliceLayout(0, OUT_LAYOUT))
        ptrs = DQ + (q_start + rows).to(gl.int64)[:, None] * stride_dqt + h * stride_dqh \
            + cols[None, :]
        ok = (rows < sq)[:, None]
        if BLOCK_D != HEAD_DIM:
            ok = ok & (cols < HEAD_DIM)[None, :]
        gl.store(ptrs, out, mask=ok)
        if TWO_CHUNKS:  # the last BLOCK_D2 columns
            OUT2_LAYOUT: gl.constexpr = row_layout(BLOCK_D2)
            out2 = gl.convert_layout((dq2 * sm_scale).to(DQ.dtype.element_ty), OUT2_LAYOUT)
            rows2 = r0 + gl.arange(0, ROWS, layout=gl.SliceLayout(1, OUT2_LAYOUT))
            cols2 = BLOCK_D + gl.arange(0, BLOCK_D2, layout=gl.SliceLayout(0, OUT2_LAYOUT))
            gl.store(DQ + (q_start + rows2).to(gl.int64)[:, None] * stride_dqt
                     + h * stride_dqh + cols2[None, :], out2, mask=(rows2 < sq)[:, None])

    @gluon.jit(do_not_specialize=["total_q", "batch"])
    def _hopper_dq_kernel(desc_q, desc_do, desc_k, desc_v, desc_q2, desc_do2, desc_k2, desc_v2,
                          Lse, Delta, DQ, CuQ, CuK, TileSeq,
                          TileBlk, stride_dqt, stride_dqh, total_q, batch, qk_scale, sm_scale,
                          window_left, window_right, GROUP: gl.constexpr,
                          HEAD_DIM: gl.constexpr, BLOCK_D: gl.constexpr,
                          BLOCK_D2: gl.constexpr, BLOCK_M: gl.constexpr,
                          BLOCK_N: gl.constexpr, STAGES: gl.constexpr,
                          CONSUMER_REGS: gl.constexpr, PRODUCER_REGS: gl.constexpr,
                          TOP_LEFT: gl.constexpr, WINDOW_LEFT: gl.constexpr,
                          WINDOW_RIGHT: gl.constexpr, DEVICE_TILES: gl.constexpr):
        h = gl.program_id(1)
        b, blk = program_tile(CuQ, TileSeq, TileBlk, batch, gl.program_id(0), BLOCK_M,
                              DEVICE_TILES)
        if DEVICE_TILES:  # noqa: SIM102 (a constexpr branch: host tiles have no extra programs)
            if b >= batch:
                return
        m0 = blk * BLOCK_M
        q_start, sq, k_start, sk, offset = sequence_bounds(CuQ, CuK, b, TOP_LEFT)
        lo, n_blocks, full_lo, full_hi = key_range(m0, sk, offset, window_left, window_right,
                                                   BLOCK_M, BLOCK_N, WINDOW_LEFT,
                                                   WINDOW_RIGHT)

        PADDED: gl.constexpr = BLOCK_D != HEAD_DIM
        CONSUMERS: gl.constexpr = BLOCK_M // 64  # warpgroups of 64 query rows
        q_smem, q_box = allocate_program_rows(desc_q, BLOCK_M, BLOCK_D, PADDED)
        do_smem, do_box = allocate_program_rows(desc_do, BLOCK_M, BLOCK_D, PADDED)
        k_smem, k_box = allocate_rows(desc_k, [STAGES, BLOCK_N, BLOCK_D], PADDED)
        v_smem, v_box = allocate_rows(desc_v, [STAGES, BLOCK_N, BLOCK_D], PADDED)
        TWO_CHUNKS: gl.constexpr = BLOCK_D2 > 0
        if TWO_CHUNKS:  # the rows' last BLOCK_D2 columns (desc_*2 boxes)
            q2_smem, q2_box = allocate_rows(desc_q2, [BLOCK_M, BLOCK_D2], True)
            do2_smem, do2_box = allocate_rows(desc_do2, [BLOCK_M, BLOCK_D2], True)
            k2_smem, k2_box = allocate_rows(desc_k2, [STAGES, BLOCK_N, BLOCK_D2], True)
            v2_smem, v2_box = allocate_rows(desc_v2, [STAGES, BLOCK_N, BLOCK_D2], True)
        else:  # placeholders the partitions never read
            q2_smem, do2_smem, k2_smem, v2_smem = q_smem, do_smem, k_smem, v_smem
            q2_box, do2_box, k2_box, v2_box = q_box, do_box, k_box, v_box
        q_bar = allocate_barrier(1)
        ready, empty = allocate_ring(STAGES, CONSUMERS)
        k_zeroed = allocate_barrier(1)
        fence_async_shared()

        # runtime values travel as one tuple each (the partitions unpack it); constexprs
        # stay arguments of their own, and the partition lists literal
        args = (q_smem, do_smem, k_smem, v_smem, q2_smem, do2_smem, k2_smem, v2_smem, q_bar,
                ready, empty, k_zeroed, Lse, Delta, DQ, q_start, sq, h, m0, sk, offset, lo,
                n_blocks, full_lo, full_hi, qk_scale, sm_scale, window_left, window_right,
                stride_dqt, stride_dqh, total_q)
        loads = (desc_q, desc_do, desc_k, desc_v, desc_q2, desc_do2, desc_k2, desc_v2, q_box,
                 do_box, k_box, v_box, q2_box, do2_box, k2_box, v2_box, q_bar, ready, empty,
                 q_start + m0, h, k_start + lo, h // GROUP, n_blocks)
        if CONSUMERS == 3:
            gl.warp_specialize([
                (_consume, (args, 0, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, BLOCK_N, STAGES,
                            WINDOW_LEFT, WINDOW_RIGHT, CONSUMERS)),
                (_consume, (args, 1, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, BLOCK_N, STAGES,
                            WINDOW_LEFT, WINDOW_RIGHT, CONSUMERS)),
                (_consume, (args, 2, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, BLOCK_N, STAGES,
                            WINDOW_LEFT, WINDOW_RIGHT, CONSUMERS)),
                (_produce, (loads, HEAD_DIM, BLOCK_D, BLOCK_N, STAGES, PADDED, TWO_CHUNKS,
                             CONSUMERS))], [4, 4, 1], [CONSUMER_REGS, CONSUMER_REGS, PRODUCER_REGS])
        else:
            gl.warp_specialize([
                (_consume, (args, 0, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, BLOCK_N, STAGES,
                            WINDOW_LEFT, WINDOW_RIGHT, CONSUMERS)),
                (_consume, (args, 1, HEAD_DIM, BLOCK_D, BLOCK_D2, BLOCK_M, BLOCK_N, STAGES,
                            WINDOW_LEFT, WINDOW_RIGHT, CONSUMERS)),
                (_produce, (loads, HEAD_DIM, BLOCK_D, BLOCK_N, STAGES, PADDED, TWO_CHUNKS,
                             CONSUMERS))], [4, 1], [CONSUMER_REGS, PRODUCER_REGS])


def block_m(head_dim: int) -> int:
    """Query rows per program at ``head_dim`` (the launch's query tiles):
    hopper_forward.rows_per_program of CONFIG["block_m"]."""
    return hopper_forward.rows_per_program(head_dim, CONFIG, "block_m", BLOCK_M)


def supports(problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
             plain: bool) -> bool:
    """Whether this kernel computes dQ of a call without sinks (backward.py checks them):
    the conditions of hopper_forward.supports (any mask), a head dim read at a width of
    CONFIG (64, 128 or 256, the others zero-padded as the forward reads them), lengths it
    takes (hopper_forward.lengths_served: device offsets at the widths of
    CONFIG["device_offsets"] and, above a longest sequence, of CONFIG["device_offsets_above"]),
    and dO laid out like Q."""
    width = hopper_forward.block_d(problem.head_dim)
    return (width in CONFIG["block_n"]
            and lengths_served(problem, width, CONFIG)
            and hopper_forward.supports(problem, q, k, v, plain)
            and tma_rows(dout, problem.head_dim))


def dq(problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, dout: torch.Tensor,
       lse: torch.Tensor, delta: torch.Tensor, dq_out: torch.Tensor,
       cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
       tiles: tuple[int, torch.Tensor, torch.Tensor, bool], qk_scale: float, *,
       record: bool = False):
    """Writes ``dq_out`` (total_q, nheads, d) over the query tiles of block_m(d) rows;
    ``tiles``: forward.launch_tiles' (programs, tile_seq, tile_blk, device_tiles) with
    block_m(d) rows; lse and delta: float32 (nheads, total_q); qk_scale = scale * log2 e. With
    ``record``, returns the replay.LaunchRecord or None: replays take REPLAY_ARGS, with q,
    k, v and dout for the descriptors."""
    d = problem.head_dim
    width = hopper_forward.block_d(d)
    left, right = problem.window
    block_n = CONFIG["block_n"][width]
    rows = block_m(d)
    q_rows = hopper_forward.box_rows(rows)
    programs, tile_seq, tile_blk, device_tiles = tiles
    grid = (programs, problem.nheads)
    chunks = hopper_forward.split_widths(d, CONFIG["split"])
    first, second = chunks if chunks is not None else (width, 0)
    seconds = ((descriptor(q, d, rows, second), descriptor(dout, d, rows, second),
                descriptor(k, d, block_n, second), descriptor(v, d, block_n, second))
               if second else (None,) * 4)
    args = (descriptor(q, d, q_rows, first), descriptor(dout, d, q_rows, first),
            descriptor(k, d, block_n, first), descriptor(v, d, block_n, first), *seconds,
            lse, delta, dq_out,
            cu_seqlens_q, cu_seqlens_k, tile_seq, tile_blk, dq_out.stride(0),
            dq_out.stride(1), problem.total_q, problem.batch, qk_scale, problem.scale,
            left, right)
    kwargs = dict(
        GROUP=problem.group_size, HEAD_DIM=d, BLOCK_D=first, BLOCK_D2=second, BLOCK_M=rows,
        BLOCK_N=block_n, STAGES=CONFIG["stages"],
        CONSUMER_REGS=CONFIG["consumer_regs_three" if rows == 192 else "consumer_regs"],
        PRODUCER_REGS=CONFIG["producer_regs"], TOP_LEFT=problem.mask_alignment == "top_left",
        WINDOW_LEFT=left >= 0, WINDOW_RIGHT=right >= 0, DEVICE_TILES=device_tiles,
        num_warps=4)
    if record:
        from .replay import LaunchRecord

        if not second:
            return LaunchRecord.launch(_hopper_dq_kernel, grid, args, kwargs, REPLAY_ARGS)
        record = LaunchRecord.launch(_hopper_dq_kernel, grid, args, kwargs,
                                     REPLAY_TWO_CHUNK_ARGS)
        return None if record is None else record.repeating(0, 1, 2, 3)
    _hopper_dq_kernel[grid](*args, **kwargs)
    return None


# The arguments a replay of the kernel's launch replaces (replay.LaunchRecord).
# In the tl dQ kernel's order (backward.DQ_REPLAY_ARGS), which BackwardReplay launches with.
REPLAY_ARGS = ("desc_q", "desc_k", "desc_v", "desc_do", "Lse", "Delta", "DQ", "CuQ", "CuK")
# head dims read in two chunks (hopper_forward.split_widths): q, k, v and dout again, for
# the second chunks' descriptors (the record repeats them: LaunchRecord.repeating)
REPLAY_TWO_CHUNK_ARGS = (*REPLAY_ARGS, "desc_q2", "desc_k2", "desc_v2", "desc_do2")
