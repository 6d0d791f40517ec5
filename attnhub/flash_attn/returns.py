"""flash_attn 2.8's return conventions for ``return_attn_probs``, shared by every function.

flash_attn (flash_attn_interface.py, 2.8) asks its kernel for the probability matrix only when
``return_attn_probs and dropout_p > 0``, and returns ``(out, softmax_lse, S_dmask)`` whenever
``return_attn_probs`` is true:

* ``dropout_p == 0``: the kernel runs as usual; ``S_dmask`` is an empty tensor of shape (0,)
  and q's dtype. attnhub does the same: the call keeps its GPU kernel (it only asks for lse).
* ``dropout_p > 0``: ``S_dmask`` has shape (batch, nheads, round128(max_seqlen_q),
  round128(max_seqlen_k)) and q's dtype, entries of dropped positions negated, the padding
  zero. Its values are flash_attn's unnormalized scores exp(s - m): flash_attn's kernel takes
  m as the running row maximum over its key blocks (block size by GPU and head dim, see its
  tests' normalize_flash_attn_S); attnhub computes them as one key block, m the row maximum,
  i.e. probs / max(probs) per row. Computing them needs the full matrix, hence the reference
  backend.

``softmax_lse`` is float32: (nheads, total_q) for the varlen functions, (batch, nheads,
seqlen_q) for the fixed-length ones (the caller reshapes).
"""

from __future__ import annotations

import torch

from ..api import attention_forward_varlen
from ..arguments import as_bool, as_float


def forward(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_seqlens_q, cu_seqlens_k,
            max_seqlen_q, max_seqlen_k, dropout_p, softmax_scale, causal, window_size, softcap,
            alibi_slopes, deterministic, return_attn_probs, block_table=None):
    """attention_forward_varlen with flash_attn's ``return_attn_probs`` convention: out, or
    (out, lse (nheads, total_q) float32, S_dmask) (module docstring)."""
    if not as_bool("return_attn_probs", return_attn_probs):
        return attention_forward_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, False,
            block_table)
    if as_float("dropout_p", dropout_p, "a float in [0, 1)") == 0.0:
        out, lse = attention_forward_varlen(
            q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
            softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, False,
            block_table, return_lse=True)
        return out, lse, q.new_empty((0,))
    out, lse, probs = attention_forward_varlen(
        q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k, dropout_p,
        softmax_scale, causal, window_size, softcap, alibi_slopes, deterministic, True,
        block_table)
    return out, lse, s_dmask(probs, q.dtype)


def s_dmask(probs: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
    """attnhub's probs (batch, nheads, max_q, max_k) float32, dropped entries negated ->
    flash_attn's S_dmask: exp(s - row max) = probs / row max of probs (one key block), both
    length axes zero-padded to a multiple of 128, ``dtype``."""
    row_max = probs.abs().amax(dim=-1, keepdim=True)
    unnormalized = probs / torch.where(row_max > 0, row_max, torch.ones_like(row_max))
    pad_q = -probs.shape[2] % 128
    pad_k = -probs.shape[3] % 128
    return torch.nn.functional.pad(unnormalized, (0, pad_k, 0, pad_q)).to(dtype)
