"""ExampleSDPABackend: varlen attention as one torch SDPA call per sequence.

A different method from attnhub's reference (which works on query chunks restricted to the
visible key band): each sequence gets a dense (sq, sk) boolean mask built from the window,
``torch.nn.functional.scaled_dot_product_attention`` computes its output, and lse comes from
``torch.logsumexp`` over the masked scores. The math runs in float32 (float64 for float64
inputs) and the output is cast back to q's dtype.

Backward recomputes the forward under ``torch.func.vjp``. (Plain ``torch.autograd`` does not
work here: attnhub calls ``Backend.backward`` inside a torch.library custom op, where autograd
does not record operations; functorch's transforms do.)
"""

from __future__ import annotations

from typing import ClassVar

import torch
import torch.nn.functional as F

import attnhub


class ExampleSDPABackend(attnhub.Backend):
    name: ClassVar[str] = "example-sdpa"
    device_types: ClassVar[frozenset[str]] = frozenset({"cpu"})
    # Above the reference (-1000), below real accelerated backends: once installed, it runs
    # the CPU calls it can compute; the others go to the reference.
    priority: ClassVar[int] = -100
    description: ClassVar[str] = ("example out-of-tree backend: per-sequence torch SDPA with "
                                  "an explicit boolean mask")
    # The truth, and nothing more: whatever is False here becomes a reason in why_not, and the
    # conformance suite reports those cases as unsupported instead of running them.
    capabilities: ClassVar[attnhub.Capabilities] = attnhub.Capabilities(
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        gqa=True, causal=True, window=True,
        softcap=False, alibi=frozenset(), dropout=False, page_size_multiple=None,
        backward=True, deterministic_backward=True, top_left=False, return_probs=False)

    def forward(self, problem: attnhub.VarlenProblem,
                inputs: attnhub.VarlenInputs) -> attnhub.ForwardResult:
        out, lse = _attention(problem, _bounds(problem, inputs), inputs.q, inputs.k, inputs.v)
        return attnhub.ForwardResult(out, lse)

    def backward(self, problem: attnhub.VarlenProblem, inputs: attnhub.VarlenInputs,
                 out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                 dlse: torch.Tensor | None = None) -> attnhub.Gradients:
        bounds = _bounds(problem, inputs)
        (_, lse_again), vjp = torch.func.vjp(
            lambda q, k, v: _attention(problem, bounds, q, k, v), inputs.q, inputs.k, inputs.v)
        dlse = torch.zeros_like(lse_again) if dlse is None else dlse.to(torch.float32)
        dq, dk, dv = vjp((dout.to(inputs.q.dtype), dlse))
        return attnhub.Gradients(dq, dk, dv)


def _bounds(problem: attnhub.VarlenProblem, inputs: attnhub.VarlenInputs
            ) -> list[tuple[int, int, int, int]]:
    """(q0, q1, k0, k1) per sequence, from the host lengths when the caller gave them (no
    sync), else from cu_seqlens (one device-to-host copy)."""
    if problem.seqlens_q is not None and problem.seqlens_k is not None:
        cu_q, cu_k = [0], [0]
        for nq, nk in zip(problem.seqlens_q, problem.seqlens_k, strict=True):
            cu_q.append(cu_q[-1] + nq)
            cu_k.append(cu_k[-1] + nk)
    else:
        cu_q, cu_k = inputs.cu_seqlens_q.tolist(), inputs.cu_seqlens_k.tolist()
    return [(cu_q[b], cu_q[b + 1], cu_k[b], cu_k[b + 1]) for b in range(problem.batch)]


def visible(sq: int, sk: int, window: tuple[int, int], device: torch.device) -> torch.Tensor:
    """(sq, sk) bool, True where key j is visible to query i (bottom-right aligned):
    i + sk - sq - left <= j <= i + sk - sq + right, a negative side being unbounded."""
    rel = (torch.arange(sq, device=device)[:, None] + (sk - sq)
           - torch.arange(sk, device=device)[None, :])
    mask = torch.ones(sq, sk, dtype=torch.bool, device=device)
    left, right = window
    if left >= 0:
        mask &= rel <= left
    if right >= 0:
        mask &= rel >= -right
    return mask


def _attention(problem: attnhub.VarlenProblem, bounds: list[tuple[int, int, int, int]],
               q: torch.Tensor, k: torch.Tensor, v: torch.Tensor
               ) -> tuple[torch.Tensor, torch.Tensor]:
    """out (total_q, nheads, d) in q's dtype and lse float32 (nheads, total_q). A pure
    function of q, k, v (no in-place writes), so torch.func.vjp can differentiate it."""
    ctype = torch.float64 if q.dtype == torch.float64 else torch.float32
    group = problem.nheads // problem.nheads_k
    outs, lses = [], []
    for q0, q1, k0, k1 in bounds:
        sq, sk = q1 - q0, k1 - k0
        if sq == 0:
            continue
        if sk == 0:  # no key at all: out 0, lse -inf
            outs.append(q.new_zeros(sq, problem.nheads, problem.head_dim))
            lses.append(torch.full((problem.nheads, sq), float("-inf"), device=q.device))
            continue
        qb = q[q0:q1].to(ctype).transpose(0, 1)  # (nheads, sq, d)
        # GQA: query head h reads kv head h // group.
        kb = k[k0:k1].to(ctype).repeat_interleave(group, dim=1).transpose(0, 1)
        vb = v[k0:k1].to(ctype).repeat_interleave(group, dim=1).transpose(0, 1)
        mask = visible(sq, sk, problem.window, q.device)
        seen = mask.any(dim=-1)  # rows that see at least one key
        # SDPA returns NaN on a row that sees no key (and NaN gradients leak from it into dk
        # and dv): open such rows to every key, then overwrite them with out 0, lse -inf.
        mask = mask | ~seen[:, None]
        o = F.scaled_dot_product_attention(qb, kb, vb, attn_mask=mask, scale=problem.scale)
        scores = torch.matmul(qb, kb.transpose(-1, -2)) * problem.scale
        lse = torch.logsumexp(scores.masked_fill(~mask, float("-inf")), dim=-1)
        o = torch.where(seen[None, :, None], o, torch.zeros_like(o))
        lse = torch.where(seen[None, :], lse, torch.full_like(lse, float("-inf")))
        outs.append(o.transpose(0, 1).to(q.dtype))
        lses.append(lse.to(torch.float32))
    if not outs:
        return (q.new_zeros(q.shape),
                torch.full((problem.nheads, q.shape[0]), float("-inf"), device=q.device))
    return torch.cat(outs), torch.cat(lses, dim=1)
