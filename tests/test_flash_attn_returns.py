"""flash_attn 2.8's return_attn_probs conventions (flash_attn_interface.py): without dropout the
call stays on the kernel and S_dmask is an empty tensor of q's dtype; with dropout S_dmask is
(batch, nheads, round128(seqlen_q), round128(seqlen_k)) in q's dtype, dropped entries negated;
softmax_lse float32 (nheads, total_q) varlen, (batch, nheads, seqlen_q) fixed-length."""

from __future__ import annotations

import pytest
import torch
from naive import F64, assert_lse, assert_out, make_qkv, naive_attention

import attnhub
import attnhub.flash_attn as fa

LQ, LK = [5, 0, 7, 3], [6, 2, 7, 9]


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16])
def test_varlen_probs_without_dropout_stay_on_the_kernel(dtype):
    """Forced to the Triton backend (which cannot return probabilities): the call must run
    there, so the surface asked only for lse."""
    q, k, v, cq, ck = make_qkv(LQ, LK, 4, 2, 16, dtype=dtype, seed=21)
    with attnhub.use_backend("triton"):
        out, lse, s_dmask = fa.flash_attn_varlen_func(q, k, v, cq, ck, max(LQ), max(LK),
                                                      causal=True, return_attn_probs=True)
    want = naive_attention(q, k, v, cq, ck, causal=True)
    assert_out(out, want.out)
    assert lse.dtype == torch.float32 and lse.shape == (4, sum(LQ))
    assert_lse(lse, want.lse)
    assert s_dmask.shape == (0,) and s_dmask.dtype == dtype and s_dmask.device == q.device


def test_fixed_length_probs_without_dropout_stay_on_the_kernel():
    gen = torch.Generator().manual_seed(22)
    q, k, v = (torch.randn(2, 9, 2, 16, generator=gen) for _ in range(3))
    with attnhub.use_backend("triton"):
        out, lse, s_dmask = fa.flash_attn_func(q, k, v, causal=True, return_attn_probs=True)
        qkv = torch.stack([q, k, v], dim=2)
        res = fa.flash_attn_qkvpacked_func(qkv, causal=True, return_attn_probs=True)
    assert lse.shape == (2, 2, 9) and lse.dtype == torch.float32
    assert s_dmask.shape == (0,) and s_dmask.dtype == q.dtype
    assert torch.equal(res[0], out) and torch.equal(res[1], lse) and res[2].shape == (0,)


def test_probs_with_dropout_flash_attn_layout():
    q, k, v, cq, ck = make_qkv(LQ, LK, 4, 2, 8, dtype=torch.float32, seed=23)
    torch.manual_seed(5)
    out, lse, s = fa.flash_attn_varlen_func(q, k, v, cq, ck, max(LQ), max(LK), 0.3,
                                            return_attn_probs=True)
    assert s.shape == (len(LQ), 4, 128, 128) and s.dtype == torch.float32
    core = s[:, :, :max(LQ), :max(LK)]
    assert not s.sum(dim=(0, 1))[max(LQ):].any() and not s[..., max(LK):].any()
    want = naive_attention(q, k, v, cq, ck, keep=~(core < 0), dropout_p=0.3)
    assert_out(out, want.out)
    assert_lse(lse, want.lse)
    # flash_attn's unnormalized exp(s - m), m the row maximum (one key block)
    row_max = want.probs.amax(-1, keepdim=True).clamp_min(1e-300)
    torch.testing.assert_close(core.abs().to(F64), want.probs / row_max, rtol=1e-5, atol=1e-6)
    assert ((core.abs().amax(-1) == 1) | (core.abs().amax(-1) == 0)).all()
    # fixed length: rounded per axis, q's dtype
    gen = torch.Generator().manual_seed(24)
    qb, kb, vb = (torch.randn(2, 130, 2, 8, generator=gen, dtype=torch.float64)
                  for _ in range(3))
    _, lse_b, s_b = fa.flash_attn_func(qb, kb[:, :3], vb[:, :3], 0.2, return_attn_probs=True)
    assert s_b.shape == (2, 2, 256, 128) and s_b.dtype == torch.float64
    assert lse_b.shape == (2, 2, 130)


def test_return_attn_probs_false_returns_a_tensor():
    q, k, v, cq, ck = make_qkv(LQ, LK, 4, 2, 8, seed=25)
    out = fa.flash_attn_varlen_func(q, k, v, cq, ck, max(LQ), max(LK), return_attn_probs=0)
    assert isinstance(out, torch.Tensor)
