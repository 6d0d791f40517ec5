"""Unit tests of the example backend. The conformance suite is not here: attnhub's pytest
plugin adds it from the command line, `pytest --attnhub-backend example-sdpa`."""

from __future__ import annotations

import torch

import attnhub

LENGTHS_Q = (5, 0, 3, 4)
LENGTHS_K = (4, 2, 0, 6)  # an empty query sequence, and a sequence with no keys at all


def _inputs(dtype=torch.float32):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(sum(LENGTHS_Q), 4, 32, generator=gen, dtype=dtype)
    k = torch.randn(sum(LENGTHS_K), 2, 32, generator=gen, dtype=dtype)
    v = torch.randn(sum(LENGTHS_K), 2, 32, generator=gen, dtype=dtype)
    return q, k, v


def _call(backend, q, k, v, **kw):
    return attnhub.attention_forward_varlen(
        q, k, v, cu_seqlens_q=[0, 5, 5, 8, 12], cu_seqlens_k=[0, 4, 6, 6, 12],
        return_lse=True, backend=backend, **kw)


def test_registered_through_the_entry_point():
    registry = attnhub.get_registry()
    assert "example-sdpa" in registry.names()
    assert "attnhub_example_backend.plugin" in registry.origins["example-sdpa"]


def test_forward_and_backward_match_the_reference():
    # causal with sq > sk: the first query row of sequence 0 sees no key (out 0, lse -inf).
    q, k, v = (t.requires_grad_() for t in _inputs(torch.float64))
    dout = torch.randn_like(q)
    results = {}
    for backend in ("example-sdpa", "reference"):
        out, lse = _call(backend, q, k, v, causal=True)
        results[backend] = (out, lse, *torch.autograd.grad(out, (q, k, v), dout))
    out, lse = results["example-sdpa"][:2]
    assert torch.equal(out[0], torch.zeros_like(out[0])) and torch.isneginf(lse[:, 0]).all()
    assert torch.isneginf(lse[:, 5:8]).all()  # the sequence with no keys
    for got, want in zip(results["example-sdpa"], results["reference"], strict=True):
        torch.testing.assert_close(got, want)


def test_declines_what_it_does_not_compute():
    q, k, v = _inputs()
    explanation = attnhub.explain(q, k, v, cu_seqlens_q=[0, 5, 5, 8, 12],
                                  cu_seqlens_k=[0, 4, 6, 6, 12], softcap=30.0)
    text = str(explanation)
    assert "example-sdpa" in text and "softcap (30.0) is not supported" in text
