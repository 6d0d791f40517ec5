"""The CUDA adapters on a GPU: torch-flash (and fa4 where installed) against the reference,
the fast path free of host syncs, `attnhub info` listing the adapters.

Run on the device machine: python -m pytest -m gpu tests/test_cuda_gpu.py
"""

import json
import subprocess
import sys

import pytest
import torch
from cuda_sync import no_sync

import attnhub
from attnhub.registry import get_registry

pytestmark = [pytest.mark.gpu,
              pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")]

LENGTHS_Q = [64, 0, 17, 300, 1]
LENGTHS_K = [64, 5, 0, 280, 33]


def _available(name):
    return not get_registry().unavailable_reasons(get_registry().backends[name])


def _qkv(dtype, head_dim=128, grad=False):
    g = torch.Generator(device="cuda").manual_seed(0)
    tq, tk = sum(LENGTHS_Q), sum(LENGTHS_K)
    q = torch.randn(tq, 8, head_dim, device="cuda", dtype=dtype, generator=g)
    k = torch.randn(tk, 2, head_dim, device="cuda", dtype=dtype, generator=g)
    v = torch.randn(tk, 2, head_dim, device="cuda", dtype=dtype, generator=g)
    return [t.requires_grad_(grad) for t in (q, k, v)]


def _run(backend, q, k, v, **kw):
    iq = attnhub.VarlenInfo.from_lengths(LENGTHS_Q, "cuda")
    ik = attnhub.VarlenInfo.from_lengths(LENGTHS_K, "cuda")
    out, lse = attnhub.attention_forward_varlen(q, k, v, iq, ik, backend=backend,
                                                return_lse=True, **kw)
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out)) if q.requires_grad \
        else ()
    return out, lse, grads


@pytest.mark.parametrize("backend", ["torch-flash", "fa4"])
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(16, 3)),
                                dict(causal=True, window_size=(40, 0), softmax_scale=0.05)],
                         ids=["full", "causal", "window", "causal-window-scale"])
def test_against_reference(backend, dtype, kw):
    if not _available(backend):
        pytest.skip(f"{backend} unavailable here")
    q, k, v = _qkv(dtype, grad=True)
    out, lse, grads = _run(backend, q, k, v, **kw)
    r_out, r_lse, r_grads = _run("reference", q, k, v, **kw)
    assert (out.float() - r_out.float()).abs().max() < 2e-2
    assert torch.equal(torch.isneginf(lse), torch.isneginf(r_lse))
    finite = torch.isfinite(r_lse)
    assert (lse[finite] - r_lse[finite]).abs().max() < 1e-3
    for g, r in zip(grads, r_grads, strict=True):
        assert (g.float() - r.float()).abs().max() < 5e-2 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16])
@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(16, 3))],
                         ids=["full", "causal", "window"])
def test_fa4_sinks_against_reference(dtype, kw):
    """learnable_sink: out, lse (rows without keys: lse = sink), dq/dk/dv and dsinks, with a
    loss on lse too (FA4's backward takes dlse)."""
    if not _available("fa4"):
        pytest.skip("fa4 unavailable here")
    sinks = torch.linspace(-2.0, 3.0, 8, device="cuda")
    q, k, v = _qkv(dtype, grad=True)
    iq = attnhub.VarlenInfo.from_lengths(LENGTHS_Q, "cuda")
    ik = attnhub.VarlenInfo.from_lengths(LENGTHS_K, "cuda")
    results = []
    for backend in ("fa4", "reference"):
        s = sinks.clone().requires_grad_()
        out, lse = attnhub.attention_forward_varlen(q, k, v, iq, ik, backend=backend,
                                                    sinks=s, return_lse=True, **kw)
        loss = out.float().sum() + lse.sum()
        results.append((out, lse, *torch.autograd.grad(loss, (q, k, v, s))))
    (out, lse, *grads), (r_out, r_lse, *r_grads) = results
    assert (out.float() - r_out.float()).abs().max() < 2e-2
    assert torch.isfinite(lse).all()
    assert (lse - r_lse).abs().max() < 1e-3
    for g, r in zip(grads, r_grads, strict=True):
        assert (g.float() - r.float()).abs().max() < 5e-2 * max(1.0, r.abs().max().item())


@pytest.mark.parametrize("kw", [dict(), dict(causal=True), dict(window_size=(16, 3))],
                         ids=["full", "causal", "window"])
def test_torch_flash_out_only_gradients_come_from_torchs_own_node(kw):
    """Without return_lse the call runs under the aten op's own autograd node
    (Backend.autograd_out_runner): its gradients match the reference and attnhub's Function path
    (return_lse) on lengths with rows that see no key (sk 0, sq > sk)."""
    q, k, v = _qkv(torch.bfloat16, grad=True)
    iq = attnhub.VarlenInfo.from_lengths(LENGTHS_Q, "cuda")
    ik = attnhub.VarlenInfo.from_lengths(LENGTHS_K, "cuda")
    out = attnhub.attention_forward_varlen(q, k, v, iq, ik, backend="torch-flash", **kw)
    assert "FlashAttentionBackward" in type(out.grad_fn).__name__
    grads = torch.autograd.grad(out, (q, k, v), torch.ones_like(out))
    f_out, _, f_grads = _run("torch-flash", q, k, v, **kw)
    _, _, r_grads = _run("reference", q, k, v, **kw)
    assert torch.equal(out, f_out)
    for g, f, r in zip(grads, f_grads, r_grads, strict=True):
        scale = max(1.0, r.abs().max().item())
        assert (g.float() - r.float()).abs().max() < 5e-2 * scale
        assert (g.float() - f.float()).abs().max() < 1e-2 * scale  # FA2's dQ atomics' order


def test_torch_flash_dropout_is_reproducible_and_backward_uses_its_mask():
    q, k, v = _qkv(torch.bfloat16, grad=True)
    torch.manual_seed(3)
    a, _, ga = _run("torch-flash", q, k, v, dropout_p=0.2)
    torch.manual_seed(3)
    b, _, gb = _run("torch-flash", q, k, v, dropout_p=0.2)
    # Same mask: identical out; gradients equal up to the order of FA2's dQ atomics (a
    # different mask would change them by O(1)).
    assert torch.equal(a, b)
    for x, y in zip(ga, gb, strict=True):
        torch.testing.assert_close(x, y, atol=1e-2, rtol=1e-2)
    torch.manual_seed(4)
    c, _, _ = _run("torch-flash", q, k, v, dropout_p=0.2)
    assert not torch.equal(a, c)


def test_torch_flash_deterministic_backward_is_bitwise_repeatable():
    q, k, v = _qkv(torch.bfloat16, grad=True)
    first = _run("torch-flash", q, k, v, causal=True, deterministic=True)[2]
    for _ in range(3):
        again = _run("torch-flash", q, k, v, causal=True, deterministic=True)[2]
        assert all(torch.equal(x, y) for x, y in zip(first, again, strict=True))
    assert not torch.are_deterministic_algorithms_enabled()


def test_fast_path_does_not_sync():
    q, k, v = _qkv(torch.bfloat16)
    cu = torch.tensor([0, 64, 64, 81, 381, 382], dtype=torch.int32, device="cuda")
    info = attnhub.VarlenInfo.from_lengths(LENGTHS_Q, "cuda")
    kk, vv = k[:382], v[:382]
    for _ in range(2):  # the first call plans, the second takes the plan
        with no_sync():
            attnhub.attention_forward_varlen(q, kk, vv, cu, cu, 300, 300, causal=True,
                                             backend="torch-flash")
            attnhub.attention_forward_varlen(q, kk[:382], vv[:382], info, info, causal=True,
                                             backend="torch-flash")


def test_info_lists_the_cuda_adapters():
    out = subprocess.run([sys.executable, "-m", "attnhub", "info", "--json"],
                         capture_output=True, text=True, check=True).stdout
    backends = {b["name"]: b for b in json.loads(out)["backends"]}
    assert {"torch-flash", "flash-attn", "fa3", "fa4"} <= set(backends)
    cc = torch.cuda.get_device_capability()
    assert backends["torch-flash"]["available"] is (cc >= (8, 0))
    for b in backends.values():
        assert b["available"] or b["reasons"]
