"""Checks of what a backend returns: shapes, dtypes and devices (host facts, no sync).

A backend whose out, lse, probs or gradients do not match the contract of
:class:`attnhub.ForwardResult` / :class:`attnhub.Gradients` fails the call with a
BackendResultError naming the backend, instead of handing the caller a wrong tensor.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping

import torch

from .backend import Backend, ForwardResult, Gradients
from .errors import BackendResultError
from .features import GRAD_TENSORS
from .problem import VarlenProblem

OutRunner = Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor],
                     torch.Tensor]


def _expect(backend: str, what: str, got: object, shape: tuple, dtype: torch.dtype,
            device: torch.device) -> None:
    if not isinstance(got, torch.Tensor):
        raise BackendResultError(backend, what, f"a tensor of shape {tuple(shape)}",
                                 type(got).__name__)
    if got.shape != shape or got.dtype != dtype or got.device != device:
        raise BackendResultError(
            backend, what, f"shape {tuple(shape)}, {dtype} on {device}",
            f"shape {tuple(got.shape)}, {got.dtype} on {got.device}")


def check_out(backend: str, out: object, q: torch.Tensor) -> torch.Tensor:
    """``out`` must have q's shape, dtype and device."""
    _expect(backend, "out", out, q.shape, q.dtype, q.device)
    return out  # type: ignore[return-value]


def check_forward(backend: str, problem: VarlenProblem, q: torch.Tensor,
                  result: ForwardResult) -> ForwardResult:
    """out as q; lse float32 (nheads, total_q); probs float32 (batch, nheads, max_seqlen_q,
    max_seqlen_k) when the call asked for them."""
    _expect(backend, "out", result.out, q.shape, q.dtype, q.device)
    _expect(backend, "lse", result.lse, (problem.nheads, problem.total_q), torch.float32,
            q.device)
    if problem.return_probs:
        _expect(backend, "probs", result.probs, (problem.batch, problem.nheads,
                problem.max_seqlen_q, problem.max_seqlen_k), torch.float32, q.device)
    return result


def check_gradients(backend: str, grads: Gradients, q: torch.Tensor, k: torch.Tensor,
                    v: torch.Tensor, tensors: Mapping[str, torch.Tensor | None] | None = None
                    ) -> Gradients:
    """dq, dk, dv with the shapes, dtypes and devices of q, k, v; and for each differentiable
    feature tensor the call carries (``tensors``: name -> tensor or None), its gradient
    (e.g. dsinks) with that tensor's shape, dtype and device."""
    for what, got, like in (("dq", grads.dq, q), ("dk", grads.dk, k), ("dv", grads.dv, v)):
        _expect(backend, what, got, like.shape, like.dtype, like.device)
    if tensors:
        for t in GRAD_TENSORS:
            like = tensors.get(t.name)
            if like is not None:
                _expect(backend, t.grad, getattr(grads, t.grad, None), like.shape, like.dtype,
                        like.device)
    return grads


def checked_out_runner(backend: Backend, problem: VarlenProblem,
                       device: torch.device | None = None, run: OutRunner | None = None
                       ) -> OutRunner:
    """``run`` (by default ``backend.out_only_runner(problem)``) whose result is checked on
    every call. With
    ``device`` (q's, fixed for every call of the runner, as in a call plan) out is compared
    with the problem's q shape, dtype and that device, computed once: the check then costs
    less than reading them from q on every call."""
    if run is None:
        run = backend.out_only_runner(problem)
    name = backend.name
    if device is None:
        def checked(q, k, v, cu_seqlens_q, cu_seqlens_k):
            return check_out(name, run(q, k, v, cu_seqlens_q, cu_seqlens_k), q)

        return checked
    shape = torch.Size((problem.total_q, problem.nheads, problem.head_dim))
    dtype = problem.dtype
    tensor = torch.Tensor

    def checked_fixed(q, k, v, cu_seqlens_q, cu_seqlens_k):
        out = run(q, k, v, cu_seqlens_q, cu_seqlens_k)
        if type(out) is tensor and out.shape == shape and out.dtype is dtype \
                and out.device == device:
            return out
        return check_out(name, out, q)  # (a subclass, or the error naming what is wrong)

    return checked_fixed
