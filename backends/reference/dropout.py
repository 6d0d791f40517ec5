"""The reference dropout mask: a counter-based hash of (seed pair, head, query row, key row).

The keep decision for query head h, packed query row i and packed key row j depends on
nothing else, so forward and backward (and any chunking) see one mask, with no state kept
between them. All arithmetic stays below 2**63 in int64, on any device.
"""

from __future__ import annotations

import torch

_M32 = 0xFFFFFFFF


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix (xorshift-multiply rounds); x holds values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x5BD1E995) & _M32
    return x ^ (x >> 16)


def keep_mask(rng_state: torch.Tensor, heads: torch.Tensor, rows: torch.Tensor,
              cols: torch.Tensor, dropout_p: float) -> torch.Tensor:
    """Boolean keep mask broadcast from heads (H,1,1), rows (1,C,1), cols (1,1,S), int64.

    rng_state: int64 (2,) seed pair in [0, 2**31). An element is dropped with probability
    ``dropout_p`` (to within 2**-32).
    """
    x = _mix((rng_state[0] ^ heads) & _M32)
    x = _mix(x ^ rows)
    x = _mix(x ^ cols)
    x = _mix(x ^ rng_state[1])
    return x >= round(dropout_p * 2**32)


def new_rng_state(device: torch.device) -> torch.Tensor:
    """A fresh seed pair drawn from torch's default generator of ``device`` (no host sync), so
    torch.manual_seed makes dropout reproducible."""
    return torch.randint(0, 2**31 - 1, (2,), dtype=torch.int64, device=device)
