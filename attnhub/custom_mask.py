"""Custom masks: an arbitrary per-request boolean mask, held bit-packed (little bit order).

Layout (FlashInfer's, flattened per request): request b's mask is a row-major boolean
(sq_b, sk_b) block, True = the query may see the key; the blocks of all requests are
concatenated. attnhub keeps it as bits: ``bits`` uint8, bit ``n`` of the stream is
``(bits[n // 8] >> (n % 8)) & 1`` (numpy's ``packbits(..., bitorder="little")``), and
``offsets[b]`` (int64) is the bit where request b's block starts. Built from a boolean mask
the blocks are packed back to back; FlashInfer's ``segment_packbits`` layout (each block
padded to a whole byte, ``indptr`` in bytes) is the same thing with ``offsets = 8 * indptr``.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from .errors import InvalidArgumentError

_BIT_WEIGHTS = (1, 2, 4, 8, 16, 32, 64, 128)


@dataclass(frozen=True)
class PackedMask:
    """bits: uint8 (nbytes,), little bit order; offsets: int64 (batch,), the first bit of
    each request's row-major (sq, sk) block."""

    bits: torch.Tensor
    offsets: torch.Tensor


def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """A 1-D boolean tensor -> uint8 (ceil(n / 8),), little bit order, on the same device
    (no host sync)."""
    n = mask.shape[0]
    padded = torch.zeros((-(-n // 8)) * 8, dtype=torch.uint8, device=mask.device)
    padded[:n] = mask.to(torch.uint8)
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.uint8, device=mask.device)
    return (padded.view(-1, 8) * weights).sum(-1, dtype=torch.uint8)


def block_offsets(cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> torch.Tensor:
    """int64 (batch,): where each request's (sq, sk) block starts in the concatenated mask,
    computed on the offsets' device (no host sync)."""
    sq = (cu_seqlens_q[1:] - cu_seqlens_q[:-1]).to(torch.int64)
    sk = (cu_seqlens_k[1:] - cu_seqlens_k[:-1]).to(torch.int64)
    sizes = sq * sk
    return torch.cumsum(sizes, 0) - sizes


def from_bool(mask: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
              seqlens_q: tuple[int, ...] | None = None,
              seqlens_k: tuple[int, ...] | None = None) -> PackedMask:
    """Pack FlashInfer's flattened boolean mask (sum of sq_b * sk_b elements). The size is
    checked when the host lengths are known."""
    if not isinstance(mask, torch.Tensor) or mask.dim() != 1 or mask.dtype != torch.bool:
        got = (f"{mask.dim()}-D {mask.dtype}" if isinstance(mask, torch.Tensor)
               else type(mask).__name__)
        raise InvalidArgumentError("custom_mask", "a 1-D bool tensor: each request's "
                                   "(qo_len, kv_len) mask flattened row-major, concatenated", got)
    if seqlens_q is not None and seqlens_k is not None:
        need = sum(a * b for a, b in zip(seqlens_q, seqlens_k, strict=True))
        if mask.shape[0] != need:
            raise InvalidArgumentError("custom_mask", f"{need} elements (the sum of "
                                       "qo_len * kv_len over the requests)", mask.shape[0])
    return PackedMask(pack_bits(mask), block_offsets(cu_seqlens_q, cu_seqlens_k))


def from_segments(packed: torch.Tensor, indptr: torch.Tensor) -> PackedMask:
    """FlashInfer's ``packed_custom_mask`` (uint8, each request's block packed separately,
    little bit order) and its byte offsets ``indptr`` (batch + 1)."""
    if not isinstance(packed, torch.Tensor) or packed.dim() != 1 or packed.dtype != torch.uint8:
        raise InvalidArgumentError("packed_custom_mask", "a 1-D uint8 tensor (little bit order)",
                                   getattr(packed, "dtype", type(packed).__name__))
    if not isinstance(indptr, torch.Tensor) or indptr.dim() != 1:
        raise InvalidArgumentError("qk_indptr", "a 1-D int tensor of batch + 1 byte offsets",
                                   type(indptr).__name__)
    return PackedMask(packed, indptr[:-1].to(device=packed.device, dtype=torch.int64) * 8)


def check(mask: PackedMask, batch: int, device: torch.device) -> PackedMask:
    """O(1) checks of a PackedMask against the call (dtype, shape, device)."""
    if not isinstance(mask, PackedMask):
        raise InvalidArgumentError("custom_mask", "a bool tensor or an attnhub PackedMask",
                                   type(mask).__name__)
    if mask.bits.dtype != torch.uint8 or mask.bits.dim() != 1:
        raise InvalidArgumentError("custom_mask", "bits as a 1-D uint8 tensor",
                                   f"{mask.bits.dim()}-D {mask.bits.dtype}")
    if mask.offsets.dtype != torch.int64 or tuple(mask.offsets.shape) != (batch,):
        raise InvalidArgumentError("custom_mask", f"int64 offsets of shape ({batch},)",
                                   f"{mask.offsets.dtype} {tuple(mask.offsets.shape)}")
    for t in (mask.bits, mask.offsets):
        if t.device != device:
            raise InvalidArgumentError("custom_mask", f"the device of q ({device})", t.device)
    return mask


def read_block(bits: torch.Tensor, offset: int, sk: int, rows: range, cols: range
               ) -> torch.Tensor:
    """The visible-key booleans (len(rows), len(cols)) of one request whose block starts at
    bit ``offset`` and has ``sk`` columns."""
    dev = bits.device
    i = torch.arange(rows.start, rows.stop, device=dev, dtype=torch.int64)[:, None]
    j = torch.arange(cols.start, cols.stop, device=dev, dtype=torch.int64)[None, :]
    pos = offset + i * sk + j
    return ((bits[pos >> 3].to(torch.int32) >> (pos & 7).to(torch.int32)) & 1).bool()
