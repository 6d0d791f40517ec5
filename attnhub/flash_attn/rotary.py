"""Rotary position embedding as flash_attn_with_kvcache applies it to q and the new k.

Facts from flash_attn 2.8's docstring of flash_attn_with_kvcache: cos/sin are
(seqlen_ro, rotary_dim / 2); only the first rotary_dim channels rotate; interleaved pairs
channels (0, 1), (2, 3), ... and non-interleaved (GPT-NeoX style) pairs i with
i + rotary_dim / 2. Computed in float32 (float64 for float64 inputs), cast back to the
input's dtype.
"""

from __future__ import annotations

import torch


def apply_rotary(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                 positions: torch.Tensor, interleaved: bool) -> torch.Tensor:
    """x (batch, seqlen, nheads, head_dim); positions (batch, seqlen) int64 row indices
    into cos/sin (seqlen_ro, rotary_dim / 2). Returns a new tensor of x's shape and dtype."""
    half = cos.shape[-1]
    rot = 2 * half
    compute = torch.promote_types(x.dtype, torch.float32)
    c = cos[positions].to(compute).unsqueeze(2)  # (batch, seqlen, 1, half)
    s = sin[positions].to(compute).unsqueeze(2)
    xr = x[..., :rot].to(compute)
    if interleaved:
        x1, x2 = xr[..., 0::2], xr[..., 1::2]
        rotated = torch.stack((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1).flatten(-2)
    else:
        x1, x2 = xr[..., :half], xr[..., half:]
        rotated = torch.cat((x1 * c - x2 * s, x1 * s + x2 * c), dim=-1)
    return torch.cat((rotated.to(x.dtype), x[..., rot:]), dim=-1)
