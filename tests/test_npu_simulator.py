"""The torch_npu simulator follows npu_fusion_attention's documented semantics and quirks."""

from __future__ import annotations

import pytest
import torch
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
    ({"actual_seq_qlen": [0, 3, 8]}, ValueError, "leading 0"),
    ({"actual_seq_qlen": [3, 3, 8], "actual_seq_kvlen": [4, 4, 9]}, ValueError, "increasing"),
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


def test_fully_masked_rows_are_nan_unless_inner_precise_2():
    sq, sk = (5,), (2,)  # band (0, 0): rows 0..2 see no key
    q, k, v = _qkv(sq, sk)
    kw = {"atten_mask": MASK, "sparse_mode": 4, "pre_tockens": 0, "next_tockens": 0}
    out = _call(q, k, v, sq, sk, **kw)[0]
    assert out[:3].isnan().all() and not out[3:].isnan().any()
    out2, smax, ssum = _call(q, k, v, sq, sk, inner_precise=2, **kw)[:3]
    assert (out2[:3] == 0).all()
    torch.testing.assert_close(out2[3:], out[3:])
    lse = smax.view(4, 5, 8)[..., 0] + ssum.view(4, 5, 8)[..., 0].log()  # N-major
    assert torch.isneginf(lse[:, :3]).all() and lse[:, 3:].isfinite().all()


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
    dq, dk, dv, _ = sim.npu_fusion_attention_grad(
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
