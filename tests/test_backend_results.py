"""What a backend returns is checked (shapes, dtypes, devices: host facts) on every path that
hands it to the caller, and a broken backend is named in the error."""

from __future__ import annotations

import pytest
import torch
from conftest import FakeBackend, make_backend

import attnhub
from attnhub import BackendResultError, ForwardResult, Gradients
from attnhub.backends.reference import kernel

LENGTHS = [3, 5]
CU = [0, 3, 8]


class _Broken(FakeBackend):
    """The reference kernel, with one output damaged as ``self.damage`` says."""

    damage = ""

    def forward(self, problem, inputs):
        res = kernel.forward(problem, inputs)
        if self.damage == "out-shape":
            return res._replace(out=res.out[:, :1])
        if self.damage == "out-dtype":
            return res._replace(out=res.out.double())
        if self.damage == "lse-shape":
            return res._replace(lse=res.lse.t())
        if self.damage == "lse-dtype":
            return res._replace(lse=res.lse.half())
        if self.damage == "lse-none":
            return ForwardResult(res.out, None)
        return res

    def backward(self, problem, inputs, out, lse, dout, dlse=None):
        g = kernel.backward(problem, inputs, dout, dlse)
        if self.damage == "dk-shape":
            return Gradients(g.dq, g.dk[:, :1], g.dv)
        return g


def _install(install, damage):
    backend = make_backend("broken", 50)
    backend.__class__ = type("Broken", (_Broken, type(backend)), {"damage": damage})
    install(backend)
    return backend


def _qkv(grad=False):
    gen = torch.Generator().manual_seed(0)
    q = torch.randn(8, 4, 16, generator=gen).requires_grad_(grad)
    k = torch.randn(8, 2, 16, generator=gen).requires_grad_(grad)
    v = torch.randn(8, 2, 16, generator=gen).requires_grad_(grad)
    return q, k, v


def _assert_names_backend(exc_info, what):
    assert exc_info.value.backend == "broken" and exc_info.value.what == what
    assert "backend 'broken' returned " + what in str(exc_info.value)


@pytest.mark.parametrize("damage", ["out-shape", "out-dtype"])
def test_out_checked_on_eager_and_fast_paths(install, damage):
    _install(install, damage)
    q, k, v = _qkv()
    info = attnhub.VarlenInfo.from_lengths(LENGTHS)
    for _ in range(2):  # the full path, then the plan-cache fast path
        with pytest.raises(BackendResultError) as exc_info:
            attnhub.attention_forward_varlen(q, k, v, info, info)
        _assert_names_backend(exc_info, "out")
    batch = attnhub.plan(info, info, nheads=4, nheads_k=2, head_dim=16, dtype=torch.float32)
    with pytest.raises(BackendResultError):
        batch.run(q, k, v)


@pytest.mark.parametrize("damage", ["lse-shape", "lse-dtype", "lse-none"])
def test_lse_checked_with_return_lse_and_autograd(install, damage):
    _install(install, damage)
    q, k, v = _qkv()
    with pytest.raises(BackendResultError) as exc_info:
        attnhub.attention_forward_varlen(q, k, v, CU, CU, return_lse=True)
    _assert_names_backend(exc_info, "lse")
    q, k, v = _qkv(grad=True)
    with pytest.raises(BackendResultError):
        attnhub.attention_forward_varlen(q, k, v, CU, CU)
    batch = attnhub.plan(CU, CU, nheads=4, nheads_k=2, head_dim=16, dtype=torch.float32)
    with pytest.raises(BackendResultError):
        batch.run(*_qkv(), return_lse=True)


def test_gradients_checked(install):
    _install(install, "dk-shape")
    q, k, v = _qkv(grad=True)
    out = attnhub.attention_forward_varlen(q, k, v, CU, CU)
    with pytest.raises(BackendResultError) as exc_info:
        out.sum().backward()
    _assert_names_backend(exc_info, "dk")


@pytest.mark.usefixtures("fresh_dynamo")
def test_checked_under_compile(install):
    _install(install, "out-shape")
    cu = torch.tensor(CU, dtype=torch.int32)
    compiled = torch.compile(
        lambda q, k, v: attnhub.attention_forward_varlen(q, k, v, cu, cu, 5, 5),
        backend="eager", fullgraph=True)
    with pytest.raises(BackendResultError):
        compiled(*_qkv())


def test_a_correct_backend_passes(install):
    _install(install, "")
    q, k, v = _qkv(grad=True)
    out, lse = attnhub.attention_forward_varlen(q, k, v, CU, CU, return_lse=True)
    (out.sum() + lse.sum()).backward()
    assert q.grad.shape == q.shape
