"""Eager autograd runs the backend through a plain torch.autograd.Function (attnhub.ops), not
through the attnhub::varlen_fwd custom op: same gradients, no torch._dynamo import (the op's
first eager call costs 1-2 s of import), a clear error on double backward (as the op's).
The main job (`attnhub run`) imports neither torch._dynamo nor sympy.
The op still serves traced calls (tests/test_compile.py)."""

from __future__ import annotations

import subprocess
import sys

import pytest
import torch

import attnhub
from attnhub import VarlenInfo, attention_forward_varlen, plans
from attnhub.normalize import normalize
from attnhub.ops import pack, varlen_fwd


def _leaves(seed: int = 0) -> tuple[torch.Tensor, ...]:
    gen = torch.Generator().manual_seed(seed)
    return tuple(torch.randn(9, h, 8, generator=gen, dtype=torch.float64).requires_grad_(True)
                 for h in (4, 2, 2))


def test_eager_gradients_equal_the_custom_op_path():
    info = VarlenInfo.from_lengths([4, 0, 5], torch.device("cpu"))
    q, k, v = _leaves()
    out, lse = attention_forward_varlen(q, k, v, info, info, causal=True, return_lse=True,
                                        backend="reference")
    assert out.grad_fn is not None and "EagerVarlen" in type(out.grad_fn).__name__
    dout = torch.randn_like(out)
    loss = (out * dout).sum() + lse[torch.isfinite(lse)].sum()
    grads = torch.autograd.grad(loss, (q, k, v))
    problem, inputs = normalize(q, k, v, info, info, causal=True)
    assert problem.requires_grad
    o2, l2, _, _ = varlen_fwd(*pack(problem, inputs, "reference"))
    grads2 = torch.autograd.grad((o2 * dout).sum() + l2[torch.isfinite(l2)].sum(), (q, k, v))
    torch.testing.assert_close(out, o2, rtol=0, atol=0)
    for g, g2 in zip(grads, grads2, strict=True):
        torch.testing.assert_close(g, g2, rtol=1e-12, atol=1e-12)


def test_double_backward_raises():
    info = VarlenInfo.from_lengths([3, 6], torch.device("cpu"))
    q, k, v = _leaves(1)
    out = attention_forward_varlen(q, k, v, info, info, backend="reference")
    with pytest.raises(RuntimeError, match=r"double backward .* not supported: "
                       r"backend 'reference'"):
        torch.autograd.grad(out.sum(), (q,), create_graph=True)


def test_eager_backward_and_main_job_import_neither_dynamo_nor_sympy():
    """torch._dynamo (a custom op's first eager call) and sympy (torch.autograd.grad checking
    a grad_outputs tensor) each cost about a second of `attnhub run`'s start."""
    code = ("import sys, torch, attnhub\n"
            "from attnhub.main_job import JobConfig, run_job\n"
            "info = attnhub.VarlenInfo.from_lengths([5, 3], torch.device('cpu'))\n"
            "q, k, v = (torch.randn(8, 2, 8, requires_grad=True) for _ in range(3))\n"
            "attnhub.attention_forward_varlen(q, k, v, info, info, causal=True).sum()"
            ".backward()\n"
            "assert run_job(JobConfig(lengths=(5, 0, 3), repeats=1)).passed\n"
            "print(sorted(m for m in ('torch._dynamo', 'sympy') if m in sys.modules))\n")
    done = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                          timeout=120, check=True)
    assert done.stdout.strip() == "[]", done.stderr


def test_saved_tensor_hooks_see_every_saved_tensor():
    """Activation offloading packs what autograd saves: the eager path keeps nothing beside."""
    info = VarlenInfo.from_lengths([4, 5], torch.device("cpu"))
    q, k, v = _leaves(2)
    packed = []

    def pack(t: torch.Tensor) -> torch.Tensor:
        packed.append(t)
        return t.clone()

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = attention_forward_varlen(q, k, v, info, info, causal=True, backend="reference")
    assert any(t is q for t in packed) and any(t is k for t in packed)
    grads = torch.autograd.grad(out.sum(), (q, k, v))
    ref = torch.autograd.grad(attention_forward_varlen(q, k, v, info, info, causal=True,
                                                       backend="reference").sum(), (q, k, v))
    for g, r in zip(grads, ref, strict=True):
        torch.testing.assert_close(g, r, rtol=0, atol=0)


def test_a_backends_own_autograd_serves_out_only_calls(install):
    """Backend.autograd_out_runner: an eager call that requires grad and wants neither lse nor
    probs takes the backend's own autograd graph (here q * 2 + k.sum() * 0, so the gradients
    show which graph ran), through the dispatch fast path and a plan alike; return_lse,
    torch.no_grad and a backend answering None take the usual paths."""
    from conftest import make_backend

    class OwnAutograd(type(make_backend("x"))):
        name, priority, device_types = "own-autograd", 10, frozenset({"cpu"})
        capabilities = make_backend("x").capabilities
        serve = True

        def autograd_out_runner(self, problem):
            if not self.serve:
                self.calls.append("autograd_out")
                return None

            def run(q, k, v, cu_seqlens_q, cu_seqlens_k):
                self.calls.append("autograd_out")
                return q * 2 + (k.sum() + v.sum()) * 0

            return run

    backend = OwnAutograd()
    install(backend)
    info = VarlenInfo.from_lengths([4, 0, 5], torch.device("cpu"))
    q, k, v = (t.float() for t in _leaves())
    q, k, v = (t.detach().requires_grad_(True) for t in (q, k, v))
    for _ in range(2):  # the second call comes through the dispatch fast path
        out = attention_forward_varlen(q, k, v, info, info, causal=True)
        dq, dk = torch.autograd.grad(out.sum(), (q, k))
        assert torch.equal(dq, torch.full_like(q, 2.0)) and not dk.any()
    assert backend.calls == ["autograd_out"] * 2
    plan = attnhub.plan(info, info, nheads=4, nheads_k=2, head_dim=8, dtype=q.dtype,
                        causal=True)
    out = plan.run(q, k, v)
    assert torch.equal(torch.autograd.grad(out.sum(), q)[0], torch.full_like(q, 2.0))
    assert backend.calls[-1] == "autograd_out"
    backend.calls.clear()
    out, _lse = attention_forward_varlen(q, k, v, info, info, causal=True, return_lse=True)
    out.sum().backward()
    assert backend.calls == ["forward", "backward"]
    backend.calls.clear()
    with torch.no_grad():
        attention_forward_varlen(q, k, v, info, info, causal=True)
    assert backend.calls == ["forward"]  # forward_out's default
    backend.calls.clear()
    backend.serve = False
    plans.clear()  # runners are bound per planned call; this backend changed its answer
    out = attention_forward_varlen(q, k, v, info, info, causal=True)
    out.sum().backward()
    # asked (by the new plan and the call), answered None: the Function's forward / backward
    assert backend.calls[-2:] == ["forward", "backward"] and "autograd_out" in backend.calls
