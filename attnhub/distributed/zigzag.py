"""ContextShard: the zigzag split of a packed batch's sequences over the ranks of a group.

Each sequence of length n is cut into 2 * world chunks; rank r holds chunks r and
2 * world - 1 - r, so that under a causal mask every rank does the same amount of work (an
early chunk, cheap, paired with a late chunk, expensive). Uneven lengths: the first
n % (2 * world) chunks are one token longer (torch.tensor_split's rule), so a rank holds at
most 2 tokens per sequence more than another; zero-length sequences give empty chunks.
A rank's local packed layout keeps the sequence order and, inside each sequence, its two
chunks in position order (early chunk first).
"""

from __future__ import annotations

import operator
from collections.abc import Sequence
from dataclasses import dataclass
from functools import cached_property

import torch

from ..errors import InvalidArgumentError
from ..varlen_info import VarlenInfo


def chunk_bounds(length: int, nchunks: int) -> tuple[int, ...]:
    """The nchunks + 1 boundaries (positions) of a sequence of ``length`` tokens: the first
    ``length % nchunks`` chunks hold one token more than the others."""
    base, extra = divmod(length, nchunks)
    bounds = [0]
    for c in range(nchunks):
        bounds.append(bounds[-1] + base + (1 if c < extra else 0))
    return tuple(bounds)


@dataclass(frozen=True)
class ContextShard:
    """The zigzag layout of a packed batch over ``world_size`` ranks, seen from ``rank``.

    ``seqlens``: global per-sequence lengths (tokens). Build it with :func:`zigzag_shard`.
    Everything here is host data; tensors are built on request for a device.
    """

    seqlens: tuple[int, ...]
    world_size: int
    rank: int

    def __post_init__(self) -> None:
        if self.world_size < 1:
            raise InvalidArgumentError("world_size", "an int >= 1", self.world_size)
        if not 0 <= self.rank < self.world_size:
            raise InvalidArgumentError("rank", f"an int in [0, {self.world_size})", self.rank)

    @cached_property
    def bounds(self) -> tuple[tuple[int, ...], ...]:
        """Per sequence, the 2 * world_size + 1 chunk boundaries in global positions."""
        return tuple(chunk_bounds(n, 2 * self.world_size) for n in self.seqlens)

    @cached_property
    def global_info(self) -> VarlenInfo:
        """The global packed layout (host offsets)."""
        return VarlenInfo.from_lengths(self.seqlens)

    def chunks_of(self, rank: int) -> tuple[int, int]:
        """The two chunk indices rank ``rank`` holds (early, late)."""
        return rank, 2 * self.world_size - 1 - rank

    def spans(self, rank: int | None = None) -> tuple[tuple[tuple[int, int], tuple[int, int]], ...]:
        """Per sequence, the (start, end) positions of the two chunks ``rank`` holds."""
        r = self.rank if rank is None else rank
        a, b = self.chunks_of(r)
        return tuple(((bd[a], bd[a + 1]), (bd[b], bd[b + 1])) for bd in self.bounds)

    def local_seqlens(self, rank: int | None = None) -> tuple[int, ...]:
        """Per sequence, how many tokens ``rank`` holds."""
        return tuple((a1 - a0) + (b1 - b0) for (a0, a1), (b0, b1) in self.spans(rank))

    def local_info(self, rank: int | None = None) -> VarlenInfo:
        """The rank-local packed layout (host offsets; ``.to(device)`` for the tensor)."""
        r = self.rank if rank is None else rank
        cache = self.__dict__.setdefault("_local_infos", {})
        if r not in cache:
            cache[r] = VarlenInfo.from_lengths(self.local_seqlens(r))
        return cache[r]

    @property
    def info(self) -> VarlenInfo:
        """This rank's local layout: pass it as cu_seqlens of the local shard."""
        return self.local_info()

    @property
    def total(self) -> int:
        """Tokens on this rank."""
        return self.local_info().total

    def max_local_total(self) -> int:
        """The largest number of tokens any rank holds."""
        return max(self.local_info(r).total for r in range(self.world_size))

    def _positions_host(self, rank: int) -> list[int]:
        pos: list[int] = []
        for (a0, a1), (b0, b1) in self.spans(rank):
            pos.extend(range(a0, a1))
            pos.extend(range(b0, b1))
        return pos

    def positions(self, device: torch.device | str | None = None,
                  rank: int | None = None) -> torch.Tensor:
        """int64 (local total,): each local token's position inside its sequence (for RoPE)."""
        r = self.rank if rank is None else rank
        return torch.tensor(self._positions_host(r), dtype=torch.int64, device=device)

    def global_rows(self, device: torch.device | str | None = None,
                    rank: int | None = None) -> torch.Tensor:
        """int64 (local total,): each local token's row in the global packed batch."""
        r = self.rank if rank is None else rank
        starts = self.global_info.cu_seqlens_host
        rows: list[int] = []
        for s, ((a0, a1), (b0, b1)) in enumerate(self.spans(r)):
            rows.extend(range(starts[s] + a0, starts[s] + a1))
            rows.extend(range(starts[s] + b0, starts[s] + b1))
        return torch.tensor(rows, dtype=torch.int64, device=device)

    def shard(self, x: torch.Tensor, rank: int | None = None) -> torch.Tensor:
        """This rank's rows of a global packed tensor ``x`` (global total, ...)."""
        if x.shape[0] != self.global_info.total:
            raise InvalidArgumentError("x", f"{self.global_info.total} rows (the global packed "
                                       "batch)", x.shape[0])
        return x.index_select(0, self.global_rows(x.device, rank))

    def unshard(self, pieces: Sequence[torch.Tensor]) -> torch.Tensor:
        """The global packed tensor from every rank's local tensor (``pieces[r]`` = rank r's)."""
        if len(pieces) != self.world_size:
            raise InvalidArgumentError("pieces", f"{self.world_size} tensors (one per rank)",
                                       len(pieces))
        first = pieces[0]
        out = first.new_empty((self.global_info.total, *first.shape[1:]))
        for r, piece in enumerate(pieces):
            out.index_copy_(0, self.global_rows(first.device, r), piece)
        return out

    def gather(self, x: torch.Tensor, group: object | None = None) -> torch.Tensor:
        """All-gather every rank's local ``x`` (local total, ...) into the global packed order,
        on every rank (torch.distributed collective; not differentiable)."""
        import torch.distributed as dist

        if x.shape[0] != self.total:
            raise InvalidArgumentError("x", f"{self.total} rows (this rank's shard)", x.shape[0])
        width = self.max_local_total()
        padded = x.new_zeros((width, *x.shape[1:]))
        padded[: x.shape[0]] = x
        gathered = [torch.empty_like(padded) for _ in range(self.world_size)]
        dist.all_gather(gathered, padded.contiguous(), group=group)
        return self.unshard([g[: self.local_info(r).total] for r, g in enumerate(gathered)])


def zigzag_shard(seqlens: Sequence[int] | torch.Tensor | VarlenInfo, group: object | None = None,
                 *, world_size: int | None = None, rank: int | None = None) -> ContextShard:
    """The zigzag shard of a packed batch for this rank of ``group`` (the default group when
    None), or for an explicit ``world_size`` / ``rank`` (no process group needed).

    seqlens: global per-sequence lengths in tokens (host list, tensor, or a VarlenInfo of
    the global batch). Every rank must pass the same lengths."""
    if isinstance(seqlens, VarlenInfo):
        lengths = seqlens.seqlens
    else:
        lengths = VarlenInfo.from_lengths(seqlens).seqlens
    if world_size is None or rank is None:
        import torch.distributed as dist

        if not dist.is_available() or not dist.is_initialized():
            raise InvalidArgumentError("group", "an initialized torch.distributed process group "
                                       "(or world_size= and rank=)", "none initialized")
        world_size = dist.get_world_size(group) if world_size is None else world_size
        rank = dist.get_rank(group) if rank is None else rank
    return ContextShard(tuple(lengths), operator.index(world_size), operator.index(rank))
