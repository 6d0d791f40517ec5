"""VarlenInfo: a packed batch layout built once (host lengths + device cu_seqlens + max)."""

from __future__ import annotations

import operator
from collections.abc import Sequence

import torch

from .errors import InvalidArgumentError

INT32_MAX = 2**31 - 1


def check_cu_seqlens_values(name: str, cu: Sequence[int]) -> None:
    """Validate host cumulative offsets: at least [0], leading 0, non-decreasing, int32 range."""
    if len(cu) == 0:
        raise InvalidArgumentError(name, "at least one element (batch + 1 offsets)",
                                   "an empty list")
    if cu[0] != 0:
        raise InvalidArgumentError(name, "a leading 0", f"{name}[0] = {cu[0]}")
    for b in range(1, len(cu)):
        if cu[b] < cu[b - 1]:
            raise InvalidArgumentError(
                name,
                "non-decreasing offsets (sequence lengths >= 0)",
                f"{name}[{b}] = {cu[b]} < {name}[{b - 1}] = {cu[b - 1]}",
            )
    if cu[-1] > INT32_MAX:
        raise InvalidArgumentError(name, f"a total of at most {INT32_MAX} tokens", cu[-1])


class VarlenInfo:
    """The layout of one side (queries or keys) of a packed batch, built once, reused per layer.

    Holds the cumulative offsets as a host tuple and as an int32 tensor on ``device``, the
    per-sequence lengths and their maximum. Passing it instead of ``cu_seqlens`` makes calls
    free of host-device synchronisation: everything the host needs is already here.

    Build it with :meth:`from_lengths` or :meth:`from_cu_seqlens`; building from a device
    tensor reads it back once (one synchronisation, at construction only).
    """

    __slots__ = ("_by_device", "batch", "cu_seqlens", "cu_seqlens_host", "max_seqlen",
                 "max_seqlen_bound", "seqlens", "total")

    def __init__(self, cu_seqlens_host: Sequence[int], device: torch.device | str | None = None,
                 *, _name: str = "cu_seqlens") -> None:
        try:  # operator.index, not int(): a float such as 2.5 must not be truncated silently
            cu = tuple(operator.index(x) for x in cu_seqlens_host)
        except TypeError:
            raise InvalidArgumentError(_name, "a sequence of ints",
                                       repr(cu_seqlens_host)[:80]) from None
        check_cu_seqlens_values(_name, cu)
        self.cu_seqlens_host: tuple[int, ...] = cu
        self.seqlens: tuple[int, ...] = tuple(cu[b + 1] - cu[b] for b in range(len(cu) - 1))
        self.max_seqlen: int = max(self.seqlens, default=0)
        # What torch.compile sees instead of max_seqlen (an upper bound that changes rarely,
        # so a graph serves every batch whose longest sequence falls in the same bucket).
        self.max_seqlen_bound: int = max(16, 1 << (self.max_seqlen - 1).bit_length())
        self.total: int = cu[-1]
        self.batch: int = len(cu) - 1
        dev = torch.device(device) if device is not None else torch.device("cpu")
        self.cu_seqlens: torch.Tensor = torch.tensor(cu, dtype=torch.int32, device=dev)
        self._by_device: dict[torch.device, VarlenInfo] = {dev: self}

    @classmethod
    def from_lengths(cls, lengths: Sequence[int] | torch.Tensor,
                     device: torch.device | str | None = None) -> VarlenInfo:
        """Build from per-sequence lengths (host sequence, or a tensor read back once)."""
        if isinstance(lengths, torch.Tensor):
            if lengths.dim() != 1 or lengths.dtype.is_floating_point or lengths.is_complex():
                raise InvalidArgumentError("lengths", "a 1-D integer tensor",
                                           f"{lengths.dim()}-D {lengths.dtype}")
            lengths = lengths.tolist()
        cu = [0]
        for i, n in enumerate(lengths):
            try:
                n = operator.index(n)
            except TypeError:
                raise InvalidArgumentError("lengths", "a sequence of ints",
                                           f"lengths[{i}] = {n!r}") from None
            if n < 0:
                raise InvalidArgumentError("lengths", "non-negative lengths", f"lengths[{i}] = {n}")
            cu.append(cu[-1] + n)
        return cls(cu, device, _name="lengths")

    @classmethod
    def from_cu_seqlens(cls, cu_seqlens: Sequence[int] | torch.Tensor,
                        device: torch.device | str | None = None) -> VarlenInfo:
        """Build from cumulative offsets [0, l0, l0+l1, ...] (host sequence or tensor)."""
        if isinstance(cu_seqlens, torch.Tensor):
            if cu_seqlens.dim() != 1 or cu_seqlens.dtype not in (torch.int32, torch.int64):
                raise InvalidArgumentError("cu_seqlens", "a 1-D int32 or int64 tensor",
                                           f"{cu_seqlens.dim()}-D {cu_seqlens.dtype}")
            if device is None:
                device = cu_seqlens.device
            cu_seqlens = cu_seqlens.tolist()
        return cls(cu_seqlens, device)

    @property
    def device(self) -> torch.device:
        return self.cu_seqlens.device

    def to(self, device: torch.device | str) -> VarlenInfo:
        """The same layout with its tensor on ``device`` (cached: built once per device)."""
        if device == self.cu_seqlens.device:
            return self
        dev = torch.device(device)
        if dev.type not in ("cpu", "meta") and dev.index is None:  # meta has no device module
            dev = torch.device(dev.type, torch.get_device_module(dev.type).current_device())
        info = self._by_device.get(dev)
        if info is None:
            info = VarlenInfo.__new__(VarlenInfo)
            for slot in ("cu_seqlens_host", "seqlens", "max_seqlen", "max_seqlen_bound", "total",
                         "batch"):
                setattr(info, slot, getattr(self, slot))
            info.cu_seqlens = self.cu_seqlens.to(dev)
            info._by_device = self._by_device
            self._by_device[dev] = info
        return info

    def __len__(self) -> int:
        return self.batch

    def __repr__(self) -> str:
        return (f"VarlenInfo(batch={self.batch}, total={self.total}, max_seqlen={self.max_seqlen}, "
                f"device={self.device})")
