"""Dropout in attnhub.attention_forward_varlen: reproducibility, keep rate, and forward /
backward consistency with the naive oracle run on the same (reconstructed) mask."""

from __future__ import annotations

import math

import pytest
import torch
from naive import F64, alibi_slopes, make_paged, make_qkv, masked_lse, naive_attention, randn

from attnhub import attention_forward_varlen

LQ, LK = [6, 0, 9, 4, 3], [7, 5, 9, 0, 2]


def _call(q, k, v, cq, ck, seed, p=0.3, **kw):
    torch.manual_seed(seed)
    return attention_forward_varlen(q, k, v, cq, ck, dropout_p=p, **kw)


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window_size": (2, 1)}],
                         ids=["full", "causal", "window"])
def test_same_seed_bitwise_identical(kw):
    q, k, v, cq, ck = make_qkv(LQ, LK, 4, 2, 8, seed=1)
    a, a_lse, a_probs = _call(q, k, v, cq, ck, 123, return_attn_probs=True, **kw)
    b, b_lse, b_probs = _call(q, k, v, cq, ck, 123, return_attn_probs=True, **kw)
    assert torch.equal(a, b) and torch.equal(a_lse, b_lse) and torch.equal(a_probs, b_probs)
    # the output alone, without probs, is the same as well
    assert torch.equal(_call(q, k, v, cq, ck, 123, **kw), a)


def test_different_seeds_differ():
    q, k, v, cq, ck = make_qkv(LQ, LK, 4, 2, 8, seed=2)
    outs = [_call(q, k, v, cq, ck, s) for s in range(4)]
    for i in range(4):
        for j in range(i + 1, 4):
            assert not torch.equal(outs[i], outs[j])
    no_drop = attention_forward_varlen(q, k, v, cq, ck)
    assert not torch.equal(outs[0], no_drop)


def test_dropout_does_not_change_lse():
    """lse is the softmax normalizer: dropout (after softmax) leaves it alone."""
    q, k, v, cq, ck = make_qkv(LQ, LK, 4, 2, 8, seed=3)
    _, lse = _call(q, k, v, cq, ck, 5, p=0.5, return_lse=True, causal=True)
    _, ref = attention_forward_varlen(q, k, v, cq, ck, causal=True, return_lse=True)
    assert torch.equal(lse, ref)


def test_dropout_zero_is_plain():
    q, k, v, cq, ck = make_qkv(LQ, LK, 4, 2, 8, seed=4)
    assert torch.equal(_call(q, k, v, cq, ck, 0, p=0.0), attention_forward_varlen(q, k, v, cq, ck))


@pytest.mark.parametrize("p", [0.1, 0.5, 0.85])
def test_keep_rate(p):
    lq, lk = [30, 17, 40], [40, 23, 11]
    q, k, v, cq, ck = make_qkv(lq, lk, 4, 2, 8, seed=5)
    _, _, probs = _call(q, k, v, cq, ck, 99, p=p, return_attn_probs=True)
    n = int((probs != 0).sum())
    kept = int((probs > 0).sum())
    assert n == 4 * sum(a * b for a, b in zip(lq, lk, strict=True))  # every entry is nonzero
    sigma = math.sqrt(p * (1 - p) / n)
    assert abs(kept / n - (1 - p)) < 4 * sigma, (kept / n, 1 - p, sigma)


def test_dropped_entries_are_negated_probs():
    """|S_dmask| equals the softmax; dropped entries carry a minus sign (flash_attn)."""
    q, k, v, cq, ck = make_qkv(LQ, LK, 4, 2, 8, seed=6)
    _, _, probs = _call(q, k, v, cq, ck, 7, p=0.4, causal=True, return_attn_probs=True)
    _, _, plain = attention_forward_varlen(q, k, v, cq, ck, causal=True, return_attn_probs=True)
    assert torch.equal(probs.abs(), plain)
    assert (probs < 0).any() and (probs > 0).any()


def _keep_from_probs(probs: torch.Tensor) -> torch.Tensor:
    return ~(probs < 0)  # entries that are exactly 0 are masked anyway


CONSISTENCY_CASES = {
    "gqa": ([6, 0, 9, 4], [7, 5, 9, 0], 4, 2, {}),
    "mqa-causal": ([6, 8, 3], [9, 5, 3], 4, 1, {"causal": True}),
    "window-softcap": ([7, 5], [6, 8], 2, 2, {"window_size": (2, 1), "softcap": 1.5}),
    "alibi": ([5, 6], [6, 4], 4, 2, {"alibi": True, "causal": True}),
    "paged": ([4, 5, 2], [9, 4, 6], 4, 2, {"paged": 3, "causal": True}),
}


@pytest.mark.parametrize("p", [0.2, 0.6])
@pytest.mark.parametrize("name", list(CONSISTENCY_CASES))
def test_forward_backward_use_one_mask(name, p):
    lq, lk, h, hk, kw = CONSISTENCY_CASES[name]
    kw = dict(kw)
    d = 8
    q, k, v, cq, ck = make_qkv(lq, lk, h, hk, d, seed=len(name), requires_grad=True)
    if kw.pop("paged", None):
        k, v, kw["block_table"] = make_paged(lk, 3, hk, d, seed=8, requires_grad=True)
    if kw.pop("alibi", None):
        kw["alibi_slopes"] = alibi_slopes(h, len(lq))
    gen = torch.Generator().manual_seed(11)
    w = randn(q.shape, F64, gen)
    w_lse = randn((h, q.shape[0]), torch.float32, gen).to(F64)

    torch.manual_seed(1234)
    out, lse, probs = attention_forward_varlen(q, k, v, cq, ck, dropout_p=p,
                                               return_attn_probs=True, return_lse=True, **kw)
    grads = torch.autograd.grad((out * w).sum() + (masked_lse(lse) * w_lse).sum(), (q, k, v))

    keep = _keep_from_probs(probs)
    ref = naive_attention(q, k, v, cq, ck, keep=keep, dropout_p=p, **kw)
    torch.testing.assert_close(out.detach(), ref.out.detach(), rtol=1e-10, atol=1e-10)
    torch.testing.assert_close(probs.abs().to(F64), ref.probs, rtol=1e-6, atol=1e-7)
    ref_grads = torch.autograd.grad((ref.out * w).sum() + (masked_lse(ref.lse) * w_lse).sum(),
                                    (q, k, v), retain_graph=True)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9)

    # the same seed without probs requested gives the same output and gradients
    torch.manual_seed(1234)
    out2 = attention_forward_varlen(q, k, v, cq, ck, dropout_p=p, **kw)
    assert torch.equal(out2.detach(), out.detach())
    grads2 = torch.autograd.grad((out2 * w).sum(), (q, k, v))
    ref_grads2 = torch.autograd.grad((ref.out * w).sum(), (q, k, v))
    for g, rg in zip(grads2, ref_grads2, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9)


def test_dropout_mask_unaffected_by_chunking(monkeypatch):
    q, k, v, cq, ck = make_qkv(LQ, LK, 4, 2, 8, seed=9)
    a, _, pa = _call(q, k, v, cq, ck, 21, p=0.5, causal=True, return_attn_probs=True)
    monkeypatch.setenv("ATTNHUB_REFERENCE_CHUNK_MB", "0.000001")
    b, _, pb = _call(q, k, v, cq, ck, 21, p=0.5, causal=True, return_attn_probs=True)
    assert torch.equal(pa, pb)
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


def test_expected_value_matches_no_dropout():
    """Inverted dropout is unbiased: the mean over many seeds approaches the plain output."""
    lq, lk = [3, 4], [4, 3]
    q, k, v, cq, ck = make_qkv(lq, lk, 2, 1, 4, seed=10)
    ref = attention_forward_varlen(q, k, v, cq, ck)
    n = 400
    outs = torch.stack([_call(q, k, v, cq, ck, s, p=0.3) for s in range(n)])
    mean, std = outs.mean(0), outs.std(0)
    z = (mean - ref).abs() / (std / math.sqrt(n) + 1e-12)
    assert z.max() < 5, float(z.max())
    assert (mean - ref).abs().max() < 0.1
