"""Scalar arguments as flash_attn 2.8 callers pass them (tuples, lists, tensors, numpy scalars,
0-d tensors) through the one converter (attnhub/arguments.py), junk rejected by name, and
window sides beyond any sequence's reach (up to and past int32) bounded at normalization."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from naive import assert_lse, assert_out, make_qkv, naive_attention

import attnhub
import attnhub.flash_attn as fa
from attnhub import InvalidArgumentError
from attnhub.arguments import as_bool, as_float, as_int, as_window, bound_window

LQ, LK = [5, 0, 7, 3], [6, 2, 7, 9]


def _varlen(**kw):
    q, k, v, cq, ck = make_qkv(LQ, LK, 4, 2, 8, seed=11)
    return (q, k, v, cq, ck), fa.flash_attn_varlen_func(q, k, v, cq, ck, max(LQ), max(LK), **kw)


@pytest.mark.parametrize("window", [
    (2, 1), [2, 1], torch.tensor([2, 1]), torch.tensor([2, 1], dtype=torch.int32),
    (torch.tensor(2), torch.tensor(1)), np.array([2, 1]), (np.int64(2), np.int32(1)),
], ids=["tuple", "list", "tensor", "int32-tensor", "0d-tensors", "ndarray", "numpy-ints"])
def test_window_forms_flash_attn_accepts(window):
    (q, k, v, cq, ck), out = _varlen(window_size=window, causal=False)
    assert_out(out, naive_attention(q, k, v, cq, ck, window_size=(2, 1)).out)


def test_window_random_tensor_as_in_flash_attn_tests():
    """flash_attn's tests pass ``torch.randint(0, seqlen_k, (2,))``."""
    torch.manual_seed(0)
    window = torch.randint(0, max(LK), (2,))
    (q, k, v, cq, ck), out = _varlen(window_size=window)
    want = naive_attention(q, k, v, cq, ck, window_size=tuple(window.tolist()))
    assert_out(out, want.out)


@pytest.mark.parametrize("name,value", [
    ("max_seqlen_q", np.int64(7)), ("max_seqlen_q", torch.tensor(7)),
    ("dropout_p", np.float32(0.0)), ("dropout_p", torch.tensor(0.0)),
    ("softmax_scale", np.float64(0.3)),
    ("softmax_scale", torch.tensor(0.3, dtype=torch.float64)),
    ("softcap", np.float32(2.0)), ("softcap", torch.tensor(2.0)),
    ("causal", np.bool_(True)), ("causal", torch.tensor(True)), ("causal", 1),
    ("deterministic", np.bool_(False)), ("deterministic", torch.tensor(0)),
])
def test_scalar_forms(name, value):
    q, k, v, cq, ck = make_qkv(LQ, LK, 4, 2, 8, seed=12)
    plain = {"max_seqlen_q": 7, "dropout_p": 0.0, "softmax_scale": 0.3, "softcap": 2.0,
             "causal": True, "deterministic": False}
    args = {**plain, name: value}
    got = fa.flash_attn_varlen_func(q, k, v, cq, ck, max_seqlen_k=max(LK), **args)
    want = fa.flash_attn_varlen_func(q, k, v, cq, ck, max_seqlen_k=max(LK), **plain)
    assert torch.equal(got, want)


def test_batched_and_kvcache_take_tensor_windows_and_numpy_scalars():
    gen = torch.Generator().manual_seed(3)
    q, k, v = (torch.randn(2, 6, 2, 8, generator=gen) for _ in range(3))
    a = fa.flash_attn_func(q, k, v, np.float32(0.0), None, np.bool_(True), torch.tensor([3, 0]))
    b = fa.flash_attn_func(q, k, v, 0.0, None, True, (3, 0))
    assert torch.equal(a, b)
    kc, vc = torch.randn(2, 8, 2, 8, generator=gen), torch.randn(2, 8, 2, 8, generator=gen)
    a = fa.flash_attn_with_kvcache(q[:, :1], kc, vc, cache_seqlens=np.int64(5),
                                   causal=torch.tensor(True), window_size=torch.tensor([2, 0]),
                                   num_splits=np.int32(0))
    b = fa.flash_attn_with_kvcache(q[:, :1], kc, vc, cache_seqlens=5, causal=True,
                                   window_size=(2, 0))
    assert torch.equal(a, b)


@pytest.mark.parametrize("name,value,text", [
    ("deterministic", "no", "a bool"),
    ("return_attn_probs", "no", "a bool"),
    ("causal", "yes", "a bool"),
    ("causal", 0.5, "a bool"),
    ("causal", None, "a bool"),
    ("window_size", "(1, 2)", "a pair of ints"),
    ("window_size", torch.tensor([1.0, 2.0]), "a pair of ints"),
    ("window_size", torch.tensor([1, 2, 3]), "a pair of ints"),
    ("window_size", np.array([[1, 2]]), "a pair of ints"),
    ("window_size", (True, 2), "a pair of ints"),
    ("window_size", torch.tensor([-3, 2]), "a left value >= -1"),
    ("max_seqlen_q", np.float64(7.0), "an int >= 0"),
    ("max_seqlen_q", torch.tensor([7, 7]), "an int >= 0"),
    ("dropout_p", "0", "a float in [0, 1)"),
    ("softcap", torch.tensor([1.0, 2.0]), "a finite float >= 0"),
    ("softmax_scale", np.float32("nan"), "a finite float"),
])
def test_junk_is_rejected_by_name(name, value, text):
    q, k, v, cq, ck = make_qkv(LQ, LK, 4, 2, 8, seed=13)
    args = {"max_seqlen_q": max(LQ), name: value}
    with pytest.raises(InvalidArgumentError) as exc:
        fa.flash_attn_varlen_func(q, k, v, cq, ck, max_seqlen_k=max(LK), **args)
    assert exc.value.argument == name
    assert text in str(exc.value)


def test_return_lse_string_and_bool_offsets_rejected():
    q, k, v, cq, ck = make_qkv(LQ, LK, 4, 2, 8, seed=14)
    with pytest.raises(InvalidArgumentError, match="'return_lse'"):
        attnhub.attention_forward_varlen(q, k, v, cq, ck, return_lse="no")
    q1, k1, v1, _, _ = make_qkv([7], [7], 2, 2, 8, seed=15)
    with pytest.raises(InvalidArgumentError, match="'cu_seqlens_q'"):
        attnhub.attention_forward_varlen(q1, k1, v1, [False, True, 7], [0, 1, 7])
    # numpy ints in the lists are ints
    out = attnhub.attention_forward_varlen(q1, k1, v1, [0, np.int64(7)], (np.int32(0), 7))
    assert_out(out, naive_attention(q1, k1, v1, [0, 7], [0, 7]).out)


def test_converter_units():
    assert as_int("x", np.int16(3)) == 3 and as_int("x", torch.tensor([4])) == 4
    assert as_bool("x", np.bool_(False)) is False and as_bool("x", torch.tensor(1)) is True
    assert as_float("x", np.float16(0.5)) == 0.5 and as_float("x", 2) == 2.0
    assert as_window(None) == (-1, -1) and as_window(np.int64(4)) == (4, 4)
    assert as_window(torch.tensor(3)) == (3, 3)
    for bad in (True, 2.0, "3", None):
        with pytest.raises(InvalidArgumentError):
            as_int("x", bad)
    for bad in (2, -1, "True", 1.0, torch.tensor([1, 0])):
        with pytest.raises(InvalidArgumentError):
            as_bool("x", bad)
    # a side no sequence can reach is unbounded; causal's right side 0 stays
    assert bound_window((2**31 - 1, 0), 20, 20) == (-1, 0)
    assert bound_window((5, 2**40), 20, 30) == (5, -1)
    assert bound_window((29, 30), 20, 30) == (29, -1)
    assert bound_window((0, 0), 0, 0) == (0, 0)


@pytest.mark.parametrize("backend", ["reference", "triton"])
@pytest.mark.parametrize("window", [(-1, 2**31 - 1), (2**31 - 1, 2**31 - 1), (2**31, 2**40),
                                    (2**31 + 5, 0), (3, 2**31 - 1)])
def test_huge_window_sides_mean_unbounded(backend, window):
    """Issue 15: (-1, 2**31 - 1) gave out 0 / lse -inf on Triton, >= 2**31 crashed there."""
    lq, lk = [20, 3], [20, 9]
    q, k, v, cq, ck = make_qkv(lq, lk, 2, 1, 16, dtype=torch.float32, seed=16)
    out, lse = attnhub.attention_forward_varlen(q, k, v, cq, ck, window_size=window,
                                                return_lse=True, backend=backend)
    bounded = tuple(w if w < 2**31 - 1 and w < 20 else -1 for w in window)
    want = naive_attention(q, k, v, cq, ck, window_size=bounded)
    assert_out(out, want.out)
    assert_lse(lse, want.lse)
