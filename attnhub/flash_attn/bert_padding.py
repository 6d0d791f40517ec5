"""flash_attn 2.8's bert_padding helpers: between padded (batch, seqlen, ...) tensors and the
packed (total_nnz, ...) layout with cu_seqlens. Signatures and return conventions follow
flash_attn 2.8 (flash_attn/bert_padding.py); plain torch indexing, differentiable."""

from __future__ import annotations

import torch


def index_first_axis(input: torch.Tensor, indices: torch.Tensor) -> torch.Tensor:
    """input (n, ...) -> input[indices] (len(indices), ...); gradients scatter back."""
    if input.dim() < 2:
        raise ValueError(f"index_first_axis: expected input with >= 2 dimensions, got shape "
                         f"{tuple(input.shape)}")
    return torch.index_select(input, 0, indices)


def index_put_first_axis(values: torch.Tensor, indices: torch.Tensor,
                         first_axis_dim: int) -> torch.Tensor:
    """A zero tensor (first_axis_dim, ...) with rows ``indices`` set to ``values``."""
    if indices.dim() != 1 or values.dim() < 2:
        raise ValueError("index_put_first_axis: expected 1-D indices and values with >= 2 "
                         f"dimensions, got {tuple(indices.shape)} and {tuple(values.shape)}")
    out = values.new_zeros((first_axis_dim, *values.shape[1:]))
    return out.index_copy(0, indices, values)


def unpad_input(hidden_states: torch.Tensor, attention_mask: torch.Tensor,
                unused_mask: torch.Tensor | None = None):
    """hidden_states (batch, seqlen, ...), attention_mask (batch, seqlen) bool/int (1 = valid),
    unused_mask (batch, seqlen) (1 = allocated but unused) ->
    (hidden_states (total_nnz, ...), indices (total_nnz,) into the flattened (batch * seqlen),
    cu_seqlens (batch + 1,) int32, max_seqlen_in_batch int, seqused (batch,) int32: the valid
    tokens per sequence). max_seqlen_in_batch is read back from the device (one sync), as in
    flash_attn."""
    all_masks = attention_mask + unused_mask if unused_mask is not None else attention_mask
    seqlens = all_masks.sum(dim=-1, dtype=torch.int32)
    used = attention_mask.sum(dim=-1, dtype=torch.int32)
    indices = torch.nonzero(all_masks.flatten(), as_tuple=False).flatten()
    max_seqlen = int(seqlens.max().item()) if seqlens.numel() else 0
    cu_seqlens = torch.nn.functional.pad(torch.cumsum(seqlens, dim=0, dtype=torch.int32), (1, 0))
    flat = hidden_states.reshape(-1, *hidden_states.shape[2:])
    return index_first_axis(flat, indices), indices, cu_seqlens, max_seqlen, used


def pad_input(hidden_states: torch.Tensor, indices: torch.Tensor, batch: int,
              seqlen: int) -> torch.Tensor:
    """hidden_states (total_nnz, ...) -> (batch, seqlen, ...), zeros where nothing was kept."""
    out = index_put_first_axis(hidden_states, indices, batch * seqlen)
    return out.view(batch, seqlen, *hidden_states.shape[1:])
