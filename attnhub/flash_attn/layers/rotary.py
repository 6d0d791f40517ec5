"""flash_attn 2.8's ``flash_attn.layers.rotary.apply_rotary_emb``, in plain torch.

Same arguments and conventions as flash_attn's (flash_attn/layers/rotary.py): x (batch,
seqlen, nheads, head_dim), or (total, nheads, head_dim) with cu_seqlens; cos / sin
(seqlen_ro, rotary_dim / 2); only the first rotary_dim channels rotate; token t of sequence b
uses row seqlen_offsets[b] + t, and a row past seqlen_ro leaves the token unrotated (flash_attn's
kernel masks those rows to cos 1, sin 0). Differentiable; ``inplace`` writes into x.
"""

from __future__ import annotations

import torch

from ...arguments import as_bool, as_int
from ...errors import InvalidArgumentError
from ..rotary import apply_rotary


def apply_rotary_emb(x: torch.Tensor, cos: torch.Tensor, sin: torch.Tensor,
                     interleaved: bool = False, inplace: bool = False,
                     seqlen_offsets: int | torch.Tensor = 0,
                     cu_seqlens: torch.Tensor | None = None,
                     max_seqlen: int | None = None) -> torch.Tensor:
    """x rotated at positions seqlen_offsets + t (module docstring); x's shape and dtype."""
    for name, t in (("cos", cos), ("sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise InvalidArgumentError(name, "a 2-D tensor (seqlen_ro, rotary_dim / 2)",
                                       type(t).__name__ if not isinstance(t, torch.Tensor)
                                       else f"shape {tuple(t.shape)}")
    if sin.shape != cos.shape:
        raise InvalidArgumentError("sin", f"the shape of cos {tuple(cos.shape)}",
                                   tuple(sin.shape))
    if 2 * cos.shape[1] > x.shape[-1]:
        raise InvalidArgumentError("cos", f"rotary_dim / 2 <= head_dim / 2 = {x.shape[-1] // 2}",
                                   cos.shape[1])
    if cu_seqlens is None:
        if x.dim() != 4:
            raise InvalidArgumentError("x", "a 4-D tensor (batch, seqlen, nheads, head_dim)",
                                       f"shape {tuple(x.shape)}")
        batched, batch, seqlen = x, x.shape[0], x.shape[1]
        local = torch.arange(seqlen, device=x.device).expand(batch, seqlen)
        seq_of = torch.arange(batch, device=x.device)[:, None].expand(batch, seqlen)
    else:
        if x.dim() != 3:
            raise InvalidArgumentError("x", "a 3-D tensor (total, nheads, head_dim) with "
                                       "cu_seqlens", f"shape {tuple(x.shape)}")
        cu = cu_seqlens.to(device=x.device, dtype=torch.long)
        batch = cu.shape[0] - 1
        rows = torch.arange(x.shape[0], device=x.device)
        seq_of = (torch.searchsorted(cu, rows, right=True) - 1).clamp(0, max(batch - 1, 0))
        local = (rows - cu[seq_of])[None]
        seq_of = seq_of[None]
        batched = x[None]
    if isinstance(seqlen_offsets, torch.Tensor) and seqlen_offsets.numel() != 1:
        if tuple(seqlen_offsets.shape) != (batch,):
            raise InvalidArgumentError("seqlen_offsets", f"an int or a (batch,) = ({batch},) "
                                       "int tensor", f"shape {tuple(seqlen_offsets.shape)}")
        offsets = seqlen_offsets.to(device=x.device, dtype=torch.long)[seq_of]
    else:
        offsets = as_int("seqlen_offsets", seqlen_offsets, 0)
    positions = local + offsets
    # rows past seqlen_ro: an identity row (cos 1, sin 0) appended after the table
    seqlen_ro = cos.shape[0]
    cos_ext = torch.cat([cos, cos.new_ones(1, cos.shape[1])])
    sin_ext = torch.cat([sin, sin.new_zeros(1, sin.shape[1])])
    positions = torch.where(positions < seqlen_ro, positions, seqlen_ro)
    out = apply_rotary(batched, cos_ext, sin_ext, positions, as_bool("interleaved", interleaved))
    if cu_seqlens is not None:
        out = out[0]
    if as_bool("inplace", inplace):
        x.copy_(out)
        return x
    return out
