"""flashinfer.quantization's packbits / segment_packbits (little bit order), so that code
building packed_custom_mask runs unchanged."""

from __future__ import annotations

from itertools import pairwise

import torch

from attnhub.custom_mask import pack_bits


def packbits(x: torch.Tensor, bitorder: str = "big") -> torch.Tensor:
    """A bool tensor, flattened, packed into uint8 (FlashInfer's masks use 'little')."""
    bits = x.reshape(-1).to(torch.bool)
    if bitorder == "little":
        return pack_bits(bits)
    if bitorder != "big":
        raise ValueError(f"bitorder must be 'big' or 'little', got {bitorder!r}")
    n = bits.shape[0]
    padded = torch.zeros(-(-n // 8) * 8, dtype=torch.bool, device=bits.device)
    padded[:n] = bits
    return pack_bits(padded.view(-1, 8).flip(-1).reshape(-1))


def segment_packbits(x: torch.Tensor, indptr: torch.Tensor, bitorder: str = "big"
                     ) -> tuple[torch.Tensor, torch.Tensor]:
    """Pack each segment x[indptr[i]:indptr[i + 1]] separately (padded to whole bytes);
    returns (packed uint8, new_indptr in bytes)."""
    bounds = [int(i) for i in indptr.tolist()]
    parts = [packbits(x[a:b], bitorder) for a, b in pairwise(bounds)]
    new = [0]
    for p in parts:
        new.append(new[-1] + p.shape[0])
    packed = torch.cat(parts) if parts else torch.zeros(0, dtype=torch.uint8, device=x.device)
    return packed, torch.tensor(new, dtype=indptr.dtype, device=indptr.device)
