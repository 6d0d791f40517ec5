"""fa4: FlashAttention-4 (flash_attn.cute, package flash-attn-4), used when installed, on
Hopper (sm90) and Blackwell (sm100).

Low-level calls ``flash_attn.cute.interface._flash_attn_fwd`` / ``_flash_attn_bwd`` (read in
flash-attn-4 4.0.0b36): fp16 / bf16, GQA, causal and windows bottom-right with None meaning
unbounded, softcap, lse float32 (nheads, total_q) with -inf on rows that see no key,
gradients through lse (dlse), deterministic backward. Head dims on sm90: 8..256, multiples
of 8; on sm100: 8..128 or 256, and no softcap in the head_dim 256 backward. No dropout, no
ALiBi. Page tables go with ``seqused_k`` there, not with cu_seqlens_k: paged KV is not wired.

Attention sinks: ``learnable_sink`` of both functions, (nheads,) float16 / bfloat16 / float32
(attnhub passes its float32 sinks): a raw logit per query head, not multiplied by
softmax_scale, that joins the softmax normalizer and the lse and takes no value; a row that
sees no key gets out 0 and lse = sink (softmax.apply_learnable_sink). With it the backward
returns a fourth output, dsink = -sum_rows exp(sink - lse) * (rowsum(dout * out) - dlse), on
sm90 and sm100, except the dedicated sm100 head_dim 256 backward ("SM100 backward with
head_dim=256 does not support learnable_sink").
"""

from __future__ import annotations

from typing import ClassVar

import torch

from attnhub.backend import ForwardResult, Gradients
from attnhub.capabilities import Capabilities
from attnhub.inputs import VarlenInputs
from attnhub.problem import VarlenProblem

from . import device
from .base import CudaAdapter
from .tensors import dense_offsets

MODULE = "flash_attn.cute.interface"
kernels = device.lazy_module(MODULE)  # the interface module, imported on first use


def window(problem: VarlenProblem) -> tuple[int | None, int | None]:
    """attnhub's (left, right), -1 = unbounded, as FA4's (left, right), None = unbounded."""
    left, right = problem.window
    return (None if left < 0 else left), (None if right < 0 else right)


class FA4Backend(CudaAdapter):
    """Adapter to FlashAttention-4's varlen kernels (CuTe DSL)."""

    name: ClassVar[str] = "fa4"
    priority: ClassVar[int] = 300
    description: ClassVar[str] = "FlashAttention-4 (flash_attn.cute), Hopper and Blackwell"
    capabilities: ClassVar[Capabilities] = Capabilities(
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        head_dims=(8, 256),
        head_dim_multiple=8,
        alibi=frozenset(),
        dropout=False,
        page_size_multiple=None,
        top_left=False,
        return_probs=False,
        sinks=True,
    )

    def unavailable_reasons(self) -> list[str]:
        reasons = []
        if device.distribution_version("flash-attn-4") is None:
            reasons.append("flash-attn-4 is not installed (pip install 'attnhub[fa4]')")
        cc = device.capability()
        reasons += device.cuda_reasons(
            "compute capability 9.0 (Hopper) or 10.x (Blackwell)",
            None if cc is None else cc[0] in (9, 10))
        return reasons or device.import_reason(MODULE)

    def why_not(self, problem: VarlenProblem) -> list[str]:
        reasons = super().why_not(problem)
        cc = device.capability()
        if cc is not None and cc[0] == 9 and problem.requires_grad and problem.head_dim % 32:
            reasons.append(f"head_dim {problem.head_dim} in the backward is not supported on "
                           "Hopper by FA4 (needs a multiple of 32: 72 and 80 gave wrong "
                           "gradients on an H200 with flash-attn-4 4.0.0b36)")
        if cc is not None and cc[0] == 10:
            d = problem.head_dim
            if 128 < d < 256:
                reasons.append(f"head_dim {d} is not supported on Blackwell by FA4 "
                               "(needs <= 128, or 256)")
            if d == 256 and problem.softcap > 0 and problem.requires_grad:
                reasons.append("softcap in the head_dim 256 backward is not supported on "
                               "Blackwell by FA4")
            if d == 256 and problem.sinks and problem.requires_grad:
                reasons.append("attention sinks in the head_dim 256 backward are not supported "
                               "on Blackwell by FA4 (its dedicated head_dim 256 backward takes "
                               "no learnable_sink)")
        return reasons

    def run_forward(self, problem: VarlenProblem, inputs: VarlenInputs,
                    return_lse: bool) -> ForwardResult:
        return ForwardResult(*_forward(problem, inputs, return_lse))

    def run_backward(self, problem: VarlenProblem, inputs: VarlenInputs, out: torch.Tensor,
                     lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None
                     ) -> Gradients:
        q, k, v = inputs.q, inputs.k, inputs.v
        left, right = window(problem)
        grads = kernels()._flash_attn_bwd(
            q, k, v, out, dout, lse, problem.scale, problem.causal, problem.softcap,
            window_size_left=left, window_size_right=right,
            cu_seqlens_q=dense_offsets(inputs.cu_seqlens_q),
            cu_seqlens_k=dense_offsets(inputs.cu_seqlens_k), max_seqlen_q=problem.max_seqlen_q,
            max_seqlen_k=problem.max_seqlen_k, deterministic=problem.deterministic, dlse=dlse,
            learnable_sink=inputs.sinks)
        # (dq, dk, dv), and dsink fourth with learnable_sink
        return Gradients(*grads[:3], None if inputs.sinks is None else grads[3])


def _forward(problem: VarlenProblem, inputs: VarlenInputs, return_lse: bool) -> tuple:
    """-> out, lse ((nheads, total_q), -inf on rows that see no key, the sink with sinks; None
    unless return_lse)."""
    left, right = window(problem)
    out, lse, *_ = kernels()._flash_attn_fwd(
        inputs.q, inputs.k, inputs.v, cu_seqlens_q=dense_offsets(inputs.cu_seqlens_q),
        cu_seqlens_k=dense_offsets(inputs.cu_seqlens_k), max_seqlen_q=problem.max_seqlen_q,
        max_seqlen_k=problem.max_seqlen_k, softmax_scale=problem.scale, causal=problem.causal,
        softcap=problem.softcap, window_size_left=left, window_size_right=right,
        learnable_sink=inputs.sinks, return_lse=return_lse)
    return out, lse
