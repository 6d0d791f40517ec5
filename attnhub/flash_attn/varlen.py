"""flash_attn 2.8's varlen functions, with its signatures and return conventions.

Each is a thin translation into attention_forward_varlen: same normalization, same dispatch.
"""

from __future__ import annotations

import torch

from ..normalize import CuSeqlens, WindowSize
from .layouts import check_packed
from .returns import forward


def flash_attn_varlen_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: CuSeqlens,
    cu_seqlens_k: CuSeqlens,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
    block_table: torch.Tensor | None = None,
):
    """q (total_q, nheads, d), k/v (total_k, nheads_k, d) -> out, or (out, softmax_lse,
    S_dmask) with return_attn_probs: lse float32 (nheads, total_q); S_dmask an empty tensor
    when dropout_p == 0, else (batch, nheads, round128(max_seqlen_q), round128(max_seqlen_k))
    in q's dtype, dropped entries negated (attnhub.flash_attn.returns)."""
    return forward(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
        softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs, block_table)


def flash_attn_varlen_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    cu_seqlens_q: CuSeqlens,
    cu_seqlens_k: CuSeqlens,
    max_seqlen_q: int | None,
    max_seqlen_k: int | None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """q (total_q, nheads, d), kv (total_k, 2, nheads_k, d); returns as flash_attn_varlen_func."""
    check_packed("kv", kv, 4, 1, 2, "(total_k, 2, nheads_k, head_dim)")
    return forward(
        q, kv[:, 0], kv[:, 1], cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs)


def flash_attn_varlen_qkvpacked_func(
    qkv: torch.Tensor,
    cu_seqlens: CuSeqlens,
    max_seqlen: int | None,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """qkv (total, 3, nheads, d), self-attention; returns as flash_attn_varlen_func."""
    check_packed("qkv", qkv, 4, 1, 3, "(total, 3, nheads, head_dim)")
    return forward(
        qkv[:, 0], qkv[:, 1], qkv[:, 2], cu_seqlens, cu_seqlens, max_seqlen, max_seqlen,
        dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic,
        return_attn_probs)

