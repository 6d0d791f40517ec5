"""Shape helpers shared by the flash_attn surface: packed-argument checks and the uniform
(batch, seqlen) layout expressed as a packed batch for the varlen core."""

from __future__ import annotations

import functools

import torch

from ..errors import InvalidArgumentError
from ..varlen_info import VarlenInfo


def check_packed(name: str, t: object, ndim: int, axis: int, parts: int, shape: str) -> None:
    """Raise unless ``t`` is an ``ndim``-D tensor with ``parts`` entries along ``axis``."""
    if not isinstance(t, torch.Tensor) or t.dim() != ndim or t.shape[axis] != parts:
        got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise InvalidArgumentError(name, f"a {ndim}-D tensor of shape {shape}", got)


def check_batched(name: str, t: object, shape: str) -> torch.Tensor:
    """Raise unless ``t`` is a 4-D (batch, seqlen, heads, head_dim) tensor."""
    if not isinstance(t, torch.Tensor) or t.dim() != 4:
        got = f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__
        raise InvalidArgumentError(name, f"a 4-D tensor of shape {shape}", got)
    return t


@functools.lru_cache(maxsize=256)
def uniform_layout(batch: int, seqlen: int, device: torch.device) -> VarlenInfo:
    """``batch`` sequences of ``seqlen`` tokens each, built on the host once per shape and
    device: calls with it never read the device back."""
    return VarlenInfo([b * seqlen for b in range(batch + 1)], device)


def pack(t: torch.Tensor) -> torch.Tensor:
    """(batch, seqlen, ...) -> (batch * seqlen, ...), a view where the strides allow."""
    return t.reshape(t.shape[0] * t.shape[1], *t.shape[2:])


def unpack_lse(lse: torch.Tensor, batch: int, seqlen: int) -> torch.Tensor:
    """lse (nheads, batch * seqlen) -> flash_attn's (batch, nheads, seqlen)."""
    return lse.view(lse.shape[0], batch, seqlen).transpose(0, 1)
