"""Custom (per-request boolean) masks: packing, the reference backend against the naive
oracle, gradients, and the reasons of backends that do not take them."""

from __future__ import annotations

import pytest
import torch
from naive import assert_lse, assert_out, make_qkv, naive_attention

import attnhub
from attnhub import custom_mask as masks

SEQ_Q, SEQ_K = [5, 0, 7, 3], [6, 4, 7, 0]


def _random_masks(seqlens_q, seqlens_k, seed=0, density=0.6):
    gen = torch.Generator().manual_seed(seed)
    return [torch.rand(sq, sk, generator=gen) < density
            for sq, sk in zip(seqlens_q, seqlens_k, strict=True)]


def _flat(blocks):
    return torch.cat([m.reshape(-1) for m in blocks]) if blocks else torch.zeros(0, dtype=bool)


def test_pack_bits_is_little_bit_order():
    mask = torch.tensor([1, 0, 0, 0, 0, 0, 0, 0, 1, 1, 0, 1], dtype=torch.bool)
    assert masks.pack_bits(mask).tolist() == [1, 0b1011]


def test_from_segments_gives_byte_aligned_offsets():
    packed = torch.tensor([3, 255, 7], dtype=torch.uint8)
    indptr = torch.tensor([0, 1, 3], dtype=torch.int32)
    pm = masks.from_segments(packed, indptr)
    assert pm.offsets.tolist() == [0, 8]
    assert masks.read_block(pm.bits, 8, 4, range(0, 3), range(0, 4)).sum().item() == 11


@pytest.mark.parametrize("causal", [False, True])
def test_reference_matches_naive_with_custom_mask(causal):
    q, k, v, cu_q, cu_k = make_qkv(SEQ_Q, SEQ_K, 4, 2, 16, seed=1)
    blocks = _random_masks(SEQ_Q, SEQ_K, seed=2)
    out, lse = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, causal=causal,
                                                custom_mask=_flat(blocks), return_lse=True)
    want = naive_attention(q, k, v, cu_q, cu_k, causal=causal, custom_mask=blocks)
    assert_out(out, want.out)
    assert_lse(lse, want.lse)


def test_fully_masked_rows_give_zero_and_minus_inf():
    q, k, v, cu_q, cu_k = make_qkv([3], [4], 2, 2, 8, seed=3)
    block = torch.ones(3, 4, dtype=torch.bool)
    block[1] = False
    out, lse = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, custom_mask=block.reshape(-1),
                                                return_lse=True)
    assert torch.equal(out[1], torch.zeros_like(out[1]))
    assert torch.isneginf(lse[:, 1]).all() and torch.isfinite(lse[:, [0, 2]]).all()


def test_causal_as_custom_mask_equals_causal():
    q, k, v, cu_q, cu_k = make_qkv([4, 6], [7, 6], 2, 1, 8, seed=4)
    blocks = [torch.ones(sq, sk, dtype=torch.bool).tril(sk - sq) for sq, sk in ((4, 7), (6, 6))]
    got = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, custom_mask=_flat(blocks))
    want = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, causal=True)
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_packed_mask_with_segment_layout_matches_bool():
    q, k, v, cu_q, cu_k = make_qkv(SEQ_Q, SEQ_K, 2, 2, 8, seed=5)
    blocks = _random_masks(SEQ_Q, SEQ_K, seed=6)
    segments = [masks.pack_bits(m.reshape(-1)) for m in blocks]
    indptr = torch.tensor([0, *torch.tensor([len(s) for s in segments]).cumsum(0).tolist()])
    packed = masks.from_segments(torch.cat(segments), indptr)
    got = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, custom_mask=packed)
    want = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, custom_mask=_flat(blocks))
    torch.testing.assert_close(got, want, rtol=0, atol=0)


def test_gradients_through_custom_mask_match_naive():
    q, k, v, cu_q, cu_k = make_qkv(SEQ_Q, SEQ_K, 4, 2, 8, seed=7, requires_grad=True)
    blocks = _random_masks(SEQ_Q, SEQ_K, seed=8, density=0.8)
    out = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, custom_mask=_flat(blocks))
    weights = torch.randn(out.shape, dtype=out.dtype, generator=torch.Generator().manual_seed(9))
    grads = torch.autograd.grad((out * weights).sum(), (q, k, v))
    want = naive_attention(q, k, v, cu_q, cu_k, custom_mask=blocks).out
    want_grads = torch.autograd.grad((want * weights).sum(), (q, k, v))
    for g, w in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(g, w)


def test_wrong_mask_size_names_the_argument():
    q, k, v, cu_q, cu_k = make_qkv([2, 3], [2, 3], 2, 2, 8)
    with pytest.raises(attnhub.InvalidArgumentError, match=r"custom_mask.*13 elements"):
        attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k,
                                         custom_mask=torch.ones(12, dtype=torch.bool))


def test_custom_mask_is_a_static_feature_and_a_reason(install):
    from conftest import make_backend

    install(make_backend("plain", 10))
    q, k, v, cu_q, cu_k = make_qkv([2, 3], [2, 3], 2, 2, 8)
    mask = torch.ones(13, dtype=torch.bool)
    verdicts = {v_.backend: v_ for v_ in attnhub.explain(q, k, v, cu_q, cu_k, custom_mask=mask)}
    assert "custom masks (a per-request boolean mask) are not supported" in \
        verdicts["plain"].reasons
    assert verdicts["reference"].selected
    problem, _ = attnhub.normalize(q, k, v, cu_q, cu_k, custom_mask=mask)
    plain, _ = attnhub.normalize(q, k, v, cu_q, cu_k)
    assert problem.signature() != plain.signature() and "custom_mask" in problem.features()
    assert attnhub.VarlenProblem.from_signature(problem.signature()).custom_mask


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(6, 3))])
def test_triton_forward_reads_the_packed_mask(kw):
    """The Triton kernel (interpreted on the CPU) against the reference; tiles of 32 query
    rows and 16 keys, so the mask crosses tile edges and fully masked rows occur."""
    seqlens_q, seqlens_k = [37, 0, 20, 5], [40, 3, 20, 0]
    q, k, v, cu_q, cu_k = make_qkv(seqlens_q, seqlens_k, 2, 1, 16, dtype=torch.float32, seed=10)
    blocks = _random_masks(seqlens_q, seqlens_k, seed=11, density=0.5)
    blocks[0][3] = False  # a row that sees nothing
    mask = _flat(blocks)
    got = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, custom_mask=mask,
                                           backend="triton", return_lse=True, **kw)
    want = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, custom_mask=mask,
                                            backend="reference", return_lse=True, **kw)
    torch.testing.assert_close(got[0], want[0], rtol=2e-5, atol=2e-5)
    assert torch.equal(torch.isneginf(got[1]), torch.isneginf(want[1]))
    torch.testing.assert_close(got[1], want[1], rtol=2e-5, atol=2e-5)


@pytest.mark.parametrize("kw", [dict(), dict(causal=True)])
def test_triton_backward_reads_the_packed_mask(kw):
    """dq, dk, dv of the Triton kernels (interpreted on the CPU) against the reference, with
    a mask crossing tile edges, a row that sees nothing and GQA (2 query heads per kv head)."""
    seqlens_q, seqlens_k = [37, 0, 20], [40, 3, 20]
    q, k, v, cu_q, cu_k = make_qkv(seqlens_q, seqlens_k, 2, 1, 16, dtype=torch.float32,
                                   seed=12, requires_grad=True)
    blocks = _random_masks(seqlens_q, seqlens_k, seed=13, density=0.5)
    blocks[0][3] = False
    mask = _flat(blocks)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(14))
    grads = {}
    for backend in ("triton", "reference"):
        out = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, custom_mask=mask,
                                               backend=backend, **kw)
        grads[backend] = torch.autograd.grad(out, (q, k, v), dout)
    for got, want in zip(grads["triton"], grads["reference"], strict=True):
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)
