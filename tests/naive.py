"""An independent, naive varlen attention oracle for the tests, plus input builders.

Everything here is written straight from docs/semantics.md, one sequence at a time, in
float64, with a dense (sq, sk) mask and ``repeat_interleave`` for GQA. It deliberately imports
nothing from attnhub's backends, so it can judge the library rather than echo it. It is
differentiable (plain torch ops), so torch.autograd on it gives reference gradients.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from dataclasses import dataclass

import torch

F64 = torch.float64


# --------------------------------------------------------------------------------------------
# The oracle
# --------------------------------------------------------------------------------------------


@dataclass
class NaiveResult:
    out: torch.Tensor  # (total_q, nheads, head_dim) float64
    lse: torch.Tensor  # (nheads, total_q) float64, -inf on rows that see no key
    probs: torch.Tensor  # (batch, nheads, max_q, max_k) float64 softmax (before dropout)


def as_offsets(cu: object) -> list[int]:
    """cu_seqlens in any accepted form (list, tuple, tensor, VarlenInfo) -> host list."""
    host = getattr(cu, "cu_seqlens_host", None)
    if host is not None:
        return [int(x) for x in host]
    if isinstance(cu, torch.Tensor):
        return [int(x) for x in cu.tolist()]
    return [int(x) for x in cu]  # type: ignore[union-attr]


def parse_window(window_size: object, causal: bool) -> tuple[int, int]:
    """docs/semantics.md: a pair (left, right), an int w meaning (w, w), -1 or None = unbounded;
    causal sets right = 0."""
    if window_size is None:
        left, right = -1, -1
    elif isinstance(window_size, int):
        left = right = window_size
    else:
        left, right = window_size  # type: ignore[misc]
    if causal:
        right = 0
    return int(left), int(right)


def visible_mask(sq: int, sk: int, left: int, right: int, top_left: bool = False
                 ) -> torch.Tensor:
    """Dense (sq, sk) bool: key j visible to query i iff
    i + off - left <= j <= i + off + right (a negative side unbounded), off = sk - sq
    (bottom-right alignment) or 0 (top-left)."""
    off = 0 if top_left else sk - sq
    i = torch.arange(sq).view(sq, 1)
    j = torch.arange(sk).view(1, sk)
    vis = torch.ones(sq, sk, dtype=torch.bool)
    if left >= 0:
        vis &= j >= i + off - left
    if right >= 0:
        vis &= j <= i + off + right
    return vis


def gather_pages(pool: torch.Tensor, block_table: torch.Tensor, b: int, sk: int
                 ) -> torch.Tensor:
    """Sequence b's first sk rows of a page pool (num_pages, page_size, hk, d)."""
    page_size = pool.shape[1]
    npages = -(-sk // page_size)
    ids = [int(x) for x in block_table[b, :npages].tolist()]
    if not ids:
        return pool.new_zeros((0, *pool.shape[2:]))
    return torch.cat([pool[p] for p in ids], dim=0)[:sk]


def naive_attention(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: object,
    cu_seqlens_k: object,
    *,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: object = None,
    softcap: float | None = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    top_left: bool = False,
    keep: torch.Tensor | None = None,
    dropout_p: float = 0.0,
    custom_mask: Sequence[torch.Tensor] | None = None,
    sinks: torch.Tensor | None = None,
) -> NaiveResult:
    """The oracle. ``keep``: an explicit dropout keep mask (batch, nheads, >= sq, >= sk), bool;
    kept probabilities are scaled by 1 / (1 - dropout_p). With ``block_table``, k and v are
    page pools (num_pages, page_size, nheads_k, d). ``custom_mask``: one bool (sq, sk) tensor
    per request (True = visible), combined with the window. ``sinks`` (nheads,): each head's
    sink logit is one more column of every row's softmax, whose probability multiplies no
    value (so lse includes it and a row that sees no key has lse = sink, out = 0)."""
    cq, ck = as_offsets(cu_seqlens_q), as_offsets(cu_seqlens_k)
    batch = len(cq) - 1
    assert len(ck) == batch + 1
    _, nheads, d = q.shape
    nheads_k = k.shape[-2]
    assert nheads % nheads_k == 0
    group = nheads // nheads_k
    scale = d ** -0.5 if softmax_scale is None else softmax_scale
    left, right = parse_window(window_size, causal)
    lens_q = [cq[b + 1] - cq[b] for b in range(batch)]
    lens_k = [ck[b + 1] - ck[b] for b in range(batch)]
    mq = max(lens_q, default=0) if max_seqlen_q is None else max_seqlen_q
    mk = max(lens_k, default=0) if max_seqlen_k is None else max_seqlen_k
    probs = torch.zeros(batch, nheads, mq, mk, dtype=F64)
    outs, lses = [], []
    for b in range(batch):
        sq, sk = lens_q[b], lens_k[b]
        if sq == 0:
            continue
        qb = q[cq[b]:cq[b + 1]].to(F64)  # (sq, h, d)
        if block_table is not None:
            kb = gather_pages(k, block_table, b, sk).to(F64)
            vb = gather_pages(v, block_table, b, sk).to(F64)
        else:
            kb, vb = k[ck[b]:ck[b + 1]].to(F64), v[ck[b]:ck[b + 1]].to(F64)
        if sk == 0:
            outs.append(torch.zeros(sq, nheads, d, dtype=F64))
            lses.append(torch.full((nheads, sq), -math.inf, dtype=F64) if sinks is None
                        else sinks.to(F64).view(nheads, 1).expand(nheads, sq))
            continue
        kb = kb.repeat_interleave(group, dim=1)  # (sk, h, d): head j reads kv head j // group
        vb = vb.repeat_interleave(group, dim=1)
        s = torch.einsum("ihd,jhd->hij", qb, kb) * scale
        if softcap:
            s = softcap * torch.tanh(s / softcap)
        if alibi_slopes is not None:
            slope = alibi_slopes if alibi_slopes.dim() == 1 else alibi_slopes[b]
            i = torch.arange(sq, dtype=F64).view(sq, 1)
            j = torch.arange(sk, dtype=F64).view(1, sk)
            off = 0 if top_left else sk - sq  # docs/api.md: the alignment moves ALiBi too
            dist = (i + off - j).abs()
            s = s - slope.to(F64).view(nheads, 1, 1) * dist
        vis = visible_mask(sq, sk, left, right, top_left)  # (sq, sk)
        if custom_mask is not None:
            vis = vis & custom_mask[b].to(torch.bool).cpu()
        row_any = vis.any(-1)  # (sq,)
        s = s.masked_fill(~vis, -math.inf)
        if sinks is not None:  # the sink column is always visible: no row is empty
            s_ext = torch.cat([s, sinks.to(F64).view(nheads, 1, 1).expand(nheads, sq, 1)], -1)
            p = torch.softmax(s_ext, dim=-1)[..., :sk]
            lse = torch.logsumexp(s_ext, dim=-1)
        else:
            s_safe = torch.where(row_any.view(1, sq, 1), s, torch.zeros_like(s))
            p = torch.softmax(s_safe, dim=-1) * row_any.view(1, sq, 1).to(F64)
            lse = torch.where(row_any.view(1, sq), torch.logsumexp(s_safe, dim=-1),
                              torch.full_like(s_safe[..., 0], -math.inf))
        probs[b, :, :sq, :sk] = p.detach()
        pd = p
        if keep is not None:
            pd = p * keep[b, :, :sq, :sk].to(F64) / (1.0 - dropout_p)
        outs.append(torch.einsum("hij,jhd->ihd", pd, vb))
        lses.append(lse)
    out = torch.cat(outs, 0) if outs else q.new_zeros(q.shape, dtype=F64)
    lse = torch.cat(lses, 1) if lses else torch.full((nheads, 0), -math.inf, dtype=F64)
    return NaiveResult(out, lse, probs)


# --------------------------------------------------------------------------------------------
# Input builders
# --------------------------------------------------------------------------------------------


def offsets(lengths: Sequence[int]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + int(n))
    return out


def randn(shape: Sequence[int], dtype: torch.dtype, gen: torch.Generator,
          requires_grad: bool = False) -> torch.Tensor:
    t = torch.randn(*shape, generator=gen, dtype=F64).to(dtype)
    return t.requires_grad_(requires_grad)


def make_qkv(seqlens_q: Sequence[int], seqlens_k: Sequence[int], nheads: int, nheads_k: int,
             d: int, dtype: torch.dtype = F64, seed: int = 0, requires_grad: bool = False
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, list[int], list[int]]:
    """Random packed q, k, v and their host cu_seqlens."""
    gen = torch.Generator().manual_seed(seed)
    tq, tk = sum(seqlens_q), sum(seqlens_k)
    q = randn((tq, nheads, d), dtype, gen, requires_grad)
    k = randn((tk, nheads_k, d), dtype, gen, requires_grad)
    v = randn((tk, nheads_k, d), dtype, gen, requires_grad)
    return q, k, v, offsets(seqlens_q), offsets(seqlens_k)


def make_paged(seqlens_k: Sequence[int], page_size: int, nheads_k: int, d: int,
               dtype: torch.dtype = F64, seed: int = 0, extra_pages: int = 3,
               requires_grad: bool = False
               ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random page pools (num_pages, page_size, hk, d) with every slot filled (so reading a
    wrong slot shows), and a shuffled block table (batch, max_pages) int32 whose unused
    entries point at other valid pages."""
    gen = torch.Generator().manual_seed(seed + 1000)
    need = [-(-n // page_size) for n in seqlens_k]
    num_pages = sum(need) + extra_pages
    max_pages = max(need, default=0) + 1
    perm = torch.randperm(num_pages, generator=gen).tolist()
    table = torch.randint(0, num_pages, (len(seqlens_k), max_pages), generator=gen)
    pos = 0
    for b, n in enumerate(need):
        table[b, :n] = torch.tensor(perm[pos:pos + n], dtype=table.dtype)
        pos += n
    k = randn((num_pages, page_size, nheads_k, d), dtype, gen, requires_grad)
    v = randn((num_pages, page_size, nheads_k, d), dtype, gen, requires_grad)
    return k, v, table.to(torch.int32)


def alibi_slopes(nheads: int, batch: int | None = None, seed: int = 0) -> torch.Tensor:
    """float32 slopes, (nheads,) or (batch, nheads), in [0.05, 1.05)."""
    gen = torch.Generator().manual_seed(seed + 77)
    shape = (nheads,) if batch is None else (batch, nheads)
    return (torch.rand(*shape, generator=gen) + 0.05).to(torch.float32)


def masked_lse(lse: torch.Tensor) -> torch.Tensor:
    """lse with -inf entries replaced by 0 (so sums and their gradients are finite)."""
    return torch.where(torch.isinf(lse), torch.zeros_like(lse), lse)


# --------------------------------------------------------------------------------------------
# Comparisons
# --------------------------------------------------------------------------------------------

OUT_TOL = {
    torch.float64: (1e-10, 1e-10),
    torch.float32: (2e-5, 2e-5),
    torch.float16: (2e-3, 2e-3),
    torch.bfloat16: (1.6e-2, 1.6e-2),
}
LSE_TOL = (1e-5, 1e-5)  # lse is float32 whatever the input dtype


def assert_out(got: torch.Tensor, want: torch.Tensor, dtype: torch.dtype | None = None) -> None:
    dtype = dtype or got.dtype
    rtol, atol = OUT_TOL[dtype]
    torch.testing.assert_close(got.detach().to(F64), want.detach().to(F64), rtol=rtol, atol=atol)


def assert_lse(got: torch.Tensor, want: torch.Tensor) -> None:
    """-inf entries must agree exactly; finite ones to float32 precision."""
    assert got.dtype == torch.float32
    assert got.shape == want.shape
    got, want = got.detach(), want.detach()
    assert torch.equal(torch.isneginf(got), torch.isneginf(want))
    assert not torch.isnan(got).any()
    torch.testing.assert_close(got.to(F64), want, rtol=LSE_TOL[0], atol=LSE_TOL[1])
