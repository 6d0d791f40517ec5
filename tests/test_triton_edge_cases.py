"""Triton kernels on edge inputs, on the CPU (TRITON_INTERPRET=1), against the float64 oracle:
softcap precision over the whole range of caps (fp32 and fp16), and batches where no sequence
has a key."""

from __future__ import annotations

import math

import pytest
import torch
from naive import naive_attention

import attnhub
from attnhub.backends.triton import configs

pytestmark = pytest.mark.skipif(not configs.interpreting(),
                                reason="CPU tensors reach the Triton kernels only in the "
                                       "interpreter (TRITON_INTERPRET=1)")


@pytest.mark.parametrize("cap", [30.0, 1e4, 1e6])
def test_softcap_fp32_accuracy_does_not_degrade_with_the_cap(cap):
    """s / cap is small for large caps, where 1 - 2 / (exp(2x) + 1) cancels: its absolute
    error, times the cap, reached 5.7e-2 at cap 1e6. fp32 must stay near the reference's."""
    gen = torch.Generator().manual_seed(0)
    cu = [0, 20, 29]
    q, k, v = (torch.randn(29, 2, 16, generator=gen, requires_grad=True) for _ in range(3))
    out = attnhub.attention_forward_varlen(q, k, v, cu, cu, softcap=cap, backend="triton")
    want = naive_attention(q, k, v, cu, cu, softcap=cap)
    assert (out.double() - want.out).abs().max().item() < 2e-6
    grad = torch.randn(out.shape, generator=gen)
    got = torch.autograd.grad(out, (q, k), grad)
    ref = torch.autograd.grad(want.out, (q, k), grad.double())
    for g, r in zip(got, ref, strict=True):
        assert (g.double() - r).abs().max().item() < 1e-5


@pytest.mark.parametrize("cap", [30.0, 256.0, 300.0, 1e4, 1e6])
def test_softcap_fp16_error_stays_at_the_references_own_with_any_cap(cap):
    """fp16 / bf16 inputs take softcap.tanh_half: below |x| = 0.1 (every score once the cap
    is large) its exp form alone cancels to an absolute error of ~1e-7, which the cap
    multiplies into the logit (0.1 at cap 1e6), so caps above softcap.SMALL_ARGUMENT_CAP
    (256: the largest cap without the branch, and 300: the smallest with it here) take its
    small-argument branch. Forward and gradients must stay at the error the reference
    itself makes in fp16."""
    gen = torch.Generator().manual_seed(0)
    cu = [0, 37, 101]
    q, k, v = (torch.randn(101, h, 32, generator=gen) for h in (2, 1, 1))
    q = (q * 3).half().requires_grad_()
    k, v = (t.half().requires_grad_() for t in (k, v))
    out = attnhub.attention_forward_varlen(q, k, v, cu, cu, causal=True, softcap=cap,
                                           backend="triton")
    half = attnhub.attention_forward_varlen(q, k, v, cu, cu, causal=True, softcap=cap,
                                            backend="reference")
    want = naive_attention(q, k, v, cu, cu, causal=True, softcap=cap)
    own = (half.double() - want.out).abs().max().item()
    assert (out.double() - want.out).abs().max().item() <= 1.5 * own
    grad = torch.randn(out.shape, generator=gen).half()
    got = torch.autograd.grad(out, (q, k, v), grad)
    ref = torch.autograd.grad(want.out, (q, k, v), grad.double())
    ref_half = torch.autograd.grad(half, (q, k, v), grad)
    for g, r, h in zip(got, ref, ref_half, strict=True):  # the conformance rule's bound
        own = (h.double() - r).abs().max().item()
        rounding = 2.0 ** -11 * r.abs().max().item()
        assert (g.double() - r).abs().max().item() <= 2 * own + 2 * rounding


@pytest.mark.parametrize("total_q", [5, 40])
def test_every_key_sequence_empty(total_q):
    """total_k = 0 with more than a block of queries: out 0 and lse -inf (the TMA descriptor
    of an empty K used to fail with 'shape must be positive')."""
    q = torch.randn(total_q, 2, 16)
    k = v = torch.randn(0, 1, 16)
    cu_q = [0, total_q // 2, total_q]
    out, lse = attnhub.attention_forward_varlen(q, k, v, cu_q, [0, 0, 0], return_lse=True,
                                                backend="triton")
    assert torch.equal(out, torch.zeros_like(q))
    assert lse.shape == (2, total_q) and bool((lse == -math.inf).all())


def test_paged_call_requiring_grad_runs_here_with_exact_gradients():
    """A paged call whose inputs require grad runs its forward on Triton (not the reference);
    its gradients come from the reference kernel's backward and match the oracle."""
    from naive import make_paged, make_qkv

    lk = [9, 20]
    q, _, _, cq, ck = make_qkv([3, 20], lk, 4, 2, 16, dtype=torch.float32, seed=7)
    kp, vp, table = make_paged(lk, 16, 2, 16, dtype=torch.float32, seed=7)
    for t in (q, kp, vp):
        t.requires_grad_(True)
    why = attnhub.explain(q, kp, vp, cq, ck, block_table=table, causal=True)
    assert next(v for v in why if v.backend == "triton").ok
    out = attnhub.attention_forward_varlen(q, kp, vp, cq, ck, block_table=table, causal=True,
                                           backend="triton")
    want = naive_attention(q, kp, vp, cq, ck, block_table=table, causal=True)
    torch.testing.assert_close(out.double(), want.out.detach(), rtol=1e-5, atol=1e-5)
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(1))
    got = torch.autograd.grad(out, (q, kp, vp), grad)
    ref = torch.autograd.grad(want.out, (q, kp, vp), grad.double())
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g.double(), r.double(), rtol=1e-4, atol=1e-4)
