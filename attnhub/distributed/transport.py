"""Point-to-point and collective transfers of K/V blocks over torch.distributed.

Transfers are batched isend/irecv (``torch.distributed.batch_isend_irecv``) started before a
step's compute and waited for after it, so they overlap: NCCL runs them on its own
communication streams and ``wait()`` only makes the compute stream wait for their end; gloo
runs them on its own threads.
"""

from __future__ import annotations

from dataclasses import dataclass, field

import torch
import torch.distributed as dist


@dataclass
class Exchange:
    """One batch of sends and receives in flight; ``wait()`` returns the received tensors in
    the order ``recv`` was called."""

    group: object | None
    _ops: list = field(default_factory=list)
    _received: list = field(default_factory=list)
    _works: list = field(default_factory=list)

    def send(self, tensor: torch.Tensor, peer: int, tag: int = 0) -> None:
        """Queue a send of ``tensor`` to ``peer`` (a rank of the group)."""
        self._ops.append(dist.P2POp(dist.isend, tensor, _global(self.group, peer), self.group,
                                    tag))

    def recv(self, like: torch.Tensor, shape: tuple[int, ...], peer: int, tag: int = 0) -> None:
        """Queue a receive of a tensor of ``shape`` (``like``'s dtype and device) from
        ``peer``; messages between two ranks with the same tag arrive in order."""
        buf = like.new_empty(shape)
        self._received.append(buf)
        self._ops.append(dist.P2POp(dist.irecv, buf, _global(self.group, peer), self.group,
                                    tag))

    def start(self) -> Exchange:
        if self._ops:
            self._works = dist.batch_isend_irecv(self._ops)
        return self

    def wait(self) -> list[torch.Tensor]:
        for work in self._works:
            work.wait()
        self._works = []
        return self._received


def _global(group: object | None, rank: int) -> int:
    return rank if group is None else dist.get_global_rank(group, rank)


def all_gather_rows(x: torch.Tensor, rows: list[int], group: object | None
                    ) -> list[torch.Tensor]:
    """Every rank's ``x`` (``rows[r]`` leading rows on rank r), as a list indexed by rank."""
    if len(rows) == 1:
        return [x]
    width = max(rows)
    padded = x if x.shape[0] == width else torch.cat(
        [x, x.new_zeros((width - x.shape[0], *x.shape[1:]))])
    out = [torch.empty_like(padded) for _ in rows]
    dist.all_gather(out, padded.contiguous(), group=group)
    return [t[:n] for t, n in zip(out, rows, strict=True)]


def reduce_rows(parts: list[torch.Tensor], rows: list[int], rank: int, group: object | None,
                deterministic: bool) -> torch.Tensor:
    """Sum over ranks of ``parts[rank]`` as seen by every rank: ``parts[r]`` (rows[r]
    leading rows) is this rank's contribution to rank r's rows; returns this rank's total.
    Deterministic mode gathers every contribution and adds them in rank order."""
    if len(parts) == 1:
        return parts[0]
    width = max(rows)
    stacked = torch.stack([p if p.shape[0] == width else torch.cat(
        [p, p.new_zeros((width - p.shape[0], *p.shape[1:]))]) for p in parts])
    if deterministic:
        everyone = torch.empty_like(stacked)
        dist.all_to_all_single(everyone.flatten(0, 1), stacked.flatten(0, 1), group=group)
        total = everyone[0].clone()
        for t in everyone[1:]:
            total.add_(t)
    elif dist.get_backend(group) == dist.Backend.GLOO:  # gloo has no reduce_scatter
        dist.all_reduce(stacked, group=group)
        total = stacked[rank]
    else:
        total = torch.empty_like(stacked[rank])
        dist.reduce_scatter_tensor(total, stacked, group=group)
    return total[: rows[rank]]
