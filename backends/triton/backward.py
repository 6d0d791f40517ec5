"""Varlen FlashAttention backward in Triton, deterministic by construction (no atomics).

* dK/dV: one program per (key tile, kv head); it loops over the query heads of its group and
  over the query blocks that can see its keys, so GQA gradients are reduced in registers.
* dQ: one program per (query tile, query head) over the key blocks its rows can see.
The softmax is recomputed from q, k and the forward's lse; delta = rowsum(dO * O) - dlse
comes from one fused pass over O and dO. With attention sinks the lse includes the sink, so
dQ/dK/dV need nothing more; for the sinks' gradient
dsinks[h] = sum_i exp(sinks[h] - lse_i) * (dlse_i - D_i), the dQ kernel also sums
D_i = rowsum(P * dP) in fp32 (what rowsum(dO * O) is before O is rounded to q's dtype, which
would cost dsinks about 1e-3 of accuracy in fp16).
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs, group_split, hopper_backward, hopper_dq, replay
from .forward import (
    PER_BATCH_ARGS,
    custom_mask_visible,
    dropout_keep,
    key_ranges,
    kv_layout,
    launch_tiles,
    score_scalars,
    score_tile,
    sequence_bounds,
)
from .softcap import mode as softcap_mode
from .tiles import program_tile


@triton.jit
def query_rows(Q, DO, Lse, Delta, q_start, offs_m, sq, h, offs_d, stride_qt, stride_qh,
               stride_dot, stride_doh, total_q, HEAD_DIM: tl.constexpr,
               TRANS_Q: tl.constexpr):
    """q ((M, D), or (D, M) with TRANS_Q), dO (M, D), lse in base 2 (+inf where a row sees
    nothing, so p = 0) and delta of query rows ``offs_m`` of head h; rows past the sequence
    load zeros and contribute exactly nothing."""
    m_ok = offs_m < sq
    mask = m_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows_q = (q_start + offs_m).to(tl.int64)
    if TRANS_Q:
        q = tl.load(Q + rows_q[None, :] * stride_qt + h * stride_qh + offs_d[:, None],
                    mask=m_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
    else:
        q = tl.load(Q + rows_q[:, None] * stride_qt + h * stride_qh + offs_d[None, :],
                    mask=mask, other=0.0)
    do = tl.load(DO + rows_q[:, None] * stride_dot + h * stride_doh + offs_d[None, :],
                 mask=mask, other=0.0)
    lse = tl.load(Lse + h.to(tl.int64) * total_q + q_start + offs_m, mask=m_ok, other=0.0)
    delta = tl.load(Delta + h.to(tl.int64) * total_q + q_start + offs_m, mask=m_ok, other=0.0)
    lse2 = tl.where(lse == float("-inf"), float("inf"), lse * 1.4426950408889634)
    return q, do, lse2, delta


@triton.jit
def _dkdv_blocks(dk, dv, k, v, Q, DO, Lse, Delta, b, h, q_start, sq, sk, offset, offs_n,
                 offs_d, stride_qt, stride_qh, stride_dot, stride_doh, total_q, nheads,
                 max_seqlen_k, qk_scale, tanh_scale, softcap2, slope2, dropout_p, window_left,
                 window_right, Seed, first, split, second, count, MaskBits, mask_off,
                 MASK: tl.constexpr, HAS_CUSTOM_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
                 BLOCK_M: tl.constexpr,
                 WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
                 HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
                 PRECISION: tl.constexpr):
    # Tiles are (keys, queries): P^T and dS^T come out of the matmuls already in the layout
    # of the left operand of dV += P^T dO and dK += dS^T Q, so nothing is transposed in
    # registers.
    kj = offs_n[:, None]
    for i in range(0, count):  # blocks first, first + BLOCK_M, ... then second, ...
        start_m = tl.where(i < split, first + i * BLOCK_M, second + (i - split) * BLOCK_M)
        offs_m = start_m + tl.arange(0, BLOCK_M)
        qt, do, lse2, delta = query_rows(Q, DO, Lse, Delta, q_start, offs_m, sq, h, offs_d,
                                         stride_qt, stride_qh, stride_dot, stride_doh,
                                         total_q, HEAD_DIM, True)
        st, tt = score_tile(k, qt, offs_m[None, :], kj, sk, offset, qk_scale, tanh_scale,
                            softcap2, slope2, window_left, window_right, MASK, HAS_SOFTCAP,
                            HAS_ALIBI, WINDOW_LEFT, WINDOW_RIGHT, PRECISION)
        if HAS_CUSTOM_MASK:
            st = tl.where(custom_mask_visible(MaskBits, mask_off, offs_m[None, :], kj, sq, sk),
                          st, float("-inf"))
        pt = tl.exp2(st - lse2[None, :])  # 0 where masked or where the row sees nothing
        dpt = tl.dot(v, tl.trans(do), input_precision=PRECISION)
        pdt = pt
        if HAS_DROPOUT:
            keep = dropout_keep(Seed, b, h, nheads, offs_m[None, :], kj, max_seqlen_k,
                                dropout_p)
            pdt = tl.where(keep, pt / (1.0 - dropout_p), 0.0)
            dpt = tl.where(keep, dpt / (1.0 - dropout_p), 0.0)
        dv = tl.dot(pdt.to(do.dtype), do, dv, input_precision=PRECISION)
        dst = pt * (dpt - delta[None, :])
        if HAS_SOFTCAP:
            dst = dst * (1.0 - tt * tt)
        dk = tl.dot(dst.to(qt.dtype), tl.trans(qt), dk, input_precision=PRECISION)
    return dk, dv


@triton.jit(do_not_specialize=["total_q"])
def _delta_kernel(Out, DO, DLse, Delta, stride_ot, stride_oh, stride_dot, stride_doh,
                  stride_lh, stride_lt, total_q, HEAD_DIM: tl.constexpr,
                  BLOCK_D: tl.constexpr, BLOCK_T: tl.constexpr, HAS_DLSE: tl.constexpr):
    """delta[h, t] = sum_d dO[t, h, d] * O[t, h, d] - dlse[h, t], float32 (nheads, total_q):
    one pass over O and dO in their own dtype."""
    h = tl.program_id(1)
    offs_t = tl.program_id(0) * BLOCK_T + tl.arange(0, BLOCK_T)
    offs_d = tl.arange(0, BLOCK_D)
    t_ok = offs_t < total_q
    mask = t_ok[:, None] & (offs_d[None, :] < HEAD_DIM)
    rows = offs_t.to(tl.int64)
    o = tl.load(Out + rows[:, None] * stride_ot + h * stride_oh + offs_d[None, :], mask=mask,
                other=0.0)
    do = tl.load(DO + rows[:, None] * stride_dot + h * stride_doh + offs_d[None, :], mask=mask,
                 other=0.0)
    delta = tl.sum(o.to(tl.float32) * do.to(tl.float32), 1)
    if HAS_DLSE:
        delta -= tl.load(DLse + h.to(tl.int64) * stride_lh + rows * stride_lt, mask=t_ok,
                         other=0.0)
    tl.store(Delta + h.to(tl.int64) * total_q + rows, delta, mask=t_ok)


def _prune_dkdv(configs_, named_args, **kwargs):
    d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 128))
    return configs.pick("dkdv", configs_, d, named_args.get("BLOCK_N", kwargs.get("BLOCK_N")),
                        "BLOCK_M")


def _prune_dq(configs_, named_args, **kwargs):
    d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 128))
    return configs.pick("dq", configs_, d, named_args.get("BLOCK_M", kwargs.get("BLOCK_M")),
                        "BLOCK_N")


_KEY = ["HEAD_DIM", "GROUP", "WINDOW_LEFT", "WINDOW_RIGHT", "HAS_SOFTCAP", "HAS_ALIBI",
        "HAS_DROPOUT", "HAS_CUSTOM_MASK"]


@triton.autotune(configs=configs.candidates("dkdv", "BLOCK_M"), key=[*_KEY, "BLOCK_N", "SPLIT"],
                 prune_configs_by={"early_config_prune": _prune_dkdv})
@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _dkdv_kernel(
    Q, K, V, DO, Lse, Delta, DK, DV, CuQ, CuK, TileSeq, TileBlk, Alibi, Seed, MaskBits, MaskOffsets,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot, stride_doh,
    stride_dkt, stride_dkh, stride_dvt, stride_dvh, stride_ab, total_q, batch, nheads,
    max_seqlen_k, sm_scale, qk_scale, tanh_scale, softcap2, dropout_p, window_left,
    window_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TOP_LEFT: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    HAS_CUSTOM_MASK: tl.constexpr, DEVICE_TILES: tl.constexpr, SPLIT: tl.constexpr,
):
    # GROUP query heads per program: program_id(1) = kv head * SPLIT + its share of the
    # group's heads (group_split.py); DK/DV hold one row per share
    share = tl.program_id(1)
    kvh = share // SPLIT
    b, nblk = program_tile(TileSeq, TileBlk, CuK, batch, BLOCK_N, DEVICE_TILES)
    if b >= batch:
        return
    q_start, sq, k_start, sk, offset = sequence_bounds(CuQ, CuK, b, TOP_LEFT)
    n0 = nblk * BLOCK_N
    mask_off = 0
    if HAS_CUSTOM_MASK:
        mask_off = tl.load(MaskOffsets + b)

    offs_n = n0 + tl.arange(0, BLOCK_N)
    offs_d = tl.arange(0, BLOCK_D)
    n_ok = offs_n < sk
    d_ok = offs_d < HEAD_DIM
    rows_k = (k_start + offs_n).to(tl.int64)
    kv_mask = n_ok[:, None] & d_ok[None, :]
    k = tl.load(K + rows_k[:, None] * stride_kt + kvh * stride_kh + offs_d[None, :],
                mask=kv_mask, other=0.0)  # (N, D)
    v = tl.load(V + rows_k[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
                mask=kv_mask, other=0.0)  # (N, D)

    # Query rows that see keys [n0, n0 + BLOCK_N): i + offset - j within [-right, left].
    # Keys past the sequence may stay unmasked: their dK/dV rows are never stored.
    lo = 0
    hi = sq
    full_lo = 0
    full_hi = sq
    if WINDOW_RIGHT:
        lo = (tl.maximum(0, n0 - offset - window_right) // BLOCK_M) * BLOCK_M
        first_full = tl.maximum(n0 + BLOCK_N - 1 - offset - window_right, 0)
        full_lo = (first_full + BLOCK_M - 1) // BLOCK_M * BLOCK_M
    if WINDOW_LEFT:
        hi = tl.minimum(sq, n0 + BLOCK_N - 1 - offset + window_left + 1)
        full_hi = (tl.maximum(n0 - offset + window_left + 1, 0) // BLOCK_M) * BLOCK_M
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    bnd = tl.maximum(tl.minimum(full_hi, hi), a)
    n_full = (bnd - a + BLOCK_M - 1) // BLOCK_M
    n_before = (a - lo + BLOCK_M - 1) // BLOCK_M
    n_masked = n_before + (hi - bnd + BLOCK_M - 1) // BLOCK_M

    dk = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    dv = tl.zeros([BLOCK_N, BLOCK_D], dtype=tl.float32)
    for g in range(GROUP):
        h = share * GROUP + g
        slope2 = 0.0
        if HAS_ALIBI:
            slope2 = tl.load(Alibi + b * stride_ab + h) * 1.4426950408889634
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, Q, DO, Lse, Delta, b, h, q_start, sq, sk, offset, offs_n, offs_d,
            stride_qt, stride_qh, stride_dot, stride_doh, total_q, nheads, max_seqlen_k,
            qk_scale, tanh_scale, softcap2, slope2, dropout_p, window_left, window_right, Seed,
            a, n_full, a, n_full, MaskBits, mask_off, False, HAS_CUSTOM_MASK, HEAD_DIM, BLOCK_M,
            WINDOW_LEFT, WINDOW_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, PRECISION)
        dk, dv = _dkdv_blocks(
            dk, dv, k, v, Q, DO, Lse, Delta, b, h, q_start, sq, sk, offset, offs_n, offs_d,
            stride_qt, stride_qh, stride_dot, stride_doh, total_q, nheads, max_seqlen_k,
            qk_scale, tanh_scale, softcap2, slope2, dropout_p, window_left, window_right, Seed,
            lo, n_before, bnd, n_masked, MaskBits, mask_off, True, HAS_CUSTOM_MASK, HEAD_DIM,
            BLOCK_M, WINDOW_LEFT, WINDOW_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, PRECISION)
    dk = dk * sm_scale
    dk_ptrs = DK + rows_k[:, None] * stride_dkt + share * stride_dkh + offs_d[None, :]
    dv_ptrs = DV + rows_k[:, None] * stride_dvt + share * stride_dvh + offs_d[None, :]
    tl.store(dk_ptrs, dk.to(DK.dtype.element_ty), mask=kv_mask)
    tl.store(dv_ptrs, dv.to(DV.dtype.element_ty), mask=kv_mask)


@triton.jit
def _dq_blocks(dq, pdp, q, do, lse2, delta, K, V, b, h, kvh, k_start, offs_m, offs_d, sk, offset,
               stride_kt, stride_kh, stride_vt, stride_vh, nheads, max_seqlen_k, qk_scale,
               tanh_scale, softcap2, slope2, dropout_p, window_left, window_right, Seed,
               first, split, second, count, MaskBits, mask_off, sq,
               MASK: tl.constexpr, HAS_CUSTOM_MASK: tl.constexpr, HEAD_DIM: tl.constexpr,
               BLOCK_N: tl.constexpr,
               WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr,
               PRECISION: tl.constexpr, HAS_SINKS: tl.constexpr):
    """dq accumulated over the key blocks (as _fwd_blocks walks them), and with HAS_SINKS
    pdp, the rows' sum of P * dP (dP after dropout: D_i = dO_i . O_i in fp32)."""
    d_ok = offs_d < HEAD_DIM
    for i in range(0, count):  # blocks first, first + BLOCK_N, ... then second, ...
        start_n = tl.where(i < split, first + i * BLOCK_N, second + (i - split) * BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < sk
        rows_k = (k_start + offs_n).to(tl.int64)
        kt = tl.load(K + rows_k[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        vt = tl.load(V + rows_k[None, :] * stride_vt + kvh * stride_vh + offs_d[:, None],
                     mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        s, t = score_tile(q, kt, offs_m[:, None], offs_n[None, :], sk, offset, qk_scale,
                          tanh_scale, softcap2, slope2, window_left, window_right, MASK,
                          HAS_SOFTCAP, HAS_ALIBI, WINDOW_LEFT, WINDOW_RIGHT, PRECISION)
        if HAS_CUSTOM_MASK:
            s = tl.where(custom_mask_visible(MaskBits, mask_off, offs_m[:, None],
                                             offs_n[None, :], sq, sk), s, float("-inf"))
        p = tl.exp2(s - lse2[:, None])
        dp = tl.dot(do, vt, input_precision=PRECISION)
        if HAS_DROPOUT:
            keep = dropout_keep(Seed, b, h, nheads, offs_m[:, None], offs_n[None, :],
                                max_seqlen_k, dropout_p)
            dp = tl.where(keep, dp / (1.0 - dropout_p), 0.0)
        if HAS_SINKS:
            pdp += tl.sum(p * dp, 1)
        ds = p * (dp - delta[:, None])
        if HAS_SOFTCAP:
            ds = ds * (1.0 - t * t)
        dq = tl.dot(ds.to(kt.dtype), tl.trans(kt), dq, input_precision=PRECISION)
    return dq, pdp


@triton.autotune(configs=configs.candidates("dq", "BLOCK_N"), key=[*_KEY, "BLOCK_M"],
                 prune_configs_by={"early_config_prune": _prune_dq})
@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _dq_kernel(
    Q, K, V, DO, Lse, Delta, DQ, CuQ, CuK, TileSeq, TileBlk, Alibi, Seed, MaskBits, MaskOffsets,
    RowPdP, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_dot,
    stride_doh, stride_dqt, stride_dqh, stride_ab, total_q, batch, nheads, max_seqlen_k,
    sm_scale, qk_scale, tanh_scale, softcap2, dropout_p, window_left, window_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TOP_LEFT: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, PRECISION: tl.constexpr,
    HAS_CUSTOM_MASK: tl.constexpr, DEVICE_TILES: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    h = tl.program_id(1)
    b, mblk = program_tile(TileSeq, TileBlk, CuQ, batch, BLOCK_M, DEVICE_TILES)
    if b >= batch:
        return
    q_start, sq, k_start, sk, offset = sequence_bounds(CuQ, CuK, b, TOP_LEFT)
    kvh = h // GROUP
    m0 = mblk * BLOCK_M
    mask_off = 0
    if HAS_CUSTOM_MASK:
        mask_off = tl.load(MaskOffsets + b)

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    m_ok = offs_m < sq
    d_ok = offs_d < HEAD_DIM
    rows_q = (q_start + offs_m).to(tl.int64)
    q, do, lse2, delta = query_rows(Q, DO, Lse, Delta, q_start, offs_m, sq, h, offs_d,
                                    stride_qt, stride_qh, stride_dot, stride_doh, total_q,
                                    HEAD_DIM, False)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b * stride_ab + h) * 1.4426950408889634

    lo, a, bnd, hi = key_ranges(m0, sk, offset, window_left, window_right, BLOCK_M, BLOCK_N,
                                WINDOW_LEFT, WINDOW_RIGHT)
    n_full = (bnd - a + BLOCK_N - 1) // BLOCK_N
    n_before = (a - lo + BLOCK_N - 1) // BLOCK_N
    n_masked = n_before + (hi - bnd + BLOCK_N - 1) // BLOCK_N
    dq = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    pdp = tl.zeros([BLOCK_M], dtype=tl.float32)
    dq, pdp = _dq_blocks(dq, pdp, q, do, lse2, delta, K, V, b, h, kvh, k_start, offs_m, offs_d, sk,
                    offset, stride_kt, stride_kh, stride_vt, stride_vh, nheads, max_seqlen_k,
                    qk_scale, tanh_scale, softcap2, slope2, dropout_p, window_left,
                    window_right, Seed, a, n_full, a, n_full, MaskBits, mask_off, sq, False,
                    HAS_CUSTOM_MASK, HEAD_DIM, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT, HAS_SOFTCAP,
                    HAS_ALIBI, HAS_DROPOUT, PRECISION, HAS_SINKS)
    dq, pdp = _dq_blocks(dq, pdp, q, do, lse2, delta, K, V, b, h, kvh, k_start, offs_m, offs_d, sk,
                    offset, stride_kt, stride_kh, stride_vt, stride_vh, nheads, max_seqlen_k,
                    qk_scale, tanh_scale, softcap2, slope2, dropout_p, window_left,
                    window_right, Seed, lo, n_before, bnd, n_masked, MaskBits, mask_off, sq,
                    True, HAS_CUSTOM_MASK, HEAD_DIM, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT,
                    HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, PRECISION, HAS_SINKS)
    dq = dq * sm_scale
    tl.store(DQ + rows_q[:, None] * stride_dqt + h * stride_dqh + offs_d[None, :],
             dq.to(DQ.dtype.element_ty), mask=m_ok[:, None] & d_ok[None, :])
    if HAS_SINKS:  # rows that see no key store 0 (their O is 0)
        tl.store(RowPdP + h.to(tl.int64) * total_q + q_start + offs_m, pdp, mask=m_ok)


# The arguments replays of the backward's launches replace (replay.LaunchRecord).
DELTA_REPLAY_ARGS = ("Out", "DO", "DLse", "Delta")
DKDV_REPLAY_ARGS = ("Q", "K", "V", "DO", "Lse", "Delta", "DK", "DV", "CuQ", "CuK")
DQ_REPLAY_ARGS = ("Q", "K", "V", "DO", "Lse", "Delta", "DQ", "CuQ", "CuK")
_replays = replay.ReplayCache()


class BackwardReplay:
    """The recorded launches of one backward (delta, dK/dV in the tl or Gluon kernel, dQ);
    ``dkdv_slots`` / ``dq_slots``: the optional slots each record also replaces ("Alibi":
    the slopes, "RowPdP": the dQ kernel's row sums for dsinks; replay.FEATURES)."""

    __slots__ = ("delta", "dkdv", "dkdv_slots", "dq", "dq_slots")

    def __init__(self, delta, dkdv, dq, dkdv_slots: tuple[str, ...] = (),
                 dq_slots: tuple[str, ...] = ()) -> None:
        self.delta, self.dkdv, self.dq = delta, dkdv, dq
        self.dkdv_slots, self.dq_slots = dkdv_slots, dq_slots

    def launch(self, q, k, v, out, dout, lse, dlse_arg, delta, dq, dk, dv, cu_q, cu_k,
               alibi: torch.Tensor | None = None, row_pdp: torch.Tensor | None = None) -> bool:
        if not self.delta(out, dout, dlse_arg, delta):
            return False
        dkdv_extra = dq_extra = ()
        if self.dkdv_slots or self.dq_slots:
            named = {"Alibi": alibi, "RowPdP": row_pdp}
            dkdv_extra = tuple(named[name] for name in self.dkdv_slots)
            dq_extra = tuple(named[name] for name in self.dq_slots)
        self.dkdv(q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k, *dkdv_extra)
        self.dq(q, k, v, dout, lse, delta, dq, cu_q, cu_k, *dq_extra)
        return True


def backward(problem, inputs, out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
             dlse: torch.Tensor | None, seed: torch.Tensor | None, *,
             sinks: torch.Tensor | None = None, gluon: bool = True
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor | None]:
    """dq, dk, dv with the shapes and dtypes of q, k, v (packed K/V only), and dsinks float32
    (nheads,) when ``sinks`` (float32 (nheads,), the forward's) is given, else None. ``lse``:
    the forward's (with the sinks in it).

    ``gluon``: plain calls on an sm_90 GPU compute dQ (without sinks) in the
    warp-specialised Gluon kernel (hopper_dq.py), and causal (right-bounded) ones dK/dV
    too (hopper_backward.py), with host lengths or device offsets. Ships on; benchmarks and
    tests turn it off to compare with the tl kernels.

    Repeats of a problem object replay the launches recorded at its second backward, under
    the conditions of forward.forward's replays (replay.py), with out, dout and dlse of the
    recorded strides too."""
    q, k, v = inputs.q, inputs.k, inputs.v
    cu_q, cu_k = inputs.cu_seqlens_q, inputs.cu_seqlens_k
    alibi = inputs.alibi_slopes
    split = group_split.split_for(problem, q.device)
    recording = False
    if seed is None and problem.paged is None and not problem.custom_mask \
            and (replay.FEATURES or (sinks is None and alibi is None)) \
            and problem.total_q and problem.nheads:
        replay_key = (q.stride(), k.stride(), v.stride(), out.stride(), dout.stride(),
                      None if dlse is None else dlse.stride(), q.get_device(), gluon,
                      None if alibi is None else alibi.stride())
        found = _replays.get(problem, replay_key)
        if found is not None and replay.aligned(q, k, v, out, dout, lse, cu_q, cu_k) \
                and (alibi is None or replay.aligned(alibi)):
            if found is True:
                recording = all(t.stride(-1) == 1 for t in (q, k, v, out, dout))
                if not recording:
                    _replays.put(problem, replay_key, None)
            else:
                delta = torch.empty((problem.nheads, problem.total_q), dtype=torch.float32,
                                    device=q.device)
                dlse_arg = dlse.float() if dlse is not None else delta
                dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
                dk, dv = _dkdv_buffers(problem, k, v, split)
                row_pdp = _row_pdp(problem, q, sinks)
                if replay.aligned(dlse_arg) and found.launch(
                        q, k, v, out, dout, lse, dlse_arg, delta, dq, dk, dv, cu_q, cu_k,
                        alibi, row_pdp):
                    dsinks = None if sinks is None else sink_gradient(sinks, lse, row_pdp, dlse)
                    return dq, *_dkdv_results(problem, k, v, dk, dv, split), dsinks
    records: dict[str, object] = {}
    q = _c(q)
    k, stride_kt, stride_kh = kv_layout(problem, _c(k))
    v, stride_vt, stride_vh = kv_layout(problem, _c(v))
    dout = _c(dout)
    out = _c(out)
    delta = torch.empty((problem.nheads, problem.total_q), dtype=torch.float32,
                        device=q.device)
    if problem.total_q and problem.nheads:
        dlse_arg = dlse.float() if dlse is not None else delta
        recording = recording and replay.aligned(dlse_arg)
        block_t = 16 if configs.interpreting() else 64
        delta_args = (out, dout, dlse_arg, delta, out.stride(0), out.stride(1), dout.stride(0),
                      dout.stride(1), dlse_arg.stride(0), dlse_arg.stride(1), problem.total_q)
        delta_kwargs = dict(HEAD_DIM=problem.head_dim, BLOCK_D=configs.block_d(problem.head_dim),
                            BLOCK_T=block_t, HAS_DLSE=dlse is not None, num_warps=4)
        delta_grid = (triton.cdiv(problem.total_q, block_t), problem.nheads)
        if recording and not configs.interpreting():
            records["delta"] = replay.LaunchRecord.launch(_delta_kernel, delta_grid, delta_args,
                                                          delta_kwargs, DELTA_REPLAY_ARGS)
        else:
            _delta_kernel[delta_grid](*delta_args, **delta_kwargs)
    dq = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    dk, dv = _dkdv_buffers(problem, k, v, split)
    key_tile, query_tile = configs.backward_tiles(problem.head_dim, problem.causal)
    left, right = problem.window
    dummy = cu_q
    common = dict(
        GROUP=problem.group_size, HEAD_DIM=problem.head_dim,
        BLOCK_D=configs.block_d(problem.head_dim),
        TOP_LEFT=problem.mask_alignment == "top_left", WINDOW_LEFT=left >= 0,
        WINDOW_RIGHT=right >= 0, HAS_SOFTCAP=softcap_mode(problem.softcap),
        HAS_ALIBI=alibi is not None,
        HAS_DROPOUT=problem.dropout_p > 0, PRECISION=configs.dot_precision(q.dtype),
        HAS_CUSTOM_MASK=problem.custom_mask)
    scalars = (problem.total_q, problem.batch, problem.nheads, max(problem.max_seqlen_k, 1),
               problem.scale, *score_scalars(problem), problem.dropout_p, left, right)
    alibi_arg = alibi if alibi is not None else dummy
    alibi_stride = alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0
    seed_arg = seed if seed is not None else dummy
    mask_args = ((inputs.custom_mask, inputs.custom_mask_offsets) if problem.custom_mask
                 else (dummy, dummy))

    plain = (not problem.custom_mask and problem.dropout_p == 0 and problem.softcap == 0
             and alibi is None and problem.paged is None)
    # calls with no right mask bound go to the Gluon dK/dV with CONFIG["right_unbounded"]
    # (on: faster than the tl kernel since the lse / delta prefetch, docs/performance.md v16)
    dkdv_slots = dq_slots = ()  # the optional slots the records replace
    if (gluon and problem.nheads_k
            and (right >= 0 or hopper_backward.CONFIG["right_unbounded"])
            and hopper_backward.supports(problem, q, k, v, dout, plain)):
        k_tiles = launch_tiles(problem, cu_k, hopper_backward.block_n(problem.head_dim),
                               False)
        if k_tiles[0]:
            recorded = hopper_backward.dkdv(problem, q, k, v, dout, lse, delta, dk, dv, cu_q,
                                            cu_k, k_tiles, score_scalars(problem)[0],
                                            split=split, record=recording)
            if recording:
                records["dkdv"] = recorded
    else:
        k_programs, k_seq, k_blk, k_device = launch_tiles(problem, cu_k, key_tile, False)
        dkdv_slots = replay.present(Alibi=alibi)[0]
        if k_programs and problem.nheads_k:
            records["dkdv"] = configs.launch(
                "dkdv", _dkdv_kernel, (k_programs, problem.nheads_k * split),
                q, k, v, dout, lse, delta, dk, dv, cu_q, cu_k,
                k_seq, k_blk, alibi_arg, seed_arg, *mask_args,
                q.stride(0), q.stride(1), stride_kt, stride_kh, stride_vt, stride_vh,
                dout.stride(0), dout.stride(1), dk.stride(0), dk.stride(1), dv.stride(0),
                dv.stride(1), alibi_stride, *scalars, BLOCK_N=key_tile, DEVICE_TILES=k_device,
                record=DKDV_REPLAY_ARGS + dkdv_slots if recording else (),
                **dict(common, GROUP=problem.group_size // split), SPLIT=split)
    row_pdp = _row_pdp(problem, q, sinks)
    if gluon and sinks is None and hopper_dq.supports(problem, q, k, v, dout, plain):
        q_tiles = launch_tiles(problem, cu_q, hopper_dq.block_m(problem.head_dim), True)
        if q_tiles[0] and problem.nheads:
            records["dq"] = hopper_dq.dq(problem, q, k, v, dout, lse, delta, dq, cu_q, cu_k,
                                         q_tiles, score_scalars(problem)[0], record=recording)
        q_programs = 0
    else:
        q_programs, q_seq, q_blk, q_device = launch_tiles(problem, cu_q, query_tile, True)
        dq_slots = replay.present(Alibi=alibi, RowPdP=row_pdp)[0]
    if q_programs and problem.nheads:
        records["dq"] = configs.launch("dq", _dq_kernel, (q_programs, problem.nheads),
            q, k, v, dout, lse, delta, dq, cu_q, cu_k,
            q_seq, q_blk, alibi_arg, seed_arg, *mask_args,
            row_pdp if row_pdp is not None else dummy,
            q.stride(0), q.stride(1), stride_kt, stride_kh, stride_vt, stride_vh,
            dout.stride(0), dout.stride(1), dq.stride(0), dq.stride(1), alibi_stride,
            *scalars, BLOCK_M=query_tile, DEVICE_TILES=q_device, HAS_SINKS=sinks is not None,
            record=DQ_REPLAY_ARGS + dq_slots if recording else (), **common)
    if recording:
        complete = all(records.get(name) for name in ("delta", "dkdv", "dq"))
        _replays.put(problem, replay_key, BackwardReplay(
            records["delta"], records["dkdv"], records["dq"], dkdv_slots, dq_slots)
            if complete else None)
    dsinks = None if sinks is None else sink_gradient(sinks, lse, row_pdp, dlse)
    return dq, *_dkdv_results(problem, k, v, dk, dv, split), dsinks


def _row_pdp(problem, q: torch.Tensor, sinks: torch.Tensor | None) -> torch.Tensor | None:
    """With sinks: the tl dQ kernel's rowsum(P * dP) per (head, query row), float32
    (nheads, total_q), for their gradient (sink_gradient); None without."""
    if sinks is None:
        return None
    return torch.empty((problem.nheads, problem.total_q), dtype=torch.float32, device=q.device)


def _dkdv_buffers(problem, k: torch.Tensor, v: torch.Tensor, split: int
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """What the dK/dV kernel writes: dk, dv like k and v, or with a group split
    (group_split.py) their float32 partials."""
    if split > 1:
        return group_split.partials(k, problem.nheads_k, split)
    return (torch.empty(k.shape, dtype=k.dtype, device=k.device),
            torch.empty(v.shape, dtype=v.dtype, device=v.device))


def _dkdv_results(problem, k: torch.Tensor, v: torch.Tensor, dk: torch.Tensor,
                  dv: torch.Tensor, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    if split == 1:
        return dk, dv
    return (group_split.reduce(dk, problem.nheads_k, split, k.dtype),
            group_split.reduce(dv, problem.nheads_k, split, v.dtype))


def sink_gradient(sinks: torch.Tensor, lse: torch.Tensor, row_pdp: torch.Tensor,
                  dlse: torch.Tensor | None) -> torch.Tensor:
    """dsinks[h] = sum_i exp(sinks[h] - lse_i) * (dlse_i - D_i), float32 (nheads,), with
    D_i = rowsum(P * dP) (``row_pdp``) and lse, dlse (nheads, total_q). lse is -inf only
    under a -inf sink, whose weight is then 0."""
    weight = torch.exp(sinks[:, None] - lse.masked_fill(torch.isneginf(lse), 0.0))
    grad = -row_pdp if dlse is None else dlse.float() - row_pdp
    return (weight * grad).sum(1)


def _c(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
