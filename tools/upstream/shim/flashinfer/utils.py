"""``flashinfer.utils`` (import shim): the device queries FlashInfer's tests call."""

from __future__ import annotations

import torch


class GPUArchitectureError(Exception):
    """FlashInfer's error for a kernel unavailable on this GPU; attnhub dispatches instead."""


def get_compute_capability(device: torch.device) -> tuple[int, int]:
    return torch.cuda.get_device_capability(device)


def has_flashinfer_jit_cache() -> bool:
    """True: there is no JIT step to warm up (flashinfer.jit.build_jit_specs builds nothing)."""
    return True


def is_sm90a_supported(device: torch.device) -> bool:
    return torch.cuda.is_available() and get_compute_capability(device)[0] == 9


def is_sm100a_supported(device: torch.device) -> bool:
    return torch.cuda.is_available() and get_compute_capability(device)[0] == 10
