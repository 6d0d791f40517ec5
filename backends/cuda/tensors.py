"""Small tensor conventions shared by the CUDA adapters."""

from __future__ import annotations

import torch

from attnhub.backend import ForwardResult
from attnhub.problem import VarlenProblem

_INF = float("inf")
_NAN = float("nan")


def lse_to_attnhub(lse: torch.Tensor) -> torch.Tensor:
    """FlashAttention-2/3 write +inf as the lse of a row that sees no key; attnhub says -inf.
    In place, one kernel; NaN stays NaN (a true lse is never +inf)."""
    return lse.nan_to_num_(nan=_NAN, posinf=-_INF, neginf=-_INF)


def lse_to_flash(lse: torch.Tensor) -> torch.Tensor:
    """attnhub's lse back in FlashAttention-2/3's convention (+inf on rows that see no key),
    as their backward kernels expect. A new tensor: the caller's lse is left alone."""
    return lse.nan_to_num(nan=_NAN, posinf=_INF, neginf=_INF)


def reject_dlse(dlse: torch.Tensor | None, backend: str, kernel: str) -> None:
    """FA2/FA3 backward kernels take no gradient of lse: a loss on lse is an error naming
    the backends that take one. ``kernel``: whose backward, for the message."""
    if dlse is not None:
        raise NotImplementedError(
            f"backend {backend!r} cannot propagate a gradient through lse ({kernel}'s backward "
            "takes none); use backend='triton', 'fa4' or 'reference' for losses on lse")


def last_dim_contiguous(t: torch.Tensor) -> torch.Tensor:
    """The kernels need stride 1 on the head dimension (any row and head strides).
    is_contiguous() first: it answers the common case in half the time of stride(-1)."""
    return t if t.is_contiguous() or t.stride(-1) == 1 else t.contiguous()


def dense_offsets(cu: torch.Tensor) -> torch.Tensor:
    """cu_seqlens as the kernels read them: contiguous int32 (normalize gives int32)."""
    return cu if cu.is_contiguous() else cu.contiguous()


def kernel_max_seqlen_q(problem: VarlenProblem) -> int:
    """max_seqlen_q for FlashAttention-2's varlen kernels (torch's and flash_attn's).

    Any upper bound is valid, and two exact values are avoided: 0 (a grid of no blocks is a
    launch error) and 1, where the kernel swaps query heads into the sequence dimension for
    GQA decode, which needs every sequence to hold exactly one query and returns lse in
    another layout."""
    return max(problem.max_seqlen_q, 2)


def empty_batch(problem: VarlenProblem, q: torch.Tensor) -> ForwardResult:
    """The result of a call with no sequences (the kernels reject batch 0)."""
    out = q.new_zeros(q.shape)
    lse = q.new_full((problem.nheads, q.shape[0]), -_INF, dtype=torch.float32)
    return ForwardResult(out, lse)
