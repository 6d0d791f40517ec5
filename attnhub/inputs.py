"""VarlenInputs: the tensors of one normalized call, as backends receive them."""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(slots=True)
class VarlenInputs:
    """Tensors of one call, all on q's device.

    q: (total_q, nheads, head_dim); k, v: (total_k, nheads_k, head_dim), or page pools
    (num_pages, page_size, nheads_k, head_dim) with ``block_table`` (batch, max_pages) int32.
    cu_seqlens_q / cu_seqlens_k: (batch + 1,) int32 offsets. alibi_slopes: float32, (nheads,)
    or (batch, nheads). rng_state: dropout state. In backward, the rng_state that the
    same backend's forward returned; in forward, None (the backend draws from torch's
    generator) or, for the reference backend, a fixed int64 (2,) seed pair.
    custom_mask / custom_mask_offsets: the bit-packed per-request mask (uint8, little bit
    order) and the int64 (batch,) bit offset of each request's (sq, sk) block
    (attnhub.custom_mask). schedule: what the backend's ``prepare`` returned for this layout
    (a plan's precomputed launch metadata), or None.
    """

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    alibi_slopes: torch.Tensor | None = None
    block_table: torch.Tensor | None = None
    rng_state: torch.Tensor | None = None
    custom_mask: torch.Tensor | None = None
    custom_mask_offsets: torch.Tensor | None = None
    schedule: object | None = None
