"""Drop-in surfaces as conformance entry points: a case's packed tensors translated into one
surface's call (flash_attn, Paddle, FlashAttention-Plus), judged like a direct call.

The oracle stays the reference through attention_forward_varlen; only the run under test
goes through the surface, with the backend forced by attnhub.use_backend. A case that a
surface cannot express is unsupported, with the surface's reason.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from .cases import Case

Tensors = tuple[torch.Tensor, torch.Tensor, torch.Tensor]


@dataclass(frozen=True)
class Surface:
    """``why_not(case)``: what the surface cannot express; ``call(case, kwargs, q, k, v)`` ->
    (out, lse or None), kwargs being attention_forward_varlen's for the case."""

    name: str
    why_not: Callable[[Case], list[str]]
    call: Callable[[Case, dict, torch.Tensor, torch.Tensor, torch.Tensor],
                   tuple[torch.Tensor, torch.Tensor | None]]


def _flash_attn_call(case, kw, q, k, v):
    from attnhub.flash_attn import flash_attn_varlen_func

    out = flash_attn_varlen_func(
        q, k, v, kw["cu_seqlens_q"], kw["cu_seqlens_k"], kw["max_seqlen_q"], kw["max_seqlen_k"],
        kw["dropout_p"], None, kw["causal"], kw["window_size"] or (-1, -1), kw["softcap"],
        kw["alibi_slopes"], False, False, kw["block_table"])
    return out, None


def _flash_attn_why_not(case: Case) -> list[str]:
    return ["flash_attn 2.8's functions have no attention sinks"] if case.sinks else []


def _paddle_why_not(case: Case) -> list[str]:
    reasons = []
    if case.seqlens_q != case.seqlens_k:
        reasons.append("Paddle's packed qkv holds equal q and k lengths")
    for name, used in (("windows", case.window is not None), ("softcap", bool(case.softcap)),
                       ("ALiBi", case.alibi is not None), ("paged KV", case.page_size is not None),
                       ("attention sinks", case.sinks)):
        if used:
            reasons.append(f"Paddle's flash_attn_varlen_qkvpacked has no {name}")
    return reasons


def _paddle_call(case, kw, q, k, v):
    from attnhub.compat.paddle import flash_attn_varlen_qkvpacked

    total, hk, d = k.shape
    qkv = torch.cat((q.view(total, -1, hk, d), k[:, None], v[:, None]), dim=1)
    cu = torch.tensor(kw["cu_seqlens_q"], dtype=torch.int32, device=q.device)
    out, _ = flash_attn_varlen_qkvpacked(qkv, cu, cu, kw["max_seqlen_q"], kw["max_seqlen_k"],
                                         case.head_dim ** -0.5, kw["dropout_p"], kw["causal"],
                                         varlen_padded=False)
    return out, None


def _plus_why_not(case: Case) -> list[str]:
    reasons = []
    if case.softcap:
        reasons.append("FlashAttention-Plus's FlashAttention module has no softcap")
    if case.page_size is not None:
        reasons.append("FlashAttention-Plus's FlashAttention module has no paged KV")
    if case.sinks:
        reasons.append("FlashAttention-Plus's FlashAttention module has no attention sinks")
    return reasons


def _plus_call(case, kw, q, k, v):
    from attnhub.compat.flashattention_plus import FlashAttention

    module = FlashAttention(case.nheads, case.head_dim, case.dropout_p, case.causal,
                            kw["window_size"] or (-1, -1), kw["alibi_slopes"]).train()
    out = module(q, k, v, kw["cu_seqlens_q"], kw["cu_seqlens_k"], kw["max_seqlen_q"],
                 kw["max_seqlen_k"])
    return out, None


SURFACES: dict[str, Surface] = {
    "flash_attn": Surface("flash_attn", _flash_attn_why_not, _flash_attn_call),
    "paddle": Surface("paddle", _paddle_why_not, _paddle_call),
    "flashattention_plus": Surface("flashattention_plus", _plus_why_not, _plus_call),
}


def get_surface(name: str) -> Surface:
    try:
        return SURFACES[name]
    except KeyError:
        raise ValueError(f"unknown surface {name!r}; surfaces: {', '.join(SURFACES)}") from None
