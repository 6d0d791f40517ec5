"""A dense float64 attention with an explicit dropout mask: the oracle for dropout cases.

The reference draws its own dropout mask; a backend draws another. To check a backend's
dropout, the suite reads the backend's mask back from its output and recomputes attention
with exactly that mask here, per sequence, with autograd for the gradients.
"""

from __future__ import annotations

import torch


def visible(sq: int, sk: int, window: tuple[int, int]) -> torch.Tensor:
    """(sq, sk) bool: key j visible to query i, bottom-right aligned."""
    i = torch.arange(sq)[:, None]
    j = torch.arange(sk)[None, :]
    rel = i + sk - sq - j
    ok = torch.ones(sq, sk, dtype=torch.bool)
    left, right = window
    if left >= 0:
        ok &= rel <= left
    if right >= 0:
        ok &= rel >= -right
    return ok


def attention_with_mask(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                        seqlens_q: tuple[int, ...], seqlens_k: tuple[int, ...], scale: float,
                        window: tuple[int, int], keep: list[torch.Tensor], dropout_p: float,
                        compute_dtype: torch.dtype) -> torch.Tensor:
    """out (total_q, nheads, d) in q's dtype; keep[b] is (nheads, sq, sk) bool."""
    group = q.shape[1] // k.shape[1]
    outs, q0, k0 = [], 0, 0
    for b, (sq, sk) in enumerate(zip(seqlens_q, seqlens_k, strict=True)):
        qb = q[q0:q0 + sq].to(compute_dtype)
        kb = k[k0:k0 + sk].to(compute_dtype).repeat_interleave(group, dim=1)
        vb = v[k0:k0 + sk].to(compute_dtype).repeat_interleave(group, dim=1)
        s = torch.einsum("ihd,jhd->hij", qb, kb) * scale
        s = s.masked_fill(~visible(sq, sk, window).to(s.device), float("-inf"))
        p = torch.softmax(s, dim=-1).nan_to_num(0.0)
        p = p * keep[b].to(p.device) / (1.0 - dropout_p)
        outs.append(torch.einsum("hij,jhd->ihd", p, vb).to(q.dtype))
        q0, k0 = q0 + sq, k0 + sk
    return torch.cat(outs) if outs else q.new_zeros(q.shape)
