"""attnhub.compat.paddle.flash_attn_varlen_qkvpacked against the naive oracle."""

from __future__ import annotations

import pytest
import torch
from naive import F64, assert_out, naive_attention, offsets, randn

from attnhub import InvalidArgumentError
from attnhub.compat.paddle import flash_attn_varlen_qkvpacked


def _split(qkv):
    g = qkv.shape[1] - 2
    return qkv[:, :g].reshape(qkv.shape[0], -1, qkv.shape[3]), qkv[:, g], qkv[:, g + 1]


def test_paddle_documentation_example():
    torch.manual_seed(2023)
    q = torch.rand((2, 128, 8, 16), dtype=torch.float16)
    cu = torch.arange(0, 384, 128, dtype=torch.int32)
    qq = q.reshape(256, 8, 16)
    qkv = torch.stack([qq, qq, qq], dim=2)  # (256, 8, 3, 16): G = 6, nheads_k = 3
    out, softmax = flash_attn_varlen_qkvpacked(qkv, cu, cu, 128, 128, 0.25, 0.0, False, False)
    assert softmax is None and out.shape == (256, 18, 16) and out.dtype == torch.float16
    want = naive_attention(*_split(qkv), cu, cu, softmax_scale=0.25)
    assert_out(out, want.out, torch.float16)


def test_head_mapping_gqa_and_grads_packed():
    gen = torch.Generator().manual_seed(1)
    lens = [4, 0, 7, 2]
    qkv = randn((sum(lens), 4, 3, 8), F64, gen, requires_grad=True)  # G = 2, nheads_k = 3
    cu = torch.tensor(offsets(lens), dtype=torch.int32)
    out, _ = flash_attn_varlen_qkvpacked(qkv, cu, cu, 7, 7, 0.3, causal=True,
                                         varlen_padded=False)
    q, k, v = _split(qkv)
    want = naive_attention(q, k, v, cu, cu, softmax_scale=0.3, causal=True)
    assert out.shape == (sum(lens), 6, 8)
    assert_out(out, want.out)
    w = randn(out.shape, F64, gen)
    (g,) = torch.autograd.grad((out * w).sum(), qkv)
    (rg,) = torch.autograd.grad((want.out * w).sum(), qkv)
    torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9)


def test_top_left_causal_when_lengths_differ():
    gen = torch.Generator().manual_seed(2)
    lq, lk = [3, 6], [6, 3]
    qkv = randn((9, 3, 2, 8), F64, gen)
    cq, ck = offsets(lq), offsets(lk)
    out, probs = flash_attn_varlen_qkvpacked(qkv, torch.tensor(cq), torch.tensor(ck), 6, 6, 0.5,
                                             causal=True, return_softmax=True,
                                             varlen_padded=False)
    want = naive_attention(*_split(qkv), cq, ck, softmax_scale=0.5, causal=True, top_left=True)
    assert_out(out, want.out)
    torch.testing.assert_close(probs, want.probs, rtol=1e-6, atol=1e-7)  # fp32 probs
    bottom_right = naive_attention(*_split(qkv), cq, ck, softmax_scale=0.5, causal=True)
    assert (out - bottom_right.out).abs().max() > 1e-3


def test_varlen_padded_rows_and_softmax():
    gen = torch.Generator().manual_seed(3)
    lens, max_len = [5, 8, 0], 8
    qkv = randn((3 * max_len, 3, 2, 8), F64, gen, requires_grad=True)
    cu = torch.tensor(offsets(lens), dtype=torch.int32)
    out, probs = flash_attn_varlen_qkvpacked(qkv, cu, cu, max_len, max_len, 0.4, causal=True,
                                             return_softmax=True)
    assert out.shape == (24, 2, 8) and probs.shape == (3, 2, 8, 8) and probs.dtype == F64
    rows = torch.cat([torch.arange(b * max_len, b * max_len + n) for b, n in enumerate(lens)])
    want = naive_attention(*_split(qkv[rows]), cu, cu, softmax_scale=0.4, causal=True)
    assert_out(out[rows], want.out)
    padding = torch.ones(24, dtype=torch.bool)
    padding[rows] = False
    assert torch.equal(out[padding], torch.zeros_like(out[padding]))
    torch.testing.assert_close(probs, want.probs, rtol=1e-6, atol=1e-7)  # fp32 probs
    (g,) = torch.autograd.grad(out.sum(), qkv)
    assert g[padding].abs().sum() == 0 and g[rows].abs().sum() > 0


def test_dropout_training_and_fixed_seed_offset():
    gen = torch.Generator().manual_seed(4)
    qkv = randn((16, 3, 2, 8), torch.float32, gen)
    cu = torch.tensor([0, 9, 16], dtype=torch.int32)
    args = (qkv, cu, cu, 9, 9, 0.35, 0.5)
    plain, _ = flash_attn_varlen_qkvpacked(*args[:6], varlen_padded=False)
    off, _ = flash_attn_varlen_qkvpacked(*args, varlen_padded=False, training=False)
    assert torch.equal(off, plain)
    seed = torch.tensor([7, 3], dtype=torch.int64)
    state = torch.get_rng_state()
    a, _ = flash_attn_varlen_qkvpacked(*args, fixed_seed_offset=seed, varlen_padded=False)
    assert torch.equal(torch.get_rng_state(), state)  # the caller's generator is untouched
    torch.manual_seed(99)
    b, _ = flash_attn_varlen_qkvpacked(*args, fixed_seed_offset=seed.clone(), varlen_padded=False)
    c, _ = flash_attn_varlen_qkvpacked(*args, fixed_seed_offset=torch.tensor([7, 4]),
                                       varlen_padded=False)
    assert torch.equal(a, b) and not torch.equal(a, c) and not torch.equal(a, plain)


@pytest.mark.parametrize("kwargs,arg", [
    ({"rng_name": "local_seed"}, "rng_name"),
    ({"fixed_seed_offset": torch.tensor([1, 2], dtype=torch.int32)}, "fixed_seed_offset"),
    ({"qkv": torch.zeros(16, 2, 2, 8)}, "qkv"),
    ({"qkv": torch.zeros(15, 3, 2, 8)}, "qkv"),
    ({"cu_seqlens_q": torch.tensor([0, 9, 10], dtype=torch.int32)}, "cu_seqlens_q"),
    ({"cu_seqlens_k": torch.tensor([0, 8], dtype=torch.int32)}, "cu_seqlens_k"),
    ({"training": "yes"}, "training"),  # 0 / 1 are bool-like (attnhub.arguments)
])
def test_bad_input(kwargs, arg):
    call = {"qkv": torch.zeros(16, 3, 2, 8), "cu_seqlens_q": torch.tensor([0, 8, 10]),
            "cu_seqlens_k": torch.tensor([0, 8, 10]), "max_seqlen_q": 8, "max_seqlen_k": 8,
            "scale": 0.5, "dropout": 0.1}
    call.update(kwargs)
    with pytest.raises(InvalidArgumentError) as e:
        flash_attn_varlen_qkvpacked(**call)
    assert e.value.argument == arg
