"""Varlen FlashAttention backward in Triton, deterministic by construction (no atomics).

* dK/dV: one program per (key tile, kv head); it loops over the query heads of its group and
  over the query blocks that can see its keys, so GQA gradients are reduced in registers.
* dQ: one program per (query tile, query head) over the key blocks its rows can see.
The softmax is recomputed from q, k and the forward's lse; delta = rowsum(dO * O) - dlse.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .forward import PER_BATCH_ARGS, dropout_keep, kv_layout, score_tile, tile_list


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, CuQ, CuK, TileSeq, TileBlk, Alibi, Seed,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_ab, total_q, batch, nheads,
    max_seqlen_k, sm_scale, qk_scale, softcap, dropout_p, window_left, window_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TOP_LEFT: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    kvh = tl.program_id(1)
    b = tl.load(TileSeq + pid)
    if b >= batch:
        return
    nblk = tl.load(TileBlk + pid)
    q_start = tl.load(CuQ + b)
    sq = tl.load(CuQ + b + 1) - q_start
    k_start = tl.load(CuK + b)
    sk = tl.load(CuK + b + 1) - k_start
    offset = 0 if TOP_LEFT else sk - sq

    offs_n = nblk * BLOCK_N + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < sk
    d_ok = offs_d < HEAD_DIM
    rows_k = (k_start + offs_n).to(tl.int64)
    kt = tl.load(K + rows_k[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None],
                 mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (D, N)
    vt = tl.load(V + rows_k[None, :] * stride_vt + kvh * stride_vh + offs_d[:, None],
                 mask=n_ok[None, :] & d_ok[:, None], other=0.0)  # (D, N)

    # Query rows that can see keys [nblk * BLOCK_N, nblk * BLOCK_N + BLOCK_N): i + offset - j
    # within [-right, left].
    lo = 0
    hi = sq
    if WINDOW_RIGHT:
        lo = tl.maximum(0, nblk * BLOCK_N - offset - window_right)
        lo = (lo // BLOCK_M) * BLOCK_M
    if WINDOW_LEFT:
        hi = tl.minimum(sq, nblk * BLOCK_N + BLOCK_N - 1 - offset + window_left + 1)

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = kvh * GROUP + g
        slope = 0.0
        if HAS_ALIBI:
            slope = tl.load(Alibi + b * stride_ab + h)
        for start_m in range(lo, hi, BLOCK_M):
            offs_m = start_m + tl.arange(0, BLOCK_M)
            m_ok = offs_m < sq
            rows_q = (q_start + offs_m).to(tl.int64)
            q = tl.load(Q + rows_q[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                        mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            do = tl.load(DO + rows_q[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                         mask=m_ok[:, None] & d_ok[None, :], other=0.0)
            lse = tl.load(Lse + h.to(tl.int64) * total_q + q_start + offs_m, mask=m_ok,
                          other=0.0)
            delta = tl.load(Delta + h.to(tl.int64) * total_q + q_start + offs_m, mask=m_ok,
                            other=0.0)
            s, t = score_tile(q, kt, offs_m, offs_n, sq, sk, offset, qk_scale, softcap, slope,
                              window_left, window_right, HAS_SOFTCAP, HAS_ALIBI, WINDOW_LEFT,
                              WINDOW_RIGHT, PRECISION)
            lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
            p = tl.exp2(s - lse2[:, None])  # (M, N); 0 where masked or the row sees nothing
            dp = tl.dot(do, vt, input_precision=PRECISION)
            pd = p
            if HAS_DROPOUT:
                keep = dropout_keep(Seed, b, h, nheads, offs_m, offs_n, max_seqlen_k, dropout_p)
                pd = tl.where(keep, p / (1.0 - dropout_p), 0.0)
                dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
            dv += tl.dot(tl.trans(pd.to(do.dtype)), do, input_precision=PRECISION)
            ds = p * (dp - delta[:, None])
            if HAS_SOFTCAP:
                ds = ds * (1.0 - t * t)
            dk += tl.dot(tl.trans(ds.to(q.dtype)), q, input_precision=PRECISION)
    dk = dk * sm_scale
    dk_ptrs = DK + rows_k[:, None] * stride_dkt + kvh * stride_dkh + offs_d[None, :]
    dv_ptrs = DV + rows_k[:, None] * stride_dvt + kvh * stride_dvh + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=n_ok[:, None] & d_ok[None, :])


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, CuQ, CuK, TileSeq, TileBlk, Alibi, Seed,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dqt, stride_dqh, stride_ab, total_q, batch, nheads, max_seqlen_k,
    sm_scale, qk_scale, softcap, dropout_p, window_left, window_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TOP_LEFT: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
):
    pid = tl.program_id(0)
    h = tl.program_id(1)
    b = tl.load(TileSeq + pid)
    if b >= batch:
        return
    mblk = tl.load(TileBlk + pid)
    q_start = tl.load(CuQ + b)
    sq = tl.load(CuQ + b + 1) - q_start
    k_start = tl.load(CuK + b)
    sk = tl.load(CuK + b + 1) - k_start
    offset = 0 if TOP_LEFT else sk - sq
    kvh = h // GROUP

    offs_m = mblk * BLOCK_M + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < sq
    d_ok = offs_d < HEAD_DIM
    rows_q = (q_start + offs_m).to(tl.int64)
    q = tl.load(Q + rows_q[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    do = tl.load(DO + rows_q[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                 mask=m_ok[:, None] & d_ok[None, :], other=0.0)
    lse = tl.load(Lse + h.to(tl.int64) * total_q + q_start + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + h.to(tl.int64) * total_q + q_start + offs_m, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    slope = 0.0
    if HAS_ALIBI:
        slope = tl.load(Alibi + b * stride_ab + h)

    lo = 0
    hi = sk
    if WINDOW_RIGHT:
        hi = tl.minimum(sk, mblk * BLOCK_M + BLOCK_M - 1 + offset + window_right + 1)
    if WINDOW_LEFT:
        lo = tl.maximum(0, mblk * BLOCK_M + offset - window_left)
        lo = (lo // BLOCK_N) * BLOCK_N
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < sk
        rows_k = (k_start + offs_n).to(tl.int64)
        kt = tl.load(K + rows_k[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(V + rows_k[None, :] * stride_vt + kvh * stride_vh + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s, t = score_tile(q, kt, offs_m, offs_n, sq, sk, offset, qk_scale, softcap, slope,
                          window_left, window_right, HAS_SOFTCAP, HAS_ALIBI, WINDOW_LEFT,
                          WINDOW_RIGHT, PRECISION)
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(Seed, b, h, nheads, offs_m, offs_n, max_seqlen_k, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq += tl.dot(ds.to(kt.dtype), tl.trans(kt), input_precision=PRECISION)
    dq = dq * sm_scale
    tl.store(DQ + rows_q[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])


def backward(problem, inputs, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
             dlse: torch.Tensor | None, seed: torch.Tensor | None
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """dq, dk, dv with the shapes and dtypes of q, k, v (packed K/V only)."""
    q = _c(inputs.q)
    k, stride_kt, stride_kh = kv_layout(problem, _c(inputs.k))
    v, stride_vt, stride_vh = kv_layout(problem, _c(inputs.v))
    dout = _c(dout)
    delta = (dout.float() * out.float()).sum(-1).transpose(0, 1).contiguous()  # (nheads, T)
    if dlse is not None:
        delta = delta - dlse.float()
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk = torch.empty(k.shape, dtype=k.dtype, device=k.device)
    dv = torch.empty(v.shape, dtype=v.dtype, device=v.device)
    cfg = configs.backward_config(problem.head_dim)
    left, right = problem.window
    alibi = inputs.alibi_slopes
    dummy = inputs.cu_seqlens_q
    common = dict(
        GROUP=problem.group_size, HEAD_DIM=problem.head_dim,
        BLOCK_D=configs.block_d(problem.head_dim), BLOCK_M=cfg.block_m, BLOCK_N=cfg.block_n,
        TOP_LEFT=problem.mask_alignment == "top_left", WINDOW_LEFT=left >= 0,
        WINDOW_RIGHT=right >= 0, HAS_SOFTCAP=problem.softcap > 0, HAS_ALIBI=alibi is not None,
        HAS_DROPOUT=problem.dropout_p > 0, PRECISION=configs.dot_precision(q.dtype),
        num_warps=cfg.num_warps, num_stages=cfg.num_stages)
    scalars = (problem.total_q, problem.batch, problem.nheads, max(problem.max_seqlen_k, 1),
               problem.scale, problem.scale, problem.softcap, problem.dropout_p, left, right)
    alibi_arg = alibi if alibi is not None else dummy
    alibi_stride = alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0
    seed_arg = seed if seed is not None else dummy

    k_seq, k_blk = tile_list(problem, inputs.cu_seqlens_k, cfg.block_n, False)
    if k_seq.numel() and problem.nheads_k:
        _dkdv_kernel[(k_seq.numel(), problem.nheads_k)](
            q, k, v, dout, lse, delta, dk, dv, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
            k_seq, k_blk, alibi_arg, seed_arg,
            q.stride(0), q.stride(1), stride_kt, stride_kh, stride_vt, stride_vh,
            dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0),
            dv.stride(1), alibi_stride, *scalars, **common)
    q_seq, q_blk = tile_list(problem, inputs.cu_seqlens_q, cfg.block_m, True)
    if q_seq.numel() and problem.nheads:
        _dq_kernel[(q_seq.numel(), problem.nheads)](
            q, k, v, dout, lse, delta, dq, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
            q_seq, q_blk, alibi_arg, seed_arg,
            q.stride(0), q.stride(1), stride_kt, stride_kh, stride_vt, stride_vh,
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), alibi_stride,
            *scalars, **common)
    return dq, dk, dv


def _c(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
