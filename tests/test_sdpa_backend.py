"""The sdpa backend (PyTorch's fused CPU attention kernel) against the reference, in float64
unless a test is about another dtype: forward, lse, gradients including lse's, masks, rows that
see no key, empty sequences, selection and reasons."""

from __future__ import annotations

import pytest
import torch
from naive import (
    F64,
    OUT_TOL,
    alibi_slopes,
    assert_lse,
    assert_out,
    make_paged,
    make_qkv,
    masked_lse,
)

import attnhub
from attnhub import attention_forward_varlen
from attnhub.backends.sdpa import kernel

# Zero-length sequences on either side, sq < sk, sq > sk (rows that see no key under a
# bottom-right causal mask) and runs of equal lengths (grouped into one kernel call).
LENS_Q = [5, 0, 7, 3, 3, 3, 0, 1, 9]
LENS_K = [5, 4, 0, 9, 9, 9, 0, 2, 4]

CASES = {
    "plain": {},
    "causal": {"causal": True},
    "window": {"window_size": (2, 1)},
    "causal-left": {"causal": True, "window_size": (3, 0)},
    "top-left-causal": {"causal": True, "mask_alignment": "top_left"},
    "top-left-window": {"window_size": (1, 2), "mask_alignment": "top_left"},
    "alibi-head": {"alibi_slopes": "head", "causal": True},
    "alibi-batch-head": {"alibi_slopes": "batch_head", "window_size": (4, 3)},
    "scale": {"softmax_scale": 0.7, "causal": True},
}


def _kwargs(case: str, batch: int, nheads: int) -> dict:
    kw = dict(CASES[case])
    if kw.get("alibi_slopes") == "head":
        kw["alibi_slopes"] = alibi_slopes(nheads)
    elif kw.get("alibi_slopes") == "batch_head":
        kw["alibi_slopes"] = alibi_slopes(nheads, batch)
    return kw


def _grads(backend: str, q, k, v, cq, ck, kw, dout, dlse):
    leaves = [t.detach().requires_grad_(True) for t in (q, k, v)]
    out, lse = attention_forward_varlen(*leaves, cq, ck, return_lse=True, backend=backend, **kw)
    loss = (out * dout).sum() + (masked_lse(lse) * dlse).sum()
    return out, lse, torch.autograd.grad(loss, leaves)


@pytest.mark.parametrize("heads", [(4, 4), (6, 2), (3, 1)], ids=["mha", "gqa", "mqa"])
@pytest.mark.parametrize("case", list(CASES))
def test_matches_reference_with_lse_gradients(case, heads):
    nheads, nheads_k = heads
    q, k, v, cq, ck = make_qkv(LENS_Q, LENS_K, nheads, nheads_k, 16, seed=7)
    kw = _kwargs(case, len(LENS_Q), nheads)
    gen = torch.Generator().manual_seed(3)
    dout = torch.randn(q.shape, generator=gen, dtype=F64)
    dlse = torch.randn(nheads, q.shape[0], generator=gen, dtype=torch.float32)
    out, lse, grads = _grads("sdpa", q, k, v, cq, ck, kw, dout, dlse)
    ref_out, ref_lse, ref_grads = _grads("reference", q, k, v, cq, ck, kw, dout, dlse)
    assert_out(out, ref_out)
    assert_lse(lse, ref_lse.to(F64))
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9)


def test_custom_mask_forward_and_backward():
    lq, lk = [4, 6, 3], [5, 6, 2]
    q, k, v, cq, ck = make_qkv(lq, lk, 4, 2, 8, seed=11)
    gen = torch.Generator().manual_seed(11)
    blocks = [torch.rand(a, b, generator=gen) < 0.6 for a, b in zip(lq, lk, strict=True)]
    blocks[1][2] = False  # a row that sees no key
    mask = torch.cat([blk.reshape(-1) for blk in blocks])
    kw = {"custom_mask": mask, "causal": True}
    dout = torch.randn(q.shape, generator=gen, dtype=F64)
    dlse = torch.randn(4, q.shape[0], generator=gen, dtype=torch.float32)
    out, lse, grads = _grads("sdpa", q, k, v, cq, ck, kw, dout, dlse)
    ref_out, ref_lse, ref_grads = _grads("reference", q, k, v, cq, ck, kw, dout, dlse)
    assert torch.isneginf(lse[:, cq[1] + 2]).all() and not out[cq[1] + 2].any()
    assert_out(out, ref_out)
    assert_lse(lse, ref_lse.to(F64))
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=1e-9, atol=1e-9)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float16, torch.bfloat16])
def test_narrow_dtypes_match_the_reference(dtype):
    """float16 / bfloat16 are computed in float32 like the reference: both agree within the
    suite's per-dtype output tolerance (naive.OUT_TOL), gradients within twice that."""
    q, k, v, cq, ck = make_qkv(LENS_Q, LENS_K, 6, 2, 32, dtype=dtype, seed=5)
    kw = {"causal": True, "alibi_slopes": alibi_slopes(6)}
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(5)).to(dtype)
    dlse = torch.zeros(6, q.shape[0])
    out, lse, grads = _grads("sdpa", q, k, v, cq, ck, kw, dout, dlse)
    ref_out, ref_lse, ref_grads = _grads("reference", q, k, v, cq, ck, kw, dout, dlse)
    rtol, atol = OUT_TOL[dtype]
    assert out.dtype == dtype and all(g.dtype == dtype for g in grads)
    assert_out(out, ref_out)
    torch.testing.assert_close(lse, ref_lse, rtol=1e-5, atol=1e-5)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=2 * rtol, atol=2 * atol)


def test_out_only_path_equals_forward():
    q, k, v, cq, ck = make_qkv(LENS_Q, LENS_K, 4, 2, 16, dtype=torch.float32, seed=9)
    out, _ = attention_forward_varlen(q, k, v, cq, ck, causal=True, return_lse=True,
                                      backend="sdpa")
    assert torch.equal(attention_forward_varlen(q, k, v, cq, ck, causal=True, backend="sdpa"),
                       out)


def test_equal_length_runs_are_one_kernel_call(monkeypatch):
    """Consecutive sequences of equal (sq, sk) share one call (a free view of the packed
    rows); a custom mask or per-sequence ALiBi slopes keep them apart."""
    calls = []
    real = kernel._forward_op

    def spy(q, *args, **kwargs):
        calls.append(q.shape[0])
        return real(q, *args, **kwargs)

    monkeypatch.setattr(kernel, "_forward_op", spy)
    q, k, v, cq, ck = make_qkv(LENS_Q, LENS_K, 4, 2, 8, seed=1)
    attention_forward_varlen(q, k, v, cq, ck, causal=True, backend="sdpa")
    # 5/5, (0/4, 7/0 empty), 3/9 three times, (0/0 empty), 1/2, 9/4
    assert calls == [1, 3, 1, 1]
    calls.clear()
    attention_forward_varlen(q, k, v, cq, ck, alibi_slopes=alibi_slopes(4, len(LENS_Q)),
                             backend="sdpa")
    assert calls == [1, 1, 1, 1, 1, 1]


def test_backward_is_deterministic():
    q, k, v, cq, ck = make_qkv([40, 17, 33], [40, 17, 50], 4, 2, 32, dtype=torch.float32,
                               seed=2, requires_grad=True)
    dout = torch.randn(q.shape, generator=torch.Generator().manual_seed(2))

    def grads():
        out = attention_forward_varlen(q, k, v, cq, ck, causal=True, backend="sdpa",
                                       deterministic=True)
        return torch.autograd.grad(out, (q, k, v), dout)

    for a, b in zip(grads(), grads(), strict=True):
        assert torch.equal(a, b)


def test_selected_on_the_cpu_and_ranked_above_the_reference():
    q, k, v, cq, ck = make_qkv([5, 3], [5, 3], 4, 2, 16, dtype=torch.float32)
    explanation = attnhub.explain(q, k, v, cq, ck, causal=True)
    assert explanation.selected == "sdpa"
    order = [verdict.backend for verdict in explanation]
    assert order.index("sdpa") < order.index("reference")


@pytest.mark.parametrize("kw,reason", [
    ({"softcap": 5.0}, "softcap (5.0) is not supported"),
    ({"dropout_p": 0.1}, "dropout (p = 0.1) is not supported"),
    ({"return_attn_probs": True}, "return_attn_probs is not supported"),
    ({"paged": True}, "paged KV (block_table) is not supported"),
])
def test_reasons_for_what_the_kernel_cannot_express(kw, reason):
    q, k, v, cq, ck = make_qkv([5, 3], [5, 3], 4, 2, 16, dtype=torch.float32)
    if kw.pop("paged", False):
        k, v, kw["block_table"] = make_paged([5, 3], 4, 2, 16, dtype=torch.float32)
    with pytest.warns(RuntimeWarning, match="falling back to the 'reference'"):
        explanation = attnhub.explain(q, k, v, cq, ck, **kw)
        attention_forward_varlen(q, k, v, cq, ck, **kw)
    verdict = next(v for v in explanation if v.backend == "sdpa")
    assert reason in verdict.reasons
    assert explanation.selected == "reference"


def test_empty_batch_and_all_empty_sequences():
    for lq, lk in (([], []), ([0, 0], [3, 0]), ([2, 0], [0, 0])):
        q, k, v, cq, ck = make_qkv(lq, lk, 2, 1, 8, seed=4, requires_grad=True)
        out, lse = attention_forward_varlen(q, k, v, cq, ck, return_lse=True, backend="sdpa")
        assert not out.any() and torch.isneginf(lse).all()
        if q.shape[0]:
            grads = torch.autograd.grad(out.sum(), (q, k, v), allow_unused=True)
            assert all(g is None or not g.any() for g in grads)


# Windows bounded on both sides run in blocks of query rows against the keys their window
# reaches (kernel._blocks); BLOCK_ROWS is lowered so that these short sequences take blocks.
WINDOW_LENS_Q = [40, 0, 33, 17, 17, 1, 29]
WINDOW_LENS_K = [40, 5, 50, 17, 17, 3, 20]
WINDOW_CASES = {
    "causal-left": {"causal": True, "window_size": (3, 0)},
    "window": {"window_size": (2, 1)},
    "top-left-window": {"window_size": (1, 2), "mask_alignment": "top_left"},
    "alibi-batch-head": {"alibi_slopes": "batch_head", "window_size": (4, 3)},
    "custom-mask": {"custom_mask": True, "window_size": (2, 2)},
}


@pytest.mark.parametrize("dtype", [F64, torch.float32])
@pytest.mark.parametrize("case", list(WINDOW_CASES))
def test_windowed_blocks_match_the_reference(case, dtype, monkeypatch):
    """Out, lse and gradients (lse's too) of windowed calls computed in row blocks, against
    the reference; more kernel calls than groups shows the blocks ran. float64 recomputes
    each block's forward in the backward, float32 takes the forward's out and lse."""
    monkeypatch.setattr(kernel, "BLOCK_ROWS", 4)
    calls = []
    real = kernel._forward_op
    monkeypatch.setattr(kernel, "_forward_op",
                        lambda q, *a, **kw: calls.append(q.shape[2]) or real(q, *a, **kw))
    q, k, v, cq, ck = make_qkv(WINDOW_LENS_Q, WINDOW_LENS_K, 6, 2, 16, dtype=dtype, seed=4)
    kw = dict(WINDOW_CASES[case])
    gen = torch.Generator().manual_seed(4)
    if kw.get("alibi_slopes") == "batch_head":
        kw["alibi_slopes"] = alibi_slopes(6, len(WINDOW_LENS_Q))
    if kw.get("custom_mask"):
        kw["custom_mask"] = torch.cat([
            (torch.rand(a, b, generator=gen) < 0.7).reshape(-1)
            for a, b in zip(WINDOW_LENS_Q, WINDOW_LENS_K, strict=True)])
    dout = torch.randn(q.shape, generator=gen, dtype=F64).to(dtype)
    dlse = torch.randn(6, q.shape[0], generator=gen, dtype=torch.float32)
    out, lse, grads = _grads("sdpa", q, k, v, cq, ck, kw, dout, dlse)
    assert len(calls) > 7 and max(calls) < 40  # blocks, none the whole 40-row sequence
    ref_out, ref_lse, ref_grads = _grads("reference", q, k, v, cq, ck, kw, dout, dlse)
    tol = 1e-9 if dtype == F64 else 2e-5
    torch.testing.assert_close(out, ref_out, rtol=tol, atol=tol)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    finite = ~torch.isneginf(lse)
    torch.testing.assert_close(lse[finite], ref_lse[finite], rtol=tol, atol=tol)
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, rtol=tol, atol=tol)


def test_window_blocks_cover_each_rows_keys():
    """kernel._blocks: windows bounded on both sides split a group into row blocks of at
    least BLOCK_ROWS (or the window's width) whose key range holds every key the rows may
    see; unbounded windows, short groups and windows as wide as the keys stay whole."""
    q, k, v, cq, ck = make_qkv([600], [700], 2, 1, 8, dtype=torch.float32)
    for window, align in (((64, 0), "bottom_right"), ((20, 30), "top_left"),
                          ((100, 3), "bottom_right")):
        problem, _ = attnhub.normalize(q, k, v, cq, ck, window_size=window,
                                       mask_alignment=align)
        g = kernel._Group(0, 1, 0, 0, 600, 700)
        blocks = kernel._blocks(problem, g)
        assert len(blocks) > 1
        rows = [i for b in blocks for i in range(b.i0, b.i1)]
        assert rows == list(range(600))  # every query row once, in order
        offset = 100 if align == "bottom_right" else 0
        left, right = window
        for b in blocks:
            assert b.i1 - b.i0 <= max(kernel.BLOCK_ROWS, left + right + 1)
            assert b.j0 == max(b.i0 + offset - left, 0)
            assert b.j1 == min(b.i1 - 1 + offset + right + 1, 700)
    g = kernel._Group(0, 1, 0, 0, 600, 700)
    for kw in ({"causal": True}, {"window_size": (64, -1)}, {"window_size": (300, 0)}):
        problem, _ = attnhub.normalize(q, k, v, cq, ck, **kw)
        assert kernel._blocks(problem, g) == [kernel._Block(0, 600, 0, 700)], kw
    problem, _ = attnhub.normalize(q, k, v, cq, ck, window_size=(8, 0))
    assert len(kernel._blocks(problem, kernel._Group(0, 1, 0, 0, 60, 700))) == 1  # short
