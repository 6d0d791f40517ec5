"""Attention sinks in the Triton kernels, on the CPU (TRITON_INTERPRET=1), against the float64
oracle: the launchers (forward.forward, decode.forward, backward.backward) called with an
explicit sinks tensor. Semantics (docs/semantics.md): the sink joins every row's softmax
denominator and takes no value; lse includes it; a row that sees no key gets out 0 and
lse = the sink; dsinks[h] = sum_i exp(sinks[h] - lse_i) * (dlse_i - D_i)."""

from __future__ import annotations

import math
import types

import pytest
import torch
from naive import F64, alibi_slopes, make_paged, make_qkv, naive_attention

import attnhub
from attnhub.backends.triton import backward, configs, decode, forward

pytestmark = pytest.mark.skipif(not configs.interpreting(),
                                reason="CPU tensors reach the Triton kernels only in the "
                                       "interpreter (TRITON_INTERPRET=1)")

NHEADS, NHEADS_K, D = 4, 2, 16
# sequence 1 has no keys (every row empty), sequence 3 more queries than keys (bottom-right
# causal: its first rows see nothing), sequence 2 no queries
LQ, LK = [37, 5, 0, 12], [40, 0, 9, 3]


def oracle(q, k, v, cu_q, cu_k, sinks, **kw):
    """(out, lse) in float64 with the sinks joined (tests/naive.py). Differentiable."""
    r = naive_attention(q, k, v, cu_q, cu_k, sinks=sinks, **kw)
    return r.out, r.lse


def make_sinks(seed: int = 0, nheads: int = NHEADS) -> torch.Tensor:
    """float32 (nheads,): moderate logits, and one far above any score (the sink takes
    nearly all the mass: no overflow) and one far below (no effect)."""
    s = torch.randn(nheads, generator=torch.Generator().manual_seed(seed + 5)) * 2
    s[0], s[-1] = 40.0, -40.0
    return s.to(torch.float32).requires_grad_(True)


def case(lq, lk, dtype=torch.float32, seed=0, paged=False, **kw) -> types.SimpleNamespace:
    """Random q, k, v (page pools when ``paged``), the call's problem and inputs, and the
    oracle's arguments (``args``: q, k, v, cu_q, cu_k; ``kw``: the features, top_left)."""
    q, k, v, cu_q, cu_k = make_qkv(lq, lk, NHEADS, NHEADS_K, D, dtype=dtype, seed=seed)
    if paged:
        k, v, kw["block_table"] = make_paged(lk, 16, NHEADS_K, D, dtype=dtype, seed=seed)
    problem, inputs = attnhub.normalize(q, k, v, cu_q, cu_k, **kw)
    oracle_kw = dict(kw)
    oracle_kw["top_left"] = oracle_kw.pop("mask_alignment", None) == "top_left"
    return types.SimpleNamespace(q=q, args=(q, k, v, cu_q, cu_k), kw=oracle_kw,
                                 problem=problem, inputs=inputs)


def check_forward(out, lse, want_out, want_lse, dtype) -> None:
    tol = 2e-5 if dtype == torch.float32 else 2e-3
    torch.testing.assert_close(out.double(), want_out, rtol=tol, atol=tol)
    assert lse.dtype == torch.float32 and torch.isfinite(lse).all()  # every row has its sink
    torch.testing.assert_close(lse.double(), want_lse, rtol=1e-5, atol=1e-5)


FEATURES = {
    "plain": {},
    "causal": {"causal": True},
    "window-top-left": {"window_size": (6, 2), "mask_alignment": "top_left"},
    "softcap": {"softcap": 3.0, "causal": True},
    "alibi": {"alibi_slopes": "head", "window_size": (8, 0)},
}


def features(name: str) -> dict:
    kw = dict(FEATURES[name])
    if kw.get("alibi_slopes") == "head":
        kw["alibi_slopes"] = alibi_slopes(NHEADS)
    return kw


@pytest.mark.parametrize("feature", sorted(FEATURES))
def test_forward_with_sinks_matches_oracle(feature):
    c = case(LQ, LK, **features(feature))
    sinks = make_sinks().detach()
    out, lse = forward.forward(c.problem, c.inputs, None, sinks=sinks)
    check_forward(out, lse, *oracle(*c.args, sinks, **c.kw), torch.float32)
    # rows that see no key: out 0, lse = the sink of their head
    empty = torch.isneginf(naive_attention(*c.args, **c.kw).lse)
    assert empty.any()
    assert (out.transpose(0, 1)[empty] == 0).all()
    torch.testing.assert_close(lse[empty], sinks[:, None].expand_as(lse)[empty])


def test_forward_with_sinks_fp16_and_paged():
    c = case(LQ, LK, dtype=torch.float16, seed=3, paged=True, causal=True)
    assert not decode.eligible(c.problem)  # the tiled kernel's paged path
    sinks = make_sinks(3).detach()
    out, lse = forward.forward(c.problem, c.inputs, None, sinks=sinks)
    check_forward(out, lse, *oracle(*c.args, sinks, **c.kw), torch.float16)


@pytest.mark.parametrize("paged", [False, True])
def test_decode_with_sinks_matches_oracle(paged):
    c = case([1, 3, 0, 2], [40, 0, 37, 19], seed=4, paged=paged, window_size=(5, 0))
    assert decode.eligible(c.problem)
    sinks = make_sinks(4).detach()
    out, lse = decode.forward(c.problem, c.inputs, sinks=sinks)
    check_forward(out, lse, *oracle(*c.args, sinks, **c.kw), torch.float32)
    assert (out[1:4] == 0).all()  # sequence 1: no keys
    torch.testing.assert_close(lse[:, 1:4], sinks[:, None].expand(-1, 3))


def test_minus_inf_sink_changes_nothing():
    """A -inf sink is no sink: the same out, and lse -inf on rows that see no key."""
    c = case(LQ, LK, causal=True)
    sinks = torch.full((NHEADS,), -math.inf)
    out, lse = forward.forward(c.problem, c.inputs, None, sinks=sinks)
    ref_out, ref_lse = forward.forward(c.problem, c.inputs, None)
    assert torch.equal(out, ref_out) and torch.equal(lse, ref_lse)
    assert torch.isneginf(lse).any()
    dout = torch.randn(out.shape, generator=torch.Generator().manual_seed(2))
    grads = backward.backward(c.problem, c.inputs, out, lse, dout, None, None, sinks=sinks)
    assert torch.equal(grads[3], torch.zeros(NHEADS))


def run_backward(feature_kw, dtype=torch.float32, use_dlse=True, seed=5):
    """Triton's (dq, dk, dv, dsinks) and the oracle's, for a loss <out, dout> + <lse, dlse>."""
    c = case(LQ, LK, dtype=dtype, seed=seed, **feature_kw)
    sinks = make_sinks(seed)
    gen = torch.Generator().manual_seed(seed + 9)
    dout = torch.randn(c.q.shape, generator=gen).to(dtype)
    dlse = torch.randn(NHEADS, c.q.shape[0], generator=gen) if use_dlse else None
    out, lse = forward.forward(c.problem, c.inputs, None, sinks=sinks.detach())
    got = backward.backward(c.problem, c.inputs, out, lse, dout, dlse, None,
                            sinks=sinks.detach())
    ref_in = [t.detach().to(F64).requires_grad_(True) for t in (*c.args[:3], sinks)]
    want_out, want_lse = oracle(*ref_in[:3], *c.args[3:], ref_in[3], **c.kw)
    loss = (want_out * dout.to(F64)).sum()
    if dlse is not None:
        loss = loss + (want_lse * dlse.to(F64)).sum()
    return got, torch.autograd.grad(loss, ref_in)


@pytest.mark.parametrize("feature", ["causal", "softcap",
                                     pytest.param("window-top-left", marks=pytest.mark.slow),
                                     pytest.param("alibi", marks=pytest.mark.slow)])
def test_backward_with_sinks_matches_oracle(feature):
    got, want = run_backward(features(feature))
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got, want, strict=True):
        assert g.dtype == torch.float32 and g.shape == w.shape, name
        torch.testing.assert_close(g.double(), w, rtol=1e-4, atol=1e-4, msg=name)


@pytest.mark.slow
@pytest.mark.parametrize("use_dlse", [False, True])
def test_backward_with_sinks_fp16(use_dlse):
    got, want = run_backward({"causal": True}, dtype=torch.float16, use_dlse=use_dlse)
    for name, g, w in zip(("dq", "dk", "dv", "dsinks"), got, want, strict=True):
        torch.testing.assert_close(g.double(), w, rtol=1e-2, atol=1e-2, msg=name)


def test_dsinks_of_a_batch_without_queries_is_zero():
    c = case([0, 0], [3, 0])
    sinks = make_sinks().detach()
    out, lse = forward.forward(c.problem, c.inputs, None, sinks=sinks)
    grads = backward.backward(c.problem, c.inputs, out, lse, torch.zeros_like(out), None,
                              None, sinks=sinks)
    assert torch.equal(grads[3], torch.zeros(NHEADS))


# -- end to end: attnhub's public API with backend="triton" against backend="reference" ------

def public_call(backend, q, k, v, cu_q, cu_k, sinks, **kw):
    return attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, return_lse=True,
                                            backend=backend, sinks=sinks, **kw)


@pytest.mark.parametrize("kw", [{"causal": True}, {"window_size": (6, 2), "softcap": 3.0},
                                {"paged": True, "causal": True}],
                         ids=["causal", "window-softcap", "paged"])
def test_public_api_with_sinks_matches_reference(kw):
    """Forward (out, lse) and gradients (dq, dk, dv, dsinks through autograd, with lse in the
    loss) of backend="triton" against backend="reference"; paged gradients come from the
    reference kernel's backward, dsinks included."""
    kw = dict(kw)
    c = case(LQ, LK, seed=6, paged=kw.pop("paged", False), **kw)
    q, k, v, cu_q, cu_k = (t.detach().requires_grad_(True) if isinstance(t, torch.Tensor)
                           else t for t in c.args)
    if "block_table" in c.kw:
        kw["block_table"] = c.kw["block_table"]
    sinks = make_sinks(6)
    gen = torch.Generator().manual_seed(7)
    dout = torch.randn(q.shape, generator=gen)
    dlse = torch.randn(NHEADS, q.shape[0], generator=gen)
    results = {}
    for backend in ("triton", "reference"):
        out, lse = public_call(backend, q, k, v, cu_q, cu_k, sinks, **kw)
        grads = torch.autograd.grad((out * dout).sum() + (lse * dlse).sum(), (q, k, v, sinks))
        results[backend] = (out, lse, *grads)
    names = ("out", "lse", "dq", "dk", "dv", "dsinks")
    for name, got, want in zip(names, results["triton"], results["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4, msg=name)


def test_public_api_decode_with_sinks_and_plan():
    """The split-KV decode path and a plan (attnhub.plan(..., sinks=True), run with the
    sinks) give the reference's out and lse."""
    c = case([1, 3, 0, 2], [40, 0, 37, 19], seed=8, causal=True)
    q, k, v, cu_q, cu_k = c.args
    assert decode.eligible(c.problem)
    sinks = make_sinks(8).detach()
    got = public_call("triton", q, k, v, cu_q, cu_k, sinks, causal=True)
    want = public_call("reference", q, k, v, cu_q, cu_k, sinks, causal=True)
    for g, w in zip(got, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)
    plan = attnhub.plan(cu_q, cu_k, nheads=NHEADS, nheads_k=NHEADS_K, head_dim=D,
                        dtype=q.dtype, device="cpu", causal=True, backend="triton", sinks=True)
    planned = plan.run(q, k, v, sinks=sinks, return_lse=True)
    for g, w in zip(planned, want, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-5, atol=1e-5)


def test_triton_claims_sinks():
    from attnhub.backends.triton.backend import TritonBackend

    caps = TritonBackend.capabilities
    assert caps.sinks and caps.sinks_backward
