"""FlashAttention-Plus's FlashAttention / FlashMHA modules, and ATTNHUB_BACKEND routing them."""

from __future__ import annotations

import pytest
import torch
from naive import F64, assert_out, naive_attention, offsets, randn

from attnhub import InvalidArgumentError, UnknownBackendError
from attnhub.compat.flashattention_plus import FlashAttention, FlashMHA


def _manual_mha(m, x, lens, causal):
    """Projections by hand, attention by the naive oracle, sequence by sequence."""
    h, hk, d = m.num_heads, m.num_heads_kv, m.head_dim
    qkv = torch.nn.functional.linear(x, m.Wqkv.weight, m.Wqkv.bias)
    q, k, v = qkv[:, :h * d], qkv[:, h * d:(h + hk) * d], qkv[:, (h + hk) * d:]
    cu = offsets(lens)
    att = naive_attention(q.reshape(-1, h, d), k.reshape(-1, hk, d), v.reshape(-1, hk, d), cu, cu,
                          causal=causal).out
    return torch.nn.functional.linear(att.reshape(-1, h * d), m.out_proj.weight, m.out_proj.bias)


@pytest.mark.parametrize("causal", [False, True])
def test_flash_mha_batched_and_grads(causal):
    torch.manual_seed(0)
    m = FlashMHA(32, 4, causal=causal, dtype=torch.float64, num_heads_kv=2)
    x = randn((2, 6, 32), F64, torch.Generator().manual_seed(1), requires_grad=True)
    out = m(x)
    want = _manual_mha(m, x.reshape(12, 32), [6, 6], causal).view(2, 6, 32)
    assert_out(out, want)
    got = torch.autograd.grad(out.sum(), (x, m.Wqkv.weight, m.out_proj.weight))
    ref = torch.autograd.grad(want.sum(), (x, m.Wqkv.weight, m.out_proj.weight))
    for g, r in zip(got, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=1e-9, atol=1e-9)


def test_flash_mha_padding_mask_and_packed():
    torch.manual_seed(2)
    m = FlashMHA(16, 2, causal=True, dtype=torch.float64, device="cpu")
    x = randn((2, 5, 16), F64, torch.Generator().manual_seed(3))
    mask = torch.tensor([[1, 1, 1, 0, 0], [1, 1, 1, 1, 1]], dtype=torch.bool)
    out = m(x, key_padding_mask=mask)
    want = _manual_mha(m, x[mask], [3, 5], True)
    assert_out(out[mask], want)
    assert torch.allclose(out[0, 3:], m.out_proj.bias.expand(2, 16))  # zeros through out_proj
    packed = m(x[mask], cu_seqlens=torch.tensor([0, 3, 8], dtype=torch.int32), max_seqlen=5)
    assert_out(packed, want)


def test_dropout_only_in_training_and_reset_parameters():
    torch.manual_seed(4)
    m = FlashMHA(16, 2, dropout=0.5, dtype=torch.float64)
    x = randn((1, 7, 16), F64, torch.Generator().manual_seed(5))
    m.eval()
    assert torch.equal(m(x), m(x))
    torch.manual_seed(0)
    a = m.train()(x)
    assert not torch.allclose(a, m.eval()(x))
    w = m.Wqkv.weight.clone()
    m.reset_parameters()
    assert not torch.equal(w, m.Wqkv.weight)


def test_flash_attention_module_varlen_and_alibi():
    gen = torch.Generator().manual_seed(6)
    slopes = torch.tensor([0.5, 0.25], dtype=torch.float32)
    att = FlashAttention(2, 8, causal=True, window_size=(3, 0), alibi_slopes=slopes)
    q, k, v = (randn((9, 2, 8), F64, gen) for _ in range(3))
    out = att(q, k, v, [0, 4, 9], [0, 4, 9], 5, 5)
    want = naive_attention(q, k, v, [0, 4, 9], [0, 4, 9], causal=True, window_size=(3, 0),
                           alibi_slopes=slopes)
    assert_out(out, want.out)
    with pytest.raises(InvalidArgumentError) as e:
        att(q, k, v, [0, 4, 9])
    assert e.value.argument == "cu_seqlens_k"
    with pytest.raises(InvalidArgumentError) as e:
        att(q[:, :1], k, v)
    assert e.value.argument == "q"


def test_bad_construction():
    with pytest.raises(InvalidArgumentError):
        FlashMHA(30, 4)
    with pytest.raises(InvalidArgumentError):
        FlashMHA(32, 4, num_heads_kv=3)


def test_attnhub_backend_env_routes_module_calls(monkeypatch):
    m = FlashMHA(16, 2, dtype=torch.float64)
    x = torch.zeros(1, 3, 16, dtype=F64)
    monkeypatch.setenv("ATTNHUB_BACKEND", "no-such-backend")
    with pytest.raises(UnknownBackendError, match="ATTNHUB_BACKEND"):
        m(x)
    monkeypatch.setenv("ATTNHUB_BACKEND", "reference")
    assert m(x).shape == (1, 3, 16)
