"""Triton forward for head dims 257-512 (FlashInfer's head_dim 512 prefill tests): interpreter
checks against the naive oracle here, the fp16 / bf16 kernels on a GPU (marker gpu); the
backward declines them with a reason."""

from __future__ import annotations

import pytest
import torch
from naive import assert_lse, assert_out, make_paged, make_qkv, naive_attention

import attnhub


@pytest.mark.parametrize("d", [320, 512])
def test_forward_matches_the_oracle(d):
    q, k, v, cq, ck = make_qkv([5, 0, 40], [33, 4, 40], 2, 1, d, dtype=torch.float32, seed=41)
    out, lse = attnhub.attention_forward_varlen(q, k, v, cq, ck, causal=True, return_lse=True,
                                                backend="triton")
    want = naive_attention(q, k, v, cq, ck, causal=True)
    assert_out(out, want.out)
    assert_lse(lse, want.lse)


def test_paged_forward_and_backward_declined():
    lk = [9, 20]
    q, _, _, cq, ck = make_qkv([3, 20], lk, 2, 2, 512, dtype=torch.float32, seed=42)
    kp, vp, table = make_paged(lk, 5, 2, 512, dtype=torch.float32, seed=42)
    out = attnhub.attention_forward_varlen(q, kp, vp, cq, ck, block_table=table,
                                           backend="triton")
    assert_out(out, naive_attention(q, kp, vp, cq, ck, block_table=table).out)
    q.requires_grad_(True)
    why = attnhub.explain(q, kp, vp, cq, ck, block_table=table)
    triton = next(v for v in why if v.backend == "triton")
    assert any("head_dim 512 > 256" in r for r in triton.reasons)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
def test_head_dim_512_on_gpu(dtype):
    q, k, v, cq, ck = make_qkv([1, 77, 300], [500, 77, 300], 4, 2, 512, dtype=dtype, seed=43)
    q, k, v = q.cuda(), k.cuda(), v.cuda()
    out, lse = attnhub.attention_forward_varlen(q, k, v, cq, ck, causal=True, return_lse=True,
                                                backend="triton")
    ref, ref_lse = attnhub.attention_forward_varlen(q, k, v, cq, ck, causal=True,
                                                    return_lse=True, backend="reference")
    torch.testing.assert_close(out.float(), ref.float(), rtol=2e-2, atol=2e-2)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-3, atol=1e-3)
