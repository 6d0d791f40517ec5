"""flash_attn 2.8 compatible entry points: flash_attn_varlen_func and its kv/qkv-packed
variants, against the naive oracle (naive.py)."""

from __future__ import annotations

import inspect

import pytest
import torch
from naive import (
    F64,
    alibi_slopes,
    assert_lse,
    assert_out,
    make_paged,
    make_qkv,
    naive_attention,
    offsets,
    randn,
)

import attnhub
from attnhub import (
    InvalidArgumentError,
    flash_attn_varlen_func,
    flash_attn_varlen_kvpacked_func,
    flash_attn_varlen_qkvpacked_func,
)

LQ, LK = [5, 0, 7, 3], [6, 4, 0, 8]

FA_PARAMS = ["q", "k", "v", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
             "dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes",
             "deterministic", "return_attn_probs", "block_table"]


def test_signatures_and_defaults():
    sig = inspect.signature(flash_attn_varlen_func)
    assert list(sig.parameters)[:16] == FA_PARAMS
    defaults = {n: p.default for n, p in sig.parameters.items()}
    assert defaults["dropout_p"] == 0.0
    assert defaults["softmax_scale"] is None
    assert defaults["causal"] is False
    assert tuple(defaults["window_size"]) == (-1, -1)
    assert defaults["softcap"] == 0.0
    assert defaults["alibi_slopes"] is None
    assert defaults["deterministic"] is False
    assert defaults["return_attn_probs"] is False
    assert defaults["block_table"] is None
    kv = list(inspect.signature(flash_attn_varlen_kvpacked_func).parameters)
    assert kv[:7] == ["q", "kv", "cu_seqlens_q", "cu_seqlens_k", "max_seqlen_q", "max_seqlen_k",
                      "dropout_p"]
    qkv = list(inspect.signature(flash_attn_varlen_qkvpacked_func).parameters)
    assert qkv[:4] == ["qkv", "cu_seqlens", "max_seqlen", "dropout_p"]


def test_defaults_are_full_attention():
    q, k, v, cq, ck = make_qkv(LQ, LK, 4, 2, 16, seed=1)
    ct, kt = torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32)
    out = flash_attn_varlen_func(q, k, v, ct, kt, max(LQ), max(LK))
    assert isinstance(out, torch.Tensor)
    want = naive_attention(q, k, v, cq, ck)
    assert_out(out, want.out)


@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("window", [(-1, -1), (2, 1), (3, -1)])
def test_all_positional(causal, window):
    h, hk, d = 4, 2, 8
    q, k, v, cq, ck = make_qkv(LQ, LK, h, hk, d, seed=2)
    slopes = alibi_slopes(h)
    ct, kt = torch.tensor(cq, dtype=torch.int32), torch.tensor(ck, dtype=torch.int32)
    mq, mk = max(LQ) + 1, max(LK) + 2
    res = flash_attn_varlen_func(q, k, v, ct, kt, mq, mk, 0.0, 0.4, causal, window, 1.5, slopes,
                                 True, True, None)
    assert isinstance(res, tuple) and len(res) == 3
    out, lse, s_dmask = res
    want = naive_attention(q, k, v, cq, ck, softmax_scale=0.4, causal=causal,
                           window_size=window, softcap=1.5, alibi_slopes=slopes,
                           max_seqlen_q=mq, max_seqlen_k=mk)
    assert_out(out, want.out)
    assert_lse(lse, want.lse)
    assert lse.shape == (h, sum(LQ))
    # flash_attn 2.8: without dropout, S_dmask is an empty tensor of q's dtype
    assert s_dmask.shape == (0,) and s_dmask.dtype == q.dtype


@pytest.mark.parametrize("page_size", [1, 3, 16])
def test_block_table_positional(page_size):
    h, hk, d = 4, 1, 8
    lk = [6, 9, 4, 17]
    q, _, _, cq, ck = make_qkv(LQ, lk, h, hk, d, seed=3)
    kp, vp, table = make_paged(lk, page_size, hk, d, seed=3)
    out = flash_attn_varlen_func(q, kp, vp, cq, ck, max(LQ), max(lk), 0.0, None, True,
                                 (-1, -1), 0.0, None, False, False, table)
    want = naive_attention(q, kp, vp, cq, ck, causal=True, block_table=table)
    assert_out(out, want.out)


def test_softcap_zero_is_off_and_positive_applies():
    q, k, v, cq, ck = make_qkv(LQ, LK, 2, 2, 8, seed=4)
    q = q * 4
    plain = flash_attn_varlen_func(q, k, v, cq, ck, None, None)
    assert torch.equal(flash_attn_varlen_func(q, k, v, cq, ck, None, None, softcap=0.0), plain)
    capped = flash_attn_varlen_func(q, k, v, cq, ck, None, None, softcap=0.5)
    assert_out(capped, naive_attention(q, k, v, cq, ck, softcap=0.5).out)
    assert (capped - plain).abs().max() > 1e-3


def test_matches_attention_forward_varlen():
    q, k, v, cq, ck = make_qkv(LQ, LK, 6, 3, 8, seed=5)
    kw = {"causal": True, "window_size": (3, 0), "softmax_scale": 0.3}
    a = flash_attn_varlen_func(q, k, v, cq, ck, 9, 9, return_attn_probs=True, **kw)
    b = attnhub.attention_forward_varlen(q, k, v, cq, ck, 9, 9, return_lse=True, **kw)
    for x, y in zip(a[:2], b, strict=True):
        assert torch.equal(x, y)


def test_dropout_returns_negated_s_dmask():
    q, k, v, cq, ck = make_qkv(LQ, LK, 4, 2, 8, seed=6)
    torch.manual_seed(0)
    out, lse, s = flash_attn_varlen_func(q, k, v, cq, ck, None, None, 0.5,
                                         return_attn_probs=True)
    torch.manual_seed(0)
    out2 = flash_attn_varlen_func(q, k, v, cq, ck, None, None, 0.5)
    assert torch.equal(out, out2)
    # flash_attn 2.8's layout: (batch, nheads, round128(max_q), round128(max_k)), q's dtype
    assert s.shape == (len(LQ), 4, 128, 128) and s.dtype == q.dtype
    mq, mk = max(LQ), max(LK)
    assert not s[:, :, mq:].any() and not s[:, :, :, mk:].any()
    s = s[:, :, :mq, :mk]
    assert (s < 0).any()
    want = naive_attention(q, k, v, cq, ck, keep=~(s < 0), dropout_p=0.5)
    assert_out(out, want.out)
    assert_lse(lse, want.lse)
    row_max = want.probs.amax(-1, keepdim=True)  # flash_attn: exp(s - row max), one block
    torch.testing.assert_close(s.abs().to(F64), want.probs / row_max.clamp_min(1e-300),
                               rtol=1e-6, atol=1e-7)


@pytest.mark.parametrize("nheads,nheads_k", [(4, 4), (4, 2), (4, 1)])
@pytest.mark.parametrize("causal", [False, True])
def test_kvpacked(nheads, nheads_k, causal):
    d = 8
    gen = torch.Generator().manual_seed(7)
    q = randn((sum(LQ), nheads, d), F64, gen, requires_grad=True)
    kv = randn((sum(LK), 2, nheads_k, d), F64, gen, requires_grad=True)
    cq, ck = offsets(LQ), offsets(LK)
    out, lse, probs = flash_attn_varlen_kvpacked_func(q, kv, cq, ck, max(LQ), max(LK),
                                                      causal=causal, return_attn_probs=True)
    want = naive_attention(q, kv[:, 0], kv[:, 1], cq, ck, causal=causal)
    assert_out(out, want.out)
    assert_lse(lse, want.lse)
    assert probs.shape == (0,)
    w = randn(out.shape, F64, gen)
    dq, dkv = torch.autograd.grad((out * w).sum(), (q, kv))
    rdq, rdkv = torch.autograd.grad((want.out * w).sum(), (q, kv))
    assert dkv.shape == kv.shape
    torch.testing.assert_close(dq, rdq, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(dkv, rdkv, rtol=1e-9, atol=1e-9)
    assert dkv[:, 0].abs().sum() > 0 and dkv[:, 1].abs().sum() > 0


@pytest.mark.parametrize("window", [(-1, -1), (2, 2)])
@pytest.mark.parametrize("causal", [False, True])
@pytest.mark.parametrize("cu_form", ["list", "int32", "info"])
def test_qkvpacked(causal, window, cu_form):
    lens, h, d = [5, 0, 7, 1, 3], 4, 8
    gen = torch.Generator().manual_seed(8)
    qkv = randn((sum(lens), 3, h, d), F64, gen, requires_grad=True)
    cu = offsets(lens)
    cu_arg = {"list": cu, "int32": torch.tensor(cu, dtype=torch.int32),
              "info": attnhub.VarlenInfo.from_lengths(lens)}[cu_form]
    max_len = None if cu_form == "info" else max(lens)
    out = flash_attn_varlen_qkvpacked_func(qkv, cu_arg, max_len, 0.0, None, causal, window)
    assert isinstance(out, torch.Tensor) and out.shape == (sum(lens), h, d)
    want = naive_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], cu, cu, causal=causal,
                           window_size=window)
    assert_out(out, want.out)
    w = randn(out.shape, F64, gen)
    (g,) = torch.autograd.grad((out * w).sum(), qkv)
    (rg,) = torch.autograd.grad((want.out * w).sum(), qkv)
    assert g.shape == qkv.shape
    torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9)


def test_qkvpacked_return_attn_probs_and_alibi():
    lens, h, d = [4, 6], 2, 8
    gen = torch.Generator().manual_seed(9)
    qkv = randn((sum(lens), 3, h, d), F64, gen)
    slopes = alibi_slopes(h, 2)
    res = flash_attn_varlen_qkvpacked_func(qkv, offsets(lens), 6, causal=True, softcap=2.0,
                                           alibi_slopes=slopes, return_attn_probs=True)
    assert len(res) == 3
    want = naive_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], offsets(lens), offsets(lens),
                           causal=True, softcap=2.0, alibi_slopes=slopes)
    assert_out(res[0], want.out)
    assert_lse(res[1], want.lse)
    assert res[2].shape == (0,) and res[2].dtype == qkv.dtype


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_packed_low_precision(dtype):
    lens, h, d = [5, 9, 2], 4, 32
    gen = torch.Generator().manual_seed(10)
    qkv = randn((sum(lens), 3, h, d), dtype, gen)
    out = flash_attn_varlen_qkvpacked_func(qkv, offsets(lens), max(lens), causal=True)
    assert out.dtype == dtype
    want = naive_attention(qkv[:, 0], qkv[:, 1], qkv[:, 2], offsets(lens), offsets(lens),
                           causal=True)
    assert_out(out, want.out, dtype)


@pytest.mark.parametrize("bad", [(8, 3, 2, 4), (8, 2, 4), (8, 1, 2, 4), "not a tensor"])
def test_kvpacked_bad_shape(bad):
    q = torch.randn(5, 2, 4, dtype=F64)
    kv = bad if isinstance(bad, str) else torch.randn(*bad, dtype=F64)
    with pytest.raises(InvalidArgumentError) as e:
        flash_attn_varlen_kvpacked_func(q, kv, [0, 5], [0, 8], 5, 8)
    assert e.value.argument == "kv"


@pytest.mark.parametrize("bad", [(8, 2, 2, 4), (8, 3, 4), (8, 3, 2, 4, 1), (8, 4, 2, 4)])
def test_qkvpacked_bad_shape(bad):
    with pytest.raises(InvalidArgumentError) as e:
        flash_attn_varlen_qkvpacked_func(torch.randn(*bad, dtype=F64), [0, 8], 8)
    assert e.value.argument == "qkv"
