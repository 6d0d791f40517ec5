"""The npu adapter passes npu_fusion_attention exactly what Ascend documents, syncs nothing
with host data, and declines (with reasons) what the operator cannot compute."""

from __future__ import annotations

import itertools
import sys

import pytest
import torch
from npu_calls import recorded_calls

import attnhub
from attnhub import host_copies
from attnhub.backends.npu import simulation, softmax_stats, translate
from attnhub.backends.npu.layout import Segment, tnd_layout
from attnhub.registry import get_registry

INT32_MAX = 2**31 - 1


@pytest.fixture
def npu():
    """The simulator as torch_npu, recording (short operator name, keyword arguments)."""
    with recorded_calls(short=True) as calls:
        yield calls


def _inputs(lq, lk, n=4, nk=2, d=16, grad=False):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lq), n, d, generator=g, requires_grad=grad)
    k = torch.randn(sum(lk), nk, d, generator=g, requires_grad=grad)
    v = torch.randn(sum(lk), nk, d, generator=g, requires_grad=grad)
    return q, k, v


def _problem(lq, lk, **kw):
    q, k, v = _inputs(lq, lk)
    info_q = attnhub.VarlenInfo.from_lengths(lq)
    info_k = attnhub.VarlenInfo.from_lengths(lk)
    return attnhub.normalize(q, k, v, info_q, info_k, **kw)


@pytest.mark.parametrize(("kw", "mode", "pre", "nxt", "mask"), [
    ({}, 0, INT32_MAX, INT32_MAX, False),
    ({"causal": True}, 3, INT32_MAX, INT32_MAX, True),
    ({"causal": True, "window_size": (5, -1)}, 4, 5, 0, True),
    ({"window_size": (3, 2)}, 4, 3, 2, True),
    ({"window_size": (-1, 2)}, 4, INT32_MAX, 2, True),
    ({"window_size": (4, -1)}, 4, 4, INT32_MAX, True),
    ({"window_size": 0}, 4, 0, 0, True),
])
def test_masks_become_documented_sparse_modes(kw, mode, pre, nxt, mask):
    problem, inputs = _problem((3, 5), (4, 6), softmax_scale=0.2, dropout_p=0.1, **kw)
    layout = tnd_layout(problem, inputs.cu_seqlens_q, inputs.cu_seqlens_k)
    assert layout.whole
    args = translate.forward_kwargs(problem, layout.calls[0], torch.device("cpu"), 2)
    assert (args["sparse_mode"], args["pre_tockens"], args["next_tockens"]) == (mode, pre, nxt)
    assert args["input_layout"] == "TND" and args["head_num"] == 4
    assert args["scale"] == 0.2 and args["keep_prob"] == pytest.approx(0.9)
    assert args["actual_seq_qlen"] == [3, 8] and args["actual_seq_kvlen"] == [4, 10]
    assert all(type(x) is int for x in args["actual_seq_qlen"] + args["actual_seq_kvlen"])
    if mask:
        m = args["atten_mask"]
        assert m.shape == (2048, 2048) and m.dtype == torch.bool
        assert torch.equal(m, torch.triu(torch.ones(2048, 2048, dtype=torch.bool), 1))
        assert m is translate.compressed_mask(torch.device("cpu"))  # cached, built once
    else:
        assert args["atten_mask"] is None


def test_empty_sequences_and_rows_without_keys_are_not_passed():
    lq, lk = (0, 3, 4, 6, 2), (5, 0, 4, 2, 0)
    problem, inputs = _problem(lq, lk, window_size=(-1, 1))
    layout = tnd_layout(problem, inputs.cu_seqlens_q, inputs.cu_seqlens_k)
    (call,) = layout.calls
    assert call.sequences == (2, 3)
    # sequence 3: sq 6, sk 2, right 1 -> rows i < 6 - 2 - 1 = 3 see no key: rows 7..9 dropped
    assert call.q_rows == (Segment(3, 4), Segment(10, 3))
    assert call.k_rows == (Segment(5, 4), Segment(9, 2))
    assert call.actual_seq_qlen == [4, 7] and call.actual_seq_kvlen == [4, 6]
    args = translate.forward_kwargs(problem, call, torch.device("cpu"), len(lq))
    assert args["inner_precise"] == 0


def test_causal_with_more_queries_than_keys_runs_mode_3_on_the_rows_that_see_keys(npu):
    lq, lk = (7, 2, 3), (4, 2, 5)
    q, k, v = _inputs(lq, lk, grad=True)
    cq, ck = [0, 7, 9, 12], [0, 4, 6, 11]
    out, lse = attnhub.attention_forward_varlen(q, k, v, cq, ck, causal=True, return_lse=True,
                                                backend="npu")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [c[0] for c in npu] == ["fwd", "bwd"]
    args = npu[0][1]
    assert args["sparse_mode"] == 3 and args["inner_precise"] == 0
    assert args["actual_seq_qlen"] == [4, 6, 9] and args["actual_seq_kvlen"] == [4, 6, 11]
    ref, ref_lse = attnhub.attention_forward_varlen(q, k, v, cq, ck, causal=True,
                                                    return_lse=True, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    assert torch.isneginf(lse[:, :3]).all() and (out[:3] == 0).all()
    torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_more_than_1024_sequences_are_split_into_calls(npu):
    lens = [1 + i % 3 for i in range(1030)]
    q, k, v = _inputs(lens, lens, grad=True)
    info = attnhub.VarlenInfo.from_lengths(lens)
    out = attnhub.attention_forward_varlen(q, k, v, info, info, causal=True, backend="npu")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    assert [c[0] for c in npu] == ["fwd", "fwd", "bwd", "bwd"]
    assert [len(c[1]["actual_seq_qlen"]) for c in npu] == [1024, 6, 1024, 6]
    ref = attnhub.attention_forward_varlen(q, k, v, info, info, causal=True,
                                           backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("order", softmax_stats.ORDERS)
def test_lse_from_softmax_statistics_in_both_element_orders(order):
    lse = torch.randn(3, 5)
    smax, ssum = softmax_stats.stats_from_lse(lse, order)
    assert smax.shape == (5, 3, 8)
    torch.testing.assert_close(softmax_stats.lse_from_stats(smax, ssum, 5, 3, order), lse)
    scaled = softmax_stats.lse_from_stats(smax - 1.0, ssum * torch.e, 5, 3, order)
    torch.testing.assert_close(scaled, lse)


def test_simulator_statistics_give_the_reference_lse_in_both_orders(npu):
    from attnhub.backends.npu import simulator

    q, k, v = _inputs((3, 5), (4, 6))
    _, ref_lse = attnhub.attention_forward_varlen(q, k, v, [0, 3, 8], [0, 4, 10],
                                                  return_lse=True, backend="reference")
    for layout, order in (("", "N-major"), ("TND", "TND")):
        _, smax, ssum = simulator.npu_fusion_attention(
            q, k, v, 4, "TND", scale=0.25, actual_seq_qlen=[3, 8], actual_seq_kvlen=[4, 10],
            softmax_layout=layout)[:3]
        lse = softmax_stats.lse_from_stats(smax, ssum, 8, 4, order)
        torch.testing.assert_close(lse, ref_lse, atol=1e-5, rtol=1e-5)


def test_varlen_info_calls_never_read_the_device(npu, monkeypatch):
    lq, lk = (3, 0, 5), (4, 2, 6)
    q, k, v = _inputs(lq, lk, grad=True)
    iq, ik = attnhub.VarlenInfo.from_lengths(lq), attnhub.VarlenInfo.from_lengths(lk)

    def forbidden(*args, **kwargs):
        raise AssertionError("host-device read")

    monkeypatch.setattr(host_copies, "host_copy", forbidden)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    monkeypatch.setattr(torch.Tensor, "item", forbidden)
    out = attnhub.attention_forward_varlen(q, k, v, iq, ik, causal=True, backend="npu")
    out.sum().backward()
    monkeypatch.undo()
    assert [c[0] for c in npu] == ["fwd", "bwd"]
    fwd, bwd = npu[0][1], npu[1][1]
    assert fwd["actual_seq_qlen"] == [3, 8] and fwd["actual_seq_kvlen"] == [4, 10]
    assert bwd["scale_value"] == 16 ** -0.5 and bwd["attention_in"].shape == (8, 4, 16)
    ref = attnhub.attention_forward_varlen(q, k, v, iq, ik, causal=True, backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)


def test_gradient_through_lse_raises_a_clear_error(npu):
    q, k, v = _inputs((3,), (4,), grad=True)
    _, lse = attnhub.attention_forward_varlen(q, k, v, [0, 3], [0, 4], return_lse=True,
                                              backend="npu")
    with pytest.raises(NotImplementedError, match="through lse"):
        lse.sum().backward()


@pytest.mark.parametrize(("kw", "text"), [
    ({"softcap": 5.0}, "softcap"),
    ({"alibi_slopes": torch.ones(2, 4), "dropout_p": 0.1, "lq": (3, 4), "lk": (3, 5)},
     "some sq != sk"),
    ({"return_attn_probs": True}, "return_attn_probs"),
    ({"mask_alignment": "top_left", "causal": True}, "top-left"),
])
def test_what_the_operator_cannot_do_is_a_reason(npu, kw, text):
    lq, lk = kw.pop("lq", (3,)), kw.pop("lk", (4,))
    q, k, v = _inputs(lq, lk)
    cq, ck = [0, *itertools.accumulate(lq)], [0, *itertools.accumulate(lk)]
    with attnhub.use_backend(None):
        explanation = attnhub.explain(q, k, v, cq, ck, **kw)
    npu_verdict = next(x for x in explanation if x.backend == "npu")
    assert any(text in r for r in npu_verdict.reasons), npu_verdict.reasons
    with pytest.raises(attnhub.BackendUnavailableError, match=text):
        attnhub.attention_forward_varlen(q, k, v, cq, ck, backend="npu", **kw)


def test_without_torch_npu_attnhub_works_and_npu_is_unavailable(monkeypatch):
    monkeypatch.delenv(simulation.ENV_VAR, raising=False)
    monkeypatch.setitem(sys.modules, "torch_npu", None)  # import torch_npu -> ImportError
    from attnhub.backends.npu import NpuBackend

    backend = NpuBackend()
    assert backend.device_types == frozenset({"npu"}) and backend.priority == 100
    assert backend.unavailable_reasons()[0].startswith("torch_npu not installed")
    assert "npu" in get_registry().backends


@pytest.mark.parametrize("shape", ["head", "batch_head"])
def test_alibi_becomes_the_generated_pse_of_the_v2_operators(npu, shape):
    lens = (3, 0, 5, 4)  # the empty sequence is gathered out, and its slopes row with it
    q, k, v = _inputs(lens, lens, grad=True)
    info = attnhub.VarlenInfo.from_lengths(lens)
    slopes = torch.rand(4) if shape == "head" else torch.rand(4, 4)
    out = attnhub.attention_forward_varlen(q, k, v, info, info, alibi_slopes=slopes,
                                           window_size=(2, 1), softmax_scale=0.3, backend="npu")
    out.sum().backward()
    assert [c[0] for c in npu] == ["fwd_v2", "bwd_v2"]
    want_pse = slopes if shape == "head" else slopes[[0, 2, 3]]
    for _, args in npu:
        assert args["pse_type"] == 2
        assert args["pse"].dtype == torch.float32 and args["pse"].shape == want_pse.shape
        torch.testing.assert_close(args["pse"], want_pse, rtol=0, atol=0)
        assert args["q_start_idx"] is None and args["kv_start_idx"] is None
        assert (args["sparse_mode"], args["pre_tokens"], args["next_tokens"]) == (4, 2, 1)
        assert "pre_tockens" not in args and "next_tockens" not in args
        assert args["actual_seq_qlen"] == args["actual_seq_kvlen"] == [3, 8, 12]
    assert npu[0][1]["scale"] == 0.3 and npu[1][1]["scale_value"] == 0.3


def test_alibi_gradients_match_the_reference(npu):
    lens = (4, 0, 6, 1)
    q, k, v = _inputs(lens, lens, grad=True)
    slopes = torch.rand(4, 4) * 2
    info = attnhub.VarlenInfo.from_lengths(lens)
    results = []
    for backend in ("npu", "reference"):
        out = attnhub.attention_forward_varlen(q, k, v, info, info, alibi_slopes=slopes,
                                               causal=True, backend=backend)
        results.append((out, *torch.autograd.grad((out * out).sum(), (q, k, v))))
    no_alibi = attnhub.attention_forward_varlen(q, k, v, info, info, causal=True,
                                                backend="reference")
    assert (results[1][0] - no_alibi).abs().max() > 0.1  # the bias matters here
    for got, ref in zip(*results, strict=True):
        torch.testing.assert_close(got, ref, atol=1e-5, rtol=1e-5)


def test_alibi_without_the_v2_operators_is_a_reason(npu, monkeypatch):
    q, k, v = _inputs((3,), (3,))
    with monkeypatch.context() as m, attnhub.use_backend(None):
        m.delattr(sys.modules["torch_npu"], "npu_fusion_attention_v2")
        explanation = attnhub.explain(q, k, v, [0, 3], [0, 3], alibi_slopes=torch.ones(4))
    reasons = next(x for x in explanation if x.backend == "npu").reasons
    assert any("npu_fusion_attention_v2" in r for r in reasons), reasons


@pytest.mark.parametrize("causal", [False, True])
def test_alibi_with_unequal_lengths_is_one_v2_call_per_shift_with_start_indices(npu, causal):
    lq, lk = (3, 5, 4, 2), (6, 5, 2, 5)  # sk - sq: 3, 0, -2, 3
    q, k, v = _inputs(lq, lk, grad=True)
    cq, ck = [0, 3, 8, 12, 14], [0, 6, 11, 13, 18]
    slopes = torch.rand(4, 4) * 2
    out = attnhub.attention_forward_varlen(q, k, v, cq, ck, alibi_slopes=slopes, causal=causal,
                                           backend="npu")
    grads = torch.autograd.grad((out * out).sum(), (q, k, v))
    fwd = [c[1] for c in npu if c[0] == "fwd_v2"]
    starts = [(a["q_start_idx"], a["kv_start_idx"], a["actual_seq_qlen"], a["actual_seq_kvlen"])
              for a in fwd]
    if causal:  # sequence 2 (sq 4 > sk 2): its first 2 rows see no key, its shift becomes 0
        assert starts == [([3], [0], [3, 5], [6, 11]), (None, None, [5, 7], [5, 7])]
        want_pse = [slopes[[0, 3]], slopes[[1, 2]]]
    else:
        assert starts == [([3], [0], [3, 5], [6, 11]), (None, None, [5], [5]),
                          ([0], [2], [4], [2])]
        want_pse = [slopes[[0, 3]], slopes[[1]], slopes[[2]]]
    assert len(npu) == 2 * len(fwd)
    for args, pse in zip(fwd, want_pse, strict=True):
        torch.testing.assert_close(args["pse"], pse, rtol=0, atol=0)
    ref = attnhub.attention_forward_varlen(q, k, v, cq, ck, alibi_slopes=slopes, causal=causal,
                                           backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, torch.autograd.grad((ref * ref).sum(), (q, k, v)),
                         strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_device_lengths_go_to_the_v3_operators_without_a_host_read(npu, monkeypatch):
    lens = (3, 0, 5, 2)
    q, k, v = _inputs(lens, lens, grad=True)
    cu = torch.tensor([0, 3, 3, 8, 10], dtype=torch.int32)

    def forbidden(*args, **kwargs):
        raise AssertionError("host-device read")

    monkeypatch.setattr(host_copies, "can_read_back", lambda: False)  # lengths stay unknown
    monkeypatch.setattr(host_copies, "host_copy", forbidden)
    monkeypatch.setattr(host_copies, "cached", lambda t: None)
    monkeypatch.setattr(torch.Tensor, "tolist", forbidden)
    out = attnhub.attention_forward_varlen(q, k, v, cu, cu, max_seqlen_q=5, max_seqlen_k=5,
                                           causal=True, backend="npu")
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    monkeypatch.undo()
    assert [c[0] for c in npu] == ["fwd_v3", "bwd_v3"]
    for _, args in npu:
        for name in ("actual_seq_qlen", "actual_seq_kvlen"):
            assert args[name].dtype == torch.int64 and args[name].tolist() == [3, 3, 8, 10]
        assert args["sparse_mode"] == 3
    info = attnhub.VarlenInfo.from_lengths(lens)
    ref = attnhub.attention_forward_varlen(q, k, v, info, info, causal=True,
                                           backend="reference")
    torch.testing.assert_close(out, ref, atol=1e-5, rtol=1e-5)
    for got, want in zip(grads, torch.autograd.grad(ref.sum(), (q, k, v)), strict=True):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


def test_device_lengths_with_dropout_carry_seed_and_offset_as_tensors(npu, monkeypatch):
    lens = (6, 4)
    q, k, v = _inputs(lens, lens, grad=True)
    cu = torch.tensor([0, 6, 10], dtype=torch.int32)
    monkeypatch.setattr(host_copies, "can_read_back", lambda: False)
    torch.manual_seed(3)
    out = attnhub.attention_forward_varlen(q, k, v, cu, cu, max_seqlen_q=6, max_seqlen_k=6,
                                           dropout_p=0.3, backend="npu")
    out.sum().backward()
    bwd = npu[1][1]
    assert npu[1][0] == "bwd_v3" and "numels" not in bwd
    assert isinstance(bwd["seed"], torch.Tensor) and bwd["seed"].numel() == 1
    assert isinstance(bwd["offset"], torch.Tensor) and bwd["keep_prob"] == pytest.approx(0.7)


def test_different_offset_tensors_without_host_lengths_read_them_once(npu, monkeypatch):
    q, k, v = _inputs((3, 5), (4, 6))
    cq = torch.tensor([0, 3, 8], dtype=torch.int32)
    ck = torch.tensor([0, 4, 10], dtype=torch.int32)
    monkeypatch.setattr(host_copies, "can_read_back", lambda: False)
    attnhub.attention_forward_varlen(q, k, v, cq, ck, max_seqlen_q=5, max_seqlen_k=6,
                                     backend="npu")
    assert [c[0] for c in npu] == ["fwd"]  # sq may differ from sk: v1 with host lists
    assert npu[0][1]["actual_seq_qlen"] == [3, 8]


def _paged(lq, lk, page, dtype=torch.float16, **kw):
    g = torch.Generator().manual_seed(0)
    q = torch.randn(sum(lq), 4, 16, generator=g).to(dtype)
    pages = [-(-n // page) for n in lk]
    pool_k = torch.randn(sum(pages) + 2, page, 2, 16, generator=g).to(dtype)
    pool_v = torch.randn(sum(pages) + 2, page, 2, 16, generator=g).to(dtype)
    order = torch.randperm(sum(pages) + 2, generator=g)
    table = torch.full((len(lk), max(pages) + 1), int(order[-1]), dtype=torch.int32)
    first = 0
    for b, n in enumerate(pages):
        table[b, :n] = order[first:first + n].to(torch.int32)
        first += n
    cq, ck = [0, *itertools.accumulate(lq)], [0, *itertools.accumulate(lk)]
    args = (q, pool_k, pool_v, cq, ck)
    return args, {"block_table": table, **kw}


@pytest.mark.parametrize(("lq", "lk", "page", "kw", "width", "mode"), [
    ((20, 9, 0), (40, 30, 5), 128, {"causal": True}, 20, 3),
    ((12, 9), (5, 30), 128, {"window_size": (5, 0)}, 9, 4),  # seq 0: 7 rows without keys
    # one row left in each sequence, but not a decode: Q_S is padded to 2, so mode 3 applies
    ((7, 4), (1, 1), 128, {"causal": True}, 1, 3),
    ((1, 1, 1), (40, 0, 17), 16, {"causal": True}, 1, 0),  # decode
    ((1, 1), (40, 17), 16, {"window_size": (8, 0)}, 1, 0),  # decode, (B, KV_S) mask
])
def test_paged_kv_goes_to_the_fused_infer_operator(npu, lq, lk, page, kw, width, mode):
    args, kwargs = _paged(lq, lk, page, **kw)
    out, lse = attnhub.attention_forward_varlen(*args, **kwargs, return_lse=True,
                                                backend="npu")
    (name, call), = npu
    assert name == "infer"
    active = [b for b in range(len(lq)) if lq[b] and lk[b]]
    assert call["input_layout"] == "BSND" and call["block_size"] == page
    assert call["block_table"].dtype == torch.int32
    assert call["block_table"].shape[0] == len(active)
    assert call["actual_seq_lengths_kv"] == [lk[b] for b in active]
    assert call["softmax_lse_flag"] is True and call["sparse_mode"] == mode
    assert call["num_heads"] == 4 and call["num_key_value_heads"] == 2
    assert len(call["actual_seq_lengths"]) == len(active)
    assert max(call["actual_seq_lengths"]) <= width
    if width == 1 and kw.get("window_size"):
        mask = call["atten_mask"]
        assert mask.dtype == torch.bool
        assert mask.shape == (len(active), call["block_table"].shape[1] * page)
        assert mask.sum(1).tolist() == [lk[b] - 1 - kw["window_size"][0] for b in active]
    ref, ref_lse = attnhub.attention_forward_varlen(*args, **kwargs, return_lse=True,
                                                    backend="reference")
    torch.testing.assert_close(out, ref, atol=2e-3, rtol=2e-3)
    assert torch.equal(torch.isneginf(lse), torch.isneginf(ref_lse))
    torch.testing.assert_close(lse, ref_lse, atol=1e-4, rtol=1e-4)


@pytest.mark.parametrize(("lq", "lk", "page", "kw", "text"), [
    ((20, 9), (40, 30), 64, {}, "multiple of 128"),
    ((1, 1), (40, 30), 24, {}, "multiple of 16"),
    ((20, 9), (40, 30), 128, {"dtype": torch.float32}, "float16 or bfloat16"),
    ((20, 9), (40, 30), 128, {"alibi_slopes": torch.ones(4)}, "pse_shift"),
])
def test_paged_kv_outside_the_documented_rules_is_a_reason(npu, lq, lk, page, kw, text):
    args, kwargs = _paged(lq, lk, page, **kw)
    with attnhub.use_backend(None):
        explanation = attnhub.explain(*args, **kwargs)
    reasons = next(x for x in explanation if x.backend == "npu").reasons
    assert any(text in r for r in reasons), reasons
    with pytest.raises(attnhub.BackendUnavailableError, match=text):
        attnhub.attention_forward_varlen(*args, **kwargs, backend="npu")


def test_paged_kv_has_no_backward(npu):
    args, kwargs = _paged((20, 9), (40, 30), 128, causal=True)
    args[0].requires_grad_()
    with pytest.raises(attnhub.BackendUnavailableError, match="without a backward"):
        attnhub.attention_forward_varlen(*args, **kwargs, backend="npu")
