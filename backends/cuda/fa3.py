"""fa3: FlashAttention-3 (module flash_attn_interface, built from flash-attention's hopper/
folder; no PyPI wheel), used when installed, on Hopper.

Low-level calls ``flash_attn_interface._flash_attn_forward`` / ``_flash_attn_backward``
(flash-attention's hopper/flash_attn_interface.py, the version whose forward takes
``window_size_left`` / ``window_size_right``): fp16 / bf16 (fp8 is forward-only and not
exposed here), head_dim a multiple of 8 up to 256, GQA, causal and windows bottom-right,
softcap, deterministic backward; no dropout, no ALiBi. Paged KV goes through page tables with
``seqused_k`` in FA3, not attnhub's cu_seqlens_k layout, and is not wired here.
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
from .tensors import dense_offsets, last_dim_contiguous, lse_to_attnhub, lse_to_flash

MODULE = "flash_attn_interface"
kernels = device.lazy_module(MODULE)  # the interface module, imported on first use


class FA3Backend(CudaAdapter):
    """Adapter to FlashAttention-3's varlen kernels (Hopper)."""

    name: ClassVar[str] = "fa3"
    priority: ClassVar[int] = 200
    dlse_unsupported_by: ClassVar[str | None] = "FA3"
    description: ClassVar[str] = "FlashAttention-3 (flash_attn_interface), Hopper"
    capabilities: ClassVar[Capabilities] = Capabilities(
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        head_dims=(8, 256),
        head_dim_multiple=8,
        alibi=frozenset(),
        dropout=False,
        page_size_multiple=None,
        top_left=False,
        return_probs=False,
    )

    def unavailable_reasons(self) -> list[str]:
        reasons = []
        if not device.module_present(MODULE):
            reasons.append("flash_attn_interface (FA3) is not installed: build it from "
                           "flash-attention's hopper/ folder (cd hopper && pip install "
                           "--no-build-isolation .); there is no PyPI wheel")
        cc = device.capability()
        reasons += device.cuda_reasons("compute capability 9.0 (Hopper)",
                                       None if cc is None else cc[0] == 9)
        return reasons or device.import_reason(MODULE)

    def run_forward(self, problem: VarlenProblem, inputs: VarlenInputs,
                    return_lse: bool) -> ForwardResult:
        out, lse = _forward(problem, inputs)
        return ForwardResult(out, lse_to_attnhub(lse) if return_lse else lse)

    def run_backward(self, problem: VarlenProblem, inputs: VarlenInputs, out: torch.Tensor,
                     lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None
                     ) -> Gradients:
        q, k, v = (last_dim_contiguous(t) for t in (inputs.q, inputs.k, inputs.v))
        dq, dk, dv = torch.empty_like(q), torch.empty_like(k), torch.empty_like(v)
        kernels()._flash_attn_backward(
            last_dim_contiguous(dout), q, k, v, last_dim_contiguous(out), lse_to_flash(lse),
            dense_offsets(inputs.cu_seqlens_q), dense_offsets(inputs.cu_seqlens_k), None, None,
            problem.max_seqlen_q, problem.max_seqlen_k, dq, dk, dv, problem.scale,
            problem.causal, problem.window[0], problem.window[1], problem.softcap,
            problem.deterministic)
        return Gradients(dq, dk, dv)


def _forward(problem: VarlenProblem, inputs: VarlenInputs) -> tuple[torch.Tensor, torch.Tensor]:
    """-> out, lse in FA3's convention."""
    out, lse, *_ = kernels()._flash_attn_forward(
        last_dim_contiguous(inputs.q), last_dim_contiguous(inputs.k),
        last_dim_contiguous(inputs.v), cu_seqlens_q=dense_offsets(inputs.cu_seqlens_q),
        cu_seqlens_k=dense_offsets(inputs.cu_seqlens_k), max_seqlen_q=problem.max_seqlen_q,
        max_seqlen_k=problem.max_seqlen_k, softmax_scale=problem.scale, causal=problem.causal,
        window_size_left=problem.window[0], window_size_right=problem.window[1],
        softcap=problem.softcap)
    return out, lse
