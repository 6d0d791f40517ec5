"""Gradients of attnhub.attention_forward_varlen: gradcheck (float64) and comparison with
torch.autograd on the naive oracle (naive.py)."""

from __future__ import annotations

import pytest
import torch
from naive import (
    F64,
    alibi_slopes,
    make_paged,
    make_qkv,
    masked_lse,
    naive_attention,
    offsets,
    randn,
)

from attnhub import attention_forward_varlen

GRAD_TOL = {"rtol": 1e-9, "atol": 1e-9}

# Tiny cases for gradcheck: (lengths_q, lengths_k, nheads, nheads_k, head_dim, kwargs)
GRADCHECK_CASES = {
    "mha": ([3, 2], [3, 4], 2, 2, 4, {}),
    "gqa-causal": ([3, 2], [2, 4], 4, 2, 4, {"causal": True}),
    "mqa-causal-sq>sk": ([4, 3], [2, 3], 3, 1, 4, {"causal": True}),
    "window": ([4, 3], [5, 3], 2, 1, 4, {"window_size": (1, 1)}),
    "window-left-causal": ([3, 4], [5, 4], 2, 2, 4, {"window_size": (2, -1), "causal": True}),
    "window-sq<sk": ([2, 3], [5, 6], 2, 2, 4, {"window_size": (1, 2)}),
    "softcap": ([3, 2], [3, 4], 2, 1, 4, {"softcap": 0.7, "softmax_scale": 1.5}),
    "alibi-head": ([3, 2], [4, 2], 2, 2, 4, {"alibi": "head", "causal": True}),
    "alibi-batch-head": ([2, 4], [4, 3], 2, 1, 4, {"alibi": "batch_head"}),
    "zero-length": ([2, 0, 3, 1], [0, 2, 3, 3], 2, 1, 4, {"causal": True}),
    "length-one": ([1, 1, 1], [1, 1, 1], 2, 2, 4, {}),
    "top-left": ([2, 3], [4, 3], 2, 1, 4, {"causal": True, "mask_alignment": "top_left"}),
    "paged-1": ([2, 1], [3, 2], 2, 1, 4, {"paged": 1}),
    "paged-3-causal": ([3, 2], [4, 5], 2, 2, 4, {"paged": 3, "causal": True}),
    "paged-window-zero": ([2, 3, 1], [5, 0, 2], 2, 1, 4, {"paged": 2, "window_size": (1, 0)}),
}


def _inputs(lq, lk, h, hk, d, kw, seed, requires_grad=True):
    """q, k, v (leaves, page pools when paged), cq, ck, and the call's keyword arguments."""
    kw = dict(kw)
    q, k, v, cq, ck = make_qkv(lq, lk, h, hk, d, seed=seed, requires_grad=requires_grad)
    page_size = kw.pop("paged", None)
    if page_size:
        k, v, kw["block_table"] = make_paged(lk, page_size, hk, d, seed=seed, extra_pages=1,
                                             requires_grad=requires_grad)
    alibi = kw.pop("alibi", None)
    if alibi:
        kw["alibi_slopes"] = alibi_slopes(h, len(lq) if alibi == "batch_head" else None, seed)
    return q, k, v, cq, ck, kw


def _oracle_kw(kw):
    okw = dict(kw)
    if "mask_alignment" in okw:
        okw["top_left"] = okw.pop("mask_alignment") == "top_left"
    return okw


@pytest.mark.parametrize("name", list(GRADCHECK_CASES))
def test_gradcheck(name):
    lq, lk, h, hk, d, kw = GRADCHECK_CASES[name]
    q, k, v, cq, ck, kw = _inputs(lq, lk, h, hk, d, kw, seed=len(name))

    def fn(q, k, v):
        return attention_forward_varlen(q, k, v, cq, ck, **kw)

    assert torch.autograd.gradcheck(fn, (q, k, v), eps=1e-6, atol=1e-7, rtol=1e-5)


def test_gradcheck_on_oracle_itself():
    """The oracle used for the comparisons below is itself differentiated correctly."""
    q, k, v, cq, ck, kw = _inputs([3, 2], [4, 2], 2, 1, 4, {"causal": True, "softcap": 1.0,
                                                            "alibi": "head"}, seed=5)

    def fn(q, k, v):
        r = naive_attention(q, k, v, cq, ck, **kw)
        return r.out, masked_lse(r.lse)

    assert torch.autograd.gradcheck(fn, (q, k, v))


LARGE_CASES = {
    "gqa-causal": ([9, 0, 14, 5, 1], [11, 6, 14, 0, 3], 6, 2, 16, {"causal": True}),
    "mqa-window": ([12, 7, 3], [8, 15, 3], 4, 1, 16, {"window_size": (3, 2)}),
    "softcap-alibi": ([10, 6], [7, 12], 4, 2, 8,
                      {"softcap": 1.3, "alibi": "batch_head", "causal": True}),
    "paged-3": ([6, 4, 0, 8], [13, 9, 5, 8], 4, 2, 8, {"paged": 3, "causal": True}),
    "paged-16-window": ([5, 9], [20, 9], 2, 1, 8, {"paged": 16, "window_size": (4, 1)}),
    "paged-1-alibi": ([3, 5], [6, 4], 2, 2, 8, {"paged": 1, "alibi": "head"}),
    "sq>sk-causal": ([12, 8], [5, 3], 4, 2, 16, {"causal": True}),
}


@pytest.mark.parametrize("use_lse", [False, True], ids=["out", "out+lse"])
@pytest.mark.parametrize("name", list(LARGE_CASES))
def test_grads_match_oracle(name, use_lse):
    lq, lk, h, hk, d, kw = LARGE_CASES[name]
    q, k, v, cq, ck, kw = _inputs(lq, lk, h, hk, d, kw, seed=len(name) + 100)
    gen = torch.Generator().manual_seed(7)
    w_out = randn(q.shape, F64, gen)
    # lse is float32, so its incoming gradient is rounded to float32: use weights that are
    # exact in float32 to keep the fp64 comparison tight.
    w_lse = randn((h, q.shape[0]), torch.float32, gen).to(F64)

    out, lse = attention_forward_varlen(q, k, v, cq, ck, return_lse=True, **kw)
    loss = (out * w_out).sum()
    if use_lse:
        loss = loss + (masked_lse(lse) * w_lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))

    ref = naive_attention(q, k, v, cq, ck, **_oracle_kw(kw))
    ref_loss = (ref.out * w_out).sum()
    if use_lse:
        ref_loss = ref_loss + (masked_lse(ref.lse) * w_lse).sum()
    ref_grads = torch.autograd.grad(ref_loss, (q, k, v))

    for name_, g, rg, t in zip("qkv", grads, ref_grads, (q, k, v), strict=True):
        assert g.shape == t.shape and g.dtype == t.dtype, name_
        torch.testing.assert_close(g, rg, **GRAD_TOL, msg=lambda m, n=name_: f"d{n}: {m}")
    if "block_table" in kw:  # page slots no sequence reads get exactly zero gradient
        used = torch.zeros(k.shape[:2], dtype=torch.bool)
        table = kw["block_table"]
        for b, n in enumerate(lk):
            for t in range(n):
                used[int(table[b, t // k.shape[1]]), t % k.shape[1]] = True
        assert not grads[1][~used].any() and not grads[2][~used].any()


def test_lse_only_loss():
    """A loss on lse alone (out unused): gradients flow through lse."""
    q, k, v, cq, ck, kw = _inputs([6, 0, 4], [5, 3, 0], 4, 2, 8, {"causal": True}, seed=9)
    _, lse = attention_forward_varlen(q, k, v, cq, ck, return_lse=True, **kw)
    grads = torch.autograd.grad(masked_lse(lse).sum(), (q, k))
    ref = naive_attention(q, k, v, cq, ck, **kw)
    ref_grads = torch.autograd.grad(masked_lse(ref.lse).sum(), (q, k))
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **GRAD_TOL)
    assert grads[0].abs().sum() > 0


def test_grads_with_chunking(monkeypatch):
    monkeypatch.setenv("ATTNHUB_REFERENCE_CHUNK_MB", "0.000001")
    q, k, v, cq, ck, kw = _inputs([7, 0, 5], [6, 4, 9], 4, 2, 8,
                                  {"window_size": (2, 3), "softcap": 2.0}, seed=11)
    out, lse = attention_forward_varlen(q, k, v, cq, ck, return_lse=True, **kw)
    loss = out.square().sum() + masked_lse(lse).sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    ref = naive_attention(q, k, v, cq, ck, **kw)
    ref_grads = torch.autograd.grad(ref.out.square().sum() + masked_lse(ref.lse).sum(),
                                    (q, k, v))
    for g, rg in zip(grads, ref_grads, strict=True):
        torch.testing.assert_close(g, rg, **GRAD_TOL)


@pytest.mark.parametrize("layout", ["qkv-packed", "transposed"])
def test_non_contiguous_inputs(layout):
    lens = [5, 0, 7, 3]
    cu = offsets(lens)
    total, h, d = sum(lens), 4, 8
    gen = torch.Generator().manual_seed(13)
    if layout == "qkv-packed":
        base = randn((total, 3, h, d), F64, gen, requires_grad=True)
        q, k, v = base[:, 0], base[:, 1], base[:, 2]
    else:
        base = randn((3, h, total, d), F64, gen, requires_grad=True)
        q, k, v = (base[i].transpose(0, 1) for i in range(3))
    assert not q.is_contiguous()
    w = randn((total, h, d), F64, gen)
    out = attention_forward_varlen(q, k, v, cu, cu, causal=True)
    (grad,) = torch.autograd.grad((out * w).sum(), base)
    base2 = base.detach().clone().requires_grad_()
    if layout == "qkv-packed":
        q2, k2, v2 = (base2[:, i].contiguous() for i in range(3))
    else:
        q2, k2, v2 = (base2[i].transpose(0, 1).contiguous() for i in range(3))
    ref = naive_attention(q2, k2, v2, cu, cu, causal=True)
    (ref_grad,) = torch.autograd.grad((ref.out * w).sum(), base2)
    torch.testing.assert_close(out.detach(), ref.out.detach(), **GRAD_TOL)
    torch.testing.assert_close(grad, ref_grad, **GRAD_TOL)


def test_partial_requires_grad():
    """Only k requires grad: its gradient is right, q and v get none."""
    q, k, v, cq, ck = make_qkv([4, 6], [5, 6], 4, 2, 8, seed=15)
    k.requires_grad_()
    out = attention_forward_varlen(q, k, v, cq, ck, causal=True)
    (dk,) = torch.autograd.grad(out.sum(), k)
    k2 = k.detach().clone().requires_grad_()
    (rdk,) = torch.autograd.grad(naive_attention(q, k2, v, cq, ck, causal=True).out.sum(), k2)
    torch.testing.assert_close(dk, rdk, **GRAD_TOL)


def test_deterministic_backward_bitwise():
    q, k, v, cq, ck, kw = _inputs([8, 3, 6], [5, 9, 6], 4, 2, 8, {"causal": True}, seed=17)
    results = []
    for _ in range(2):
        out = attention_forward_varlen(q, k, v, cq, ck, deterministic=True, **kw)
        results.append(torch.autograd.grad(out.square().sum(), (q, k, v)))
    for a, b in zip(*results, strict=True):
        assert torch.equal(a, b)


@pytest.mark.parametrize("dtype,tol", [(torch.float32, 1e-4), (torch.bfloat16, 6e-2)])
def test_low_precision_grads(dtype, tol):
    lq, lk = [6, 0, 9], [7, 4, 5]
    q, k, v, cq, ck = make_qkv(lq, lk, 4, 2, 16, dtype=dtype, seed=19, requires_grad=True)
    gen = torch.Generator().manual_seed(3)
    w = randn(q.shape, F64, gen)
    out = attention_forward_varlen(q, k, v, cq, ck, causal=True)
    grads = torch.autograd.grad((out.to(F64) * w).sum(), (q, k, v))
    q2, k2, v2 = (t.detach().to(F64).requires_grad_() for t in (q, k, v))
    ref = naive_attention(q2, k2, v2, cq, ck, causal=True)
    ref_grads = torch.autograd.grad((ref.out * w).sum(), (q2, k2, v2))
    for g, rg, t in zip(grads, ref_grads, (q, k, v), strict=True):
        assert g.dtype == t.dtype
        torch.testing.assert_close(g.to(F64), rg, rtol=tol, atol=tol)
