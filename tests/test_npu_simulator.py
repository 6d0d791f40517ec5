"""The torch_npu simulator follows npu_fusion_attention's documented semantics and quirks."""

from __future__ import annotations

import pytest
import torch
from naive import naive_attention

from attnhub.backends.npu import simulator as sim

MASK = sim.compressed_causal_mask()


def _qkv(sq=(3, 5), sk=(4, 5), n=4, nk=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(sq), n, d, generator=g)
    k = torch.randn(sum(sk), nk, d, generator=g)
    v = torch.randn(sum(sk), nk, d, generator=g)
    return q, k, v


def _ends(lengths):
    out, acc = [], 0
    for n in lengths:
        acc += n
        out.append(acc)
    return out


def _dense(q, k, v, sq, sk, scale, visible):
    """Per-sequence float64 attention with visible(sq_b, sk_b) -> (sq_b, sk_b) bool."""
    g = q.shape[1] // k.shape[1]
    outs, q0, k0 = [], 0, 0
    for a, b in zip(sq, sk, strict=True):
        s = torch.einsum("ihd,jhd->hij", q[q0:q0 + a].double(),
                         k[k0:k0 + b].double().repeat_interleave(g, 1)) * scale
        s = s.masked_fill(~visible(a, b), float("-inf"))
        p = torch.softmax(s, -1)
        outs.append(torch.einsum("hij,jhd->ihd", p, v[k0:k0 + b].double().repeat_interleave(g, 1)))
        q0, k0 = q0 + a, k0 + b
    return torch.cat(outs)


def _call(q, k, v, sq, sk, **kw):
    return sim.npu_fusion_attention(q, k, v, q.shape[1], "TND", actual_seq_qlen=_ends(sq),
                                    actual_seq_kvlen=_ends(sk), **kw)


def test_scale_defaults_to_one_and_no_mask_means_full_attention():
    q, k, v = _qkv()
    out = _call(q, k, v, (3, 5), (4, 5), sparse_mode=3)[0]  # no atten_mask: mode ignored
    want = _dense(q, k, v, (3, 5), (4, 5), 1.0, lambda a, b: torch.ones(a, b, dtype=torch.bool))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("mode", "pre", "nxt"), [(3, 0, 0), (4, 2, 0), (4, 1, 2), (4, 0, 0),
                                                  (4, 2**31 - 1, 1), (2, 0, 0)])
def test_sparse_modes_mask_bottom_right_bands(mode, pre, nxt):
    sq, sk = (3, 5, 2), (4, 5, 6)
    q, k, v = _qkv(sq, sk)

    def visible(a, b):
        i = torch.arange(a)[:, None]
        j = torch.arange(b)[None, :]
        if mode == 2:
            return j <= i
        diag = i + b - a
        if mode == 3:
            return j <= diag
        return (j >= diag - pre) & (j <= diag + nxt)

    out = _call(q, k, v, sq, sk, atten_mask=MASK, sparse_mode=mode, scale=0.3,
                pre_tockens=pre, next_tockens=nxt)[0]
    torch.testing.assert_close(out.double(), _dense(q, k, v, sq, sk, 0.3, visible),
                               atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("kwargs", "error", "text"), [
    ({"actual_seq_qlen": torch.tensor([3, 8])}, TypeError, "list of ints"),
    ({"actual_seq_qlen": [3, 2, 8]}, ValueError, "non-decreasing"),
    ({"actual_seq_kvlen": [0, 9]}, ValueError, "Skv 0"),
    ({"actual_seq_qlen": [3, 7]}, ValueError, "T = 8"),
    ({"sparse_mode": 3, "atten_mask": torch.ones(2048, 2048, dtype=torch.bool)}, ValueError,
     "compressed mask"),
    ({"sparse_mode": 4, "atten_mask": MASK[:1024, :1024]}, ValueError, "compressed mask"),
    ({"keep_prob": 0.0}, ValueError, "keep_prob"),
    ({"keep_prob": 1.5}, ValueError, "keep_prob"),
    ({"input_layout": "BSND"}, NotImplementedError, "TND"),
])
def test_documented_constraints_are_hard_errors(kwargs, error, text):
    q, k, v = _qkv()
    args = {"actual_seq_qlen": [3, 8], "actual_seq_kvlen": [4, 9], "input_layout": "TND",
            **kwargs}
    with pytest.raises(error, match=text):
        sim.npu_fusion_attention(q, k, v, 4, **args)


def test_mode_3_rejects_more_queries_than_keys():
    q, k, v = _qkv((5, 3), (4, 5))
    with pytest.raises(ValueError, match="Sq <= Skv"):
        _call(q, k, v, (5, 3), (4, 5), atten_mask=MASK, sparse_mode=3)


def test_an_all_masked_row_is_an_error_in_varlen():
    sq, sk = (5,), (2,)  # band (0, 0): rows 0..2 see no key
    q, k, v = _qkv(sq, sk)
    kw = {"atten_mask": MASK, "sparse_mode": 4, "pre_tockens": 0, "next_tockens": 0}
    with pytest.raises(ValueError, match="all-masked rows"):
        _call(q, k, v, sq, sk, inner_precise=2, **kw)


def test_zero_length_sequences_on_both_sides_are_supported():
    sq = sk = (3, 0, 5)
    q, k, v = _qkv(sq, sk)
    out = _call(q, k, v, sq, sk, scale=0.3)[0]
    want = _call(q, k, v, (3, 5), (3, 5), scale=0.3)[0]
    torch.testing.assert_close(out, want, rtol=0, atol=0)


def test_at_most_1024_sequences_and_dv_at_most_dk():
    lens = (1,) * 1025
    q, k, v = _qkv(lens, lens, n=1, nk=1, d=4)
    with pytest.raises(ValueError, match="at most 1024"):
        _call(q, k, v, lens, lens)
    q, k, _ = _qkv()
    v = torch.randn(k.shape[0], k.shape[1], 32)
    with pytest.raises(ValueError, match="Dk >= Dv"):
        _call(q, k, v, (3, 5), (4, 5))


def test_v3_takes_int64_length_tensors_and_returns_seed_offset_tensors():
    q, k, v = _qkv()
    ends_q, ends_k = torch.tensor([3, 8]), torch.tensor([4, 9])
    out, smax, ssum, _, seed, offset = sim.npu_fusion_attention_v3(
        q, k, v, 4, "TND", scale=0.5, keep_prob=0.8, actual_seq_qlen=ends_q,
        actual_seq_kvlen=ends_k)
    assert isinstance(seed, torch.Tensor) and isinstance(offset, torch.Tensor)
    torch.manual_seed(0)
    dy = torch.randn_like(out)
    grads = sim.npu_fusion_attention_grad_v3(
        q, k, v, dy, 4, "TND", softmax_max=smax, softmax_sum=ssum, attention_in=out,
        scale_value=0.5, keep_prob=0.8, seed=seed, offset=offset, actual_seq_qlen=ends_q,
        actual_seq_kvlen=ends_k)
    want = sim.npu_fusion_attention_grad(
        q, k, v, dy, 4, "TND", softmax_max=smax, softmax_sum=ssum, attention_in=out,
        scale_value=0.5, keep_prob=0.8, seed=int(seed), offset=int(offset),
        numels=4 * (3 * 4 + 5 * 5), actual_seq_qlen=[3, 8], actual_seq_kvlen=[4, 9])
    for got, ref in zip(grads[:3], want[:3], strict=True):
        torch.testing.assert_close(got, ref, rtol=0, atol=0)
    with pytest.raises(TypeError, match="tensor"):
        sim.npu_fusion_attention_v3(q, k, v, 4, "TND", actual_seq_qlen=[3, 8],
                                    actual_seq_kvlen=[4, 9])
    with pytest.raises(TypeError, match="int64"):
        sim.npu_fusion_attention_v3(q, k, v, 4, "TND", actual_seq_qlen=ends_q.int(),
                                    actual_seq_kvlen=ends_k)


def test_softmax_statistics_are_t_n_8_in_both_element_orders():
    q, k, v = _qkv()
    _, smax, _ = _call(q, k, v, (3, 5), (4, 5))[:3]
    _, tmax, tsum = _call(q, k, v, (3, 5), (4, 5), softmax_layout="TND")[:3]
    assert smax.shape == tmax.shape == (8, 4, 8) and smax.dtype == torch.float32
    torch.testing.assert_close(smax.view(4, 8, 8)[..., 0], tmax[..., 0].t())  # N-major
    assert (tsum == tsum[..., :1]).all()  # each value repeated 8 times
    s = torch.einsum("ihd,jhd->hij", q[:3], k[:4].repeat_interleave(2, 1))
    torch.testing.assert_close(tmax[:3, :, 0].t(), s.amax(-1))


def test_grad_matches_autograd_of_the_documented_formula():
    sq, sk = (3, 5), (4, 5)
    q, k, v = _qkv(sq, sk)
    kw = {"atten_mask": MASK, "sparse_mode": 4, "pre_tockens": 2, "next_tockens": 1,
          "scale": 0.25}
    out, smax, ssum = _call(q, k, v, sq, sk, **kw)[:3]
    dy = torch.randn_like(out)
    kw["scale_value"] = kw.pop("scale")
    dq, dk, dv, *_ = sim.npu_fusion_attention_grad(
        q, k, v, dy, 4, "TND", softmax_max=smax, softmax_sum=ssum, attention_in=out,
        actual_seq_qlen=_ends(sq), actual_seq_kvlen=_ends(sk), **kw)

    def visible(a, b):
        i, j = torch.arange(a)[:, None], torch.arange(b)[None, :]
        return (j >= i + b - a - 2) & (j <= i + b - a + 1)

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    want = torch.autograd.grad(_dense(*leaves, sq, sk, 0.25, visible), leaves, dy.double())
    for got, ref in zip((dq, dk, dv), want, strict=True):
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


def test_dropout_mask_is_reproducible_from_seed_and_offset():
    q, k, v = _qkv()
    torch.manual_seed(3)
    a = _call(q, k, v, (3, 5), (4, 5), keep_prob=0.6)
    torch.manual_seed(3)
    b = _call(q, k, v, (3, 5), (4, 5), keep_prob=0.6)
    torch.manual_seed(4)
    c = _call(q, k, v, (3, 5), (4, 5), keep_prob=0.6)
    assert torch.equal(a[0], b[0]) and a[4] == b[4] and not torch.equal(a[0], c[0])
    assert a[6] == 4 * (3 * 4 + 5 * 5)  # numels: N * sum(sq * skv)


# --- pse / pse_type of npu_fusion_attention_v2: the operator-generated ALiBi ----------------


def _v2(q, k, v, sq, sk, **kw):
    return sim.npu_fusion_attention_v2(q, k, v, q.shape[1], "TND", actual_seq_qlen=_ends(sq),
                                       actual_seq_kvlen=_ends(sk), **kw)


def _dense_bias(q, k, v, lengths, scale, visible, bias):
    """Float64 attention of sq == sk sequences with bias(b, n) -> (N, n, n) added after the
    scale (and before the mask)."""
    g = q.shape[1] // k.shape[1]
    outs, r = [], 0
    for b, n in enumerate(lengths):
        s = torch.einsum("ihd,jhd->hij", q[r:r + n].double(),
                         k[r:r + n].double().repeat_interleave(g, 1)) * scale + bias(b, n)
        p = torch.softmax(s.masked_fill(~visible(n), float("-inf")), -1)
        outs.append(torch.einsum("hij,jhd->ihd", p, v[r:r + n].double().repeat_interleave(g, 1)))
        r += n
    return torch.cat(outs)


def _bias_fn(slopes, sqrt=False, q_start=0, kv_start=0):
    def bias(b, n):
        i = torch.arange(n, dtype=torch.float64)[:, None] + q_start
        j = torch.arange(n, dtype=torch.float64)[None, :] + kv_start
        dist = (j - i).abs()
        slope = slopes if slopes.dim() == 1 else slopes[b]
        return -slope.double()[:, None, None] * (dist.sqrt() if sqrt else dist)
    return bias


@pytest.mark.parametrize("shape", ["head", "batch_head"])
@pytest.mark.parametrize(("mode", "causal"), [(0, False), (3, True)])
def test_pse_type_2_is_the_alibi_of_the_naive_oracle(shape, mode, causal):
    lengths = (3, 6, 1, 4)
    q, k, v = _qkv(lengths, lengths, n=4, nk=2)
    slopes = torch.rand(4) if shape == "head" else torch.rand(4, 4)
    mask = {"atten_mask": MASK, "sparse_mode": mode} if mode else {}
    out = _v2(q, k, v, lengths, lengths, pse=slopes, pse_type=2, scale=0.3, **mask)[0]
    cu = [0, *_ends(lengths)]
    want = naive_attention(q, k, v, cu, cu, softmax_scale=0.3, causal=causal, alibi_slopes=slopes)
    torch.testing.assert_close(out.double(), want.out, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("pse_type", "q_start", "kv_start"), [(3, 0, 0), (2, 2, 2), (3, 1, 1)])
def test_pse_type_3_takes_the_root_and_start_indices_shift_the_zero_line(pse_type, q_start,
                                                                         kv_start):
    lengths = (5, 2, 4)
    q, k, v = _qkv(lengths, lengths, n=2, nk=1)
    slopes = torch.rand(3, 2) * 2
    out = _v2(q, k, v, lengths, lengths, pse=slopes, pse_type=pse_type, scale=0.25,
              q_start_idx=[q_start], kv_start_idx=[kv_start], atten_mask=MASK, sparse_mode=4,
              pre_tokens=2, next_tokens=1)[0]

    def band(n):
        i, j = torch.arange(n)[:, None], torch.arange(n)[None, :]
        return (j >= i - 2) & (j <= i + 1)

    want = _dense_bias(q, k, v, lengths, 0.25, band,
                       _bias_fn(slopes, pse_type == 3, q_start, kv_start))
    torch.testing.assert_close(out.double(), want, atol=1e-5, rtol=1e-5)


def test_v2_grad_with_generated_alibi_matches_autograd():
    lengths = (4, 6)
    q, k, v = _qkv(lengths, lengths, n=4, nk=2)
    slopes = torch.rand(4)
    kw = {"pse": slopes, "pse_type": 2, "atten_mask": MASK, "sparse_mode": 3}
    out, smax, ssum = _v2(q, k, v, lengths, lengths, scale=0.4, **kw)[:3]
    dy = torch.randn_like(out)
    grads = sim.npu_fusion_attention_grad_v2(
        q, k, v, dy, 4, "TND", softmax_max=smax, softmax_sum=ssum, attention_in=out,
        scale_value=0.4, actual_seq_qlen=_ends(lengths), actual_seq_kvlen=_ends(lengths), **kw)
    assert len(grads) == 7  # (dq, dk, dv, dpse, dq_rope, dk_rope, dsink), the 2.14.0 schema

    def causal(n):
        return torch.ones(n, n, dtype=torch.bool).tril()

    leaves = [t.double().requires_grad_() for t in (q, k, v)]
    dense = _dense_bias(*leaves, lengths, 0.4, causal, _bias_fn(slopes))
    want = torch.autograd.grad(dense, leaves, dy.double())
    for got, ref in zip(grads[:3], want, strict=True):
        torch.testing.assert_close(got.double(), ref, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("kwargs", "error", "text"), [
    ({"pse_type": 4}, ValueError, "pse_type must be one of"),
    ({"pse_type": 2, "pse": torch.ones(4, dtype=torch.float16)}, TypeError, "float32"),
    ({"pse_type": 3, "pse": torch.ones(3, 4)}, ValueError, r"\[B, N\] = \[2, 4\]"),
    ({"pse_type": 2, "pse": torch.ones(4), "lengths_k": (4, 5)}, ValueError, "Sq == Skv"),
    ({"pse_type": 2, "pse": torch.ones(4), "lengths_k": (4, 6), "q_start_idx": [2]},
     ValueError, "Sq == Skv"),
    ({"pse_type": 2, "pse": torch.ones(4), "lengths_q": (3, 0), "lengths_k": (3, 0)},
     ValueError, "some S is 0"),
    ({"pse_type": 2}, ValueError, "slopes"),
    ({"pse_type": 1, "pse": torch.ones(2, 4, 1024, 5)}, NotImplementedError, "pse_type 2 and 3"),
    ({"pse_type": 2, "pse": torch.ones(4), "q_start_idx": torch.tensor([1])}, TypeError,
     "host data"),
    ({"pse_type": 2, "pse": torch.ones(4), "kv_start_idx": [0, 1]}, ValueError, "exactly one"),
    ({"query_rope": torch.ones(8, 4, 16)}, NotImplementedError, "query_rope"),
])
def test_documented_pse_constraints_are_hard_errors(kwargs, error, text):
    lengths_q = kwargs.pop("lengths_q", (3, 5))
    lengths_k = kwargs.pop("lengths_k", (3, 5))
    q, k, v = _qkv(lengths_q, lengths_k)
    with pytest.raises(error, match=text):
        _v2(q, k, v, lengths_q, lengths_k, **kwargs)


@pytest.mark.parametrize(("sq", "sk", "q_start", "kv_start"), [(3, 7, 4, 0), (6, 2, 0, 4)])
def test_start_indices_place_a_cut_of_an_equal_length_sequence(sq, sk, q_start, kv_start):
    """Queries that are the last sq rows of a sequence of sk (or keys the last sk of sq):
    the bias is attnhub's bottom-right |i + sk - sq - j|."""
    q, k, v = _qkv((sq,), (sk,), n=2, nk=1)
    slopes = torch.rand(2) + 0.5
    out = _v2(q, k, v, (sq,), (sk,), pse=slopes, pse_type=2, scale=0.5,
              q_start_idx=[q_start], kv_start_idx=[kv_start])[0]
    want = naive_attention(q, k, v, [0, sq], [0, sk], softmax_scale=0.5, alibi_slopes=slopes)
    torch.testing.assert_close(out.double(), want.out, atol=1e-5, rtol=1e-5)


def test_v1_has_no_pse_type_and_its_pse_is_not_modeled():
    q, k, v = _qkv((3, 5), (3, 5))
    with pytest.raises(NotImplementedError, match="pse"):
        _call(q, k, v, (3, 5), (3, 5), pse=torch.ones(4))
    with pytest.raises(TypeError):
        _call(q, k, v, (3, 5), (3, 5), pse_type=2)


def _fia_inputs(lq, lk, page, qs=None, n=4, nk=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    qs = qs or max(lq)
    query = torch.randn(len(lq), qs, n, d, generator=g).half()
    blocks = [-(-x // page) for x in lk]
    key = torch.randn(sum(blocks), page, nk * d, generator=g).half()
    value = torch.randn(sum(blocks), page, nk * d, generator=g).half()
    table = torch.zeros(len(lk), max(blocks), dtype=torch.int32)
    first = 0
    for b, c in enumerate(blocks):
        table[b, :c] = torch.arange(first, first + c, dtype=torch.int32).flip(0)
        first += c
    return query, key, value, table


def _fia_dense(query, key, value, table, lq, lk, page, nk, causal):
    """Per-batch float64 attention over the pages in table order, bottom-right causal."""
    outs, lses = [], []
    for b, (sq, sk) in enumerate(zip(lq, lk, strict=True)):
        pages = table[b, :-(-sk // page)].long()
        kb = key[pages].reshape(-1, nk, key.shape[-1] // nk)[:sk].double()
        vb = value[pages].reshape(-1, nk, key.shape[-1] // nk)[:sk].double()
        g = query.shape[2] // nk
        s = torch.einsum("ihd,jhd->hij", query[b, :sq].double(), kb.repeat_interleave(g, 1))
        s = s * 0.25
        if causal:
            i, j = torch.arange(sq)[:, None], torch.arange(sk)[None, :]
            s = s.masked_fill(j > i + sk - sq, float("-inf"))
        outs.append(torch.einsum("hij,jhd->ihd", torch.softmax(s, -1),
                                 vb.repeat_interleave(g, 1)))
        lses.append(torch.logsumexp(s, -1))
    return outs, lses


@pytest.mark.parametrize(("lq", "lk", "page", "causal"), [
    ((5, 3), (9, 140), 128, True), ((5, 3), (9, 140), 128, False), ((1, 1), (30, 17), 16, True)])
def test_fused_infer_page_attention_is_the_dense_attention_over_the_pages(lq, lk, page, causal):
    query, key, value, table = _fia_inputs(lq, lk, page)
    mask = {"atten_mask": MASK, "sparse_mode": 3} if causal and max(lq) > 1 else {}
    out, lse = sim.npu_fused_infer_attention_score(
        query, key, value, actual_seq_lengths=list(lq), actual_seq_lengths_kv=list(lk),
        block_table=table, block_size=page, num_heads=4, num_key_value_heads=2, scale=0.25,
        input_layout="BSND", softmax_lse_flag=True, **mask)
    outs, lses = _fia_dense(query, key, value, table, lq, lk, page, 2, causal)
    for b, sq in enumerate(lq):
        torch.testing.assert_close(out[b, :sq].double(), outs[b], atol=2e-3, rtol=2e-3)
        torch.testing.assert_close(lse[b, :, :sq, 0].double(), lses[b], atol=1e-4, rtol=1e-4)
        assert out[b, sq:].isnan().all()  # rows past the actual length are undefined


@pytest.mark.parametrize(("lq", "lk", "page", "text"), [
    ((5, 3), (9, 140), 64, "multiple of 128"),
    ((1, 1), (9, 40), 24, "multiple of 16"),
])
def test_fused_infer_block_size_rules_are_hard_errors(lq, lk, page, text):
    query, key, value, table = _fia_inputs(lq, lk, page)
    with pytest.raises(ValueError, match=text):
        sim.npu_fused_infer_attention_score(
            query, key, value, actual_seq_lengths=list(lq), actual_seq_lengths_kv=list(lk),
            block_table=table, block_size=page, num_heads=4, num_key_value_heads=2,
            input_layout="BSND")


def test_fused_infer_decode_ignores_the_sparse_arguments():
    lq, lk = (1, 1), (30, 17)
    query, key, value, table = _fia_inputs(lq, lk, 16)
    kw = {"actual_seq_lengths_kv": list(lk), "block_table": table, "block_size": 16,
          "num_heads": 4, "num_key_value_heads": 2, "input_layout": "BSND"}
    plain = sim.npu_fused_infer_attention_score(query, key, value, **kw)[0]
    band = sim.npu_fused_infer_attention_score(query, key, value, sparse_mode=4, pre_tokens=2,
                                               next_tokens=0, **kw)[0]
    torch.testing.assert_close(band, plain, rtol=0, atol=0)
    mask = torch.zeros(2, table.shape[1] * 16, dtype=torch.bool)
    mask[:, :10] = True  # an explicit (B, KV_S) mask does apply
    masked = sim.npu_fused_infer_attention_score(query, key, value, atten_mask=mask, **kw)[0]
    assert not torch.equal(masked, plain)
    with pytest.raises(ValueError, match=r"\(B, KV_S\)"):
        sim.npu_fused_infer_attention_score(query, key, value, atten_mask=MASK, **kw)
