"""torch's bundled FlashAttention-2 backward has no `deterministic` argument: it runs its
deterministic variant while `torch.use_deterministic_algorithms(True)` is in force (not
warn-only; PyTorch's aten/src/ATen/native/transformers/cuda/attention_backward.cu)."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch


@contextlib.contextmanager
def deterministic_algorithms(required: bool) -> Iterator[None]:
    """Turn torch's deterministic mode on (strict) for the block when ``required`` and it is
    not already strict; the previous mode is restored. The flag is process-wide: another
    thread running ops meanwhile also sees it (it only makes them deterministic)."""
    enabled = torch.are_deterministic_algorithms_enabled()
    warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    if not required or (enabled and not warn_only):
        yield
        return
    torch.use_deterministic_algorithms(True)
    try:
        yield
    finally:
        torch.use_deterministic_algorithms(enabled, warn_only=warn_only)
