"""The reference math: per sequence, per query chunk, in fp32 (fp64 for fp64 inputs).

Memory is bounded by the chunk: a (nheads, chunk, sk) block of scores at a time, never a
total x total matrix. ATTNHUB_REFERENCE_CHUNK_MB (default 256) caps one chunk's working set.
"""

from __future__ import annotations

import math
import os
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from attnhub import custom_mask, host_copies
from attnhub.backend import ForwardResult, Gradients
from attnhub.errors import InvalidArgumentError, InvalidEnvironmentError
from attnhub.inputs import VarlenInputs
from attnhub.problem import VarlenProblem
from attnhub.varlen_info import check_cu_seqlens_values

from .dropout import keep_mask, new_rng_state

# Temporaries per score element in the backward chunk: scores, probs, tanh, dP, mask hash, ...
_TEMPS_PER_SCORE = 8


@dataclass
class _Seq:
    """One sequence: its packed query rows [q0, q1) and key rows (packed or gathered)."""

    b: int
    q0: int
    q1: int
    k0: int
    sk: int
    k: torch.Tensor  # (sk, nheads_k, head_dim)
    v: torch.Tensor
    kv_rows: torch.Tensor | None  # paged: flat pool row of each key, for scattering grads
    mask_offset: int = 0  # custom mask: the first bit of this sequence's (sq, sk) block


@dataclass
class _Block:
    """Query rows [i0, i1) of a sequence and the key range [j0, j1) any of them can see."""

    i0: int
    i1: int
    j0: int
    j1: int


def compute_dtype_for(dtype: torch.dtype) -> torch.dtype:
    return torch.float64 if dtype == torch.float64 else torch.float32


def forward(problem: VarlenProblem, inputs: VarlenInputs,
            compute_dtype: torch.dtype | None = None) -> ForwardResult:
    """out (total_q, nheads, head_dim) in q's dtype, lse float32 (nheads, total_q). With
    sinks, each head's sink logit joins the softmax denominator (lse includes it; a row that
    sees no key keeps out 0 and lse = the sink)."""
    ctype = compute_dtype or compute_dtype_for(problem.dtype)
    q = inputs.q
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    sink = _sink(problem, inputs, ctype)
    lse = torch.full((problem.nheads, problem.total_q), float("-inf"), dtype=torch.float32,
                     device=q.device)
    if sink is not None:  # rows that see no key
        lse[:] = sink.to(torch.float32)[:, None]
    probs = None
    if problem.return_probs:
        probs = torch.zeros(problem.batch, problem.nheads, problem.max_seqlen_q,
                            problem.max_seqlen_k, dtype=torch.float32, device=q.device)
    rng = _rng_state(problem, inputs)
    for seq in _sequences(problem, inputs):
        for blk in _blocks(seq, problem, ctype):
            rows = slice(seq.q0 + blk.i0, seq.q0 + blk.i1)
            s, _ = _scores(problem, inputs, seq, blk, ctype)
            p, row_lse = _softmax(s, sink)
            lse[:, rows] = row_lse.to(torch.float32)
            pd = p
            if problem.dropout_p > 0:
                keep = _keep(problem, rng, seq, blk)
                pd = p * keep / (1.0 - problem.dropout_p)
                if probs is not None:
                    p = torch.where(keep, p, -p)
            if probs is not None:
                probs[seq.b, :, blk.i0:blk.i1, blk.j0:blk.j1] = p.to(torch.float32)
            out[rows] = _pv(problem, pd, seq.v[blk.j0:blk.j1].to(ctype)).to(q.dtype)
    return ForwardResult(out, lse, probs, rng)


def backward(problem: VarlenProblem, inputs: VarlenInputs, dout: torch.Tensor,
             dlse: torch.Tensor | None = None, compute_dtype: torch.dtype | None = None
             ) -> Gradients:
    """dq, dk, dv (shapes and dtypes of q, k, v; page pools when paged) and, with sinks,
    dsinks (float32 (nheads,)) from dout and, when given, dlse (nheads, total_q). The softmax
    is recomputed from q and k, so out and lse are not needed."""
    ctype = compute_dtype or compute_dtype_for(problem.dtype)
    q, k, v = inputs.q, inputs.k, inputs.v
    g, hk, d = problem.group_size, problem.nheads_k, problem.head_dim
    dq = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    paged = problem.paged is not None
    if paged:
        dk_acc = torch.zeros(k.shape[0] * k.shape[1], hk, d, dtype=ctype, device=k.device)
        dv_acc = torch.zeros_like(dk_acc)
    else:
        dk = torch.zeros(k.shape, dtype=k.dtype, device=k.device)
        dv = torch.zeros(v.shape, dtype=v.dtype, device=v.device)
    rng = inputs.rng_state
    sink = _sink(problem, inputs, ctype)
    dsink = None
    if sink is not None:  # d lse_i / d sink = exp(sink - lse_i): 1 on rows that see no key
        dsink = torch.zeros(problem.nheads, dtype=ctype, device=q.device)
        seen = torch.zeros(problem.total_q, dtype=torch.bool, device=q.device)
    for seq in _sequences(problem, inputs):
        kc, vc = seq.k.to(ctype), seq.v.to(ctype)
        dk_seq = torch.zeros(hk, seq.sk, d, dtype=ctype, device=q.device)
        dv_seq = torch.zeros_like(dk_seq)
        for blk in _blocks(seq, problem, ctype):
            rows = slice(seq.q0 + blk.i0, seq.q0 + blk.i1)
            keys = slice(blk.j0, blk.j1)
            s, tanh = _scores(problem, inputs, seq, blk, ctype)
            p, row_lse = _softmax(s, sink)
            do = _grouped(dout[rows].to(ctype), hk, g)  # (hk, g, C, d)
            dp = torch.matmul(do, vc[keys].permute(1, 2, 0).unsqueeze(1)).reshape(p.shape)
            pd = p
            if problem.dropout_p > 0:
                if rng is None:
                    raise InvalidArgumentError("rng_state", "the dropout state that forward "
                                               "returned", None)
                scale_keep = _keep(problem, rng, seq, blk) / (1.0 - problem.dropout_p)
                pd = p * scale_keep
                dp = dp * scale_keep
            c, w = blk.i1 - blk.i0, blk.j1 - blk.j0
            dv_seq[:, keys] += torch.matmul(pd.reshape(hk, g, c, w).transpose(-1, -2), do).sum(1)
            delta = (p * dp).sum(-1, keepdim=True)  # D_i = rowsum(dout * out)
            row_grad = dp - delta
            if dlse is not None:  # d lse_i / d s_ij = p_ij
                row_grad = row_grad + dlse[:, rows, None].to(ctype)
            if dsink is not None:
                p_sink = torch.exp(sink[:, None] - row_lse)  # (nheads, C)
                g_sink = -delta.squeeze(-1)
                if dlse is not None:
                    g_sink = g_sink + dlse[:, rows].to(ctype)
                dsink += (p_sink * g_sink).sum(-1)
                seen[rows] = True
            ds = p * row_grad
            if tanh is not None:
                ds = ds * (1.0 - tanh * tanh)
            ds = ds * problem.scale
            ds_g = ds.reshape(hk, g, c, w)
            dq_c = torch.matmul(ds_g, kc[keys].permute(1, 0, 2).unsqueeze(1))  # (hk, g, C, d)
            dq[rows] = dq_c.permute(2, 0, 1, 3).reshape(c, -1, d).to(q.dtype)
            qg = _grouped(q[rows].to(ctype), hk, g)
            dk_seq[:, keys] += torch.matmul(ds_g.transpose(-1, -2), qg).sum(1)
        if paged:
            dk_acc.index_add_(0, seq.kv_rows, dk_seq.transpose(0, 1))
            dv_acc.index_add_(0, seq.kv_rows, dv_seq.transpose(0, 1))
        else:
            dk[seq.k0:seq.k0 + seq.sk] = dk_seq.transpose(0, 1).to(k.dtype)
            dv[seq.k0:seq.k0 + seq.sk] = dv_seq.transpose(0, 1).to(v.dtype)
    if paged:
        dk = dk_acc.view(k.shape).to(k.dtype)
        dv = dv_acc.view(v.shape).to(v.dtype)
    dsinks = None
    if dsink is not None:
        if dlse is not None:  # rows that see no key: lse = sink, out = 0
            dsink += dlse.to(ctype)[:, ~seen].sum(-1)
        dsinks = dsink.to(inputs.sinks.dtype)  # float32 through the API
    return Gradients(dq, dk, dv, dsinks)


def _sink(problem: VarlenProblem, inputs: VarlenInputs, ctype: torch.dtype
          ) -> torch.Tensor | None:
    """The sink logits (nheads,) in ctype, or None without sinks."""
    if not problem.sinks:
        return None
    assert inputs.sinks is not None
    return inputs.sinks.detach().to(ctype)


def _rng_state(problem: VarlenProblem, inputs: VarlenInputs) -> torch.Tensor | None:
    if problem.dropout_p == 0:
        return None
    if inputs.rng_state is not None:
        return inputs.rng_state
    return new_rng_state(inputs.q.device)


def host_offsets(name: str, tensor: torch.Tensor, known: tuple[int, ...] | None,
                  total: int | None, max_seqlen: int) -> tuple[int, ...]:
    """Host offsets, validated: the reference reads them, so it checks what it reads."""
    if known is not None:
        return (0, *_cumsum(known))
    host = host_copies.host_copy(tensor)
    check_cu_seqlens_values(name, host)
    if total is not None and host[-1] != total:
        raise InvalidArgumentError(name, f"a last offset equal to the number of rows ({total})",
                                   host[-1])
    longest = max((host[b + 1] - host[b] for b in range(len(host) - 1)), default=0)
    if longest > max_seqlen:
        raise InvalidArgumentError(name.replace("cu_seqlens", "max_seqlen"),
                                   f"at least the longest sequence ({longest} tokens)", max_seqlen)
    return host


def _cumsum(lengths: tuple[int, ...]) -> list[int]:
    out, acc = [], 0
    for n in lengths:
        acc += n
        out.append(acc)
    return out


def _sequences(problem: VarlenProblem, inputs: VarlenInputs) -> Iterator[_Seq]:
    paged = problem.paged
    cu_q = host_offsets("cu_seqlens_q", inputs.cu_seqlens_q, problem.seqlens_q,
                         problem.total_q, problem.max_seqlen_q)
    cu_k = host_offsets("cu_seqlens_k", inputs.cu_seqlens_k, problem.seqlens_k,
                         None if paged else problem.total_k, problem.max_seqlen_k)
    pages = None
    if paged is not None:
        assert inputs.block_table is not None
        pages = host_copies.host_copy(inputs.block_table)
    bit_offsets = mask_offsets(problem, inputs, cu_q, cu_k)
    k, v = inputs.k, inputs.v
    for b in range(problem.batch):
        q0, q1, k0, k1 = cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]
        sk = k1 - k0
        if q1 == q0 or sk == 0:  # nothing to compute: out rows stay 0, lse -inf, grads 0
            continue
        kv_rows = None
        if paged is not None:
            assert pages is not None
            need = -(-sk // paged.page_size)
            ids = pages[b][:need]
            if len(ids) < need or any(not 0 <= p < paged.num_pages for p in ids):
                raise InvalidArgumentError(
                    "block_table", f"{need} page indices in [0, {paged.num_pages}) for "
                    f"sequence {b}", list(ids))
            page_ids = torch.tensor(ids, dtype=torch.int64, device=k.device)
            rows = (page_ids[:, None] * paged.page_size
                    + torch.arange(paged.page_size, device=k.device)[None, :]).reshape(-1)[:sk]
            flat = k.shape[0] * k.shape[1]
            kb = k.reshape(flat, *k.shape[2:]).index_select(0, rows)
            vb = v.reshape(flat, *v.shape[2:]).index_select(0, rows)
            kv_rows = rows
        else:
            kb, vb = k[k0:k1], v[k0:k1]
        yield _Seq(b, q0, q1, k0, sk, kb, vb, kv_rows,
                   bit_offsets[b] if bit_offsets is not None else 0)


def mask_offsets(problem: VarlenProblem, inputs: VarlenInputs, cu_q: tuple[int, ...],
                  cu_k: tuple[int, ...]) -> tuple[int, ...] | None:
    """Host bit offsets of the custom mask's blocks, checked against the packed size."""
    if not problem.custom_mask:
        return None
    assert inputs.custom_mask is not None and inputs.custom_mask_offsets is not None
    offsets = host_copies.host_copy(inputs.custom_mask_offsets)
    nbits = inputs.custom_mask.shape[0] * 8
    for b, off in enumerate(offsets):
        size = (cu_q[b + 1] - cu_q[b]) * (cu_k[b + 1] - cu_k[b])
        if size and not (off >= 0 and off + size <= nbits):
            raise InvalidArgumentError(
                "custom_mask", f"bits [{off}, {off + size}) of request {b} inside the packed "
                f"mask ({nbits} bits)", f"{nbits} bits")
    return offsets


def chunk_budget() -> int:
    """ATTNHUB_REFERENCE_CHUNK_MB (MiB, default 256) in bytes."""
    raw = os.environ.get("ATTNHUB_REFERENCE_CHUNK_MB") or "256"
    try:
        mib = float(raw)
    except ValueError:
        mib = math.nan
    if not (math.isfinite(mib) and mib > 0):
        raise InvalidEnvironmentError("ATTNHUB_REFERENCE_CHUNK_MB",
                                   "a positive number of MiB (default 256)", repr(raw))
    return int(mib * 2**20)


def _blocks(seq: _Seq, problem: VarlenProblem, ctype: torch.dtype) -> Iterator[_Block]:
    """Query chunks sized to the memory budget, each with the band of keys its rows can see
    under the mask; chunks that see no key are skipped (their rows keep out 0, lse -inf)."""
    budget = chunk_budget()
    per_row = problem.nheads * max(seq.sk, 1) * torch.finfo(ctype).bits // 8 * _TEMPS_PER_SCORE
    step = max(1, budget // per_row)
    sq, sk = seq.q1 - seq.q0, seq.sk
    offset = sk - sq if problem.mask_alignment == "bottom_right" else 0
    left, right = problem.window
    for i0 in range(0, sq, step):
        i1 = min(i0 + step, sq)
        j0 = max(0, i0 + offset - left) if left >= 0 else 0
        j1 = min(sk, i1 + offset + right) if right >= 0 else sk
        if j0 < j1:
            yield _Block(i0, i1, j0, j1)


def _grouped(x: torch.Tensor, hk: int, g: int) -> torch.Tensor:
    """(C, nheads, d) -> (nheads_k, group, C, d): head h = kv_head * group + member."""
    c, _, d = x.shape
    return x.reshape(c, hk, g, d).permute(1, 2, 0, 3)


def _scores(problem: VarlenProblem, inputs: VarlenInputs, seq: _Seq, blk: _Block,
            ctype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Masked scores (nheads, C, j1 - j0) in ctype (-inf where masked), and tanh(s / cap)
    for the softcap derivative (None without softcap)."""
    hk, g = problem.nheads_k, problem.group_size
    dev = inputs.q.device
    qg = _grouped(inputs.q[seq.q0 + blk.i0:seq.q0 + blk.i1].to(ctype), hk, g)
    kt = seq.k[blk.j0:blk.j1].to(ctype).permute(1, 2, 0).unsqueeze(1)  # (hk, 1, d, w)
    s = torch.matmul(qg, kt).reshape(problem.nheads, blk.i1 - blk.i0, blk.j1 - blk.j0)
    s = s * problem.scale
    tanh = None
    if problem.softcap > 0:
        tanh = torch.tanh(s / problem.softcap)
        s = tanh * problem.softcap
    sq = seq.q1 - seq.q0
    offset = seq.sk - sq if problem.mask_alignment == "bottom_right" else 0
    rows = torch.arange(blk.i0, blk.i1, device=dev)[:, None] + offset
    rel = rows - torch.arange(blk.j0, blk.j1, device=dev)[None, :]  # i + offset - j
    if problem.alibi is not None:
        slopes = inputs.alibi_slopes
        assert slopes is not None
        slope = slopes if problem.alibi == "head" else slopes[seq.b]
        s = s - slope.to(ctype)[:, None, None] * rel.abs().to(ctype)
    visible = window_visible(rel, problem.window)
    if problem.custom_mask:
        assert inputs.custom_mask is not None
        visible &= custom_mask.read_block(inputs.custom_mask, seq.mask_offset, seq.sk,
                                          range(blk.i0, blk.i1), range(blk.j0, blk.j1))
    return s.masked_fill(~visible, float("-inf")), tanh


def window_visible(rel: torch.Tensor, window: tuple[int, int]) -> torch.Tensor:
    """Bool of ``rel``'s shape: key j visible to query i under ``window`` (left, right; -1 =
    unbounded), where ``rel`` holds i + offset - j (the aligned distance)."""
    left, right = window
    visible = torch.ones_like(rel, dtype=torch.bool)
    if left >= 0:
        visible &= rel <= left
    if right >= 0:
        visible &= rel >= -right
    return visible


def _softmax(s: torch.Tensor, sink: torch.Tensor | None = None
             ) -> tuple[torch.Tensor, torch.Tensor]:
    """Row softmax and lse of scores (nheads, C, w); rows that see no key give p = 0 and
    lse = -inf. ``sink`` (nheads,): each head's sink logit joins the denominator (such rows
    then give lse = sink)."""
    m = s.amax(-1, keepdim=True)
    if sink is not None:
        m = torch.maximum(m, sink[:, None, None])
    m = torch.where(torch.isneginf(m), torch.zeros_like(m), m)
    p = torch.exp(s - m)
    denom = p.sum(-1, keepdim=True)
    if sink is not None:
        denom = denom + torch.exp(sink[:, None, None] - m)
    lse = (m + torch.log(denom)).squeeze(-1)
    p = p / torch.where(denom == 0, torch.ones_like(denom), denom)
    return p, lse


def _keep(problem: VarlenProblem, rng: torch.Tensor, seq: _Seq, blk: _Block) -> torch.Tensor:
    dev, i64 = rng.device, torch.int64
    heads = torch.arange(problem.nheads, device=dev, dtype=i64)[:, None, None]
    rows = torch.arange(seq.q0 + blk.i0, seq.q0 + blk.i1, device=dev, dtype=i64)[None, :, None]
    cols = torch.arange(seq.k0 + blk.j0, seq.k0 + blk.j1, device=dev, dtype=i64)[None, None, :]
    return keep_mask(rng, heads, rows, cols, problem.dropout_p)


def _pv(problem: VarlenProblem, p: torch.Tensor, v: torch.Tensor) -> torch.Tensor:
    """(nheads, C, sk) @ v (sk, nheads_k, d) -> (C, nheads, d), GQA by broadcasting."""
    hk, g = problem.nheads_k, problem.group_size
    _, c, sk = p.shape
    o = torch.matmul(p.reshape(hk, g, c, sk), v.permute(1, 0, 2).unsqueeze(1))
    return o.permute(2, 0, 1, 3).reshape(c, problem.nheads, -1)
