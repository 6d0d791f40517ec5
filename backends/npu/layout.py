"""The TND layout of one call: host lengths, the sequences the operator sees, dead rows.

Ascend's TND lists hold cumulative END offsets, so an empty sequence would appear as a
repeated offset (or a leading 0), which the documentation does not cover. attnhub therefore
hands the operator only the sequences with sq > 0 and sk > 0: when a batch has others, the
rows of the active ones are gathered into compact tensors and the results scattered back
(empty sequences contribute out 0, lse -inf and zero gradients). Everything here is computed
from host data: the problem's host lengths when the caller gave a list, a CPU tensor or a
VarlenInfo (no device read), else one cached read-back of cu_seqlens (see host_copies).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnhub import host_copies
from attnhub.problem import VarlenProblem


@dataclass(frozen=True)
class TndLayout:
    """seqlens_q / seqlens_k: every sequence's lengths. active: indices of the sequences
    the operator computes. q_rows / k_rows: packed rows of those sequences in order (None
    when every sequence is active: the tensors go to the operator as they are).
    actual_seq_qlen / actual_seq_kvlen: the operator's END offsets over the active
    sequences. dead_rows: packed query rows of active sequences that see no key."""

    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    active: tuple[int, ...]
    q_rows: tuple[int, ...] | None
    k_rows: tuple[int, ...] | None
    actual_seq_qlen: list[int]
    actual_seq_kvlen: list[int]
    dead_rows: tuple[int, ...]

    @property
    def empty(self) -> bool:
        """No sequence has both queries and keys: nothing for the operator to compute."""
        return not self.active

    @property
    def compacted(self) -> bool:
        return self.q_rows is not None


def host_lengths(problem: VarlenProblem, cu: torch.Tensor, known: tuple[int, ...] | None
                 ) -> tuple[int, ...]:
    """Per-sequence lengths: the problem's host copy, else one cached read of ``cu``."""
    if known is not None:
        return known
    offsets = host_copies.host_copy(cu)
    return tuple(offsets[b + 1] - offsets[b] for b in range(len(offsets) - 1))


def tnd_layout(problem: VarlenProblem, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor
               ) -> TndLayout:
    """The layout the operator sees for ``problem`` (bottom-right mask, problem.window)."""
    lq = host_lengths(problem, cu_seqlens_q, problem.seqlens_q)
    lk = host_lengths(problem, cu_seqlens_k, problem.seqlens_k)
    active = tuple(b for b in range(len(lq)) if lq[b] > 0 and lk[b] > 0)
    compact = len(active) != len(lq)
    q_rows: list[int] = []
    k_rows: list[int] = []
    ends_q: list[int] = []
    ends_k: list[int] = []
    dead: list[int] = []
    right = problem.window[1]
    q0 = k0 = 0
    for sq, sk in zip(lq, lk, strict=True):
        if sq > 0 and sk > 0:
            ends_q.append((ends_q[-1] if ends_q else 0) + sq)
            ends_k.append((ends_k[-1] if ends_k else 0) + sk)
            if compact:
                q_rows.extend(range(q0, q0 + sq))
                k_rows.extend(range(k0, k0 + sk))
            if right >= 0:  # row i sees no key when i + sk - sq + right < 0
                dead.extend(range(q0, q0 + max(0, min(sq, sq - sk - right))))
        q0, k0 = q0 + sq, k0 + sk
    return TndLayout(lq, lk, active, tuple(q_rows) if compact else None,
                     tuple(k_rows) if compact else None, ends_q, ends_k, tuple(dead))


def gather(rows: tuple[int, ...] | None, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The given packed rows of each tensor (dim 0), or the tensors themselves for None."""
    if rows is None:
        return list(tensors)
    index = torch.tensor(rows, dtype=torch.int64).to(tensors[0].device, non_blocking=True)
    return [t.index_select(0, index) for t in tensors]


def scatter_rows(rows: tuple[int, ...] | None, compact: torch.Tensor, total: int,
                 fill: float = 0.0, dim: int = 0) -> torch.Tensor:
    """Inverse of gather along ``dim``: a tensor of ``total`` rows, ``fill`` elsewhere."""
    if rows is None:
        return compact
    shape = list(compact.shape)
    shape[dim] = total
    full = torch.full(shape, fill, dtype=compact.dtype, device=compact.device)
    index = torch.tensor(rows, dtype=torch.int64).to(compact.device, non_blocking=True)
    return full.index_copy_(dim, index, compact)
