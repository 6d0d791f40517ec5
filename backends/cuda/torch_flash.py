"""torch-flash: PyTorch's bundled FlashAttention-2 kernels, present in every CUDA build.

Calls ``torch.ops.aten._flash_attention_forward`` / ``_flash_attention_backward`` with
cum_seq_q / cum_seq_k (varlen). Facts (PyTorch's flash_attn/flash_api.cpp, and the project's
measurements on an H200 with torch 2.11): fp16 / bf16 only, head_dim a multiple of 8 up to
256, sm80 or newer, int32 offsets, GQA read natively, causal and windows aligned bottom-right
(-1 = unbounded), lse float32 (nheads, total_q) with +inf on rows that see no key, out 0
there; no ALiBi in the bundled build, no softcap, no paged KV through this op.
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
from .determinism import deterministic_algorithms
from .fa2_windows import left_only_window_reasons
from .tensors import (
    dense_offsets,
    kernel_max_seqlen_q,
    last_dim_contiguous,
    lse_to_attnhub,
    lse_to_flash,
)

# The forward returns the dropout state as uint64 (seed, offset); attnhub carries int64.
_RNG_DTYPE = getattr(torch, "uint64", torch.int64)

# The aten overloads, resolved once (they exist in every torch build, CUDA or not); module
# attributes so that CPU tests can put recording fakes in their place.
aten_forward = torch.ops.aten._flash_attention_forward.default
aten_backward = torch.ops.aten._flash_attention_backward.default


class TorchFlashBackend(CudaAdapter):
    """Adapter to torch's bundled FlashAttention-2 (aten op, varlen through cum_seq)."""

    name: ClassVar[str] = "torch-flash"
    priority: ClassVar[int] = 50
    dlse_unsupported_by: ClassVar[str | None] = "torch's FA2"
    description: ClassVar[str] = "PyTorch's bundled FlashAttention-2 (aten._flash_attention_*)"
    capabilities: ClassVar[Capabilities] = Capabilities(
        dtypes=frozenset({torch.float16, torch.bfloat16}),
        head_dims=(8, 256),
        head_dim_multiple=8,
        softcap=False,
        alibi=frozenset(),
        page_size_multiple=None,
        top_left=False,
        return_probs=False,
    )

    def unavailable_reasons(self) -> list[str]:
        cc = device.capability()
        reasons = device.cuda_reasons("compute capability 8.0 (Ampere) or newer",
                                      None if cc is None else cc >= (8, 0))
        if reasons:
            return reasons
        check = getattr(torch.backends.cuda, "is_flash_attention_available", None)
        if check is not None and not check():
            return ["this PyTorch build was compiled without its FlashAttention kernels"]
        return []

    def why_not(self, problem: VarlenProblem) -> list[str]:
        return super().why_not(problem) + left_only_window_reasons(problem)

    def run_forward(self, problem: VarlenProblem, inputs: VarlenInputs,
                    return_lse: bool) -> ForwardResult:
        out, lse, rng = _forward(problem, inputs)
        if not return_lse:
            return ForwardResult(out, lse)  # the kernel's convention: only out is read
        return ForwardResult(out, lse_to_attnhub(lse), None,
                             rng.view(torch.int64) if problem.dropout_p > 0 else None)

    def out_only_runner(self, problem: VarlenProblem):
        if problem.batch == 0:
            return super().out_only_runner(problem)
        max_q, max_k = kernel_max_seqlen_q(problem), problem.max_seqlen_k
        dropout_p, causal, scale = problem.dropout_p, problem.causal, problem.scale
        left, right = problem.window
        # The overload's C++ entry point (what OpOverload.__call__ forwards to), resolved once.
        kernel = getattr(aten_forward, "_op", aten_forward)

        # Window arguments only when they say more than is_causal: the op then parses fewer
        # keywords per call (-1 / -1 is its default, and is_causal sets right = 0).
        if left == -1 and right == (0 if causal else -1):
            def run(q, k, v, cu_seqlens_q, cu_seqlens_k):
                try:  # the kernel checks its layouts itself: no Python checks per call
                    return kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, dropout_p,
                                  causal, False, scale=scale)[0]
                except RuntimeError:
                    return _dense_retry(run, q, k, v, cu_seqlens_q, cu_seqlens_k)
        else:
            def run(q, k, v, cu_seqlens_q, cu_seqlens_k):
                try:
                    return kernel(q, k, v, cu_seqlens_q, cu_seqlens_k, max_q, max_k, dropout_p,
                                  causal, False, scale=scale, window_size_left=left,
                                  window_size_right=right)[0]
                except RuntimeError:
                    return _dense_retry(run, q, k, v, cu_seqlens_q, cu_seqlens_k)
        return run

    def autograd_out_runner(self, problem: VarlenProblem):
        """The aten forward (out_only_runner's launch) with torch's own autograd node
        (FlashAttentionBackward0): its backward is the same aten backward, with no Python on
        the way. Not with dropout (the node keeps its own rng state: attnhub's Function hands
        it over instead) nor with ``deterministic`` (torch's flag would have to be set while
        the engine runs the backward), nor for a batch of no sequences."""
        if problem.batch == 0 or problem.dropout_p > 0 or problem.deterministic:
            return None
        return self.out_only_runner(problem)

    def run_backward(self, problem: VarlenProblem, inputs: VarlenInputs, out: torch.Tensor,
                     lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None
                     ) -> Gradients:
        q, k, v = inputs.q, inputs.k, inputs.v
        if problem.dropout_p > 0:
            rng = inputs.rng_state.view(_RNG_DTYPE)
        else:
            rng = q.new_empty((2,), dtype=_RNG_DTYPE)
        unused = q.new_empty((), dtype=_RNG_DTYPE)
        with deterministic_algorithms(problem.deterministic):
            dq, dk, dv = aten_backward(
                last_dim_contiguous(dout), last_dim_contiguous(q), last_dim_contiguous(k),
                last_dim_contiguous(v), last_dim_contiguous(out), lse_to_flash(lse),
                dense_offsets(inputs.cu_seqlens_q), dense_offsets(inputs.cu_seqlens_k),
                kernel_max_seqlen_q(problem), problem.max_seqlen_k, problem.dropout_p,
                problem.causal, rng, unused, scale=problem.scale,
                window_size_left=problem.window[0], window_size_right=problem.window[1])
        return Gradients(dq, dk, dv)


def _dense_retry(run, q, k, v, cu_seqlens_q, cu_seqlens_k) -> torch.Tensor:
    """After the kernel raised: run again with the layouts it needs (stride 1 on the head
    dimension, contiguous offsets), or re-raise when the inputs had them already."""
    dense = (last_dim_contiguous(q), last_dim_contiguous(k), last_dim_contiguous(v),
             dense_offsets(cu_seqlens_q), dense_offsets(cu_seqlens_k))
    if all(a is b for a, b in zip(dense, (q, k, v, cu_seqlens_q, cu_seqlens_k), strict=True)):
        raise  # the error the caller is handling: it was not about layouts
    return run(*dense)


def _forward(problem: VarlenProblem, inputs: VarlenInputs
             ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """-> out, lse in the kernel's convention (+inf on empty rows), rng_state (uint64 (2,))."""
    out, lse, rng, _unused, _mask = aten_forward(
        last_dim_contiguous(inputs.q), last_dim_contiguous(inputs.k),
        last_dim_contiguous(inputs.v), dense_offsets(inputs.cu_seqlens_q),
        dense_offsets(inputs.cu_seqlens_k), kernel_max_seqlen_q(problem),
        problem.max_seqlen_k, problem.dropout_p, problem.causal, False, scale=problem.scale,
        window_size_left=problem.window[0], window_size_right=problem.window[1])
    return out, lse, rng
