"""attention_forward_varlen (the Ascend signature) and explain(): the core public calls."""

from __future__ import annotations

from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from . import plans
from .arguments import as_bool
from .backend import Backend
from .custom_mask import PackedMask
from .deferred_errors import deferred
from .dispatch import Explanation, explain_problem, forced_context, select
from .errors import AttnhubError
from .inputs import VarlenInputs
from .normalize import CuSeqlens, WindowSize, normalize
from .ops import run_forward
from .problem import VarlenProblem
from .results import check_out


def attention_forward_varlen(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: CuSeqlens,
    cu_seqlens_k: CuSeqlens,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool | None = None,
    return_attn_probs: bool | None = None,
    block_table: torch.Tensor | None = None,
    *,
    return_lse: bool = False,
    backend: str | None = None,
    mask_alignment: str = "bottom_right",
    custom_mask: torch.Tensor | PackedMask | None = None,
    sinks: torch.Tensor | None = None,
):
    """Attention over a packed batch of variable-length sequences.

    q: (total_q, nheads, head_dim); k, v: (total_k, nheads_k, head_dim), or page pools
    (num_pages, page_size, nheads_k, head_dim) with block_table (batch, max_pages) int32.
    cu_seqlens_q / cu_seqlens_k: (batch + 1,) offsets as an int32/int64 tensor, a list or
    tuple, or a VarlenInfo. max_seqlen_*: optional upper bounds (computed when None).
    window_size: None, w or (left, right), -1 = unbounded; causal sets right = 0, bottom-right
    aligned. softcap: 0/None = off. alibi_slopes: float32 (nheads,) or (batch, nheads).

    Returns out (q's shape and dtype); (out, lse) with return_lse; (out, lse, probs) with
    return_attn_probs, lse float32 (nheads, total_q) and probs float32 (batch, nheads,
    max_seqlen_q, max_seqlen_k). ``backend`` forces a backend by name. ``custom_mask``: a
    1-D bool tensor, each request's row-major (sq, sk) block (True = visible) concatenated,
    or a PackedMask; applied on top of causal / window. ``sinks``: float32 (nheads,), one
    learnable logit per query head that joins every row's softmax denominator and takes no
    value (lse includes it; docs/semantics.md); it may require grad.
    """
    if type(return_lse) is not bool:
        return_lse = as_bool("return_lse", return_lse)
    key = None
    if block_table is None and not return_attn_probs and custom_mask is None:
        key = plans.call_key(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size, softcap, deterministic, backend,
            mask_alignment, forced_context(), alibi_slopes, sinks)
        plan = plans.get(key) if key is not None else None
        if plan is not None:  # this call's key was normalized and dispatched before
            if plan.out_only and not return_lse:
                if plan.offsets_as_given:
                    return plan.run_out(q, k, v, cu_seqlens_q, cu_seqlens_k)
                return plan.run_out(q, k, v, *plan.offsets(cu_seqlens_q, cu_seqlens_k))
            if plan.run_grad is not None and not return_lse \
                    and _get_current_dispatch_mode() is None:  # ops.run_forward's gate
                return plan.run_grad(q, k, v, *plan.offsets(cu_seqlens_q, cu_seqlens_k))
            # the call's own ALiBi slopes and sinks (a plan with them has neither runner)
            return _run(plan.problem, plan.inputs(q, k, v, cu_seqlens_q, cu_seqlens_k,
                                                  alibi_slopes, sinks), plan.backend, return_lse)
    try:
        problem, inputs = normalize(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
            dropout_p=dropout_p, softmax_scale=softmax_scale, causal=causal,
            window_size=window_size, softcap=softcap, alibi_slopes=alibi_slopes,
            deterministic=deterministic, return_attn_probs=return_attn_probs,
            block_table=block_table, mask_alignment=mask_alignment, custom_mask=custom_mask,
            sinks=sinks)
        chosen = select(problem, backend)
    except AttnhubError as exc:
        if not torch.compiler.is_compiling():
            raise
        return _deferred(exc, q, return_lse, return_attn_probs)
    if key is not None:
        plans.store(key, problem, chosen, inputs, cu_seqlens_q, cu_seqlens_k)
    return _run(problem, inputs, chosen, return_lse)


def _run(problem: VarlenProblem, inputs: VarlenInputs, backend: Backend, return_lse: bool):
    """Run the call; out only (Backend.forward_out) when neither lse nor autograd is used."""
    out_only = not (return_lse or problem.return_probs)
    if out_only and not (problem.requires_grad or torch.compiler.is_compiling()):
        return check_out(backend.name, backend.forward_out(problem, inputs), inputs.q)
    result = run_forward(problem, inputs, backend, out_only)
    if problem.return_probs:
        return result.out, result.lse, result.probs
    if return_lse:
        return result.out, result.lse
    return result.out


def _deferred(exc: AttnhubError, q: object, return_lse: bool, return_probs: object):
    """Traced by torch.compile: the call's results, computed by an op that raises ``exc``."""
    out = deferred(exc, q)
    if not (return_lse or return_probs):
        return out
    lse = out.new_empty((0,), dtype=torch.float32)
    return (out, lse, lse) if return_probs else (out, lse)


def explain(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: CuSeqlens,
    cu_seqlens_k: CuSeqlens,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    softmax_scale: float | None = None,
    block_table: torch.Tensor | None = None,
    backend: str | None = None,
    **features: Any,
) -> Explanation:
    """Every registered backend's verdict (reasons, or selected) for this call, computing
    nothing. Takes attention_forward_varlen's arguments (the feature arguments by keyword:
    causal, window_size, softcap, alibi_slopes, dropout_p, custom_mask, sinks, ...);
    ``print()`` it for a table."""
    problem, _ = normalize(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                           softmax_scale=softmax_scale, block_table=block_table, **features)
    return explain_problem(problem, backend)
