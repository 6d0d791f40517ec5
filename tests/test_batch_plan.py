"""attnhub.plan / BatchPlan.run: one normalization and dispatch per batch, O(1) per call."""

from __future__ import annotations

import pytest
import torch
from naive import make_paged, make_qkv

import attnhub
from attnhub import batch_plan

SEQ_Q, SEQ_K = [5, 0, 9, 3], [7, 2, 9, 0]


def _plain(q, k, v, cu_q, cu_k, **kw):
    return attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, return_lse=True, **kw)


@pytest.mark.parametrize("kw", [dict(causal=True), dict(window_size=(2, 1), softcap=5.0),
                                dict(softmax_scale=0.3)])
def test_run_matches_plain_api(kw):
    q, k, v, cu_q, cu_k = make_qkv(SEQ_Q, SEQ_K, 4, 2, 8, seed=1)
    p = attnhub.plan(cu_q, cu_k, nheads=4, nheads_k=2, head_dim=8, dtype=q.dtype, **kw)
    out, lse = p.run(q, k, v, return_lse=True)
    want_out, want_lse = _plain(q, k, v, cu_q, cu_k, **kw)
    torch.testing.assert_close(out, want_out, rtol=0, atol=0)
    torch.testing.assert_close(lse, want_lse, rtol=0, atol=0)
    # the CPU's sdpa backend declines softcap (the reference runs it)
    assert p.backend.name == ("reference" if "softcap" in kw else "sdpa")


def test_plan_is_reused_across_layers_without_normalizing(monkeypatch):
    q, k, v, cu_q, cu_k = make_qkv(SEQ_Q, SEQ_K, 2, 2, 8, seed=2)
    info_q, info_k = attnhub.VarlenInfo(cu_q), attnhub.VarlenInfo(cu_k)
    p = attnhub.plan(info_q, info_k, nheads=2, nheads_k=2, head_dim=8, dtype=q.dtype,
                     causal=True)

    def no_normalize(*a, **kw):
        raise AssertionError("run() must not normalize")

    monkeypatch.setattr(batch_plan, "normalize", no_normalize)
    monkeypatch.setattr(batch_plan, "select", no_normalize)
    for layer in range(3):
        ql, kl, vl = q + layer, k * (layer + 1), v - layer
        torch.testing.assert_close(p.run(ql, kl, vl), _plain(ql, kl, vl, cu_q, cu_k,
                                                             causal=True)[0])


def test_paged_plan_with_custom_mask():
    q, _, _, cu_q, cu_k = make_qkv(SEQ_Q, SEQ_K, 4, 1, 8, seed=3)
    k, v, table = make_paged(SEQ_K, 4, 1, 8, seed=3)
    gen = torch.Generator().manual_seed(4)
    mask = torch.rand(sum(a * b for a, b in zip(SEQ_Q, SEQ_K, strict=True)), generator=gen) < 0.7
    p = attnhub.plan(cu_q, cu_k, nheads=4, nheads_k=1, head_dim=8, dtype=q.dtype,
                     block_table=table, page_size=4, custom_mask=mask)
    want = _plain(q, k, v, cu_q, cu_k, block_table=table, custom_mask=mask)
    got = p.run(q, k, v, return_lse=True)
    for a, b in zip(got, want, strict=True):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


def test_gradients_through_run_match_plain_api():
    q, k, v, cu_q, cu_k = make_qkv(SEQ_Q, SEQ_K, 4, 2, 8, seed=5, requires_grad=True)
    p = attnhub.plan(cu_q, cu_k, nheads=4, nheads_k=2, head_dim=8, dtype=q.dtype, causal=True)
    out = p.run(q, k, v)
    grads = torch.autograd.grad(out.square().sum(), (q, k, v))
    want = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, causal=True)
    want_grads = torch.autograd.grad(want.square().sum(), (q, k, v))
    for a, b in zip(grads, want_grads, strict=True):
        torch.testing.assert_close(a, b)


def test_run_checks_shapes_dtype_device():
    q, k, v, cu_q, cu_k = make_qkv(SEQ_Q, SEQ_K, 2, 2, 8)
    p = attnhub.plan(cu_q, cu_k, nheads=2, nheads_k=2, head_dim=8, dtype=q.dtype)
    with pytest.raises(attnhub.InvalidArgumentError, match="as planned"):
        p.run(q[:-1], k, v)
    with pytest.raises(attnhub.InvalidArgumentError, match="rows as planned"):
        p.run(q, k[:-1], v[:-1])
    with pytest.raises(attnhub.InvalidArgumentError, match="float64"):
        p.run(q.float(), k.float(), v.float())


def test_cuda_graph_mode_replans_into_the_same_buffers():
    """The CUDA-graph discipline, checked on the CPU: replan writes the new offsets, block
    table and mask into the buffers planned first, and runs read them from there."""
    lens_q, lens_k = [4, 6, 2], [8, 5, 3]
    q, _, _, cu_q, cu_k = make_qkv(lens_q, lens_k, 2, 2, 8, seed=6)
    k, v, table = make_paged(lens_k, 4, 2, 8, seed=6)
    p = attnhub.plan(cu_q, cu_k, nheads=2, nheads_k=2, head_dim=8, dtype=q.dtype,
                     block_table=table, page_size=4, num_pages=k.shape[0], max_seqlen_q=8,
                     max_seqlen_k=12, causal=True, cuda_graph=True)
    assert p.problem.seqlens_q is None
    buffers = {n: getattr(p._inputs, n).data_ptr() for n in ("cu_seqlens_q", "block_table")}
    torch.testing.assert_close(p.run(q, k, v), _plain(q, k, v, cu_q, cu_k, block_table=table,
                                                      causal=True)[0])
    new_q, new_k = [7, 1, 4], [12, 1, 6]  # same batch and total_q; a new table, same width
    _, _, _, cu_q2, cu_k2 = make_qkv(new_q, new_k, 2, 2, 8)
    need = [-(-n // 4) for n in new_k]
    pages = torch.randperm(k.shape[0], generator=torch.Generator().manual_seed(7))[:sum(need)]
    table2 = torch.zeros_like(table)
    table2[0, :3], table2[1, :1], table2[2, :2] = pages[:3], pages[3:4], pages[4:6]
    p.replan(cu_q2, cu_k2, block_table=table2)
    assert {n: getattr(p._inputs, n).data_ptr() for n in buffers} == buffers
    torch.testing.assert_close(p.run(q, k, v), _plain(q, k, v, cu_q2, cu_k2, block_table=table2,
                                                      causal=True)[0])
    with pytest.raises(attnhub.InvalidArgumentError, match="planned batch size"):
        p.replan([0, 6, 12], [0, 6, 12], block_table=table2[:2])


def test_triton_plan_uses_its_precomputed_tiles():
    # more than 16 query rows: the tiled path (the split-KV decode path plans nothing)
    q, k, v, cu_q, cu_k = make_qkv([20, 0, 35, 3], [20, 2, 35, 0], 2, 1, 16,
                                   dtype=torch.float32, seed=8)
    p = attnhub.plan(cu_q, cu_k, nheads=2, nheads_k=1, head_dim=16, dtype=torch.float32,
                     causal=True, backend="triton")
    assert p.backend.name == "triton" and p._inputs.schedule is not None
    want = _plain(q, k, v, cu_q, cu_k, causal=True, backend="reference")[0]
    torch.testing.assert_close(p.run(q, k, v), want, rtol=2e-5, atol=2e-5)
