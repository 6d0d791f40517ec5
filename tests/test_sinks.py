"""Attention sinks (sinks=): validation, the reference backend against the naive oracle
(forward, lse, gradients incl. dsinks), rows that see no key, selection reasons, plans and
torch.compile."""

from __future__ import annotations

import pytest
import torch
from conftest import make_backend
from naive import assert_lse, assert_out, make_qkv, naive_attention

import attnhub
from attnhub.inputs import VarlenInputs
from backends.reference import kernel

SEQ_Q, SEQ_K = [5, 0, 7, 3, 2], [6, 4, 7, 0, 9]
NHEADS, NHEADS_K = 4, 2


def _sinks(nheads=NHEADS, seed=0, grad=False):
    gen = torch.Generator().manual_seed(seed)
    return (torch.randn(nheads, generator=gen) * 2).requires_grad_(grad)


CASES = {
    "gqa": {},
    "causal": dict(causal=True),
    "window": dict(window_size=(2, 1)),
    "softcap": dict(softcap=2.5, causal=True),
    "alibi": dict(alibi_slopes=torch.tensor([0.5, 0.25, 0.125, 0.0625])),
    "top_left-causal": dict(causal=True, mask_alignment="top_left"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_reference_matches_naive(case):
    kw = CASES[case]
    q, k, v, cu_q, cu_k = make_qkv(SEQ_Q, SEQ_K, NHEADS, NHEADS_K, 16, seed=1)
    sinks = _sinks(seed=2)
    out, lse = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, sinks=sinks,
                                                return_lse=True, **kw)
    naive_kw = {key: val for key, val in kw.items() if key != "mask_alignment"}
    want = naive_attention(q, k, v, cu_q, cu_k, sinks=sinks,
                           top_left=kw.get("mask_alignment") == "top_left", **naive_kw)
    assert_out(out, want.out)
    assert_lse(lse, want.lse)
    assert torch.isfinite(lse).all()  # with sinks no row has lse = -inf


def test_rows_that_see_no_key_give_zero_and_the_sink():
    # sequence 0: sq 4 > sk 2, causal bottom-right: rows 0 and 1 see no key; sequence 1: sk 0
    q, k, v, cu_q, cu_k = make_qkv([4, 3], [2, 0], NHEADS, NHEADS_K, 8, seed=3)
    sinks = _sinks(seed=4)
    out, lse = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, causal=True, sinks=sinks,
                                                return_lse=True)
    empty = [0, 1, 4, 5, 6]
    assert torch.equal(out[empty], torch.zeros_like(out[empty]))
    assert torch.equal(lse[:, empty], sinks[:, None].expand(NHEADS, len(empty)))
    seen = [2, 3]
    assert (lse[:, seen] > sinks[:, None]).all()  # the keys add mass on top of the sink


def test_a_very_negative_sink_is_no_sink():
    q, k, v, cu_q, cu_k = make_qkv(SEQ_Q, SEQ_K, NHEADS, NHEADS_K, 8, seed=5)
    got = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, causal=True,
                                           sinks=torch.full((NHEADS,), -1e4))
    want = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, causal=True, backend="reference")
    torch.testing.assert_close(got, want, rtol=0, atol=0)


@pytest.mark.parametrize("case", ["gqa", "causal", "softcap", "alibi"])
@pytest.mark.parametrize("use_lse", [False, True])
def test_gradients_match_naive(case, use_lse):
    kw = CASES[case]
    q, k, v, cu_q, cu_k = make_qkv(SEQ_Q, SEQ_K, NHEADS, NHEADS_K, 8, seed=6,
                                   requires_grad=True)
    sinks = _sinks(seed=7, grad=True)
    out, lse = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, sinks=sinks,
                                                return_lse=True, **kw)
    gen = torch.Generator().manual_seed(8)
    dout = torch.randn(out.shape, generator=gen, dtype=out.dtype)
    dlse = torch.randn(lse.shape, generator=gen, dtype=torch.float64)
    loss = (out * dout).sum() + ((lse.double() * dlse).sum() if use_lse else 0)
    got = torch.autograd.grad(loss, (q, k, v, sinks))
    s64 = sinks.detach().double().requires_grad_(True)
    want = naive_attention(q, k, v, cu_q, cu_k, sinks=s64, **kw)
    want_loss = (want.out * dout).sum() + ((want.lse * dlse).sum() if use_lse else 0)
    ref = torch.autograd.grad(want_loss, (q, k, v, s64))
    for g, r in zip(got[:3], ref[:3], strict=True):
        torch.testing.assert_close(g, r, rtol=1e-5, atol=1e-6)  # dlse reaches it as float32
    assert got[3].dtype == torch.float32 and got[3].shape == (NHEADS,)
    torch.testing.assert_close(got[3].double(), ref[3], rtol=1e-5, atol=1e-5)


def test_dsinks_on_rows_that_see_no_key_is_dlse():
    q, k, v, cu_q, cu_k = make_qkv([3], [0], NHEADS, NHEADS_K, 8, seed=9, requires_grad=True)
    sinks = _sinks(seed=10, grad=True)
    out, lse = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, sinks=sinks,
                                                return_lse=True)
    (out.sum() + (lse * torch.arange(1.0, 4.0)).sum()).backward()
    torch.testing.assert_close(sinks.grad, torch.full((NHEADS,), 6.0))


class _ReferenceWithSinks(torch.autograd.Function):
    """The reference kernel's forward and backward, with float64 sinks (gradcheck needs every
    input in float64; through the API sinks are float32)."""

    @staticmethod
    def forward(ctx, q, k, v, sinks, problem, cu_q, cu_k):
        ctx.save_for_backward(q, k, v, sinks)
        ctx.problem, ctx.cu = problem, (cu_q, cu_k)
        return kernel.forward(problem, VarlenInputs(q, k, v, cu_q, cu_k, sinks=sinks)).out

    @staticmethod
    def backward(ctx, dout):
        q, k, v, sinks = ctx.saved_tensors
        g = kernel.backward(ctx.problem, VarlenInputs(q, k, v, *ctx.cu, sinks=sinks), dout)
        return g.dq, g.dk, g.dv, g.dsinks, None, None, None


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(1, 0), softcap=3.0)])
def test_gradcheck_reference_float64(kw):
    q, k, v, cu_q, cu_k = make_qkv([3, 2], [4, 1], 2, 1, 4, seed=11, requires_grad=True)
    problem, inputs = attnhub.normalize(q, k, v, cu_q, cu_k, sinks=_sinks(2), **kw)
    sinks = _sinks(2, seed=12).double().requires_grad_(True)
    assert torch.autograd.gradcheck(
        lambda q, k, v, s: _ReferenceWithSinks.apply(q, k, v, s, problem,
                                                     inputs.cu_seqlens_q, inputs.cu_seqlens_k),
        (q, k, v, sinks))


@pytest.mark.parametrize("bad, message", [
    (torch.zeros(NHEADS, dtype=torch.float16), "dtype float32"),
    (torch.zeros(NHEADS_K), "shape (nheads,) = (4,)"),
    (torch.zeros(1, NHEADS), "shape (nheads,) = (4,)"),
    ([0.0] * NHEADS, "a float32 tensor"),
])
def test_invalid_sinks_name_the_argument(bad, message):
    q, k, v, cu_q, cu_k = make_qkv([3], [3], NHEADS, NHEADS_K, 8)
    with pytest.raises(attnhub.InvalidArgumentError, match="sinks") as info:
        attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, sinks=bad)
    assert message in str(info.value)


def test_backends_without_sinks_give_the_reason(install):
    plain = make_backend("plain", 10)
    fwd_only = make_backend("fwd-only", 5, sinks=True, sinks_backward=False)
    install(plain, fwd_only)
    q, k, v, cu_q, cu_k = make_qkv([3], [3], NHEADS, NHEADS_K, 8, dtype=torch.float32,
                                   requires_grad=True)
    expl = attnhub.explain(q, k, v, cu_q, cu_k, sinks=_sinks())
    reasons = {verdict.backend: verdict.reasons for verdict in expl}
    assert reasons["plain"] == ("attention sinks (sinks=) are not supported",)
    assert reasons["fwd-only"] == ("backward with attention sinks is not implemented",)
    assert expl.selected == "reference"
    with torch.no_grad():
        assert attnhub.explain(q, k, v, cu_q, cu_k, sinks=_sinks()).selected == "fwd-only"
    assert attnhub.explain(q.detach(), k.detach(), v.detach(), cu_q, cu_k).selected == "plain"
    assert plain.capabilities.summary()["sinks"] == "no"
    assert fwd_only.capabilities.summary()["sinks"] == "fwd"


def test_sinks_are_part_of_the_signature():
    q, k, v, cu_q, cu_k = make_qkv([3], [3], NHEADS, NHEADS_K, 8)
    problem, inputs = attnhub.normalize(q, k, v, cu_q, cu_k, sinks=_sinks())
    plain, _ = attnhub.normalize(q, k, v, cu_q, cu_k)
    assert problem.sinks and not plain.sinks and "sinks" in problem.features()
    assert problem.signature() != plain.signature()
    assert attnhub.VarlenProblem.from_signature(problem.signature()).sinks
    assert inputs.sinks.is_contiguous() and plain is not None


def test_sinks_requiring_grad_make_the_call_differentiable():
    q, k, v, cu_q, cu_k = make_qkv([4], [4], NHEADS, NHEADS_K, 8)
    sinks = _sinks(grad=True)
    problem, _ = attnhub.normalize(q, k, v, cu_q, cu_k, sinks=sinks)
    assert problem.requires_grad
    out = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, sinks=sinks)
    out.sum().backward()
    assert sinks.grad is not None and sinks.grad.shape == (NHEADS,)


def test_plan_with_sinks_matches_the_call():
    q, k, v, cu_q, cu_k = make_qkv(SEQ_Q, SEQ_K, NHEADS, NHEADS_K, 8, dtype=torch.float32,
                                   seed=13, requires_grad=True)
    plan = attnhub.plan(cu_q, cu_k, nheads=NHEADS, nheads_k=NHEADS_K, head_dim=8,
                        dtype=torch.float32, causal=True, sinks=True)
    sinks = _sinks(seed=14, grad=True)
    out, lse = plan.run(q, k, v, sinks=sinks, return_lse=True)
    want, want_lse = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, causal=True,
                                                      sinks=sinks, return_lse=True)
    torch.testing.assert_close(out, want, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    (got_ds,) = torch.autograd.grad(out.sum(), sinks)
    (want_ds,) = torch.autograd.grad(want.sum(), sinks)
    torch.testing.assert_close(got_ds, want_ds)
    with pytest.raises(attnhub.InvalidArgumentError, match="sinks"):
        plan.run(q, k, v)
    plain = attnhub.plan(cu_q, cu_k, nheads=NHEADS, nheads_k=NHEADS_K, head_dim=8,
                         dtype=torch.float32)
    with pytest.raises(attnhub.InvalidArgumentError, match="sinks"):
        plain.run(q, k, v, sinks=sinks)


def test_compiled_call_with_sinks_matches_eager():
    q, k, v, cu_q, cu_k = make_qkv([5, 3], [5, 6], NHEADS, NHEADS_K, 8, dtype=torch.float32,
                                   seed=15, requires_grad=True)
    cu_q, cu_k = (torch.tensor(c, dtype=torch.int32) for c in (cu_q, cu_k))
    sinks = _sinks(seed=16, grad=True)

    def fn(q, k, v, sinks):
        out, lse = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, 5, 6, causal=True,
                                                    sinks=sinks, return_lse=True)
        return out.sum() + lse.sum()

    compiled = torch.compile(fn, backend="eager", fullgraph=True)
    got = torch.autograd.grad(compiled(q, k, v, sinks), (q, k, v, sinks))
    want = torch.autograd.grad(fn(q, k, v, sinks), (q, k, v, sinks))
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w)
