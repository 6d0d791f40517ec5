"""Paged KV bounds: lengths beyond a block table's (or KV cache's) capacity raise CapacityError
(a ValueError and, as in flash_attn 2.8, a RuntimeError naming block_table) before any kernel
reads; the Triton kernels never read a block table past its row; any page size runs on Triton,
FlashInfer's strided (packed qkv) paged prefill included."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from naive import assert_lse, assert_out, make_paged, make_qkv, naive_attention

import attnhub
import attnhub.compat.flashinfer as flashinfer
import attnhub.flash_attn as fa
from attnhub import CapacityError, InvalidArgumentError
from attnhub.registry import get_registry


def _paged_problem(lk, page_size, max_pages, dtype=torch.float32, sq=1):
    q, _, _, cq, ck = make_qkv([sq] * len(lk), lk, 2, 1, 16, dtype=dtype, seed=31)
    kp, vp, table = make_paged(lk, page_size, 1, 16, dtype=dtype, seed=31)
    return q, kp, vp, cq, ck, table[:, :max_pages].contiguous()


def test_error_type_is_value_and_runtime_error():
    assert issubclass(CapacityError, InvalidArgumentError)
    assert issubclass(CapacityError, ValueError) and issubclass(CapacityError, RuntimeError)


def test_core_host_lengths_beyond_capacity():
    q, kp, vp, cq, ck, table = _paged_problem([5, 9], 4, 2)  # capacity 8 < 9
    with pytest.raises(RuntimeError, match="block_table") as exc:
        attnhub.attention_forward_varlen(q, kp, vp, cq, ck, block_table=table)
    assert isinstance(exc.value, CapacityError) and exc.value.argument == "cu_seqlens_k"


def test_core_declared_max_seqlen_k_beyond_capacity():
    """With host lengths a larger max_seqlen_k is an upper bound like any other."""
    q, kp, vp, cq, ck, table = _paged_problem([5, 7], 4, 2)
    out = attnhub.attention_forward_varlen(q, kp, vp, cq, ck, 1, 50, block_table=table,
                                           backend="triton")
    assert_out(out, naive_attention(q, kp, vp, cq, ck, block_table=table).out)


@pytest.mark.parametrize("append", [False, True])
def test_kvcache_paged_beyond_capacity_like_flash_attn(append):
    """flash_attn's test_flash_attn_kvcache_paged_block_table_bounds, on host lengths."""
    page, d = 16, 8
    kc = torch.randn(4, page, 1, d)
    vc = torch.randn(4, page, 1, d)
    table = torch.zeros(1, 1, dtype=torch.int32)
    q = torch.randn(1, 1, 1, d)
    knew = torch.randn(1, 1, 1, d) if append else None
    vnew = torch.randn(1, 1, 1, d) if append else None
    seqlens = torch.full((1,), page if append else page + 1, dtype=torch.int32)
    before = kc.clone()
    with pytest.raises(RuntimeError, match="block_table"):
        fa.flash_attn_with_kvcache(q, kc, vc, knew, vnew, cache_seqlens=seqlens,
                                   block_table=table)
    assert torch.equal(kc, before)  # nothing was written
    out = fa.flash_attn_with_kvcache(q, kc, vc, cache_seqlens=torch.full((1,), page),
                                     block_table=table)
    assert out.shape == (1, 1, 1, d) and not out.isnan().any()


def test_kvcache_contiguous_beyond_capacity():
    kc, vc = torch.randn(2, 6, 1, 8), torch.randn(2, 6, 1, 8)
    q, knew = torch.randn(2, 1, 1, 8), torch.randn(2, 2, 1, 8)
    with pytest.raises(CapacityError, match="seqlen_cache"):
        fa.flash_attn_with_kvcache(q, kc, vc, knew, knew, cache_seqlens=5)


@pytest.mark.parametrize("declared", [1, 4], ids=["max=capacity", "max>capacity"])
@pytest.mark.parametrize("sq", [1, 8], ids=["decode", "tiles"])
@pytest.mark.parametrize("lk", [[32], [20, 17]])
def test_triton_never_reads_past_the_block_table_row(lk, sq, declared):
    """Lengths beyond capacity that reach a kernel unchecked (device lengths under CUDA-graph
    capture): the Triton kernels clamp every block-table read to max_seqlen_k - 1, so the read
    stays in the row. The table is a (batch, 1) view of a (batch, 2) tensor whose hidden
    column points at a NaN page: reading past the row would make the output NaN."""
    page = 16
    q, kp, vp, cq, ck, table = _paged_problem([page] * len(lk), page, 2, sq=sq)
    nan_page = torch.full((1, *kp.shape[1:]), float("nan"))
    kp, vp = torch.cat([kp, nan_page]), torch.cat([vp, nan_page])
    table[:, 1] = kp.shape[0] - 1
    table = table[:, :1]
    problem, inputs = attnhub.normalize(q, kp, vp, cq, ck, sq, declared * page,
                                        block_table=table)
    assert inputs.block_table.stride(0) == 2  # the view itself reaches the kernel
    over = torch.tensor([0, *torch.tensor(lk).cumsum(0).tolist()], dtype=torch.int32)
    inputs = dataclasses.replace(inputs, cu_seqlens_k=over)
    res = get_registry().backends["triton"].forward(problem, inputs)
    assert torch.isfinite(res.out).all() and torch.isfinite(res.lse).all()


@pytest.mark.parametrize("page_size", [1, 3, 5])
def test_triton_any_page_size(page_size):
    lq, lk = [3, 0, 6, 1], [7, 4, 6, 11]
    q, _, _, cq, ck = make_qkv(lq, lk, 4, 2, 16, dtype=torch.float32, seed=32)
    kp, vp, table = make_paged(lk, page_size, 2, 16, dtype=torch.float32, seed=32)
    out, lse = attnhub.attention_forward_varlen(q, kp, vp, cq, ck, block_table=table,
                                                causal=True, return_lse=True,
                                                backend="triton")
    want = naive_attention(q, kp, vp, cq, ck, block_table=table, causal=True)
    assert_out(out, want.out)
    assert_lse(lse, want.lse)


@pytest.mark.parametrize("page_size", [1, 5])
def test_flashinfer_paged_prefill_strided_q_runs_on_triton(page_size):
    """FlashInfer's test_batch_paged_prefill_packed_input: q a strided slice of a packed qkv
    buffer; forced to Triton, so a fallback to the reference would raise."""
    batch, seq, hq, hk, d = 3, 7, 4, 2, 16
    per_req = -(-seq // page_size)
    gen = torch.Generator().manual_seed(33)
    k_cache = torch.randn(batch * per_req, page_size, hk, d, generator=gen)
    v_cache = torch.randn(batch * per_req, page_size, hk, d, generator=gen)
    qkv = torch.randn(batch * seq, (hq + 2 * hk) * d, generator=gen)
    q = qkv[:, :hq * d].view(-1, hq, d)
    assert not q.is_contiguous()
    wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(torch.empty(8, dtype=torch.uint8))
    i32 = torch.int32
    with attnhub.use_backend("triton"):
        wrapper.plan(torch.tensor([i * seq for i in range(batch + 1)], dtype=i32),
                     torch.tensor([i * per_req for i in range(batch + 1)], dtype=i32),
                     torch.arange(batch * per_req, dtype=i32),
                     torch.full((batch,), (seq - 1) % page_size + 1, dtype=i32),
                     hq, hk, d, page_size, causal=True, q_data_type=torch.float32)
        assert wrapper._plan.backend.name == "triton"
        packed = wrapper.run(q, (k_cache, v_cache))
        contiguous = wrapper.run(q.contiguous(), (k_cache, v_cache))
    torch.testing.assert_close(packed, contiguous, rtol=1e-5, atol=1e-5)


@pytest.mark.gpu
@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs CUDA")
@pytest.mark.parametrize("append", [False, True])
def test_kvcache_device_lengths_beyond_capacity_on_gpu(append):
    """Device cache_seqlens: paged -> CapacityError (one read-back, as flash_attn's .max());
    contiguous append beyond the cache -> no device assert; the CUDA context stays usable."""
    dev, page, d = "cuda", 256, 64
    kc = torch.randn(4, page, 1, d, device=dev, dtype=torch.float16)
    vc = torch.randn_like(kc)
    table = torch.zeros(1, 1, dtype=torch.int32, device=dev)
    q = torch.randn(1, 1, 1, d, device=dev, dtype=torch.float16)
    knew = torch.randn(1, 1, 1, d, device=dev, dtype=torch.float16) if append else None
    seqlens = torch.full((1,), page if append else page + 1, dtype=torch.int32, device=dev)
    with pytest.raises(RuntimeError, match="block_table"):
        fa.flash_attn_with_kvcache(q, kc, vc, knew, knew, cache_seqlens=seqlens,
                                   block_table=table)
    contiguous_k = torch.randn(1, 8, 1, d, device=dev, dtype=torch.float16)
    contiguous_v = torch.randn_like(contiguous_k)
    out = fa.flash_attn_with_kvcache(q, contiguous_k, contiguous_v, knew, knew,
                                     cache_seqlens=torch.full((1,), 8 + int(not append),
                                                              dtype=torch.int32, device=dev))
    torch.cuda.synchronize()
    assert out.shape == q.shape
    assert torch.ones(1, device=dev).item() == 1.0  # the context survived
