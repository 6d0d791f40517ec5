"""The CUDA adapters on the CPU, with their kernels replaced by recording fakes.

Each fake takes the kernel's own arguments, rebuilds the call from them alone, computes it
with the reference kernel and answers in the kernel's own conventions (+inf lse on rows that
see no key for FA2/FA3, uint64 rng_state for torch's op, None = unbounded windows for FA4).
So a wrong translation (scale, window, causal, offsets, rng hand-over, lse convention) changes
the numbers, and the tests compare against the reference run directly.
"""

from __future__ import annotations

import types

import pytest
import torch

import attnhub
from attnhub.backends.cuda import base, device, fa3, fa4, flash_attn2, torch_flash
from attnhub.backends.reference import kernel
from attnhub.inputs import VarlenInputs
from attnhub.ops import problem_from_op_args

INF = float("inf")
LENGTHS_Q = [5, 0, 3, 7, 1]
LENGTHS_K = [5, 4, 0, 4, 6]  # sq > sk rows (causal), an empty q side, an empty k side


def _call(dtype=torch.float16, nheads=4, nheads_k=2, head_dim=16, grad=False, seed=0, **kw):
    g = torch.Generator().manual_seed(seed)
    tq, tk = sum(LENGTHS_Q), sum(LENGTHS_K)
    q = torch.randn(tq, nheads, head_dim, generator=g).to(dtype).requires_grad_(grad)
    k = torch.randn(tk, nheads_k, head_dim, generator=g).to(dtype).requires_grad_(grad)
    v = torch.randn(tk, nheads_k, head_dim, generator=g).to(dtype).requires_grad_(grad)
    iq = attnhub.VarlenInfo.from_lengths(LENGTHS_Q)
    ik = attnhub.VarlenInfo.from_lengths(LENGTHS_K)
    problem, inputs = attnhub.normalize(q, k, v, iq, ik, **kw)
    dout = torch.randn(tq, nheads, head_dim, generator=g).to(dtype)
    return problem, inputs, dout


def _reference(problem, inputs, dout=None, rng_state=None):
    inputs = VarlenInputs(inputs.q.detach(), inputs.k.detach(), inputs.v.detach(),
                          inputs.cu_seqlens_q, inputs.cu_seqlens_k, inputs.alibi_slopes,
                          inputs.block_table, rng_state, sinks=inputs.sinks)
    res = kernel.forward(problem, inputs)
    grads = None if dout is None else kernel.backward(problem, inputs, dout)
    return res, grads


def _kernel_problem(q, k, cu_q, alibi, block_table, max_q, max_k, scale, left, right, softcap,
                    dropout_p, deterministic=False, sinks=None):
    """The call as a kernel sees it, rebuilt from the kernel's arguments only."""
    alibi_kind = None if alibi is None else ("head" if alibi.dim() == 1 else "batch_head")
    return problem_from_op_args(
        q, k, cu_q, {"alibi_slopes": alibi, "block_table": block_table, "sinks": sinks}, max_q,
        max_k, scale, False, None, None, {
            "window": (left, right), "causal": right == 0, "softcap": softcap,
            "dropout_p": dropout_p, "deterministic": deterministic, "alibi": alibi_kind,
            "sinks": sinks is not None})


class FakeAten:
    """torch.ops.aten._flash_attention_forward / _backward in the op's conventions."""

    def __init__(self):
        self.forward_calls, self.backward_calls = [], []
        self.fail = None  # an error the next forward raises, as a failing launch would

    def forward(self, q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, is_causal, debug, *,
                scale, window_size_left=None, window_size_right=None):
        window_size_left = -1 if window_size_left is None else window_size_left
        window_size_right = -1 if window_size_right is None else window_size_right
        # The real kernel's layout checks (flash_api.cpp: CHECK_CONTIGUOUS, stride(-1) == 1).
        if any(t.stride(-1) != 1 for t in (q, k, v)):
            raise RuntimeError("Input tensor must have contiguous last dimension")
        if not (cu_q.is_contiguous() and cu_k.is_contiguous()):
            raise RuntimeError("cu_seqlens_q must be contiguous")
        if self.fail is not None:
            raise self.fail
        self.forward_calls.append(dict(
            cu_dtype=(cu_q.dtype, cu_k.dtype), max_q=max_q, max_k=max_k, dropout_p=dropout_p,
            is_causal=is_causal, scale=scale, window=(window_size_left, window_size_right)))
        right = 0 if is_causal else window_size_right
        p = _kernel_problem(q, k, cu_q, None, None, max_q, max_k, scale, window_size_left,
                            right, 0.0, dropout_p)
        rng = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64)
        res = kernel.forward(p, VarlenInputs(q, k, v, cu_q, cu_k, rng_state=rng))
        lse = torch.where(torch.isneginf(res.lse), INF, res.lse)
        return res.out, lse, rng.view(torch.uint64), torch.empty(()), torch.empty(0)

    def backward(self, dout, q, k, v, out, lse, cu_q, cu_k, max_q, max_k, dropout_p, is_causal,
                 rng, unused, *, scale, window_size_left, window_size_right):
        self.backward_calls.append(dict(
            lse=lse.clone(), rng_dtype=rng.dtype, max_q=max_q,
            deterministic=torch.are_deterministic_algorithms_enabled()
            and not torch.is_deterministic_algorithms_warn_only_enabled()))
        right = 0 if is_causal else window_size_right
        p = _kernel_problem(q, k, cu_q, None, None, max_q, max_k, scale, window_size_left,
                            right, 0.0, dropout_p)
        seed = rng.view(torch.int64) if dropout_p > 0 else None
        return tuple(kernel.backward(p, VarlenInputs(q, k, v, cu_q, cu_k, rng_state=seed),
                                     dout))


@pytest.fixture
def aten(monkeypatch):
    fake = FakeAten()
    monkeypatch.setattr(torch_flash, "aten_forward", fake.forward)
    monkeypatch.setattr(torch_flash, "aten_backward", fake.backward)
    return fake


def test_torch_flash_forward_translates_arguments_and_lse(aten):
    problem, inputs, _ = _call(causal=True, window_size=(3, -1), softmax_scale=0.3)
    res = torch_flash.TorchFlashBackend().forward(problem, inputs)
    ref, _ = _reference(problem, inputs)
    (call,) = aten.forward_calls
    assert call == dict(cu_dtype=(torch.int32, torch.int32), max_q=7, max_k=6, dropout_p=0.0,
                        is_causal=True, scale=0.3, window=(3, 0))
    assert torch.equal(res.out, ref.out)
    assert torch.isneginf(res.lse).any()  # rows that see no key: the kernel's +inf, converted
    assert torch.equal(res.lse, ref.lse)
    assert res.rng_state is None


def test_torch_flash_avoids_max_seqlen_q_below_two(aten):
    k = torch.randn(9, 2, 16, dtype=torch.float16)
    for lengths in ([1, 1, 0], [0, 0, 0]):  # decode (max 1) and no queries at all (max 0)
        q = torch.randn(sum(lengths), 4, 16, dtype=torch.float16)
        cu = [0, *torch.tensor(lengths).cumsum(0).tolist()]
        problem, inputs = attnhub.normalize(q, k, k, cu, [0, 4, 9, 9])
        out = torch_flash.TorchFlashBackend().forward_out(problem, inputs)
        assert torch.equal(out, _reference(problem, inputs)[0].out)
    # never 1 (FA2's GQA decode swap) nor 0 (a grid of no blocks)
    assert [c["max_q"] for c in aten.forward_calls] == [2, 2]


def test_torch_flash_backward_gets_the_kernels_lse_convention(aten):
    problem, inputs, dout = _call(causal=True, grad=True)
    backend = torch_flash.TorchFlashBackend()
    res = backend.forward(problem, inputs)
    grads = backend.backward(problem, inputs, res.out, res.lse, dout)
    (call,) = aten.backward_calls
    assert torch.isposinf(call["lse"]).any() and not torch.isneginf(call["lse"]).any()
    assert torch.isneginf(res.lse).any()  # the caller's lse is left alone
    _, ref = _reference(problem, inputs, dout)
    for got, want in zip(grads, ref, strict=True):
        assert torch.equal(got, want)


def test_torch_flash_dropout_hands_rng_state_to_backward(aten):
    problem, inputs, dout = _call(dropout_p=0.3, grad=True)
    backend = torch_flash.TorchFlashBackend()
    res = backend.forward(problem, inputs)
    assert res.rng_state.dtype == torch.int64 and res.rng_state.shape == (2,)
    inputs.rng_state = res.rng_state  # what attnhub's custom op hands to backward
    grads = backend.backward(problem, inputs, res.out, res.lse, dout)
    assert aten.backward_calls[0]["rng_dtype"] == torch.uint64
    ref, ref_grads = _reference(problem, inputs, dout, rng_state=res.rng_state)
    assert torch.equal(res.out, ref.out)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.equal(got, want)


@pytest.mark.parametrize("deterministic", [False, True])
def test_torch_flash_deterministic_backward_uses_torchs_mode(aten, deterministic):
    problem, inputs, dout = _call(grad=True, deterministic=deterministic)
    backend = torch_flash.TorchFlashBackend()
    res = backend.forward(problem, inputs)
    before = torch.are_deterministic_algorithms_enabled()
    backend.backward(problem, inputs, res.out, res.lse, dout)
    assert aten.backward_calls[0]["deterministic"] is deterministic
    assert torch.are_deterministic_algorithms_enabled() is before


def test_torch_flash_autograd_out_runner_is_the_aten_forward_where_its_node_applies(aten):
    """TorchFlashBackend.autograd_out_runner: out of the aten forward (whose autograd node
    torch registers) with the call's arguments; None with dropout, with ``deterministic`` and
    for a batch of no sequences, which take attnhub's Function."""
    backend = torch_flash.TorchFlashBackend()
    problem, inputs, _ = _call(causal=True, window_size=(3, -1), softmax_scale=0.3, grad=True)
    run = backend.autograd_out_runner(problem)
    out = run(inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k)
    (call,) = aten.forward_calls
    assert call["window"] == (3, 0) and call["scale"] == 0.3 and call["dropout_p"] == 0.0
    assert torch.equal(out, _reference(problem, inputs)[0].out)
    for kw in ({"dropout_p": 0.2}, {"deterministic": True}):
        problem, inputs, _ = _call(grad=True, **kw)
        assert backend.autograd_out_runner(problem) is None
    q = torch.randn(0, 4, 16, dtype=torch.float16, requires_grad=True)
    problem, inputs = attnhub.normalize(q, q[:, :2], q[:, :2], [0], [0])
    assert backend.autograd_out_runner(problem) is None
    assert len(aten.forward_calls) == 1


def test_torch_flash_rejects_dlse_with_a_reason(aten):
    problem, inputs, dout = _call(grad=True)
    backend = torch_flash.TorchFlashBackend()
    res = backend.forward(problem, inputs)
    with pytest.raises(NotImplementedError, match="gradient through lse"):
        backend.backward(problem, inputs, res.out, res.lse, dout, torch.ones_like(res.lse))


def test_torch_flash_empty_batch_calls_no_kernel(aten):
    q = torch.randn(0, 4, 16, dtype=torch.float16)
    problem, inputs = attnhub.normalize(q, q[:, :2], q[:, :2], [0], [0])
    res = torch_flash.TorchFlashBackend().forward(problem, inputs)
    assert res.out.shape == q.shape and res.lse.shape == (4, 0)
    assert aten.forward_calls == []


@pytest.mark.parametrize("module", [torch_flash, flash_attn2, fa3, fa4],
                         ids=lambda m: m.__name__.rsplit(".", 1)[-1])
def test_every_adapter_shares_the_skeleton(module, monkeypatch):
    """The CudaAdapter base: batch 0 launches nothing (zeros, lse -inf, zero gradients), and
    a gradient through lse is refused by the kernels whose backward takes none."""
    def no_kernel(*args, **kwargs):
        raise AssertionError("a kernel was launched")

    if module is torch_flash:
        monkeypatch.setattr(torch_flash, "aten_forward", no_kernel)
        monkeypatch.setattr(torch_flash, "aten_backward", no_kernel)
    else:
        monkeypatch.setattr(module, "kernels", no_kernel)
    (backend,) = [b for b in ALL if type(b).__module__ == module.__name__]
    assert isinstance(backend, base.CudaAdapter)
    assert backend.device_types == {"cuda"} and backend.backward_uses_forward_stats
    q = torch.randn(0, 4, 16, dtype=torch.float16, requires_grad=True)
    k = torch.randn(0, 2, 16, dtype=torch.float16, requires_grad=True)
    problem, inputs = attnhub.normalize(q, k, k, [0], [0])
    res = backend.forward(problem, inputs)
    assert res.out.shape == q.shape and res.lse.shape == (4, 0)
    assert backend.forward_out(problem, inputs).shape == q.shape
    grads = backend.backward(problem, inputs, res.out, res.lse, torch.zeros_like(q))
    assert [g.shape for g in grads] == [q.shape, k.shape, k.shape]
    dlse = torch.zeros_like(res.lse)
    if module is fa4:
        backend.backward(problem, inputs, res.out, res.lse, torch.zeros_like(q), dlse)
    else:
        with pytest.raises(NotImplementedError, match="cannot propagate a gradient through lse"):
            backend.backward(problem, inputs, res.out, res.lse, torch.zeros_like(q), dlse)


def test_torch_flash_forward_out_skips_the_lse_fixup(aten, monkeypatch):
    calls = []
    monkeypatch.setattr(torch_flash, "lse_to_attnhub", lambda lse: calls.append(lse) or lse)
    problem, inputs, _ = _call()
    out = torch_flash.TorchFlashBackend().forward_out(problem, inputs)
    assert calls == [] and torch.equal(out, _reference(problem, inputs)[0].out)


class _CPUTorchFlash(torch_flash.TorchFlashBackend):
    """torch-flash claiming the CPU, so dispatch and the custom ops run it here."""

    device_types = frozenset({"cpu"})

    def unavailable_reasons(self):
        return []


def test_torch_flash_through_dispatch_and_autograd(aten, install):
    install(_CPUTorchFlash())
    problem, inputs, dout = _call(grad=True, causal=True)
    q, k, v = inputs.q, inputs.k, inputs.v
    iq = attnhub.VarlenInfo.from_lengths(LENGTHS_Q)
    ik = attnhub.VarlenInfo.from_lengths(LENGTHS_K)
    out, lse = attnhub.attention_forward_varlen(q, k, v, iq, ik, causal=True, return_lse=True)
    assert attnhub.explain(q, k, v, iq, ik, causal=True).selected == "torch-flash"
    grads = torch.autograd.grad(out, (q, k, v), dout)
    ref, ref_grads = _reference(problem, inputs, dout)
    assert torch.equal(out, ref.out) and torch.equal(lse, ref.lse)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.equal(got, want)


def _fake_fa2(record):
    def forward(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, scale, causal, *,
                window_size_left, window_size_right, softcap, alibi_slopes, return_softmax,
                block_table):
        record.append(dict(max_q=max_q, window=(window_size_left, window_size_right),
                           causal=causal, softcap=softcap, alibi=alibi_slopes is not None,
                           block_table=block_table is not None, scale=scale))
        right = 0 if causal else window_size_right
        p = _kernel_problem(q, k, cu_q, alibi_slopes, block_table, max_q, max_k, scale,
                            window_size_left, right, softcap, dropout_p)
        rng = torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64)
        res = kernel.forward(p, VarlenInputs(q, k, v, cu_q, cu_k, alibi_slopes, block_table,
                                             rng))
        return res.out, torch.where(torch.isneginf(res.lse), INF, res.lse), None, rng

    def backward(dout, q, k, v, out, lse, dq, dk, dv, cu_q, cu_k, max_q, max_k, dropout_p,
                 scale, causal, left, right, softcap, alibi, deterministic, rng):
        record.append(dict(lse_posinf=bool(torch.isposinf(lse).any()),
                           deterministic=deterministic, rng=rng))
        p = _kernel_problem(q, k, cu_q, alibi, None, max_q, max_k, scale, left,
                            0 if causal else right, softcap, dropout_p)
        g = kernel.backward(p, VarlenInputs(q, k, v, cu_q, cu_k, alibi, None, rng), dout)
        for buf, val in zip((dq, dk, dv), g, strict=True):
            buf.copy_(val)
        return torch.empty(0)

    return types.SimpleNamespace(_flash_attn_varlen_forward=forward,
                                 _flash_attn_varlen_backward=backward)


def test_flash_attn2_softcap_alibi_and_grads(monkeypatch):
    record = []
    monkeypatch.setattr(flash_attn2, "kernels", lambda: _fake_fa2(record))
    slopes = torch.tensor([0.5, 0.25, 0.125, 0.0625])
    problem, inputs, dout = _call(grad=True, causal=True, softcap=5.0, alibi_slopes=slopes,
                                  deterministic=True)
    backend = flash_attn2.FlashAttn2Backend()
    assert backend.why_not(problem) == []
    res = backend.forward(problem, inputs)
    grads = backend.backward(problem, inputs, res.out, res.lse, dout)
    assert record[0] == dict(max_q=7, window=(-1, 0), causal=True, softcap=5.0, alibi=True,
                             block_table=False, scale=0.25)
    assert record[1] == dict(lse_posinf=True, deterministic=True, rng=None)
    ref, ref_grads = _reference(problem, inputs, dout)
    assert torch.equal(res.out, ref.out) and torch.equal(res.lse, ref.lse)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.equal(got, want)


def _fake_fa3(record):
    def forward(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                softmax_scale, causal, window_size_left, window_size_right, softcap):
        record.append(dict(max_q=max_seqlen_q, window=(window_size_left, window_size_right),
                           causal=causal))
        p = _kernel_problem(q, k, cu_seqlens_q, None, None, max_seqlen_q, max_seqlen_k,
                            softmax_scale, window_size_left,
                            0 if causal else window_size_right, softcap, 0.0)
        res = kernel.forward(p, VarlenInputs(q, k, v, cu_seqlens_q, cu_seqlens_k))
        return res.out, torch.where(torch.isneginf(res.lse), INF, res.lse), None, None

    def backward(dout, q, k, v, out, lse, cu_q, cu_k, used_q, used_k, max_q, max_k, dq, dk, dv,
                 scale, causal, left, right, softcap, deterministic):
        record.append(dict(lse_posinf=bool(torch.isposinf(lse).any()), used=(used_q, used_k)))
        p = _kernel_problem(q, k, cu_q, None, None, max_q, max_k, scale, left,
                            0 if causal else right, softcap, 0.0)
        for buf, val in zip((dq, dk, dv), kernel.backward(
                p, VarlenInputs(q, k, v, cu_q, cu_k), dout), strict=True):
            buf.copy_(val)
        return torch.empty(0)

    return types.SimpleNamespace(_flash_attn_forward=forward, _flash_attn_backward=backward)


def test_fa3_window_and_grads(monkeypatch):
    record = []
    monkeypatch.setattr(fa3, "kernels", lambda: _fake_fa3(record))
    problem, inputs, dout = _call(grad=True, window_size=(2, 1), softcap=30.0)
    backend = fa3.FA3Backend()
    res = backend.forward(problem, inputs)
    grads = backend.backward(problem, inputs, res.out, res.lse, dout)
    assert record == [dict(max_q=7, window=(2, 1), causal=False),
                      dict(lse_posinf=True, used=(None, None))]
    ref, ref_grads = _reference(problem, inputs, dout)
    assert torch.equal(res.out, ref.out) and torch.equal(res.lse, ref.lse)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.equal(got, want)


def _fake_fa4(record):
    def window(left, right, causal):
        left = -1 if left is None else left
        right = 0 if causal else (-1 if right is None else right)
        return left, right

    def forward(q, k, v, *, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                softmax_scale, causal, softcap, window_size_left, window_size_right,
                learnable_sink, return_lse):
        record.append(dict(window=(window_size_left, window_size_right), causal=causal,
                           return_lse=return_lse, sink=learnable_sink))
        left, right = window(window_size_left, window_size_right, causal)
        p = _kernel_problem(q, k, cu_seqlens_q, None, None, max_seqlen_q, max_seqlen_k,
                            softmax_scale, left, right, softcap, 0.0, sinks=learnable_sink)
        res = kernel.forward(p, VarlenInputs(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                             sinks=learnable_sink))
        return res.out, res.lse if return_lse else None, None, None, None

    def backward(q, k, v, out, dout, lse, scale, causal, softcap, *, window_size_left,
                 window_size_right, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                 deterministic, dlse, learnable_sink):
        record.append(dict(dlse=dlse is not None, deterministic=deterministic,
                           sink=learnable_sink))
        left, right = window(window_size_left, window_size_right, causal)
        p = _kernel_problem(q, k, cu_seqlens_q, None, None, max_seqlen_q, max_seqlen_k, scale,
                            left, right, softcap, 0.0, sinks=learnable_sink)
        g = kernel.backward(p, VarlenInputs(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                            sinks=learnable_sink), dout, dlse)
        # FA4's convention: (dq, dk, dv), and dsink fourth only with learnable_sink
        return (*g, g.dsinks) if learnable_sink is not None else tuple(g)

    return types.SimpleNamespace(_flash_attn_fwd=forward, _flash_attn_bwd=backward)


@pytest.mark.parametrize(("window", "causal", "expected"), [
    ((-1, -1), False, (None, None)), ((-1, -1), True, (None, 0)), ((3, -1), False, (3, None)),
    ((-1, 2), False, (None, 2)), ((4, 1), False, (4, 1)), ((5, 0), True, (5, 0))])
def test_fa4_window_translation(monkeypatch, window, causal, expected):
    record = []
    monkeypatch.setattr(fa4, "kernels", lambda: _fake_fa4(record))
    problem, inputs, _ = _call(window_size=window, causal=causal)
    res = fa4.FA4Backend().forward(problem, inputs)
    assert record == [dict(window=expected, causal=causal, return_lse=True, sink=None)]
    ref, _ = _reference(problem, inputs)
    assert torch.equal(res.out, ref.out) and torch.equal(res.lse, ref.lse)


def test_fa4_passes_dlse_and_out_only_skips_lse(monkeypatch):
    record = []
    monkeypatch.setattr(fa4, "kernels", lambda: _fake_fa4(record))
    problem, inputs, dout = _call(grad=True, causal=True, deterministic=True)
    backend = fa4.FA4Backend()
    res = backend.forward(problem, inputs)
    dlse = torch.randn(res.lse.shape).masked_fill(torch.isneginf(res.lse), 0)
    grads = backend.backward(problem, inputs, res.out, res.lse, dout, dlse)
    assert record[1] == dict(dlse=True, deterministic=True, sink=None)
    ref_inputs = VarlenInputs(*(t.detach() for t in (inputs.q, inputs.k, inputs.v)),
                              inputs.cu_seqlens_q, inputs.cu_seqlens_k)
    ref_grads = kernel.backward(problem, ref_inputs, dout, dlse)
    for got, want in zip(grads, ref_grads, strict=True):
        assert torch.equal(got, want)
    backend.forward_out(problem, inputs)
    assert record[2]["return_lse"] is False


SINKS = torch.tensor([0.5, -1.0, 2.0, 0.25])


def test_fa4_passes_sinks_and_returns_dsinks(monkeypatch):
    """learnable_sink goes to both kernels as attnhub's float32 sinks; rows that see no key
    come back with lse = sink; dsink (the fourth output) becomes Gradients.dsinks."""
    record = []
    monkeypatch.setattr(fa4, "kernels", lambda: _fake_fa4(record))
    problem, inputs, dout = _call(grad=True, causal=True, sinks=SINKS)
    backend = fa4.FA4Backend()
    assert backend.why_not(problem) == []
    res = backend.forward(problem, inputs)
    grads = backend.backward(problem, inputs, res.out, res.lse, dout)
    assert record[0]["sink"] is inputs.sinks and record[1]["sink"] is inputs.sinks
    ref, ref_grads = _reference(problem, inputs, dout)
    assert torch.equal(res.out, ref.out) and torch.equal(res.lse, ref.lse)
    assert torch.isfinite(res.lse).all()  # with sinks, no row has lse -inf
    for got, want in zip((*grads, grads.dsinks), (*ref_grads, ref_grads.dsinks), strict=True):
        assert torch.equal(got, want)
    assert grads.dsinks.dtype == torch.float32 and grads.dsinks.shape == (4,)


def test_adapters_answer_a_batch_of_no_sequences_with_zero_dsinks():
    q = torch.randn(0, 4, 16, dtype=torch.float16, requires_grad=True)
    k = torch.randn(0, 2, 16, dtype=torch.float16, requires_grad=True)
    sinks = SINKS.clone().requires_grad_()
    problem, inputs = attnhub.normalize(q, k, k, [0], [0], sinks=sinks)
    backend = fa4.FA4Backend()
    res = backend.forward(problem, inputs)
    grads = backend.backward(problem, inputs, res.out, res.lse, torch.zeros_like(q))
    assert torch.equal(grads.dsinks, torch.zeros(4))


class _CPUFA4(fa4.FA4Backend):
    """fa4 claiming the CPU, so dispatch and the custom ops run it here."""

    device_types = frozenset({"cpu"})

    def unavailable_reasons(self):
        return []


def test_fa4_sinks_through_dispatch_and_autograd(monkeypatch, install):
    monkeypatch.setattr(fa4, "kernels", lambda: _fake_fa4([]))
    install(_CPUFA4())
    _, inputs, dout = _call(grad=True)
    iq = attnhub.VarlenInfo.from_lengths(LENGTHS_Q)
    ik = attnhub.VarlenInfo.from_lengths(LENGTHS_K)
    results = []
    for backend in ("fa4", "reference"):
        leaves = [t.detach().clone().requires_grad_() for t in
                  (inputs.q, inputs.k, inputs.v, SINKS)]
        out, lse = attnhub.attention_forward_varlen(
            *leaves[:3], iq, ik, causal=True, sinks=leaves[3], return_lse=True,
            backend=backend)
        loss = (out.float() * dout.float()).sum() + lse.sum()  # dlse reaches dsink too
        results.append((out, lse, *torch.autograd.grad(loss, leaves)))
    for got, want in zip(*results, strict=True):
        torch.testing.assert_close(got, want, atol=0, rtol=0)


# --- capability reasons ------------------------------------------------------------------

ALL = (torch_flash.TorchFlashBackend(), flash_attn2.FlashAttn2Backend(), fa3.FA3Backend(),
       fa4.FA4Backend())


def _problem(**kw):
    return _call(**kw)[0]


def _reasons(backend, **kw):
    return backend.why_not(_problem(**kw))


@pytest.mark.parametrize("backend", ALL, ids=lambda b: b.name)
def test_common_reasons(backend):
    assert _reasons(backend) == []
    assert _reasons(backend, dtype=torch.float32) == [
        "dtype float32 is not supported (supported: bfloat16, float16)"]
    assert _reasons(backend, head_dim=12) == [
        "head_dim 12 is not supported (needs 8..256 and a multiple of 8)"]
    assert _reasons(backend, mask_alignment="top_left") == [
        "top-left mask alignment (Paddle's convention) is not supported"]
    assert _reasons(backend, return_attn_probs=True) == ["return_attn_probs is not supported"]


def test_torch_flash_reasons():
    b = torch_flash.TorchFlashBackend()
    assert _reasons(b, softcap=5.0) == ["softcap (5.0) is not supported"]
    assert _reasons(b, alibi_slopes=torch.ones(4)) == [
        "ALiBi slopes of shape (nheads,) are not supported"]
    assert _reasons(b, grad=True, dropout_p=0.1, deterministic=True, causal=True,
                    window_size=(3, 0)) == []


def test_flash_attn2_reasons():
    b = flash_attn2.FlashAttn2Backend()
    assert _reasons(b, softcap=5.0, dropout_p=0.1) == [
        "softcap together with dropout is not supported by flash_attn"]
    assert _reasons(b, alibi_slopes=torch.ones(5, 4)) == []


@pytest.mark.parametrize("backend", [fa3.FA3Backend(), fa4.FA4Backend()], ids=lambda b: b.name)
def test_fa3_fa4_reasons(backend):
    assert _reasons(backend, dropout_p=0.1) == ["dropout (p = 0.1) is not supported"]
    assert _reasons(backend, alibi_slopes=torch.ones(4)) == [
        "ALiBi slopes of shape (nheads,) are not supported"]
    assert _reasons(backend, softcap=5.0, grad=True, deterministic=True) == []


@pytest.mark.parametrize("backend", ALL[:3], ids=lambda b: b.name)
def test_adapters_without_a_sink_argument_decline_sinks(backend):
    assert _reasons(backend, sinks=SINKS) == ["attention sinks (sinks=) are not supported"]


def test_fa4_blackwell_head_dim_256_backward_declines_sinks(monkeypatch):
    b = fa4.FA4Backend()
    monkeypatch.setattr(device, "capability", lambda: (10, 0))
    assert _reasons(b, head_dim=256, sinks=SINKS) == []
    assert _reasons(b, head_dim=256, sinks=SINKS, grad=True) == [
        "attention sinks in the head_dim 256 backward are not supported on Blackwell by FA4 "
        "(its dedicated head_dim 256 backward takes no learnable_sink)"]
    assert _reasons(b, head_dim=128, sinks=SINKS, grad=True) == []
    monkeypatch.setattr(device, "capability", lambda: (9, 0))
    assert _reasons(b, head_dim=256, sinks=SINKS, grad=True) == []


def test_paged_reasons():
    q = torch.randn(4, 4, 16, dtype=torch.float16)
    pool = torch.randn(3, 256, 2, 16, dtype=torch.float16)
    bt = torch.tensor([[0, 1], [2, 0]], dtype=torch.int32)
    problem, _ = attnhub.normalize(q, pool, pool, [0, 2, 4], [0, 300, 310], block_table=bt)
    assert torch_flash.TorchFlashBackend().why_not(problem) == [
        "paged KV (block_table) is not supported"]
    assert flash_attn2.FlashAttn2Backend().why_not(problem) == []
    small, _ = attnhub.normalize(q, pool[:, :16], pool[:, :16], [0, 2, 4], [0, 20, 30],
                                 block_table=bt)
    assert flash_attn2.FlashAttn2Backend().why_not(small) == [
        "paged KV with page_size 16 is not supported (needs a multiple of 256)"]
    with torch.enable_grad():
        grad, _ = attnhub.normalize(q.requires_grad_(), pool, pool, [0, 2, 4], [0, 300, 310],
                                    block_table=bt)
    assert flash_attn2.FlashAttn2Backend().why_not(grad) == [
        "backward through paged KV (block_table) is not supported by flash_attn's varlen "
        "backward"]


def test_fa4_blackwell_head_dims(monkeypatch):
    monkeypatch.setattr(device, "capability", lambda: (10, 0))
    b = fa4.FA4Backend()
    assert _reasons(b, head_dim=192) == [
        "head_dim 192 is not supported on Blackwell by FA4 (needs <= 128, or 256)"]
    assert _reasons(b, head_dim=256) == []
    assert _reasons(b, head_dim=256, softcap=5.0, grad=True) == [
        "softcap in the head_dim 256 backward is not supported on Blackwell by FA4"]
    monkeypatch.setattr(device, "capability", lambda: (9, 0))
    assert _reasons(b, head_dim=192) == []


# --- availability ------------------------------------------------------------------------

def _gpu(monkeypatch, cc, installed=()):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(device, "capability", lambda: cc)
    monkeypatch.setattr(device, "distribution_version",
                        lambda name: "1.0" if name in installed else None)
    monkeypatch.setattr(device, "module_present", lambda name: name in installed)
    monkeypatch.setattr(device, "import_reason", lambda module: [])


def test_unavailable_without_cuda(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", None)
    for b in ALL:
        assert "this PyTorch build has no CUDA (torch.version.cuda is None)" in \
            b.unavailable_reasons()
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(device, "capability", lambda: None)
    assert torch_flash.TorchFlashBackend().unavailable_reasons() == [
        "no CUDA device (torch.cuda.is_available() is False)"]


def test_unavailable_reasons_by_gpu_and_package(monkeypatch):
    _gpu(monkeypatch, (8, 0))
    monkeypatch.setattr(torch.backends.cuda, "is_flash_attention_available", lambda: True)
    assert torch_flash.TorchFlashBackend().unavailable_reasons() == []
    assert flash_attn2.FlashAttn2Backend().unavailable_reasons() == [
        "flash-attn is not installed (pip install 'attnhub[flash-attn]')"]
    assert fa3.FA3Backend().unavailable_reasons()[1] == \
        "needs compute capability 9.0 (Hopper), found compute capability 8.0"
    assert fa4.FA4Backend().unavailable_reasons() == [
        "flash-attn-4 is not installed (pip install 'attnhub[fa4]')",
        "needs compute capability 9.0 (Hopper) or 10.x (Blackwell), found compute "
        "capability 8.0"]
    _gpu(monkeypatch, (7, 5), installed=("flash-attn",))
    assert flash_attn2.FlashAttn2Backend().unavailable_reasons() == [
        "needs compute capability 8.0 (Ampere) or newer, found compute capability 7.5"]
    _gpu(monkeypatch, (9, 0), installed=("flash-attn", "flash_attn_interface", "flash-attn-4"))
    for b in ALL:
        assert b.unavailable_reasons() == [], b.name


def test_import_failure_is_a_reason(monkeypatch):
    monkeypatch.setattr(torch.version, "cuda", "12.8")
    monkeypatch.setattr(device, "capability", lambda: (9, 0))
    monkeypatch.setattr(device, "distribution_version", lambda name: "4.0.0b36")
    reasons = fa4.FA4Backend().unavailable_reasons()
    assert len(reasons) == 1 and reasons[0].startswith("importing flash_attn.cute.interface "
                                                       "failed: ")


def test_importing_attnhub_imports_no_cuda_package():
    import subprocess
    import sys

    code = ("import sys, attnhub; r = attnhub.get_registry(); "
            "assert {'torch-flash', 'flash-attn', 'fa3', 'fa4'} <= set(r.backends); "
            "print(sorted(m for m in sys.modules if m.split('.')[0] in "
            "('flash_attn', 'flash_attn_interface', 'flash_attn_3', 'cutlass')))")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True)
    assert out.stdout.strip() == "[]"


def test_fa2_left_only_window_declined_where_rows_could_lose_keys():
    """FA2 bounds an unbounded right side at max_seqlen_k when the left side is bounded:
    declined unless every sequence has sq <= sk (LENGTHS_Q has sequences longer than their
    keys)."""
    reason = ("window (3, -1) (bounded on the left only) with sequences that may have more "
              "queries than keys: FlashAttention-2 bounds the right side at max_seqlen_k, "
              "hiding keys from the first rows")
    for b in (torch_flash.TorchFlashBackend(), flash_attn2.FlashAttn2Backend()):
        assert _reasons(b, window_size=(3, -1)) == [reason]
        assert _reasons(b, window_size=(3, 2)) == []
        assert _reasons(b, window_size=(-1, 2)) == []
        q = torch.randn(6, 4, 16, dtype=torch.float16)
        k = torch.randn(9, 2, 16, dtype=torch.float16)
        problem, _ = attnhub.normalize(q, k, k, [0, 2, 6], [0, 4, 9], window_size=(3, -1))
        assert b.why_not(problem) == []


def test_fa4_hopper_backward_head_dims(monkeypatch):
    monkeypatch.setattr(device, "capability", lambda: (9, 0))
    b = fa4.FA4Backend()
    assert _reasons(b, head_dim=72, grad=True) == [
        "head_dim 72 in the backward is not supported on Hopper by FA4 (needs a multiple of "
        "32: 72 and 80 gave wrong gradients on an H200 with flash-attn-4 4.0.0b36)"]
    assert _reasons(b, head_dim=72) == []
    assert _reasons(b, head_dim=96, grad=True) == []


def test_torch_flash_out_only_runner_handles_layouts_the_kernel_refuses(aten):
    problem, inputs, _ = _call(causal=True)
    run = torch_flash.TorchFlashBackend().out_only_runner(problem)
    wide = torch.stack([inputs.q, torch.full_like(inputs.q, float("nan"))], dim=-1)
    q = wide[..., 0]  # stride(-1) == 2: the kernel refuses it, the runner makes it dense
    cu_q = torch.stack([inputs.cu_seqlens_q, inputs.cu_seqlens_q], dim=-1)[:, 0]
    out = run(q, inputs.k, inputs.v, cu_q, inputs.cu_seqlens_k)
    ref, _ = _reference(problem, inputs)
    assert torch.equal(out, ref.out) and len(aten.forward_calls) == 1
    aten.fail = RuntimeError("CUDA error: an illegal memory access was encountered")
    with pytest.raises(RuntimeError, match="illegal memory access"):
        run(inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k)
