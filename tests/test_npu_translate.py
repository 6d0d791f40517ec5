"""The npu adapter passes npu_fusion_attention exactly what Ascend documents, syncs nothing
with host data, and declines (with reasons) what the operator cannot compute."""

from __future__ import annotations

import sys

import pytest
import torch
from attnhub.backends.npu import simulation, softmax_stats, translate
from attnhub.backends.npu.layout import tnd_layout

import attnhub
from attnhub import host_copies
from attnhub.registry import get_registry

INT32_MAX = 2**31 - 1


@pytest.fixture
def npu():
    """The simulator as torch_npu, recording every call's keyword arguments."""
    with simulation.simulated() as module:
        calls = []
        names = {"npu_fusion_attention": "fwd", "npu_fusion_attention_grad": "bwd",
                 "npu_fusion_attention_v2": "fwd_v2", "npu_fusion_attention_grad_v2": "bwd_v2"}
        real = {name: getattr(module, name) for name in names}

        def recording(name):
            def call(*args, **kwargs):
                calls.append((names[name], kwargs))
                return real[name](*args, **kwargs)
            return call

        for name in names:
            setattr(module, name, recording(name))
        try:
            yield calls
        finally:
            for name, fn in real.items():
                setattr(module, name, fn)


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
    args = translate.forward_kwargs(problem, layout, torch.device("cpu"))
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


def test_empty_sequences_are_gathered_out_and_dead_rows_get_inner_precise_2():
    lq, lk = (0, 3, 4, 6, 2), (5, 0, 4, 2, 0)
    problem, inputs = _problem(lq, lk, window_size=(-1, 1))
    layout = tnd_layout(problem, inputs.cu_seqlens_q, inputs.cu_seqlens_k)
    assert layout.active == (2, 3)
    assert layout.actual_seq_qlen == [4, 10] and layout.actual_seq_kvlen == [4, 6]
    assert layout.q_rows == tuple(range(3, 13)) and layout.k_rows == tuple(range(5, 11))
    # sequence 3: sq 6, sk 2, right 1 -> rows i < 6 - 2 - 1 = 3 see no key
    assert layout.dead_rows == (7, 8, 9)
    args = translate.forward_kwargs(problem, layout, torch.device("cpu"))
    assert args["inner_precise"] == 2


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
    ({"alibi_slopes": torch.ones(4)}, "Sq and Skv are of equal length"),
    ({"alibi_slopes": torch.ones(1, 4), "lq": (3,), "lk": (5,), "causal": True},
     "pse_type 2"),
    ({"causal": True, "lq": (5,), "lk": (3,)}, "sq <= sk"),
    ({"return_attn_probs": True}, "return_attn_probs"),
    ({"mask_alignment": "top_left", "causal": True}, "top-left"),
])
def test_what_the_operator_cannot_do_is_a_reason(npu, kw, text):
    lq, lk = kw.pop("lq", (3,)), kw.pop("lk", (4,))
    q, k, v = _inputs(lq, lk)
    with attnhub.use_backend(None):
        explanation = attnhub.explain(q, k, v, [0, *lq], [0, *lk], **kw)
    npu_verdict = next(x for x in explanation if x.backend == "npu")
    assert any(text in r for r in npu_verdict.reasons), npu_verdict.reasons
    with pytest.raises(attnhub.BackendUnavailableError, match=text):
        attnhub.attention_forward_varlen(q, k, v, [0, *lq], [0, *lk], backend="npu", **kw)


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
    monkeypatch.delattr(sys.modules["torch_npu"], "npu_fusion_attention_v2")
    q, k, v = _inputs((3,), (3,))
    with attnhub.use_backend(None):
        explanation = attnhub.explain(q, k, v, [0, 3], [0, 3], alibi_slopes=torch.ones(4))
    reasons = next(x for x in explanation if x.backend == "npu").reasons
    assert any("npu_fusion_attention_v2" in r for r in reasons), reasons
    assert not any("equal length" in r for r in reasons)


def test_alibi_with_unequal_lengths_raises_at_call_time_when_facts_were_unknown():
    problem, inputs = _problem((3, 4), (3, 5), alibi_slopes=torch.ones(4))
    layout = tnd_layout(problem, inputs.cu_seqlens_q, inputs.cu_seqlens_k)
    with pytest.raises(ValueError, match="Sq == Skv"):
        translate.forward_kwargs(problem, layout, torch.device("cpu"), torch.ones(4))
