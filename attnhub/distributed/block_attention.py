"""Attention of this rank's queries against one K/V block, through attnhub's dispatch.

Every call of a step (attnhub.distributed.step_plan) is normalized and routed by
attnhub.normalize / attnhub.select like any other call, so any backend that returns lse
computes the steps. Backward of a block gives this block's share of dq, dk and dv:

* backends that take out and lse from their forward (``Backend.backward_uses_forward_stats``,
  every flash-style kernel: the softmax is rebuilt as exp(s - lse) and
  delta = rowsum(dout * out) - dlse) are handed the merged out and lse: their result is
  exactly the block's share of the global gradient;
* the others (the reference recomputes the softmax) get the block's own (out_i, lse_i),
  recomputed, and the gradients the merge passes to them
  (attnhub.distributed.merge.partial_grads), which needs a backward that takes dlse.
"""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass

import torch

from ..backend import Backend
from ..dispatch import select
from ..inputs import VarlenInputs
from ..normalize import normalize
from ..problem import VarlenProblem
from .calls import StepCall
from .merge import PartialSum, accumulation_dtype, partial_grads


@dataclass(frozen=True)
class AttentionOptions:
    """The per-call options every step shares: softmax scale, softcap (0 = off), whether the
    backward must be deterministic, whether gradients are needed, and a forced backend."""

    scale: float
    softcap: float
    deterministic: bool
    requires_grad: bool
    backend: str | None = None


def _prepare(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, call: StepCall,
             opts: AttentionOptions) -> tuple[VarlenProblem, VarlenInputs, Backend]:
    problem, inputs = normalize(
        q, k, v, call.info_q.to(q.device), call.info_k.to(q.device), softmax_scale=opts.scale,
        causal=call.causal, window_size=call.window_size, softcap=opts.softcap,
        deterministic=opts.deterministic)
    if problem.requires_grad != opts.requires_grad:  # forward runs with grad mode off
        problem = dataclasses.replace(problem, requires_grad=opts.requires_grad)
    return problem, inputs, select(problem, opts.backend)


def block_forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                  calls: tuple[StepCall, ...], opts: AttentionOptions, acc: PartialSum) -> None:
    """Fold the block's partial results into ``acc``. q (total_q, nheads, d); k, v
    (block rows, nheads_k, d)."""
    for call in calls:
        problem, inputs, backend = _prepare(q, k, v, call, opts)
        res = backend.forward(problem, inputs)
        acc.add(res.out, res.lse)


def block_backward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                   calls: tuple[StepCall, ...], opts: AttentionOptions, out: torch.Tensor,
                   lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None,
                   dq_acc: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor] | None:
    """Add the block's dq share into ``dq_acc`` (float32, q's shape) and return its
    (dk, dv) float32, or None when the block has no call. ``out`` / ``lse``: the merged
    result of this rank's queries (out in q's dtype); dout / dlse their gradients."""
    if not calls:
        return None
    dk = torch.zeros(k.shape, dtype=accumulation_dtype(k.dtype), device=k.device)
    dv = torch.zeros(v.shape, dtype=accumulation_dtype(v.dtype), device=v.device)
    for call in calls:
        problem, inputs, backend = _prepare(q, k, v, call, opts)
        if backend.backward_uses_forward_stats:
            grads = backend.backward(problem, inputs, out, lse, dout, dlse)
        else:
            part = backend.forward(dataclasses.replace(problem, requires_grad=False), inputs)
            d_out, d_lse = partial_grads(dout, dlse, out, lse, part.out, part.lse)
            grads = backend.backward(problem, inputs, part.out, part.lse,
                                     d_out.to(out.dtype), d_lse)
        dq_acc.add_(grads.dq)
        dk.add_(grads.dk)
        dv.add_(grads.dv)
    return dk, dv


def finish_forward(ctx, acc, inputs: tuple[torch.Tensor, ...], setup: tuple
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """End of a context-parallel autograd.Function's forward: (out, lse) from the merged
    partial sums, saved with ``inputs`` (q, k, v) for backward (``ctx.saved_tensors`` =
    (*inputs, out, lse)), ``setup`` kept as ``ctx.setup``."""
    out, lse = acc.result(inputs[0].dtype)
    ctx.set_materialize_grads(False)  # dlse stays None when lse is not used
    ctx.save_for_backward(*inputs, out, lse)
    ctx.setup = setup
    return out, lse
