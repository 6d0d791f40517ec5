"""Fixed dropout seeds for surfaces that take one (Paddle's fixed_seed_offset).

Backends draw their dropout state from torch's default generator of the device, so a fixed
seed is a forked generator state: seeded from the pair inside, restored afterwards. The same
pair gives the same mask on the same backend and device; the caller's generator is untouched.
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

import torch

from ..errors import InvalidArgumentError

_GOLDEN = 0x9E3779B97F4A7C15  # odd 64-bit multiplier: distinct seeds stay distinct


@contextlib.contextmanager
def seeded(seed_offset: torch.Tensor | None, device: torch.device, active: bool
           ) -> Iterator[None]:
    """Inside, the default generator of ``device`` is seeded from ``seed_offset`` (int64
    [seed, offset]); reading the pair from a device tensor costs one sync. No-op when
    ``seed_offset`` is None or ``active`` is False (no dropout)."""
    if seed_offset is None:
        yield
        return
    if not isinstance(seed_offset, torch.Tensor) or seed_offset.dtype != torch.int64 \
            or seed_offset.numel() != 2:
        got = (f"{seed_offset.dtype} of shape {tuple(seed_offset.shape)}"
               if isinstance(seed_offset, torch.Tensor) else type(seed_offset).__name__)
        raise InvalidArgumentError("fixed_seed_offset", "an int64 tensor [seed, offset]", got)
    if not active:
        yield
        return
    seed, offset = (int(x) for x in seed_offset.flatten().tolist())
    mixed = (seed * _GOLDEN + offset) % 2**64
    if device.type == "cpu":
        with torch.random.fork_rng(devices=[]):
            torch.default_generator.manual_seed(mixed)
            yield
        return
    module = torch.get_device_module(device.type)
    index = device.index if device.index is not None else module.current_device()
    with torch.random.fork_rng(devices=[index], device_type=device.type), module.device(index):
        module.manual_seed(mixed)
        yield
