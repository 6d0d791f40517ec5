"""flash-attn: the flash_attn package (FlashAttention-2, 2.8), used when installed.

Low-level calls ``flash_attn.flash_attn_interface._flash_attn_varlen_forward`` /
``_flash_attn_varlen_backward`` (flash-attention's flash_attn/flash_attn_interface.py): the
same FA2 kernels as torch's bundled copy plus softcap, ALiBi ((nheads,) and (batch, nheads)
fp32 slopes) and paged KV with page sizes that are multiples of 256 (forward only: the varlen
backward takes no block table). Softcap and dropout cannot be combined. lse +inf on rows that
see no key; sm80 or newer; head_dim a multiple of 8 up to 256 (flash_attn's public wrapper
pads other sizes, its low-level functions do not).
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
from .fa2_windows import left_only_window_reasons
from .tensors import (
    dense_offsets,
    kernel_max_seqlen_q,
    last_dim_contiguous,
    lse_to_attnhub,
    lse_to_flash,
)

MODULE = "flash_attn.flash_attn_interface"
kernels = device.lazy_module(MODULE)  # the interface module, imported on first use


class FlashAttn2Backend(CudaAdapter):
    """Adapter to the flash_attn package's varlen FlashAttention-2 kernels."""

    name: ClassVar[str] = "flash-attn"
    priority: ClassVar[int] = 40
    dlse_unsupported_by: ClassVar[str | None] = "flash_attn"
    description: ClassVar[str] = "flash_attn 2.x (FlashAttention-2): softcap, ALiBi, paged%256"
    capabilities: ClassVar[Capabilities] = Capabilities(
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        head_dims=(8, 256),
        head_dim_multiple=8,
        page_size_multiple=256,
        top_left=False,
        return_probs=False,
    )

    def unavailable_reasons(self) -> list[str]:
        reasons = []
        if device.distribution_version("flash-attn") is None:
            reasons.append("flash-attn is not installed (pip install 'attnhub[flash-attn]')")
        cc = device.capability()
        reasons += device.cuda_reasons("compute capability 8.0 (Ampere) or newer",
                                       None if cc is None else cc >= (8, 0))
        return reasons or device.import_reason(MODULE)

    def why_not(self, problem: VarlenProblem) -> list[str]:
        reasons = super().why_not(problem) + left_only_window_reasons(problem)
        if problem.softcap > 0 and problem.dropout_p > 0:
            reasons.append("softcap together with dropout is not supported by flash_attn")
        if problem.paged is not None and problem.requires_grad:
            reasons.append("backward through paged KV (block_table) is not supported by "
                           "flash_attn's varlen backward")
        return reasons

    def run_forward(self, problem: VarlenProblem, inputs: VarlenInputs,
                    return_lse: bool) -> ForwardResult:
        out, lse, _probs, rng = _forward(problem, inputs)
        if not return_lse:
            return ForwardResult(out, lse)  # the kernel's convention: only out is read
        return ForwardResult(out, lse_to_attnhub(lse), None,
                             rng if problem.dropout_p > 0 else None)

    def run_backward(self, problem: VarlenProblem, inputs: VarlenInputs, out: torch.Tensor,
                     lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None
                     ) -> Gradients:
        q, k, v = (last_dim_contiguous(t) for t in (inputs.q, inputs.k, inputs.v))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        kernels()._flash_attn_varlen_backward(
            last_dim_contiguous(dout), q, k, v, last_dim_contiguous(out), lse_to_flash(lse),
            dq, dk, dv, dense_offsets(inputs.cu_seqlens_q), dense_offsets(inputs.cu_seqlens_k),
            kernel_max_seqlen_q(problem), problem.max_seqlen_k, problem.dropout_p,
            problem.scale, problem.causal, problem.window[0], problem.window[1],
            problem.softcap, inputs.alibi_slopes, problem.deterministic,
            inputs.rng_state if problem.dropout_p > 0 else None)
        return Gradients(dq, dk, dv)


def _forward(problem: VarlenProblem, inputs: VarlenInputs) -> tuple:
    """-> out, lse (+inf on empty rows), S_dmask, rng_state (int64 (2,))."""
    return kernels()._flash_attn_varlen_forward(
        last_dim_contiguous(inputs.q), last_dim_contiguous(inputs.k),
        last_dim_contiguous(inputs.v), dense_offsets(inputs.cu_seqlens_q),
        dense_offsets(inputs.cu_seqlens_k), kernel_max_seqlen_q(problem),
        problem.max_seqlen_k, problem.dropout_p, problem.scale, problem.causal,
        window_size_left=problem.window[0], window_size_right=problem.window[1],
        softcap=problem.softcap, alibi_slopes=inputs.alibi_slopes, return_softmax=False,
        block_table=inputs.block_table)
