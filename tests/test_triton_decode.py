"""The Triton split-KV decode path on the CPU (TRITON_INTERPRET=1) against the reference."""

import pytest
import torch

import attnhub
from attnhub.backends.triton import configs

pytestmark = pytest.mark.skipif(not configs.interpreting(),
                                reason="CPU tensors reach the Triton kernels only in the "
                                       "interpreter (TRITON_INTERPRET=1)")

LQ, LK = [1, 3, 0, 2], [40, 0, 37, 19]


def _paged(k, v, page_size, gen):
    pages = [-(-n // page_size) for n in LK]
    num_pages = sum(pages) + 1  # one page nobody owns, all NaN
    shape = (num_pages, page_size, *k.shape[1:])
    kp = torch.full(shape, float("nan"))
    vp = torch.full(shape, float("nan"))
    table = torch.full((len(LK), max(pages)), num_pages - 1, dtype=torch.int32)
    order = torch.randperm(num_pages - 1, generator=gen).tolist()
    start = 0
    for b, n in enumerate(LK):
        for p in range(pages[b]):
            page, w = order.pop(), min(page_size, n - p * page_size)
            table[b, p] = page
            kp[page, :w] = k[start + p * page_size:start + p * page_size + w]
            vp[page, :w] = v[start + p * page_size:start + p * page_size + w]
        start += n
    return kp, vp, table


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window_size": (5, 0)},
                                {"softcap": 4.0}, {"alibi": "head"}, {"alibi": "batch_head"}])
def test_decode_path_matches_reference(kw, paged):
    from attnhub.backends.triton import decode

    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sum(LQ), 8, 32, generator=gen)
    k = torch.randn(sum(LK), 2, 32, generator=gen)
    v = torch.randn(sum(LK), 2, 32, generator=gen)
    kw = dict(kw)
    alibi = kw.pop("alibi", None)
    if alibi == "head":
        kw["alibi_slopes"] = torch.rand(8, generator=gen)
    elif alibi == "batch_head":
        kw["alibi_slopes"] = torch.rand(len(LQ), 8, generator=gen)
    if paged:
        k, v, kw["block_table"] = _paged(k, v, 16, gen)
    info_q, info_k = attnhub.VarlenInfo.from_lengths(LQ), attnhub.VarlenInfo.from_lengths(LK)
    problem, _ = attnhub.normalize(q, k, v, info_q, info_k, **kw)
    assert decode.eligible(problem)
    out, lse = attnhub.attention_forward_varlen(q, k, v, info_q, info_k, return_lse=True,
                                                backend="triton", **kw)
    ref, ref_lse = attnhub.attention_forward_varlen(q, k, v, info_q, info_k, return_lse=True,
                                                    backend="reference", **kw)
    assert not torch.isnan(out).any()
    assert (out - ref).abs().max() < 1e-5
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = torch.isfinite(ref_lse)
    assert (lse - ref_lse)[finite].abs().max() < 1e-5
    assert (out[LQ[0]:LQ[0] + LQ[1]] == 0).all()  # sequence 1 has no keys: zeros, lse -inf
    assert torch.isneginf(lse[:, LQ[0]:LQ[0] + LQ[1]]).all()
