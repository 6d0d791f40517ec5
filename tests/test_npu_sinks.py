"""Attention sinks in the torch_npu simulator: the ``sink`` argument of npu_fusion_attention
(v1, v2, v3) and of their grad operators, against a float64 oracle written from torch_npu's
own example (the raw sink appended as one more column of the scaled scores, softmax, that
column dropped before multiplying by V)."""

from __future__ import annotations

import pytest
import torch

from attnhub.backends.npu import simulator as sim
from attnhub.backends.npu import softmax_stats

MASK = sim.compressed_causal_mask()
SQ, SK = (3, 5, 2), (4, 5, 6)


def _ends(lengths):
    out, acc = [], 0
    for n in lengths:
        acc += n
        out.append(acc)
    return out


def _inputs(sq=SQ, sk=SK, n=4, nk=2, d=16, seed=0):
    g = torch.Generator().manual_seed(seed)
    q = torch.randn(sum(sq), n, d, generator=g)
    k = torch.randn(sum(sk), nk, d, generator=g)
    v = torch.randn(sum(sk), nk, d, generator=g)
    sink = torch.randn(n, generator=g) * 2
    return q, k, v, sink


def _band(left, right):
    def visible(a, b):
        i, j = torch.arange(a)[:, None], torch.arange(b)[None, :]
        diag = i + b - a
        return (j >= diag - left) & (j <= diag + right)
    return visible


def _oracle(q, k, v, sink, sq, sk, scale, visible):
    """float64 (out (T, N, D), lse (N, T)): softmax over [scores, sink] per row, the sink
    column dropped before V. Differentiable in q, k, v and sink."""
    g = q.shape[1] // k.shape[1]
    outs, lses, q0, k0 = [], [], 0, 0
    for a, b in zip(sq, sk, strict=True):
        s = torch.einsum("ihd,jhd->hij", q[q0:q0 + a], k[k0:k0 + b].repeat_interleave(g, 1))
        s = (s * scale).masked_fill(~visible(a, b), float("-inf"))
        column = sink.view(-1, 1, 1).expand(s.shape[0], a, 1)
        full = torch.cat([s, column], dim=-1)
        p = torch.softmax(full, -1)[..., :-1]
        outs.append(torch.einsum("hij,jhd->ihd", p, v[k0:k0 + b].repeat_interleave(g, 1)))
        lses.append(torch.logsumexp(full, -1))
        q0, k0 = q0 + a, k0 + b
    return torch.cat(outs), torch.cat(lses, dim=1)


def _lse(smax, ssum, t, n, layout=""):
    return softmax_stats.lse_from_stats(smax, ssum, t, n, "TND" if layout else "N-major")


@pytest.mark.parametrize("layout", ["", "TND"])
@pytest.mark.parametrize(("mask", "visible"), [
    ({}, _band(10**6, 10**6)),
    ({"atten_mask": MASK, "sparse_mode": 3}, _band(10**6, 0)),
    ({"atten_mask": MASK, "sparse_mode": 4, "pre_tockens": 2, "next_tockens": 1}, _band(2, 1)),
], ids=["full", "causal", "band"])
def test_forward_with_sink_is_the_documented_softmax(mask, visible, layout):
    q, k, v, sink = _inputs()
    out, smax, ssum = sim.npu_fusion_attention(
        q, k, v, 4, "TND", scale=0.3, actual_seq_qlen=_ends(SQ), actual_seq_kvlen=_ends(SK),
        sink=sink, softmax_layout=layout, **mask)[:3]
    want_out, want_lse = _oracle(q.double(), k.double(), v.double(), sink.double(), SQ, SK,
                                 0.3, visible)
    torch.testing.assert_close(out.double(), want_out, atol=1e-5, rtol=1e-5)
    # softmax_max / softmax_sum include the sink: lse = max + log(sum) is the oracle's
    torch.testing.assert_close(_lse(smax, ssum, q.shape[0], 4, layout).double(), want_lse,
                               atol=1e-5, rtol=1e-5)


def test_a_large_sink_is_the_row_max():
    """m = max(sink, max(S)): a sink far above every score leaves finite statistics."""
    q, k, v, _ = _inputs()
    sink = torch.full((4,), 80.0)
    out, smax, ssum = sim.npu_fusion_attention(
        q, k, v, 4, "TND", scale=0.3, actual_seq_qlen=_ends(SQ), actual_seq_kvlen=_ends(SK),
        sink=sink)[:3]
    assert torch.equal(smax, torch.full_like(smax, 80.0))
    assert out.abs().max() < 1e-20 and torch.isfinite(ssum).all()


def _grad_check(forward, backward, sq, sk, scale, visible, **kw):
    """dq, dk, dv and dsink (the grad operator's last output) against autograd of the
    oracle."""
    q, k, v, sink = _inputs(sq, sk)
    out, smax, ssum = forward(q, k, v, sink, **kw)[:3]
    dy = torch.randn_like(out)
    grads = backward(q, k, v, dy, sink, smax, ssum, out, **kw)
    leaves = [t.double().requires_grad_() for t in (q, k, v, sink)]
    want_out, _ = _oracle(*leaves, sq, sk, scale, visible)
    want = torch.autograd.grad(want_out, leaves, dy.double())
    got = (*grads[:3], grads[-1])
    assert got[3].dtype == torch.float32 and got[3].shape == (4,)
    for g, ref in zip(got, want, strict=True):
        torch.testing.assert_close(g.double(), ref, atol=1e-4, rtol=1e-4)


def test_v1_grad_returns_dsink_as_its_fifth_output():
    kw = {"atten_mask": MASK, "sparse_mode": 4, "pre_tockens": 3, "next_tockens": 0}

    def forward(q, k, v, sink, **kw):
        return sim.npu_fusion_attention(q, k, v, 4, "TND", scale=0.25, sink=sink,
                                        actual_seq_qlen=_ends(SQ),
                                        actual_seq_kvlen=_ends(SK), **kw)

    def backward(q, k, v, dy, sink, smax, ssum, out, **kw):
        grads = sim.npu_fusion_attention_grad(
            q, k, v, dy, 4, "TND", softmax_max=smax, softmax_sum=ssum, attention_in=out,
            scale_value=0.25, sink=sink, actual_seq_qlen=_ends(SQ),
            actual_seq_kvlen=_ends(SK), **kw)
        assert len(grads) == 5
        return grads

    _grad_check(forward, backward, SQ, SK, 0.25, _band(3, 0), **kw)


def test_v2_grad_with_alibi_returns_dsink_as_its_seventh_output():
    lengths = (4, 6)
    slopes = torch.rand(4)

    def visible(a, b):
        return torch.ones(a, b, dtype=torch.bool).tril()

    kw = {"pse": slopes, "pse_type": 2, "atten_mask": MASK, "sparse_mode": 3}

    def forward(q, k, v, sink, **kw):
        return sim.npu_fusion_attention_v2(q, k, v, 4, "TND", scale=0.4, sink=sink,
                                           actual_seq_qlen=_ends(lengths),
                                           actual_seq_kvlen=_ends(lengths), **kw)

    def backward(q, k, v, dy, sink, smax, ssum, out, **kw):
        grads = sim.npu_fusion_attention_grad_v2(
            q, k, v, dy, 4, "TND", softmax_max=smax, softmax_sum=ssum, attention_in=out,
            scale_value=0.4, sink=sink, actual_seq_qlen=_ends(lengths),
            actual_seq_kvlen=_ends(lengths), **kw)
        assert len(grads) == 7
        return grads

    q, k, v, sink = _inputs(lengths, lengths)
    out, smax, ssum = forward(q, k, v, sink, **kw)[:3]
    dy = torch.randn_like(out)
    grads = backward(q, k, v, dy, sink, smax, ssum, out, **kw)
    leaves = [t.double().requires_grad_() for t in (q, k, v, sink)]
    outs, r = [], 0
    for n in lengths:  # the oracle with the generated ALiBi: -slope * |i - j| after the scale
        s = torch.einsum("ihd,jhd->hij", leaves[0][r:r + n],
                         leaves[1][r:r + n].repeat_interleave(2, 1)) * 0.4
        dist = (torch.arange(n)[None, :] - torch.arange(n)[:, None]).abs().double()
        s = (s - slopes.double()[:, None, None] * dist).masked_fill(~visible(n, n), -torch.inf)
        full = torch.cat([s, leaves[3].view(-1, 1, 1).expand(4, n, 1)], -1)
        p = torch.softmax(full, -1)[..., :-1]
        outs.append(torch.einsum("hij,jhd->ihd", p, leaves[2][r:r + n].repeat_interleave(2, 1)))
        r += n
    want = torch.autograd.grad(torch.cat(outs), leaves, dy.double())
    for g, ref in zip((*grads[:3], grads[6]), want, strict=True):
        torch.testing.assert_close(g.double(), ref, atol=1e-4, rtol=1e-4)


def test_v3_grad_returns_dsink_as_its_fifth_output():
    lengths = (3, 5)
    ends = torch.tensor(_ends(lengths))

    def forward(q, k, v, sink):
        return sim.npu_fusion_attention_v3(q, k, v, 4, "TND", scale=0.5, sink=sink,
                                           atten_mask=MASK, sparse_mode=3,
                                           actual_seq_qlen=ends, actual_seq_kvlen=ends)

    def backward(q, k, v, dy, sink, smax, ssum, out):
        return sim.npu_fusion_attention_grad_v3(
            q, k, v, dy, 4, "TND", softmax_max=smax, softmax_sum=ssum, attention_in=out,
            scale_value=0.5, sink=sink, atten_mask=MASK, sparse_mode=3,
            actual_seq_qlen=ends, actual_seq_kvlen=ends)

    _grad_check(forward, backward, lengths, lengths, 0.5, _band(10**6, 0))


def test_without_sink_dsink_is_empty():
    q, k, v, _ = _inputs()
    kw = {"actual_seq_qlen": _ends(SQ), "actual_seq_kvlen": _ends(SK)}
    out, smax, ssum = sim.npu_fusion_attention(q, k, v, 4, "TND", **kw)[:3]
    grads = sim.npu_fusion_attention_grad(q, k, v, out, 4, "TND", softmax_max=smax,
                                          softmax_sum=ssum, attention_in=out, **kw)
    assert len(grads) == 5 and grads[4].numel() == 0


def test_dropout_drops_key_probabilities_only():
    """With keep_prob < 1 the sink still takes its mass from the normalizer; dsink is
    -sum exp(sink - lse) * rowsum(dy * out), with out the dropped-out output."""
    q, k, v, sink = _inputs()
    kw = {"actual_seq_qlen": _ends(SQ), "actual_seq_kvlen": _ends(SK), "keep_prob": 0.7}
    torch.manual_seed(0)
    out, smax, ssum, _, seed, offset, numels = sim.npu_fusion_attention(
        q, k, v, 4, "TND", scale=0.3, sink=sink, **kw)
    dy = torch.randn_like(out)
    grads = sim.npu_fusion_attention_grad(
        q, k, v, dy, 4, "TND", softmax_max=smax, softmax_sum=ssum, attention_in=out,
        scale_value=0.3, sink=sink, seed=seed, offset=offset, numels=numels, **kw)
    lse = _lse(smax, ssum, q.shape[0], 4).double()
    delta = (dy.double() * out.double()).sum(-1).t()  # (N, T)
    want = -(torch.exp(sink.double()[:, None] - lse) * delta).sum(-1)
    torch.testing.assert_close(grads[4].double(), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(("sink", "error", "text"), [
    (torch.zeros(4, dtype=torch.float16), TypeError, "float32"),
    (torch.zeros(4, dtype=torch.float64), TypeError, "float32"),
    (torch.zeros(2), ValueError, r"\[head_num\] = \[4\]"),
    (torch.zeros(1, 4), ValueError, r"\[head_num\] = \[4\]"),
    ([0.0] * 4, TypeError, "tensor"),
])
def test_documented_sink_constraints_are_hard_errors(sink, error, text):
    q, k, v, _ = _inputs()
    with pytest.raises(error, match=text):
        sim.npu_fusion_attention(q, k, v, 4, "TND", actual_seq_qlen=_ends(SQ),
                                 actual_seq_kvlen=_ends(SK), sink=sink)


def test_translate_passes_sink_only_with_sinks():
    """Every forward and grad argument builder adds ``sink`` for calls with sinks and leaves
    it out otherwise (torch_npu releases before the parameter keep working)."""
    import attnhub
    from attnhub.backends.npu import translate
    from attnhub.backends.npu.layout import tnd_layout

    q, k, v, sinks = _inputs()
    problem, inputs = attnhub.normalize(q, k, v, attnhub.VarlenInfo.from_lengths(SQ),
                                        attnhub.VarlenInfo.from_lengths(SK), causal=True)
    (call,) = tnd_layout(problem, inputs.cu_seqlens_q, inputs.cu_seqlens_k).calls
    cpu = torch.device("cpu")
    stats = softmax_stats.stats_from_lse(torch.zeros(4, q.shape[0]))
    cu = inputs.cu_seqlens_q
    for with_sinks in (None, sinks):
        built = [
            translate.forward_kwargs(problem, call, cpu, 3, sinks=with_sinks),
            translate.grad_kwargs(problem, call, cpu, 3, *stats, q, 0, 0, sinks=with_sinks),
            translate.v3_forward_kwargs(problem, cu, cu, cpu, sinks=with_sinks),
            translate.v3_grad_kwargs(problem, cu, cu, cpu, *stats, q, None, None,
                                     sinks=with_sinks),
        ]
        for kwargs in built:
            if with_sinks is None:
                assert "sink" not in kwargs
            else:
                assert kwargs["sink"] is sinks


# --- the npu adapter through attnhub's public API, the simulator standing in -------------------


@pytest.fixture
def npu():
    from attnhub.backends.npu.simulation import simulated

    with simulated() as module:
        yield module


def _public(lq, lk, backend, sinks, grad=True, seed=3, **kw):
    """out, lse and (with grad) dq, dk, dv, dsinks of one call through
    attnhub.attention_forward_varlen."""
    import attnhub

    q, k, v, _ = _inputs(lq, lk, seed=seed)
    leaves = [t.clone().requires_grad_(grad) for t in (q, k, v, sinks)]
    out, lse = attnhub.attention_forward_varlen(
        *leaves[:3], attnhub.VarlenInfo.from_lengths(lq), attnhub.VarlenInfo.from_lengths(lk),
        sinks=leaves[3], return_lse=True, backend=backend, **kw)
    if not grad:
        return out, lse
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(9))
    return (out, lse, *torch.autograd.grad(out, leaves, dout))


@pytest.mark.parametrize(("lq", "lk", "kw"), [
    ((5, 0, 3, 7, 1), (5, 4, 0, 4, 6), {"causal": True}),  # rows and a sequence without keys
    ((3, 5, 2), (4, 5, 6), {"window_size": (2, 1), "softmax_scale": 0.3}),  # one whole call
    ((3, 5, 4), (6, 5, 2), {"alibi_slopes": torch.rand(4), "causal": True}),  # v2 shifts
], ids=["v1-rows-without-keys", "v1-band", "v2-alibi"])
def test_npu_adapter_with_sinks_matches_the_reference(npu, lq, lk, kw):
    sinks = torch.randn(4, generator=torch.Generator().manual_seed(5)) * 2
    got = _public(lq, lk, "npu", sinks, **kw)
    want = _public(lq, lk, "reference", sinks, **kw)
    for name, g, w in zip(("out", "lse", "dq", "dk", "dv", "dsinks"), got, want, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5, msg=name)
    assert torch.isfinite(got[1]).all()  # with sinks no row has lse -inf


def test_npu_adapter_rows_without_keys_get_the_sink_as_lse(npu):
    sinks = torch.tensor([0.5, -1.0, 2.0, 0.0])
    out, lse = _public((4, 2), (0, 3), "npu", sinks, grad=False, causal=True)
    assert torch.equal(out[:4], torch.zeros_like(out[:4]))  # sequence 0 sees no key
    assert torch.equal(lse[:, :4], sinks[:, None].expand(4, 4))


def test_npu_adapter_v3_with_sinks(npu, monkeypatch):
    """Lengths only on the device: npu_fusion_attention_v3 / _grad_v3 take the sink."""
    import attnhub
    from attnhub import host_copies

    monkeypatch.setattr(host_copies, "can_read_back", lambda: False)
    lengths = (3, 0, 5)
    q, k, v, sinks = _inputs(lengths, lengths)
    cu = torch.tensor([0, 3, 3, 8], dtype=torch.int32)
    results = []
    for backend in ("npu", "reference"):
        leaves = [t.clone().requires_grad_() for t in (q, k, v, sinks)]
        out = attnhub.attention_forward_varlen(*leaves[:3], cu, cu, max_seqlen_q=5,
                                               max_seqlen_k=5, causal=True, sinks=leaves[3],
                                               backend=backend)
        results.append((out, *torch.autograd.grad(out.square().sum(), leaves)))
    for g, w in zip(*results, strict=True):
        torch.testing.assert_close(g, w, atol=2e-5, rtol=2e-5)


def test_npu_declines_sinks_with_paged_kv(npu):
    import attnhub
    from attnhub.backends.npu.backend import NpuBackend

    q = torch.randn(4, 4, 16, dtype=torch.float16)
    pool = torch.randn(2, 128, 2, 16, dtype=torch.float16)
    table = torch.tensor([[0], [1]], dtype=torch.int32)
    problem, _ = attnhub.normalize(q, pool, pool, [0, 2, 4], [0, 100, 120], block_table=table,
                                   sinks=torch.zeros(4))
    reasons = NpuBackend().why_not(problem)
    assert any("attention sinks with paged K/V" in r for r in reasons), reasons


def test_npu_declines_sinks_when_the_operators_lack_the_argument(npu, monkeypatch):
    import attnhub
    from attnhub.backends.npu.backend import NpuBackend

    def no_sink(query, key, value, head_num, input_layout, scale=1.0):
        raise AssertionError("not called")

    for name in ("npu_fusion_attention", "npu_fusion_attention_grad"):
        monkeypatch.setattr(npu, name, no_sink)
    q, k, v, sinks = _inputs()
    problem, _ = attnhub.normalize(q, k, v, attnhub.VarlenInfo.from_lengths(SQ),
                                   attnhub.VarlenInfo.from_lengths(SK), sinks=sinks)
    assert NpuBackend().why_not(problem) == [
        "attention sinks need the sink argument of npu_fusion_attention, "
        "npu_fusion_attention_grad, which this torch_npu lacks; upgrade torch_npu (2.14 has it)"]


def test_takes_argument_reads_torch_op_schemas():
    from attnhub.backends.npu import translate

    assert translate.takes_argument(torch.ops.aten.add, "alpha")
    assert not translate.takes_argument(torch.ops.aten.add, "sink")
    assert translate.takes_argument(sim.npu_fusion_attention_v3, "sink")
    assert translate.takes_argument(lambda *a, **kw: None, "sink")  # unknown: the call tells
