"""attnhub.compat.flashinfer against the naive oracle: ragged and paged wrappers (layouts,
shuffled page tables, last-page lengths), masks, RoPE, windows, soft cap, base-2 lse, and
single_prefill_with_kv_cache; FlashInfer's documentation examples on the CPU."""

from __future__ import annotations

import math
import sys
from pathlib import Path

import pytest
import torch
from naive import naive_attention

import attnhub
import attnhub.compat.flashinfer as flashinfer

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "flashinfer"))
import docs_examples

H, HK, D, PAGE = 4, 2, 16, 4
QO = [5, 0, 7, 3]
PAGES = [[6, 1], [3], [0, 8, 2], []]  # shuffled, one request with no pages
LAST = [3, 2, 4, 1]
KV = [(len(p) - 1) * PAGE + last if p else 0 for p, last in zip(PAGES, LAST, strict=True)]
NUM_PAGES = 10


def _cu(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def _workspace():
    return torch.zeros(1024, dtype=torch.uint8)


def _rand(*shape, seed=0):
    return torch.randn(*shape, generator=torch.Generator().manual_seed(seed),
                       dtype=torch.float64).to(torch.float32)


def _paged_case(seed=0):
    q = _rand(sum(QO), H, D, seed=seed)
    cache = _rand(NUM_PAGES, 2, PAGE, HK, D, seed=seed + 1)
    # the oracle's packed k / v: each request's pages gathered in order, cut at its length
    k = torch.cat([cache[p, 0].reshape(-1, HK, D)[:n] for p, n in zip(PAGES, KV, strict=True)
                   if n])
    v = torch.cat([cache[p, 1].reshape(-1, HK, D)[:n] for p, n in zip(PAGES, KV, strict=True)
                   if n])
    return q, cache, k, v


def _plan_paged(wrapper, **kw):
    indptr = torch.tensor(_cu([len(p) for p in PAGES]), dtype=torch.int32)
    indices = torch.tensor([i for p in PAGES for i in p], dtype=torch.int32)
    wrapper.plan(torch.tensor(_cu(QO), dtype=torch.int32), indptr, indices,
                 torch.tensor(LAST, dtype=torch.int32), H, HK, D, PAGE,
                 q_data_type=torch.float32, **kw)


def _oracle(q, k, v, qo, kv, **kw):
    return naive_attention(q, k, v, _cu(qo), _cu(kv), **kw)


def _close(got, want, atol=1e-5):
    torch.testing.assert_close(got.double(), want.double(), rtol=atol, atol=atol)


@pytest.mark.parametrize("layout", ["NHD", "HND"])
@pytest.mark.parametrize("as_tuple", [False, True])
def test_paged_wrapper_layouts_and_page_tables(layout, as_tuple):
    q, cache, k, v = _paged_case()
    # HND: (pages, 2, HK, PAGE, D)
    cache_in = cache.transpose(2, 3).contiguous() if layout == "HND" else cache
    if as_tuple:
        cache_in = (cache_in[:, 0].contiguous(), cache_in[:, 1].contiguous())
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(_workspace(), layout)
    _plan_paged(w, causal=True)
    out, lse = w.run(q, cache_in, return_lse=True)
    want = _oracle(q, k, v, QO, KV, causal=True)
    _close(out, want.out)
    assert lse.shape == (sum(QO), H)
    _close(lse, (want.lse / math.log(2)).t())  # base 2


@pytest.mark.parametrize("kw, oracle_kw", [
    (dict(window_left=3, causal=True), dict(window_size=(3, 0))),
    (dict(window_left=2), dict(window_size=(2, -1))),
    (dict(logits_soft_cap=2.0, sm_scale=0.5), dict(softcap=2.0, softmax_scale=0.5)),
])
def test_paged_wrapper_options(kw, oracle_kw):
    q, cache, k, v = _paged_case(seed=3)
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(_workspace())
    _plan_paged(w, **kw)
    _close(w.run(q, cache), _oracle(q, k, v, QO, KV, **oracle_kw).out)


def test_paged_wrapper_run_takes_sinks():
    """FlashInfer's paged run(..., sinks=) (float32 (num_qo_heads,)): the sink joins each
    row's softmax denominator; the base-2 lse includes it; the request with no pages gives
    out 0 and lse = sink / ln 2."""
    q, cache, k, v = _paged_case(seed=21)
    sinks = _rand(H, seed=22)
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(_workspace())
    _plan_paged(w, causal=True)
    plain = w.run(q, cache)
    out, lse = w.run(q, cache, return_lse=True, sinks=sinks)
    want = _oracle(q, k, v, QO, KV, causal=True, sinks=sinks)
    _close(out, want.out)
    _close(lse, (want.lse / math.log(2)).t())
    _close(w.run(q, cache), plain, atol=0)  # a run without sinks after one with them
    empty = slice(sum(QO[:3]), sum(QO))
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    with pytest.raises(attnhub.InvalidArgumentError, match="sinks"):
        w.run(q, cache, sinks=sinks.double())


def _random_mask(qo, kv, seed):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(a, b, generator=gen) < 0.6 for a, b in zip(qo, kv, strict=True)]


@pytest.mark.parametrize("packed", [False, True])
def test_paged_wrapper_custom_mask_overrides_causal(packed):
    q, cache, k, v = _paged_case(seed=5)
    blocks = _random_mask(QO, KV, seed=6)
    flat = torch.cat([m.reshape(-1) for m in blocks])
    w = flashinfer.BatchPrefillWithPagedKVCacheWrapper(_workspace())
    if packed:
        seg = torch.tensor(_cu([a * b for a, b in zip(QO, KV, strict=True)]))
        bits, _ = flashinfer.segment_packbits(flat, seg, bitorder="little")
        _plan_paged(w, packed_custom_mask=bits, causal=True)
    else:
        _plan_paged(w, custom_mask=flat, causal=True)
    _close(w.run(q, cache), _oracle(q, k, v, QO, KV, custom_mask=blocks).out)


def _rope_ref(x, pos, theta=1e4, scale=1.0):
    """Rotate-half RoPE written from its definition, in float64."""
    d = x.shape[-1]
    freqs = torch.tensor([theta ** (-2 * i / d) for i in range(d // 2)], dtype=torch.float64)
    ang = torch.tensor(pos, dtype=torch.float64)[:, None] / scale * freqs
    c, s = ang.cos()[:, None], ang.sin()[:, None]
    x = x.double()
    x1, x2 = x[..., :d // 2], x[..., d // 2:]
    return torch.cat([x1 * c - x2 * s, x1 * s + x2 * c], -1)


def test_ragged_wrapper_rope_llama():
    qo, kv = [3, 5], [6, 5]
    q, k, v = _rand(8, H, D, seed=7), _rand(11, HK, D, seed=8), _rand(11, HK, D, seed=9)
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(_workspace())
    w.plan(torch.tensor(_cu(qo)), torch.tensor(_cu(kv)), H, HK, D, causal=True,
           pos_encoding_mode="ROPE_LLAMA", rope_theta=500.0, rope_scale=2.0,
           q_data_type="float32")
    q_pos = [b - a + i for a, b in zip(qo, kv, strict=True) for i in range(a)]
    k_pos = [j for n in kv for j in range(n)]
    want = _oracle(_rope_ref(q, q_pos, 500.0, 2.0), _rope_ref(k, k_pos, 500.0, 2.0), v, qo, kv,
                   causal=True)
    _close(w.run(q, k, v), want.out)


def test_paged_wrapper_rope_matches_ragged():
    q, cache, k, v = _paged_case(seed=10)
    paged = flashinfer.BatchPrefillWithPagedKVCacheWrapper(_workspace())
    _plan_paged(paged, causal=True, pos_encoding_mode="ROPE_LLAMA")
    ragged = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(_workspace())
    ragged.plan(torch.tensor(_cu(QO)), torch.tensor(_cu(KV)), H, HK, D, causal=True,
                pos_encoding_mode="ROPE_LLAMA", q_data_type="float32")
    _close(paged.run(q, cache), ragged.run(q, k, v))


@pytest.mark.parametrize("layout", ["NHD", "HND"])
def test_ragged_wrapper_lse_and_layout(layout):
    qo, kv = [4, 0, 6], [4, 3, 9]
    q, k, v = _rand(10, H, D, seed=11), _rand(16, HK, D, seed=12), _rand(16, HK, D, seed=13)
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(_workspace(), layout)
    w.plan(torch.tensor(_cu(qo)), torch.tensor(_cu(kv)), H, HK, D, q_data_type="float32")
    kk, vv = (k.transpose(0, 1), v.transpose(0, 1)) if layout == "HND" else (k, v)
    out_buf = torch.empty_like(q)
    out, lse = w.run(q, kk, vv, out=out_buf, return_lse=True)
    want = _oracle(q, k, v, qo, kv)
    assert out is out_buf
    _close(out, want.out)
    _close(lse, (want.lse / math.log(2)).t())


def test_single_prefill_matches_oracle():
    q, k, v = _rand(6, H, D, seed=14), _rand(9, HK, D, seed=15), _rand(9, HK, D, seed=16)
    mask = torch.rand(6, 9, generator=torch.Generator().manual_seed(17)) < 0.5
    out, lse = flashinfer.single_prefill_with_kv_cache(
        q, k.transpose(0, 1), v.transpose(0, 1), custom_mask=mask, kv_layout="HND",
        logits_soft_cap=3.0, return_lse=True)
    want = _oracle(q, k, v, [6], [9], custom_mask=[mask], softcap=3.0)
    _close(out, want.out)
    _close(lse, (want.lse / math.log(2)).t())
    packed = flashinfer.packbits(mask.reshape(-1), bitorder="little")
    _close(flashinfer.single_prefill_with_kv_cache(q, k, v, packed_custom_mask=packed,
                                                    logits_soft_cap=3.0), want.out)


def test_unsupported_options_are_errors():
    w = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(_workspace())
    cu = torch.tensor([0, 2])
    with pytest.raises(attnhub.InvalidArgumentError, match="pos_encoding_mode"):
        w.plan(cu, cu, H, HK, D, pos_encoding_mode="ALIBI")
    with pytest.raises(attnhub.InvalidArgumentError, match="head_dim_vo"):
        w.plan(cu, cu, H, HK, D, head_dim_vo=8)
    with pytest.raises(attnhub.InvalidArgumentError, match="kv_data_type"):
        w.plan(cu, cu, H, HK, D, kv_data_type="float8_e4m3fn")
    with pytest.raises(attnhub.InvalidArgumentError, match="kv_layout"):
        flashinfer.BatchPrefillWithRaggedKVCacheWrapper(_workspace(), "NDH")


@pytest.mark.parametrize("example", ["ragged_example", "paged_example"])
def test_flashinfer_documentation_examples_run_on_the_cpu(example):
    torch.manual_seed(0)
    assert getattr(docs_examples, example)("cpu", num_layers=1) <= 1e-3
