"""Block sizes and launch settings of the Triton kernels, by head dim and mode.

One fixed BLOCK_M / BLOCK_N per (head dim, direction) so that tile tables can be planned
before launch; nothing depends on max_seqlen or the token count (no recompiles per batch).
Under TRITON_INTERPRET=1 (CPU tests) small blocks keep the interpreter fast.
"""

from __future__ import annotations

import os
from dataclasses import dataclass


def interpreting() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


@dataclass(frozen=True)
class LaunchConfig:
    block_m: int
    block_n: int
    num_warps: int
    num_stages: int


def dot_precision(dtype) -> str:
    """fp32 inputs are multiplied in true fp32 ('ieee'), never silently in tf32."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


def block_d(head_dim: int) -> int:
    """Head dims are padded to a power of two (loads are masked beyond head_dim)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def forward_config(head_dim: int) -> LaunchConfig:
    if interpreting():  # BLOCK_M != BLOCK_N: the tests exercise both tile shapes
        return LaunchConfig(32, 16, 1, 1)
    d = block_d(head_dim)
    if d <= 64:
        return LaunchConfig(128, 64, 4, 3)
    if d <= 128:
        return LaunchConfig(128, 64, 8, 3)
    return LaunchConfig(64, 32, 4, 2)


def backward_config(head_dim: int) -> LaunchConfig:
    """block_m: query rows per step of the dK/dV kernel and per program of the dQ kernel;
    block_n: key rows per program of the dK/dV kernel and per step of the dQ kernel."""
    if interpreting():
        return LaunchConfig(32, 16, 1, 1)
    d = block_d(head_dim)
    if d <= 64:
        return LaunchConfig(64, 64, 4, 2)
    if d <= 128:
        return LaunchConfig(64, 64, 8, 2)
    return LaunchConfig(32, 32, 4, 1)
