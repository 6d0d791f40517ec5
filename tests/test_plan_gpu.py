"""Plans on a CUDA GPU: CUDA-graph capture of run(), replan with new lengths of the same
batch size into the same buffers, replay, against the reference; the Triton custom mask in
bf16/fp16; FlashInfer's documentation examples at full size; torch.compile of plan/run.

Run on the device machine: python -m pytest -m gpu tests/test_plan_gpu.py -q
"""

from __future__ import annotations

import sys
from pathlib import Path

import pytest
import torch

import attnhub

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

H, HK, D, PAGE = 16, 4, 128, 16


def _cu(lens):
    out = [0]
    for n in lens:
        out.append(out[-1] + n)
    return out


def _table(kv_lens, num_pages, width, seed):
    g = torch.Generator().manual_seed(seed)
    perm = torch.randperm(num_pages, generator=g).tolist()
    table = torch.zeros(len(kv_lens), width, dtype=torch.int32)
    pos = 0
    for b, n in enumerate(kv_lens):
        need = -(-n // PAGE)
        table[b, :need] = torch.tensor(perm[pos:pos + need], dtype=torch.int32)
        pos += need
    return table.cuda()


@pytest.mark.parametrize("backend", [None, "triton"])
def test_cuda_graph_capture_replan_replay(backend):
    dtype = torch.bfloat16
    qo1, kv1 = [300, 17, 211], [900, 17, 400]
    qo2, kv2 = [100, 400, 28], [1200, 450, 28]  # same batch, same total_q
    num_pages, width = 256, 128
    q = torch.randn(sum(qo1), H, D, device="cuda", dtype=dtype)
    k = torch.randn(num_pages, PAGE, HK, D, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    t1 = _table(kv1, num_pages, width, 1)
    p = attnhub.plan(_cu(qo1), _cu(kv1), nheads=H, nheads_k=HK, head_dim=D, dtype=dtype,
                     device="cuda", block_table=t1, page_size=PAGE, num_pages=num_pages,
                     max_seqlen_q=512, max_seqlen_k=width * PAGE, causal=True,
                     backend=backend, cuda_graph=True)
    p.run(q, k, v)  # warm up (compiles the kernels) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = p.run(q, k, v)

    def reference(qo, kv, table):
        return attnhub.attention_forward_varlen(q, k, v, _cu(qo), _cu(kv), causal=True,
                                                block_table=table, backend="reference")

    graph.replay()
    torch.testing.assert_close(out, reference(qo1, kv1, t1), rtol=2e-2, atol=2e-2)
    t2 = _table(kv2, num_pages, width, 2)
    p.replan(_cu(qo2), _cu(kv2), block_table=t2)
    graph.replay()
    torch.testing.assert_close(out, reference(qo2, kv2, t2), rtol=2e-2, atol=2e-2)


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
def test_triton_custom_mask_matches_reference(dtype):
    qo, kv = [130, 0, 257, 64], [300, 5, 257, 0]
    q = torch.randn(sum(qo), H, D, device="cuda", dtype=dtype)
    k = torch.randn(sum(kv), HK, D, device="cuda", dtype=dtype)
    v = torch.randn_like(k)
    mask = torch.rand(sum(a * b for a, b in zip(qo, kv, strict=True)), device="cuda") < 0.5
    got = attnhub.attention_forward_varlen(q, k, v, _cu(qo), _cu(kv), custom_mask=mask,
                                           backend="triton")
    want = attnhub.attention_forward_varlen(q, k, v, _cu(qo), _cu(kv), custom_mask=mask,
                                            backend="reference")
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
    # Gradients with the same mask, against the reference in float64.
    dout = torch.randn_like(q)
    grads = {}
    for backend, cast in (("triton", dtype), ("reference", torch.float64)):
        inputs = [t.detach().to(cast).requires_grad_() for t in (q, k, v)]
        out = attnhub.attention_forward_varlen(*inputs, _cu(qo), _cu(kv), custom_mask=mask,
                                               backend=backend)
        grads[backend] = torch.autograd.grad(out, inputs, dout.to(cast))
    for g, r in zip(grads["triton"], grads["reference"], strict=True):
        assert (g.double() - r).abs().max().item() < 5e-2 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("example", ["ragged_example", "paged_example"])
def test_flashinfer_documentation_examples_full_size(example):
    sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "examples" / "flashinfer"))
    import docs_examples

    # The example asserts the documented rule (allclose, rtol = atol = 1e-3). Causal and
    # custom-mask calls run different kernels here (the Gluon forward takes the causal one),
    # so they may differ by an fp16 ulp of outputs above 1 (~2e-3): bounded, not equal.
    assert getattr(docs_examples, example)("cuda:0", num_layers=32) <= 4e-3


def test_plan_run_under_compile_on_gpu():
    lengths = [[100, 412], [256, 256], [1, 511]]
    q = torch.randn(512, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(512, HK, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    compiled = torch.compile(lambda p, q, k, v: p.run(q, k, v) * 2, fullgraph=True)
    for lens in lengths:
        p = attnhub.plan(_cu(lens), _cu(lens), nheads=H, nheads_k=HK, head_dim=D,
                         dtype=torch.bfloat16, device="cuda", max_seqlen_q=512,
                         max_seqlen_k=512, causal=True)
        torch.testing.assert_close(compiled(p, q, k, v), p.run(q, k, v) * 2)


def test_plan_run_with_grad_runs_the_planned_kernel():
    """A plan's schedule travels through the custom op: out with autograd on equals out
    without it bit for bit (the same kernel, not the device-tile fallback). The backend is
    pinned: by measured speed, forward-only and forward+backward may pick different ones."""
    lens = [100, 412]
    q = torch.randn(512, H, D, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(512, HK, D, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    p = attnhub.plan(_cu(lens), _cu(lens), nheads=H, nheads_k=HK, head_dim=D,
                     dtype=torch.bfloat16, device="cuda", causal=True, backend="triton")
    want = p.run(q, k, v)
    got = p.run(q.requires_grad_(), k, v)
    assert torch.equal(got.detach(), want)


def test_flashinfer_single_prefill_under_reduce_overhead_compile():
    """FlashInfer's own compile test shape: single_prefill_with_kv_cache compiled with
    mode="reduce-overhead" (CUDA graph trees) replays and matches eager."""
    from attnhub.compat import flashinfer

    def fn(q, k, v):
        return flashinfer.single_prefill_with_kv_cache(q, k, v, causal=True)

    torch._dynamo.reset()
    compiled = torch.compile(fn, mode="reduce-overhead", fullgraph=True)
    for qo_len, kv_len in ((127, 127), (127, 300), (127, 300)):
        q = torch.randn(qo_len, 8, 128, device="cuda", dtype=torch.float16)
        k = torch.randn(kv_len, 2, 128, device="cuda", dtype=torch.float16)
        v = torch.randn_like(k)
        for _ in range(3):
            got = compiled(q, k, v).clone()
        torch.testing.assert_close(got, fn(q, k, v), rtol=2e-3, atol=2e-3)


@pytest.mark.parametrize("causal, lens", [(True, [200, 17, 256]), (True, [700, 5, 300]),
                                          (False, [200, 17, 256])])
def test_plan_schedule_has_the_gluon_forward_rows(causal, lens, monkeypatch):
    """Head dim 64: the plan's tile list is made with the rows the Gluon forward runs (192,
    or 128 for causal calls of sequences up to 256 tokens), so run() plans nothing again;
    results against the reference."""
    from attnhub.backends.triton import forward, hopper_forward

    q = torch.randn(sum(lens), H, 64, device="cuda", dtype=torch.bfloat16)
    k = torch.randn(sum(lens), HK, 64, device="cuda", dtype=torch.bfloat16)
    v = torch.randn_like(k)
    p = attnhub.plan(_cu(lens), _cu(lens), nheads=H, nheads_k=HK, head_dim=64,
                     dtype=torch.bfloat16, device="cuda", causal=causal, backend="triton")
    rows = hopper_forward.block_m(64, causal, max(lens))
    assert rows == (128 if causal and max(lens) <= 256 else 192)
    planned = []
    monkeypatch.setattr(forward, "tile_list", lambda *a, **kw: planned.append(a) or None)
    for _ in range(2):
        got = p.run(q, k, v)
    assert planned == []
    want = attnhub.attention_forward_varlen(q, k, v, _cu(lens), _cu(lens), causal=causal,
                                            backend="reference")
    torch.testing.assert_close(got, want, rtol=2e-2, atol=2e-2)
