"""FlashAttention-Plus's module surface: ``FlashAttention`` and ``FlashMHA`` nn.Modules.

FlashAttention-Plus (github.com/VocabVictor/flash-attention-plus, docs/api.md) keeps
flash_attn's functions and adds these two modules; it picks its kernel with the environment
variable FLASH_ATTENTION_USE_FLAGGEMS. Here the modules call attnhub.flash_attn's functions, so
every call goes through attnhub's dispatch, and ATTNHUB_BACKEND plays the environment
variable's role (a backend name forces that backend for every call). FlashMHA's extra
constructor arguments follow flash_attn.modules.mha.MHA (num_heads_kv, bias, softmax_scale,
window_size).
"""

from __future__ import annotations

import torch
from torch import nn

from ..arguments import as_window
from ..errors import InvalidArgumentError
from ..flash_attn import bert_padding
from ..flash_attn.batched import flash_attn_func
from ..flash_attn.varlen import flash_attn_varlen_func
from ..normalize import CuSeqlens


class FlashAttention(nn.Module):
    """Attention over q, k, v split in heads; no parameters.

    forward(q, k, v): q (batch, seqlen_q, num_heads, head_dim), k / v (batch, seqlen_k,
    nheads_k, head_dim) -> (batch, seqlen_q, num_heads, head_dim); with cu_seqlens_q /
    cu_seqlens_k, packed (total, heads, head_dim) tensors instead. Dropout only in training mode.
    """

    def __init__(self, num_heads: int, head_dim: int, dropout: float = 0.0, causal: bool = False,
                 window_size: tuple[int, int] = (-1, -1),
                 alibi_slopes: torch.Tensor | None = None,
                 softmax_scale: float | None = None) -> None:
        super().__init__()
        self.num_heads, self.head_dim = num_heads, head_dim
        self.dropout, self.causal = dropout, causal
        self.window_size, self.softmax_scale = as_window(window_size), softmax_scale
        self.register_buffer("alibi_slopes", alibi_slopes, persistent=False)

    def forward(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                cu_seqlens_q: CuSeqlens | None = None, cu_seqlens_k: CuSeqlens | None = None,
                max_seqlen_q: int | None = None, max_seqlen_k: int | None = None
                ) -> torch.Tensor:
        if q.shape[-2:] != (self.num_heads, self.head_dim):
            raise InvalidArgumentError("q", f"(..., num_heads, head_dim) = (..., {self.num_heads},"
                                       f" {self.head_dim})", f"shape {tuple(q.shape)}")
        p = self.dropout if self.training else 0.0
        if (cu_seqlens_q is None) != (cu_seqlens_k is None):
            raise InvalidArgumentError("cu_seqlens_k", "given together with cu_seqlens_q, or "
                                       "neither", "only one of them")
        if cu_seqlens_q is None:
            return flash_attn_func(q, k, v, p, self.softmax_scale, self.causal, self.window_size,
                                   0.0, self.alibi_slopes)
        return flash_attn_varlen_func(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                      max_seqlen_k, p, self.softmax_scale, self.causal,
                                      self.window_size, 0.0, self.alibi_slopes)


class FlashMHA(nn.Module):
    """Multi-head self-attention: QKV projection, attention, output projection.

    forward(x): x (batch, seqlen, embed_dim) -> (batch, seqlen, embed_dim). key_padding_mask
    (batch, seqlen) bool, True = a real token: padding is dropped before attention and the
    output is 0 there (before out_proj's bias). With cu_seqlens (batch + 1,) and max_seqlen,
    x is packed (total, embed_dim).
    """

    def __init__(self, embed_dim: int, num_heads: int, dropout: float = 0.0, causal: bool = False,
                 layer_idx: int | None = None, device: torch.device | str | None = None,
                 dtype: torch.dtype | None = None, num_heads_kv: int | None = None,
                 bias: bool = True, softmax_scale: float | None = None,
                 window_size: tuple[int, int] = (-1, -1)) -> None:
        super().__init__()
        if num_heads < 1 or embed_dim % num_heads:
            raise InvalidArgumentError("num_heads", f"a divisor of embed_dim = {embed_dim}",
                                       num_heads)
        num_heads_kv = num_heads if num_heads_kv is None else num_heads_kv
        if num_heads_kv < 1 or num_heads % num_heads_kv:
            raise InvalidArgumentError("num_heads_kv", f"a divisor of num_heads = {num_heads}",
                                       num_heads_kv)
        self.embed_dim, self.num_heads, self.num_heads_kv = embed_dim, num_heads, num_heads_kv
        self.head_dim = embed_dim // num_heads
        self.layer_idx, self.causal = layer_idx, causal
        kw = {"device": device, "dtype": dtype}
        qkv_dim = (num_heads + 2 * num_heads_kv) * self.head_dim
        self.Wqkv = nn.Linear(embed_dim, qkv_dim, bias=bias, **kw)
        self.out_proj = nn.Linear(embed_dim, embed_dim, bias=bias, **kw)
        self.inner_attn = FlashAttention(num_heads, self.head_dim, dropout, causal, window_size,
                                         softmax_scale=softmax_scale)

    def reset_parameters(self) -> None:
        """Re-draw both projections as nn.Linear does at construction."""
        self.Wqkv.reset_parameters()
        self.out_proj.reset_parameters()

    def forward(self, x: torch.Tensor, key_padding_mask: torch.Tensor | None = None,
                cu_seqlens: CuSeqlens | None = None, max_seqlen: int | None = None
                ) -> torch.Tensor:
        if x.shape[-1] != self.embed_dim or x.dim() != (2 if cu_seqlens is not None else 3):
            shape = "(total, embed_dim)" if cu_seqlens is not None else "(batch, seqlen, embed_dim)"
            raise InvalidArgumentError("x", f"shape {shape} with embed_dim = {self.embed_dim}",
                                       f"shape {tuple(x.shape)}")
        if key_padding_mask is not None and cu_seqlens is not None:
            raise InvalidArgumentError("key_padding_mask", "None when cu_seqlens is given",
                                       "a mask")
        if key_padding_mask is not None:
            batch, seqlen = x.shape[:2]
            if tuple(key_padding_mask.shape) != (batch, seqlen):
                raise InvalidArgumentError("key_padding_mask", f"shape (batch, seqlen) = "
                                           f"({batch}, {seqlen})", tuple(key_padding_mask.shape))
            packed, indices, cu, max_len, _ = bert_padding.unpad_input(x, key_padding_mask)
            out = self._packed(packed, cu, max_len)
            return self.out_proj(bert_padding.pad_input(out, indices, batch, seqlen))
        if cu_seqlens is not None:
            return self.out_proj(self._packed(x, cu_seqlens, max_seqlen))
        q, k, v = self._split(self.Wqkv(x))
        out = self.inner_attn(q, k, v)
        return self.out_proj(out.reshape(*x.shape[:2], self.embed_dim))

    def _split(self, qkv: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        lead = qkv.shape[:-1]
        qkv = qkv.view(*lead, self.num_heads + 2 * self.num_heads_kv, self.head_dim)
        h, hk = self.num_heads, self.num_heads_kv
        return qkv[..., :h, :], qkv[..., h:h + hk, :], qkv[..., h + hk:, :]

    def _packed(self, x: torch.Tensor, cu: CuSeqlens, max_seqlen: int | None) -> torch.Tensor:
        q, k, v = self._split(self.Wqkv(x))
        out = self.inner_attn(q, k, v, cu, cu, max_seqlen, max_seqlen)
        return out.reshape(x.shape[0], self.embed_dim)
