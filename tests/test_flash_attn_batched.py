"""attnhub.flash_attn's fixed-length functions and bert_padding against the naive oracle."""

from __future__ import annotations

import inspect

import pytest
import torch
from naive import F64, alibi_slopes, assert_lse, assert_out, naive_attention, offsets, randn

import attnhub
import attnhub.flash_attn as fa
from attnhub import InvalidArgumentError
from attnhub.flash_attn.bert_padding import index_first_axis, pad_input, unpad_input

COMMON = ["dropout_p", "softmax_scale", "causal", "window_size", "softcap", "alibi_slopes",
          "deterministic", "return_attn_probs"]


def _flat(t):
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def _naive_batched(q, k, v, **kw):
    b, sq, sk = q.shape[0], q.shape[1], k.shape[1]
    want = naive_attention(_flat(q), _flat(k), _flat(v), offsets([sq] * b), offsets([sk] * b),
                           **kw)
    lse = want.lse.view(q.shape[2], b, sq).transpose(0, 1)
    return want.out.view(q.shape), lse, want.probs


def test_signatures_and_defaults():
    for fn, head in ((fa.flash_attn_func, ["q", "k", "v"]),
                     (fa.flash_attn_kvpacked_func, ["q", "kv"]),
                     (fa.flash_attn_qkvpacked_func, ["qkv"])):
        params = inspect.signature(fn).parameters
        assert list(params) == head + COMMON
        assert params["window_size"].default == (-1, -1)
        assert params["softcap"].default == 0.0
        assert params["deterministic"].default is False
    kv = inspect.signature(fa.flash_attn_with_kvcache).parameters
    assert list(kv) == ["q", "k_cache", "v_cache", "k", "v", "rotary_cos", "rotary_sin",
                        "cache_seqlens", "cache_batch_idx", "cache_leftpad", "block_table",
                        "softmax_scale", "causal", "window_size", "softcap",
                        "rotary_interleaved", "alibi_slopes", "num_splits",
                        "return_softmax_lse"]
    assert kv["num_splits"].default == 0 and kv["rotary_interleaved"].default is True
    from attnhub.flash_attn.flash_attn_interface import flash_attn_varlen_func
    assert flash_attn_varlen_func is attnhub.flash_attn_varlen_func


@pytest.mark.parametrize("sq,sk", [(7, 7), (3, 9), (9, 4)])
@pytest.mark.parametrize("causal", [False, True])
def test_flash_attn_func_gqa_and_grads(sq, sk, causal):
    gen = torch.Generator().manual_seed(sq * 10 + sk)
    q = randn((2, sq, 4, 8), F64, gen, requires_grad=True)
    k = randn((2, sk, 2, 8), F64, gen, requires_grad=True)
    v = randn((2, sk, 2, 8), F64, gen, requires_grad=True)
    out = fa.flash_attn_func(q, k, v, causal=causal)
    assert out.shape == q.shape
    want, _, _ = _naive_batched(q, k, v, causal=causal)
    assert_out(out, want)
    w = randn(out.shape, F64, gen)
    got = torch.autograd.grad((out * w).sum(), (q, k, v))
    ref = torch.autograd.grad((want * w).sum(), (q, k, v))
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_flash_attn_func_return_attn_probs_and_features():
    gen = torch.Generator().manual_seed(1)
    q, k, v = (randn((3, 6, 4, 8), F64, gen) for _ in range(3))
    slopes = alibi_slopes(4, 3)
    out, lse, s = fa.flash_attn_func(q, k, v, 0.0, 0.3, True, (2, 0), 1.5, slopes, False, True)
    want, want_lse, _ = _naive_batched(q, k, v, softmax_scale=0.3, causal=True,
                                           window_size=(2, 0), softcap=1.5, alibi_slopes=slopes)
    assert_out(out, want)
    assert lse.shape == (3, 4, 6) and lse.dtype == torch.float32
    assert_lse(lse.transpose(0, 1).reshape(4, 18), want_lse.transpose(0, 1).reshape(4, 18))
    assert s.shape == (0,) and s.dtype == q.dtype  # no dropout: flash_attn's empty S_dmask


def test_packed_variants_match_unpacked_and_grads_flow():
    gen = torch.Generator().manual_seed(2)
    qkv = randn((2, 5, 3, 4, 8), F64, gen, requires_grad=True)
    out = fa.flash_attn_qkvpacked_func(qkv, causal=True)
    want = fa.flash_attn_func(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], causal=True)
    assert torch.equal(out, want)
    (g,) = torch.autograd.grad(out.sum(), qkv)
    assert g.shape == qkv.shape and g[:, :, 1].abs().sum() > 0
    q = randn((2, 3, 4, 8), F64, gen)
    kv = randn((2, 6, 2, 2, 8), F64, gen)
    res = fa.flash_attn_kvpacked_func(q, kv, return_attn_probs=True)
    assert len(res) == 3
    # the same request unpacked (probs too: the same backend computes both)
    want = fa.flash_attn_func(q, kv[:, :, 0], kv[:, :, 1], return_attn_probs=True)
    assert all(torch.equal(a, b) for a, b in zip(res, want, strict=True))


def test_low_precision_keeps_dtype():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (randn((2, 9, 2, 32), torch.bfloat16, gen) for _ in range(3))
    out = fa.flash_attn_func(q, k, v, causal=True)
    assert out.dtype == torch.bfloat16
    assert_out(out, _naive_batched(q, k, v, causal=True)[0], torch.bfloat16)


@pytest.mark.parametrize("call,arg", [
    (lambda: fa.flash_attn_func(torch.zeros(5, 2, 8), torch.zeros(1, 5, 2, 8),
                                torch.zeros(1, 5, 2, 8)), "q"),
    (lambda: fa.flash_attn_func(torch.zeros(2, 5, 2, 8), torch.zeros(3, 5, 2, 8),
                                torch.zeros(3, 5, 2, 8)), "k"),
    (lambda: fa.flash_attn_kvpacked_func(torch.zeros(1, 5, 2, 8),
                                         torch.zeros(1, 5, 3, 2, 8)), "kv"),
    (lambda: fa.flash_attn_qkvpacked_func(torch.zeros(1, 5, 2, 2, 8)), "qkv"),
    (lambda: fa.flash_attn_func(*(torch.zeros(1, 5, 2, 8),) * 3, dropout_p=1.0), "dropout_p"),
])
def test_bad_input(call, arg):
    with pytest.raises(InvalidArgumentError) as e:
        call()
    assert e.value.argument == arg


def test_bert_padding_roundtrip_and_varlen():
    gen = torch.Generator().manual_seed(4)
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1], [0, 0, 0, 0, 0]], dtype=torch.bool)
    x = randn((3, 5, 2, 8), F64, gen, requires_grad=True)
    unpadded, indices, cu, max_len, used = unpad_input(x, mask)
    assert unpadded.shape == (8, 2, 8) and max_len == 5
    assert cu.tolist() == [0, 3, 8, 8] and cu.dtype == torch.int32
    assert used.tolist() == [3, 5, 0] and used.dtype == torch.int32
    assert indices.tolist() == [0, 1, 2, 5, 6, 7, 8, 9]
    back = pad_input(unpadded, indices, 3, 5)
    assert torch.equal(back, x * mask[:, :, None, None])
    out = fa.flash_attn_varlen_func(unpadded, unpadded, unpadded, cu, cu, max_len, max_len)
    want = naive_attention(unpadded, unpadded, unpadded, cu, cu)
    assert_out(out, want.out)
    (g,) = torch.autograd.grad(pad_input(out, indices, 3, 5).sum(), x)
    assert g[2].abs().sum() == 0 and g[0, :3].abs().sum() > 0
    unused = torch.zeros_like(mask)
    unused[0, 3] = True
    _, idx2, cu2, _, used2 = unpad_input(x, mask, unused)
    assert cu2.tolist() == [0, 4, 9, 9] and used2.tolist() == [3, 5, 0] and 3 in idx2.tolist()
    assert torch.equal(index_first_axis(x.reshape(15, 2, 8), indices), unpadded)
    with pytest.raises(ValueError):
        index_first_axis(torch.zeros(4), indices)
