"""FlashInfer's documentation examples for its two batch prefill wrappers (docs.flashinfer.ai,
flashinfer.prefill.BatchPrefillWithPagedKVCacheWrapper / BatchPrefillWithRaggedKVCacheWrapper),
run on attnhub: only the import line differs, and the device and the number of layers are
parameters (the tests run them on the CPU with 2 layers, tests/test_flashinfer_gpu.py on a
GPU with the documented 32).

Each returns the largest difference between the causal outputs and the outputs of the
equivalent custom mask (the documentation asserts allclose with rtol = atol = 1e-3).
"""

from __future__ import annotations

import torch

import attnhub.compat.flashinfer as flashinfer


def paged_example(device: str = "cuda:0", num_layers: int = 32) -> float:
    num_qo_heads = 64
    num_kv_heads = 16
    head_dim = 128
    max_num_pages = 128
    page_size = 16
    # allocate 128MB workspace buffer
    workspace_buffer = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device=device)
    prefill_wrapper = flashinfer.BatchPrefillWithPagedKVCacheWrapper(workspace_buffer, "NHD")
    batch_size = 7
    nnz_qo = 100
    qo_indptr = torch.tensor([0, 33, 44, 55, 66, 77, 88, nnz_qo], dtype=torch.int32,
                             device=device)
    paged_kv_indices = torch.arange(max_num_pages).int().to(device)
    paged_kv_indptr = torch.tensor([0, 17, 29, 44, 48, 66, 100, 128], dtype=torch.int32,
                                   device=device)
    # 1 <= paged_kv_last_page_len <= page_size
    paged_kv_last_page_len = torch.tensor([1, 7, 14, 4, 3, 1, 16], dtype=torch.int32,
                                          device=device)
    q_at_layer = torch.randn(num_layers, nnz_qo, num_qo_heads, head_dim).half().to(device)
    kv_cache_at_layer = torch.randn(num_layers, max_num_pages, 2, page_size, num_kv_heads,
                                    head_dim, dtype=torch.float16, device=device)
    # create auxiliary data structures for batch prefill attention
    prefill_wrapper.plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
                         num_qo_heads, num_kv_heads, head_dim, page_size, causal=True)
    outputs = []
    for i in range(num_layers):
        q = q_at_layer[i]
        kv_cache = kv_cache_at_layer[i]
        # compute batch prefill attention, reuse auxiliary data structures
        o = prefill_wrapper.run(q, kv_cache)
        outputs.append(o)
    assert outputs[0].shape == torch.Size([100, 64, 128])

    # below is another example of creating custom mask for batch prefill attention
    mask_arr = []
    qo_len = (qo_indptr[1:] - qo_indptr[:-1]).cpu().tolist()
    kv_len = (page_size * (paged_kv_indptr[1:] - paged_kv_indptr[:-1] - 1)
              + paged_kv_last_page_len).cpu().tolist()
    for i in range(batch_size):
        mask_i = torch.tril(torch.full((qo_len[i], kv_len[i]), True, device=device),
                            diagonal=(kv_len[i] - qo_len[i]))
        mask_arr.append(mask_i.flatten())
    mask = torch.cat(mask_arr, dim=0)
    prefill_wrapper.plan(qo_indptr, paged_kv_indptr, paged_kv_indices, paged_kv_last_page_len,
                         num_qo_heads, num_kv_heads, head_dim, page_size, custom_mask=mask)
    worst = 0.0
    for i in range(num_layers):
        q = q_at_layer[i]
        kv_cache = kv_cache_at_layer[i]
        # compute batch prefill attention, reuse auxiliary data structures
        o_custom = prefill_wrapper.run(q, kv_cache)
        assert torch.allclose(o_custom, outputs[i], rtol=1e-3, atol=1e-3)
        worst = max(worst, (o_custom.float() - outputs[i].float()).abs().max().item())
    return worst


def ragged_example(device: str = "cuda:0", num_layers: int = 32) -> float:
    num_qo_heads = 64
    num_kv_heads = 16
    head_dim = 128
    # allocate 128MB workspace buffer
    workspace_buffer = torch.zeros(128 * 1024 * 1024, dtype=torch.uint8, device=device)
    prefill_wrapper = flashinfer.BatchPrefillWithRaggedKVCacheWrapper(workspace_buffer, "NHD")
    batch_size = 7
    nnz_kv = 100
    nnz_qo = 100
    qo_indptr = torch.tensor([0, 33, 44, 55, 66, 77, 88, nnz_qo], dtype=torch.int32,
                             device=device)
    kv_indptr = qo_indptr.clone()
    q_at_layer = torch.randn(num_layers, nnz_qo, num_qo_heads, head_dim).half().to(device)
    k_at_layer = torch.randn(num_layers, nnz_kv, num_kv_heads, head_dim).half().to(device)
    v_at_layer = torch.randn(num_layers, nnz_kv, num_kv_heads, head_dim).half().to(device)
    # create auxiliary data structures for batch prefill attention
    prefill_wrapper.plan(qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim,
                         causal=True)
    outputs = []
    for i in range(num_layers):
        q = q_at_layer[i]
        k = k_at_layer[i]
        v = v_at_layer[i]
        # compute batch prefill attention, reuse auxiliary data structures
        o = prefill_wrapper.run(q, k, v)
        outputs.append(o)
    assert outputs[0].shape == torch.Size([100, 64, 128])

    # below is another example of creating custom mask for batch prefill attention
    mask_arr = []
    qo_len = (qo_indptr[1:] - qo_indptr[:-1]).cpu().tolist()
    kv_len = (kv_indptr[1:] - kv_indptr[:-1]).cpu().tolist()
    for i in range(batch_size):
        mask_i = torch.tril(torch.full((qo_len[i], kv_len[i]), True, device=device),
                            diagonal=(kv_len[i] - qo_len[i]))
        mask_arr.append(mask_i.flatten())
    mask = torch.cat(mask_arr, dim=0)
    prefill_wrapper.plan(qo_indptr, kv_indptr, num_qo_heads, num_kv_heads, head_dim,
                         custom_mask=mask)
    worst = 0.0
    for i in range(num_layers):
        q = q_at_layer[i]
        k = k_at_layer[i]
        v = v_at_layer[i]
        o_custom = prefill_wrapper.run(q, k, v)
        assert torch.allclose(o_custom, outputs[i], rtol=1e-3, atol=1e-3)
        worst = max(worst, (o_custom.float() - outputs[i].float()).abs().max().item())
    return worst
