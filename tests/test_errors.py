"""Every bad argument raises attnhub.InvalidArgumentError naming the argument and what it expects.

pytest.raises(InvalidArgumentError) also proves that nothing else (IndexError, RuntimeError...)
escapes first: any other exception fails the test.
"""

from __future__ import annotations

import math

import pytest
import torch

import attnhub
from attnhub import InvalidArgumentError, VarlenInfo

CU = [0, 3, 3, 8]  # lengths 3, 0, 5 (a zero-length sequence is legal)
NHEADS, NHEADS_K, D = 4, 2, 16


def _t(*shape, dtype=torch.float32, device="cpu"):
    return torch.randn(*shape, dtype=dtype, device=device)


def _cu(values, dtype=torch.int32):
    return torch.tensor(values, dtype=dtype)


def base_args():
    return {
        "q": _t(8, NHEADS, D), "k": _t(8, NHEADS_K, D), "v": _t(8, NHEADS_K, D),
        "cu_seqlens_q": list(CU), "cu_seqlens_k": list(CU),
        "max_seqlen_q": 5, "max_seqlen_k": 5,
    }


def paged_args():
    """Page pools of 6 pages of 4 tokens; kv lengths 7, 0, 5 -> 2, 0, 2 pages."""
    args = base_args()
    args.update(k=_t(6, 4, NHEADS_K, D), v=_t(6, 4, NHEADS_K, D), cu_seqlens_k=[0, 7, 7, 12],
                max_seqlen_k=7, block_table=_paged_table([[5, 0], [1, 2], [3, 4]]))
    return args


def _paged_table(values):
    return torch.tensor(values, dtype=torch.int32)


# (id, overrides of base_args (or a callable building the whole argument dict), argument, text)
CASES = [
    # tensors
    ("q-list", {"q": [[1.0]]}, "q", "a torch.Tensor of shape (total_q, nheads, head_dim)"),
    ("k-none", {"k": None}, "k", "a torch.Tensor"),
    ("v-int", {"v": 3}, "v", "a torch.Tensor"),
    ("q-2d", {"q": _t(8, NHEADS * D)}, "q", "a 3-D tensor of shape (total_q, nheads, head_dim)"),
    ("k-4d-unpaged", {"k": _t(2, 4, NHEADS_K, D)}, "k", "a 3-D tensor"),
    ("v-shape", {"v": _t(8, NHEADS, D)}, "v", "the shape of k (8, 2, 16)"),
    ("v-rows", {"v": _t(7, NHEADS_K, D)}, "v", "the shape of k"),
    ("nheads-indivisible", {"k": _t(8, 3, D), "v": _t(8, 3, D)}, "k",
     "nheads_k dividing nheads = 4"),
    ("head-dim-mismatch", {"k": _t(8, NHEADS_K, 8), "v": _t(8, NHEADS_K, 8)}, "k",
     "head_dim 16"),
    ("head-dim-mismatch-k-only", {"k": _t(8, NHEADS_K, 8)}, "k", "head_dim 16"),
    ("zero-heads", {"q": _t(8, 0, D), "k": _t(8, 0, D), "v": _t(8, 0, D)}, "q",
     "at least one head"),
    ("zero-heads-q-only", {"q": _t(8, 0, D)}, "q", "at least one head"),
    ("cu-on-meta", {"cu_seqlens_q": _cu(CU).to("meta")}, "cu_seqlens_q",
     "a tensor on the CPU or on q's device (cpu)"),
    ("int-dtype", {"q": torch.ones(8, NHEADS, D, dtype=torch.int32),
                   "k": torch.ones(8, NHEADS_K, D, dtype=torch.int32),
                   "v": torch.ones(8, NHEADS_K, D, dtype=torch.int32)}, "q", "a floating-point"),
    ("k-dtype", {"k": _t(8, NHEADS_K, D, dtype=torch.float64),
                 "v": _t(8, NHEADS_K, D, dtype=torch.float64)}, "k", "the dtype of q"),
    ("v-dtype", {"v": _t(8, NHEADS_K, D, dtype=torch.float16)}, "v",
     "the dtype of q (torch.float32)"),
    ("k-device", {"k": _t(8, NHEADS_K, D, device="meta"), "v": _t(8, NHEADS_K, D, device="meta")},
     "k", "the device of q (cpu)"),
    ("v-device", {"v": _t(8, NHEADS_K, D, device="meta")}, "v", "the device of q (cpu)"),
    ("q-device", {"q": _t(8, NHEADS, D, device="meta")}, "k", "the device of q (meta)"),
    # cu_seqlens, as tensors
    ("cu-2d", {"cu_seqlens_q": _cu([CU])}, "cu_seqlens_q", "a 1-D int32 or int64 tensor"),
    ("cu-float-tensor", {"cu_seqlens_q": torch.tensor(CU, dtype=torch.float32)}, "cu_seqlens_q",
     "a 1-D int32 or int64 tensor"),
    ("cu-int16-tensor", {"cu_seqlens_k": _cu(CU, torch.int16)}, "cu_seqlens_k",
     "a 1-D int32 or int64 tensor"),
    ("cu-empty-tensor", {"cu_seqlens_q": _cu([])}, "cu_seqlens_q", "at least one element"),
    ("cu-lead-tensor", {"cu_seqlens_q": _cu([1, 3, 3, 8])}, "cu_seqlens_q", "a leading 0"),
    ("cu-decreasing-tensor", {"cu_seqlens_k": _cu([0, 4, 3, 8], torch.int64)}, "cu_seqlens_k",
     "non-decreasing offsets"),
    ("cu-q-total-tensor", {"cu_seqlens_q": _cu([0, 3, 3, 7])}, "cu_seqlens_q",
     "a last offset equal to the number of rows (8)"),
    ("cu-k-total-tensor", {"cu_seqlens_k": _cu([0, 3, 3, 9])}, "cu_seqlens_k",
     "a last offset equal to the number of rows (8)"),
    # cu_seqlens, as lists and tuples
    ("cu-float-list", {"cu_seqlens_q": [0.0, 3.0, 3.0, 8.0]}, "cu_seqlens_q", "a sequence of ints"),
    ("cu-fraction-list", {"cu_seqlens_k": [0, 2.5, 3, 8]}, "cu_seqlens_k", "a sequence of ints"),
    ("cu-nested-list", {"cu_seqlens_q": [[0, 3], [3, 8]]}, "cu_seqlens_q", "a sequence of ints"),
    ("cu-empty-list", {"cu_seqlens_q": []}, "cu_seqlens_q", "at least one element"),
    ("cu-lead-list", {"cu_seqlens_k": (2, 3, 3, 8)}, "cu_seqlens_k", "a leading 0"),
    ("cu-decreasing-list", {"cu_seqlens_q": [0, 4, 3, 8]}, "cu_seqlens_q",
     "non-decreasing offsets"),
    ("cu-q-total-list", {"cu_seqlens_q": [0, 3, 3, 9]}, "cu_seqlens_q",
     "a last offset equal to the number of rows (8)"),
    ("cu-k-total-list", {"cu_seqlens_k": [0, 3, 3, 6]}, "cu_seqlens_k",
     "a last offset equal to the number of rows (8)"),
    # cu_seqlens of unsupported types, and as a VarlenInfo
    ("cu-str", {"cu_seqlens_q": "0,3,3,8"}, "cu_seqlens_q",
     "a 1-D int tensor, a list or tuple of ints, or a VarlenInfo"),
    ("cu-dict", {"cu_seqlens_k": {0: 0, 1: 8}}, "cu_seqlens_k", "or a VarlenInfo"),
    ("cu-none", {"cu_seqlens_q": None}, "cu_seqlens_q", "or a VarlenInfo"),
    ("info-total", {"cu_seqlens_q": VarlenInfo.from_lengths([3, 4])}, "cu_seqlens_q",
     "a last offset equal to the number of rows (8)"),
    ("batch-mismatch", {"cu_seqlens_k": [0, 8], "max_seqlen_k": 8}, "cu_seqlens_k",
     "4 offsets (the batch size of cu_seqlens_q is 3)"),
    ("batch-mismatch-info", {"cu_seqlens_q": VarlenInfo.from_lengths([8]),
                             "max_seqlen_q": None}, "cu_seqlens_k",
     "2 offsets"),
    # max_seqlen
    ("max-q-small", {"max_seqlen_q": 4}, "max_seqlen_q",
     "at least the longest sequence (5 tokens)"),
    ("max-k-small", {"max_seqlen_k": 1}, "max_seqlen_k",
     "at least the longest sequence (5 tokens)"),
    ("max-q-small-info", {"cu_seqlens_q": VarlenInfo.from_cu_seqlens(CU), "max_seqlen_q": 2},
     "max_seqlen_q", "at least the longest sequence (5 tokens)"),
    ("max-q-negative", {"max_seqlen_q": -1}, "max_seqlen_q", "an int >= 0"),
    ("max-k-negative", {"max_seqlen_k": -3}, "max_seqlen_k", "an int >= 0"),
    ("max-q-float", {"max_seqlen_q": 5.0}, "max_seqlen_q", "an int >= 0"),
    ("max-k-bool", {"max_seqlen_k": True}, "max_seqlen_k", "an int >= 0"),
    ("max-q-str", {"max_seqlen_q": "5"}, "max_seqlen_q", "an int >= 0"),
    ("max-k-float-tensor", {"max_seqlen_k": torch.tensor(5.0)}, "max_seqlen_k", "an int >= 0"),
    # window_size
    ("window-left", {"window_size": (-2, 0)}, "window_size", "a left value >= -1"),
    ("window-right", {"window_size": (3, -5)}, "window_size", "a right value >= -1"),
    ("window-int", {"window_size": -7}, "window_size", ">= -1 (-1 = unbounded)"),
    ("window-3-tuple", {"window_size": (1, 2, 3)}, "window_size", "a pair of ints (left, right)"),
    ("window-1-list", {"window_size": [4]}, "window_size", "a pair of ints"),
    ("window-float", {"window_size": 2.0}, "window_size", "a pair of ints"),
    ("window-bool", {"window_size": True}, "window_size", "a pair of ints"),
    ("window-float-pair", {"window_size": (1.0, 2)}, "window_size", "a pair of ints"),
    ("window-str", {"window_size": "4"}, "window_size", "a pair of ints"),
    ("causal-int", {"causal": 2}, "causal", "a bool"),  # 0 / 1 are bool-like
    # dropout, softcap, scale
    ("dropout-negative", {"dropout_p": -0.1}, "dropout_p", "a float in [0, 1)"),
    ("dropout-one", {"dropout_p": 1.0}, "dropout_p", "a float in [0, 1)"),
    ("dropout-bool", {"dropout_p": True}, "dropout_p", "a float in [0, 1)"),
    ("dropout-nan", {"dropout_p": math.nan}, "dropout_p", "a float in [0, 1)"),
    ("dropout-str", {"dropout_p": "0.1"}, "dropout_p", "a float in [0, 1)"),
    ("softcap-negative", {"softcap": -1.0}, "softcap", "a finite float >= 0"),
    ("softcap-nan", {"softcap": math.nan}, "softcap", "a finite float >= 0"),
    ("softcap-inf", {"softcap": math.inf}, "softcap", "a finite float >= 0"),
    ("softcap-bool", {"softcap": True}, "softcap", "a finite float >= 0"),
    ("scale-nan", {"softmax_scale": math.nan}, "softmax_scale", "a finite float"),
    ("scale-inf", {"softmax_scale": -math.inf}, "softmax_scale", "a finite float"),
    ("scale-str", {"softmax_scale": "0.25"}, "softmax_scale", "a finite float"),
    ("scale-bool", {"softmax_scale": False}, "softmax_scale", "a finite float"),
    # alibi slopes (batch 3, nheads 4)
    ("alibi-shape", {"alibi_slopes": torch.rand(3)}, "alibi_slopes",
     "shape (nheads,) = (4,) or (batch, nheads) = (3, 4)"),
    ("alibi-batch", {"alibi_slopes": torch.rand(2, NHEADS)}, "alibi_slopes",
     "(batch, nheads) = (3, 4)"),
    ("alibi-3d", {"alibi_slopes": torch.rand(3, NHEADS, 1)}, "alibi_slopes", "shape (nheads,)"),
    ("alibi-fp16", {"alibi_slopes": torch.rand(NHEADS, dtype=torch.float16)}, "alibi_slopes",
     "dtype float32"),
    ("alibi-fp64", {"alibi_slopes": torch.rand(NHEADS, dtype=torch.float64)}, "alibi_slopes",
     "dtype float32"),
    ("alibi-meta", {"alibi_slopes": torch.rand(NHEADS, device="meta")}, "alibi_slopes",
     "the device of q (cpu)"),
    ("alibi-list", {"alibi_slopes": [0.5] * NHEADS}, "alibi_slopes", "a float32 tensor"),
    # mask alignment
    ("alignment", {"mask_alignment": "top_right"}, "mask_alignment",
     "'bottom_right' or 'top_left'"),
    ("alignment-none", {"mask_alignment": None}, "mask_alignment", "'bottom_right' or 'top_left'"),
]

PAGED_CASES = [
    ("bt-1d", {"block_table": _paged_table([5, 0, 1])}, "block_table",
     "shape (batch = 3, max_pages)"),
    ("bt-3d", {"block_table": _paged_table([[[5, 0]], [[1, 2]], [[3, 4]]])}, "block_table",
     "shape (batch = 3, max_pages)"),
    ("bt-batch", {"block_table": _paged_table([[5, 0], [1, 2]])}, "block_table",
     "shape (batch = 3, max_pages)"),
    ("bt-float", {"block_table": torch.tensor([[5, 0], [1, 2], [3, 4]], dtype=torch.float32)},
     "block_table", "dtype int32"),
    ("bt-list", {"block_table": [[5, 0], [1, 2], [3, 4]]}, "block_table", "an int32 tensor"),
    ("bt-on-meta", {"block_table": _paged_table([[5, 0], [1, 2], [3, 4]]).to("meta")},
     "block_table", "a tensor on the CPU or on q's device (cpu)"),
    ("bt-negative", {"block_table": _paged_table([[5, -1], [1, 2], [3, 4]])}, "block_table",
     "page indices in [0, 6) (the page pool size)"),
    ("bt-too-large", {"block_table": _paged_table([[5, 0], [1, 2], [6, 4]])}, "block_table",
     "page indices in [0, 6)"),
    ("bt-int64-too-large", {"block_table": torch.tensor([[5, 0], [1, 2], [3, 60]])},
     "block_table", "page indices in [0, 6)"),
    ("kv-over-capacity", {"cu_seqlens_k": [0, 9, 9, 12], "max_seqlen_k": None}, "cu_seqlens_k",
     "kv lengths of at most max_pages * page_size = 8"),
    ("kv-over-capacity-tensor", {"cu_seqlens_k": _cu([0, 7, 7, 16]), "max_seqlen_k": 9},
     "cu_seqlens_k", "at most max_pages * page_size = 8"),
    ("paged-k-3d", {"k": _t(24, NHEADS_K, D), "v": _t(24, NHEADS_K, D)}, "k",
     "a 4-D tensor of shape (num_pages, page_size, nheads_k, head_dim)"),
    ("paged-max-k-small", {"max_seqlen_k": 6}, "max_seqlen_k",
     "at least the longest sequence (7 tokens)"),
]


def _check(exc_info, argument, text):
    exc = exc_info.value
    assert isinstance(exc, ValueError) and isinstance(exc, attnhub.AttnhubError)
    assert exc.argument == argument
    message = str(exc)
    assert message.startswith(f"{exc.kind} '{argument}': expected ")
    assert text in message, message
    assert text in exc.expected or text in str(exc.got), (exc.expected, exc.got)


@pytest.mark.parametrize("entry", [attnhub.attention_forward_varlen, attnhub.explain],
                         ids=["forward", "explain"])
@pytest.mark.parametrize(("overrides", "argument", "text"),
                         [pytest.param(*c[1:], id=c[0]) for c in CASES])
def test_invalid_argument(entry, overrides, argument, text):
    args = {**base_args(), **overrides}
    with pytest.raises(InvalidArgumentError) as exc_info:
        entry(**args)
    _check(exc_info, argument, text)


@pytest.mark.parametrize(("overrides", "argument", "text"),
                         [pytest.param(*c[1:], id=c[0]) for c in PAGED_CASES])
def test_invalid_paged_argument(overrides, argument, text):
    args = {**paged_args(), **overrides}
    with pytest.raises(InvalidArgumentError) as exc_info:
        attnhub.attention_forward_varlen(**args)
    _check(exc_info, argument, text)


def test_valid_base_and_paged_calls_run():
    """The bases of the tables above are valid: each failure is due to its one change."""
    out = attnhub.attention_forward_varlen(**base_args())
    assert out.shape == (8, NHEADS, D) and torch.isfinite(out).all()
    args = paged_args()
    # Entries past a sequence's needed pages are never read: padding there is not an error.
    args["block_table"] = _paged_table([[5, 0], [-1, 99], [3, 4]])
    out = attnhub.attention_forward_varlen(**args)
    assert out.shape == (8, NHEADS, D) and torch.isfinite(out).all()


@pytest.mark.parametrize(("values", "argument", "text"), [
    pytest.param([1, 3, 3, 8], "cu_seqlens_q", "a leading 0", id="leading"),
    pytest.param([0, 5, 3, 8], "cu_seqlens_q", "non-decreasing offsets", id="decreasing"),
    pytest.param([0, 3, 3, 6], "cu_seqlens_q", "a last offset equal to the number of rows (8)",
                 id="total"),
    pytest.param([0, 1, 1, 8], "max_seqlen_q", "at least the longest sequence (7 tokens)",
                 id="max-too-small"),
])
@pytest.mark.parametrize("dtype", [torch.int32, torch.int64])
@pytest.mark.parametrize("validate", ["auto", "full"])
def test_cpu_cu_seqlens_checked_even_with_max_seqlen(monkeypatch, values, argument, text, dtype,
                                                     validate):
    """A CPU tensor costs nothing to read: its values are validated although max_seqlen was
    given (only device tensors skip the read-back under ATTNHUB_VALIDATE=auto)."""
    monkeypatch.setenv("ATTNHUB_VALIDATE", validate)
    args = base_args()
    args.update(cu_seqlens_q=_cu(values, dtype), max_seqlen_q=5)
    with pytest.raises(InvalidArgumentError) as exc_info:
        attnhub.attention_forward_varlen(**args)
    _check(exc_info, argument, text)


@pytest.mark.parametrize(("build", "argument", "text"), [
    pytest.param(lambda: VarlenInfo.from_lengths([3, -1, 2]), "lengths",
                 "non-negative lengths", id="negative-length"),
    pytest.param(lambda: VarlenInfo.from_lengths([3, 2.5]), "lengths", "a sequence of ints",
                 id="fractional-length"),
    pytest.param(lambda: VarlenInfo.from_lengths(torch.tensor([[3, 1]])), "lengths",
                 "a 1-D integer tensor", id="2d-lengths"),
    pytest.param(lambda: VarlenInfo.from_lengths(torch.tensor([3.0, 1.0])), "lengths",
                 "a 1-D integer tensor", id="float-lengths"),
    pytest.param(lambda: VarlenInfo.from_lengths(torch.tensor([3, -1])), "lengths",
                 "non-negative lengths", id="negative-length-tensor"),
    pytest.param(lambda: VarlenInfo.from_cu_seqlens([0, 3, 2]), "cu_seqlens",
                 "non-decreasing offsets", id="cu-decreasing"),
    pytest.param(lambda: VarlenInfo.from_cu_seqlens([]), "cu_seqlens", "at least one element",
                 id="cu-empty"),
    pytest.param(lambda: VarlenInfo.from_cu_seqlens(torch.tensor([1, 3])), "cu_seqlens",
                 "a leading 0", id="cu-leading-tensor"),
    pytest.param(lambda: VarlenInfo.from_cu_seqlens(torch.tensor([0.0, 3.0])), "cu_seqlens",
                 "a 1-D int32 or int64 tensor", id="cu-float-tensor"),
    pytest.param(lambda: VarlenInfo.from_cu_seqlens([0, 1.5, 3]), "cu_seqlens",
                 "a sequence of ints", id="cu-float-list"),
    pytest.param(lambda: VarlenInfo.from_lengths([2**31]), "lengths", "a total of at most",
                 id="over-int32"),
])
def test_varlen_info_errors(build, argument, text):
    with pytest.raises(InvalidArgumentError) as exc_info:
        build()
    _check(exc_info, argument, text)


def _meta_args(cu):
    return {"q": _t(8, NHEADS, D, device="meta"), "k": _t(8, NHEADS_K, D, device="meta"),
            "v": _t(8, NHEADS_K, D, device="meta"), "cu_seqlens_q": cu, "cu_seqlens_k": cu,
            "max_seqlen_q": 5, "max_seqlen_k": 5}


@pytest.mark.parametrize("value", ["strict", "FULL", "0"])
def test_bad_validate_env_when_it_matters(monkeypatch, value):
    """ATTNHUB_VALIDATE decides whether a device cu_seqlens tensor is read back when max_seqlen
    was given; there, a bad value is an error naming the variable ('meta' plays the device)."""
    cu = torch.tensor(CU, dtype=torch.int32, device="meta")
    monkeypatch.setenv("ATTNHUB_VALIDATE", value)
    with pytest.raises(InvalidArgumentError) as exc_info:
        attnhub.explain(**_meta_args(cu))
    _check(exc_info, "ATTNHUB_VALIDATE", "'auto' or 'full'")
    monkeypatch.setenv("ATTNHUB_VALIDATE", "auto")
    assert len(attnhub.explain(**_meta_args(cu))) >= 1


@pytest.mark.parametrize(("variable", "value", "text"), [
    ("ATTNHUB_VALIDATE", "bogus", "'auto' or 'full'"),
    ("ATTNHUB_REFERENCE_CHUNK_MB", "abc", "a positive number of MiB"),
    ("ATTNHUB_REFERENCE_CHUNK_MB", "0", "a positive number of MiB"),
    ("ATTNHUB_REFERENCE_CHUNK_MB", "nan", "a positive number of MiB"),
])
def test_bad_environment_fails_every_call(monkeypatch, variable, value, text):
    """A value attnhub does not understand fails the call naming the variable, on the CPU too
    (where ATTNHUB_VALIDATE changes nothing), never silently ignored or a bare ValueError.
    ATTNHUB_REFERENCE_CHUNK_MB configures the reference: checked on calls it runs."""
    monkeypatch.setenv(variable, value)
    args = base_args()
    if variable == "ATTNHUB_REFERENCE_CHUNK_MB":
        args["backend"] = "reference"
    with pytest.raises(attnhub.errors.InvalidEnvironmentError) as exc_info:
        attnhub.attention_forward_varlen(**args)
    _check(exc_info, variable, text)
    assert str(exc_info.value).startswith(f"environment variable '{variable}'")


def test_bad_fallback_env_is_invalid_argument(monkeypatch):
    monkeypatch.setenv("ATTNHUB_FALLBACK", "sometimes")
    with pytest.raises(InvalidArgumentError) as exc_info:
        attnhub.attention_forward_varlen(**base_args())
    _check(exc_info, "ATTNHUB_FALLBACK", "one of warn, error, allow")
