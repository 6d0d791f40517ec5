"""Decode forward: few query tokens per sequence over long (paged) K/V, split over programs.

One program per (sequence, kv head, split) reads its slice of K/V once for all the query
heads of the group: their rows (query head x query token) are packed into one tile. A second
kernel combines the splits' partial softmax states (and joins the sinks, when the call has
them). Memory-bound by design.
"""

from __future__ import annotations

import torch
import triton
import triton.language as tl

from . import configs
from .forward import (
    PER_BATCH_ARGS,
    add_sink,
    key_bound,
    kv_layout,
    kv_rows,
    score_scalars,
    score_tile,
)
from .softcap import mode as softcap_mode

MAX_ROWS = 64  # query heads per kv head x query tokens that one tile holds


def eligible(problem) -> bool:
    """Few query rows per kv head, no dropout: the split-KV path computes the same result."""
    q_pad = triton.next_power_of_2(max(problem.max_seqlen_q, 1))
    long_keys = problem.max_seqlen_k >= 512 or configs.interpreting()  # (tests cover it)
    return (problem.max_seqlen_q <= 16 and q_pad * problem.group_size <= MAX_ROWS
            and problem.head_dim <= 256
            and problem.dropout_p == 0 and long_keys and not problem.custom_mask)


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _decode_split_kernel(
    Q, K, V, OPart, MPart, LPart, CuQ, CuK, BlockTable, Alibi,
    stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh, stride_bt_b, stride_ab,
    total_q, batch, max_seqlen_k, num_splits, qk_scale, tanh_scale, softcap2,
    window_left, window_right,
    GROUP: tl.constexpr, Q_PAD: tl.constexpr, ROWS: tl.constexpr, HEAD_DIM: tl.constexpr,
    BLOCK_D: tl.constexpr, BLOCK_N: tl.constexpr, TOP_LEFT: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
    PRECISION: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    split = tl.program_id(2)
    q_start = tl.load(CuQ + b)
    sq = tl.load(CuQ + b + 1) - q_start
    k_start = tl.load(CuK + b)
    sk = tl.load(CuK + b + 1) - k_start
    offset = 0 if TOP_LEFT else sk - sq

    r = tl.arange(0, ROWS)
    g = r // Q_PAD  # query head within the group
    i = r % Q_PAD  # query token within the sequence
    row_ok = (g < GROUP) & (i < sq)
    h = kvh * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    d_ok = offs_d < HEAD_DIM
    q = tl.load(Q + (q_start + i).to(tl.int64)[:, None] * stride_qt + h[:, None] * stride_qh
                + offs_d[None, :], mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    slope2 = tl.zeros([ROWS, 1], dtype=tl.float32)
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b * stride_ab + h, mask=g < GROUP, other=0.0)[:, None] \
            * 1.4426950408889634

    chunk = tl.cdiv(tl.cdiv(sk, num_splits), BLOCK_N) * BLOCK_N
    lo = split * chunk
    hi = tl.minimum(sk, lo + chunk)
    m_i = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for start_n in range(lo, hi, BLOCK_N):
        offs_n = start_n + tl.arange(0, BLOCK_N)
        n_ok = offs_n < hi
        rows = kv_rows(BlockTable, b, stride_bt_b, tl.where(n_ok, offs_n, 0), k_start,
                       max_seqlen_k, PAGED, PAGE_SIZE)
        k = tl.load(K + rows[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None],
                    mask=n_ok[None, :] & d_ok[:, None], other=0.0)
        v = tl.load(V + rows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :],
                    mask=n_ok[:, None] & d_ok[None, :], other=0.0)
        s, _ = score_tile(q, k, i[:, None], offs_n[None, :], hi, offset, qk_scale, tanh_scale,
                          softcap2, slope2, window_left, window_right, True, HAS_SOFTCAP,
                          HAS_ALIBI, WINDOW_LEFT, WINDOW_RIGHT, PRECISION)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = tl.dot(p.to(v.dtype), v, acc * alpha[:, None], input_precision=PRECISION)
        m_i = m_new
    part = ((b * tl.num_programs(1) + kvh) * num_splits + split).to(tl.int64) * ROWS
    tl.store(OPart + (part + r)[:, None] * BLOCK_D + offs_d[None, :], acc)
    tl.store(MPart + part + r, m_i)
    tl.store(LPart + part + r, l_i)


@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _decode_combine_kernel(
    OPart, MPart, LPart, Out, Lse, CuQ, Sinks, stride_ot, stride_oh, total_q, batch,
    num_splits, GROUP: tl.constexpr, Q_PAD: tl.constexpr, ROWS: tl.constexpr,
    HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, HAS_SINKS: tl.constexpr,
):
    b = tl.program_id(0)
    kvh = tl.program_id(1)
    q_start = tl.load(CuQ + b)
    sq = tl.load(CuQ + b + 1) - q_start
    r = tl.arange(0, ROWS)
    g = r // Q_PAD
    i = r % Q_PAD
    row_ok = (g < GROUP) & (i < sq)
    h = kvh * GROUP + g
    offs_d = tl.arange(0, BLOCK_D)
    base = (b * tl.num_programs(1) + kvh).to(tl.int64) * num_splits
    m_all = tl.full([ROWS], float("-inf"), dtype=tl.float32)
    for s in range(0, num_splits):
        m_all = tl.maximum(m_all, tl.load(MPart + (base + s) * ROWS + r))
    m_use = tl.where(m_all == float("-inf"), 0.0, m_all)
    l_sum = tl.zeros([ROWS], dtype=tl.float32)
    acc = tl.zeros([ROWS, BLOCK_D], dtype=tl.float32)
    for s in range(0, num_splits):
        w = tl.exp2(tl.load(MPart + (base + s) * ROWS + r) - m_use)
        l_sum += w * tl.load(LPart + (base + s) * ROWS + r)
        acc += w[:, None] * tl.load(OPart + ((base + s) * ROWS + r)[:, None] * BLOCK_D
                                    + offs_d[None, :])
    if HAS_SINKS:  # the state is relative to m_all (-inf: nothing seen, l_sum and acc 0)
        acc, l_sum, m_all = add_sink(acc, l_sum, m_all, Sinks, h, g < GROUP)
    seen = l_sum > 0.0
    out = acc / tl.where(seen, l_sum, 1.0)[:, None]
    lse = tl.where(seen, (m_all + tl.log2(tl.where(seen, l_sum, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    tl.store(Out + (q_start + i).to(tl.int64)[:, None] * stride_ot + h[:, None] * stride_oh
             + offs_d[None, :], out.to(Out.dtype.element_ty),
             mask=row_ok[:, None] & (offs_d[None, :] < HEAD_DIM))
    tl.store(Lse + h.to(tl.int64) * total_q + q_start + i, lse, mask=row_ok)


def num_splits(problem, device: torch.device) -> int:
    """Enough programs to fill the GPU about twice, each with at least 512 keys."""
    programs = max(problem.batch * problem.nheads_k, 1)
    if configs.interpreting():
        target = 4
    else:
        target = 2 * torch.cuda.get_device_properties(device).multi_processor_count
    return max(1, min(-(-target // programs), -(-problem.max_seqlen_k // 512)))


def forward(problem, inputs, *, sinks: torch.Tensor | None = None
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """out (total_q, nheads, d) and lse float32 (nheads, total_q), split-KV; ``sinks``:
    float32 (nheads,) sink logits, or None."""
    q = inputs.q if inputs.q.stride(-1) == 1 else inputs.q.contiguous()
    k, stride_kt, stride_kh = kv_layout(problem, inputs.k if inputs.k.stride(-1) == 1
                                        else inputs.k.contiguous())
    v, stride_vt, stride_vh = kv_layout(problem, inputs.v if inputs.v.stride(-1) == 1
                                        else inputs.v.contiguous())
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((problem.nheads, problem.total_q), dtype=torch.float32, device=q.device)
    if problem.batch == 0 or problem.total_q == 0:
        return out, lse
    q_pad = triton.next_power_of_2(max(problem.max_seqlen_q, 1))
    rows = max(16, triton.next_power_of_2(q_pad * problem.group_size))
    bd = configs.block_d(problem.head_dim)
    splits = num_splits(problem, q.device)
    parts = problem.batch * problem.nheads_k * splits * rows
    o_part = torch.empty(parts, bd, dtype=torch.float32, device=q.device)
    m_part = torch.empty(parts, dtype=torch.float32, device=q.device)
    l_part = torch.empty(parts, dtype=torch.float32, device=q.device)
    left, right = problem.window
    alibi, block_table, dummy = inputs.alibi_slopes, inputs.block_table, inputs.cu_seqlens_q
    block_n = 16 if configs.interpreting() else 64
    common = dict(GROUP=problem.group_size, Q_PAD=q_pad, ROWS=rows, HEAD_DIM=problem.head_dim,
                  BLOCK_D=bd)
    _decode_split_kernel[(problem.batch, problem.nheads_k, splits)](
        q, k, v, o_part, m_part, l_part, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
        block_table if block_table is not None else dummy,
        alibi if alibi is not None else dummy,
        q.stride(0), q.stride(1), stride_kt, stride_kh, stride_vt, stride_vh,
        block_table.stride(0) if block_table is not None else 0,
        alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0,
        problem.total_q, problem.batch, key_bound(problem), splits,
        *score_scalars(problem), left, right, **common, BLOCK_N=block_n,
        TOP_LEFT=problem.mask_alignment == "top_left", WINDOW_LEFT=left >= 0,
        WINDOW_RIGHT=right >= 0, HAS_SOFTCAP=softcap_mode(problem.softcap),
        HAS_ALIBI=alibi is not None,
        PAGED=problem.paged is not None,
        PAGE_SIZE=problem.paged.page_size if problem.paged is not None else 1,
        PRECISION=configs.dot_precision(q.dtype),
        num_warps=1 if configs.interpreting() else 4, num_stages=1 if configs.interpreting()
        else 3)
    _decode_combine_kernel[(problem.batch, problem.nheads_k)](
        o_part, m_part, l_part, out, lse, inputs.cu_seqlens_q,
        sinks if sinks is not None else dummy, out.stride(0), out.stride(1), problem.total_q,
        problem.batch, splits, **common, HAS_SINKS=sinks is not None,
        num_warps=1 if configs.interpreting() else 4)
    return out, lse
