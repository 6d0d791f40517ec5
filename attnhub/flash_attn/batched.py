"""flash_attn 2.8's fixed-length functions: (batch, seqlen, nheads, head_dim) tensors.

Each call becomes a packed batch of ``batch`` equal-length sequences (offsets built on the host,
cached per shape: no host-device sync) and goes through attention_forward_varlen.
"""

from __future__ import annotations

import torch

from ..arguments import as_bool
from ..errors import InvalidArgumentError
from ..normalize import WindowSize
from .layouts import check_batched, check_packed, pack, uniform_layout, unpack_lse
from .returns import forward


def flash_attn_func(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """q (batch, seqlen_q, nheads, d), k/v (batch, seqlen_k, nheads_k, d) -> out
    (batch, seqlen_q, nheads, d), or (out, softmax_lse (batch, nheads, seqlen_q) float32,
    S_dmask) with return_attn_probs: S_dmask an empty tensor when dropout_p == 0, else (batch,
    nheads, round128(seqlen_q), round128(seqlen_k)) in q's dtype (attnhub.flash_attn.returns)."""
    check_batched("q", q, "(batch, seqlen_q, nheads, head_dim)")
    check_batched("k", k, "(batch, seqlen_k, nheads_k, head_dim)")
    check_batched("v", v, "(batch, seqlen_k, nheads_k, head_dim)")
    return _batched(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap,
                    alibi_slopes, deterministic, return_attn_probs)


def flash_attn_kvpacked_func(
    q: torch.Tensor,
    kv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """q (batch, seqlen_q, nheads, d), kv (batch, seqlen_k, 2, nheads_k, d); returns as
    flash_attn_func."""
    check_batched("q", q, "(batch, seqlen_q, nheads, head_dim)")
    check_packed("kv", kv, 5, 2, 2, "(batch, seqlen_k, 2, nheads_k, head_dim)")
    return _batched(q, kv[:, :, 0], kv[:, :, 1], dropout_p, softmax_scale, causal, window_size,
                    softcap, alibi_slopes, deterministic, return_attn_probs)


def flash_attn_qkvpacked_func(
    qkv: torch.Tensor,
    dropout_p: float = 0.0,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    softcap: float = 0.0,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool = False,
    return_attn_probs: bool = False,
):
    """qkv (batch, seqlen, 3, nheads, d), self-attention; returns as flash_attn_func."""
    check_packed("qkv", qkv, 5, 2, 3, "(batch, seqlen, 3, nheads, head_dim)")
    return _batched(qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2], dropout_p, softmax_scale, causal,
                    window_size, softcap, alibi_slopes, deterministic, return_attn_probs)


def _batched(q, k, v, dropout_p, softmax_scale, causal, window_size, softcap, alibi_slopes,
             deterministic, return_attn_probs):
    batch, seqlen_q = q.shape[0], q.shape[1]
    if k.shape[0] != batch:
        raise InvalidArgumentError("k", f"batch size {batch} (dimension 0 of q)", k.shape[0])
    seqlen_k = k.shape[1]
    res = forward(
        pack(q), pack(k), pack(v), uniform_layout(batch, seqlen_q, q.device),
        uniform_layout(batch, seqlen_k, q.device), None, None, dropout_p, softmax_scale,
        causal, window_size, softcap, alibi_slopes, deterministic, return_attn_probs)
    if not as_bool("return_attn_probs", return_attn_probs):
        return res.reshape(q.shape)
    out, lse, probs = res
    return out.reshape(q.shape), unpack_lse(lse, batch, seqlen_q), probs
