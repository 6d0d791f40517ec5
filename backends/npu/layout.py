"""The TND layout of one attnhub call: which rows go to which operator call.

Everything here is computed from host lengths: the problem's host copy when the caller gave
a list, a CPU tensor or a VarlenInfo (no device read), else one cached read-back of
cu_seqlens (see host_copies). The rules come from Ascend's documentation of
npu_fusion_attention (torch_npu 2.14.0, cited in docs/npu.md):

* only rows that see a key are passed: with bottom-right alignment, query row i of a
  sequence sees no key when ``i + sk - sq + right < 0`` (causal or a window with sq > sk);
  those rows form a prefix of the sequence, so dropping it keeps the alignment
  (``i + sk - sq`` is unchanged) and no row of the operator's mask is all masked ("atten_mask
  中不能存在某一行全1的场景"); they get out 0 and lse -inf;
* sequences with sq = 0 or sk = 0 after that are not passed either (out 0, lse -inf, zero
  gradients; no pse may accompany a zero-length S);
* one call takes at most 1024 sequences ("varlen场景下长度最大支持1K") and at most 1M tokens
  on either side (T 1~1M); larger batches are split into several calls, each computing
  whole sequences, whose rows are disjoint (no merge arithmetic is needed);
* with ALiBi, sequences are grouped by ``sk - sq``: one call per shift, passed as
  q_start_idx / kv_start_idx (see translate.alibi_kwargs).
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from attnhub import host_copies
from attnhub.problem import VarlenProblem

MAX_SEQUENCES_PER_CALL = 1024  # varlen: actual_seq_qlen holds at most 1K entries
MAX_TOKENS = 1 << 20  # T and S: 1 ~ 1M


@dataclass(frozen=True)
class Segment:
    """Rows [start, start + count) of a packed tensor."""

    start: int
    count: int


@dataclass(frozen=True)
class OperatorCall:
    """One call of the operator. sequences: the batch indices it computes, in order.
    q_rows / k_rows: the packed rows it takes, as segments (None: the whole tensor as it is).
    actual_seq_qlen / actual_seq_kvlen: its END offsets. shift: ``sk - sq`` shared by every
    sequence of the call (ALiBi calls), else 0."""

    sequences: tuple[int, ...]
    q_rows: tuple[Segment, ...] | None
    k_rows: tuple[Segment, ...] | None
    actual_seq_qlen: list[int]
    actual_seq_kvlen: list[int]
    shift: int = 0

    @property
    def seqlens_q(self) -> list[int]:
        return _lengths(self.actual_seq_qlen)

    @property
    def seqlens_k(self) -> list[int]:
        return _lengths(self.actual_seq_kvlen)


@dataclass(frozen=True)
class TndLayout:
    """seqlens_q / seqlens_k: every sequence's lengths. calls: the operator calls that
    compute everything computable (empty: nothing is). whole: a single call that takes q, k
    and v as they are, so its outputs are the results without a scatter."""

    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    calls: tuple[OperatorCall, ...]

    @property
    def empty(self) -> bool:
        return not self.calls

    @property
    def whole(self) -> bool:
        return len(self.calls) == 1 and self.calls[0].q_rows is None


def host_lengths(cu: torch.Tensor, known: tuple[int, ...] | None) -> tuple[int, ...]:
    """Per-sequence lengths: the problem's host copy, else one cached read of ``cu``."""
    if known is not None:
        return known
    offsets = host_copies.host_copy(cu)
    return tuple(offsets[b + 1] - offsets[b] for b in range(len(offsets) - 1))


def rows_seeing_no_key(problem: VarlenProblem, sq: int, sk: int) -> int:
    """How many leading query rows of a sequence see no key under the problem's mask."""
    right = problem.window[1]
    if right < 0 or sk == 0:
        return sq if sk == 0 else 0
    return max(0, min(sq, sq - sk - right))


def tnd_layout(problem: VarlenProblem, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
               *, by_shift: bool = False) -> TndLayout:
    """The operator calls for ``problem`` (bottom-right mask, problem.window); ``by_shift``
    groups the sequences by ``sk - sq`` (ALiBi)."""
    return layout_from_lengths(problem, host_lengths(cu_seqlens_q, problem.seqlens_q),
                               host_lengths(cu_seqlens_k, problem.seqlens_k), by_shift=by_shift)


def layout_from_lengths(problem: VarlenProblem, lq: tuple[int, ...], lk: tuple[int, ...], *,
                        by_shift: bool = False) -> TndLayout:
    """tnd_layout from per-sequence host lengths."""
    too_long = [b for b in range(len(lq)) if max(lq[b], lk[b]) > MAX_TOKENS]
    if too_long:
        b = too_long[0]
        raise ValueError(f"sequence {b} has {max(lq[b], lk[b])} tokens; npu_fusion_attention "
                         f"takes S of at most 1M ({MAX_TOKENS}) tokens")
    pieces: list[tuple[int, Segment, Segment]] = []  # (batch index, q rows, k rows)
    q0 = k0 = 0
    for b, (sq, sk) in enumerate(zip(lq, lk, strict=True)):
        skip = rows_seeing_no_key(problem, sq, sk)
        if sq - skip > 0 and sk > 0:
            pieces.append((b, Segment(q0 + skip, sq - skip), Segment(k0, sk)))
        q0, k0 = q0 + sq, k0 + sk
    groups: dict[int, list[tuple[int, Segment, Segment]]] = {}
    for piece in pieces:
        shift = piece[2].count - piece[1].count if by_shift else 0
        groups.setdefault(shift, []).append(piece)
    calls = [call for shift, group in groups.items() for call in _split(group, shift)]
    if len(calls) == 1 and _takes_everything(pieces, lq):
        calls[0] = OperatorCall(calls[0].sequences, None, None, calls[0].actual_seq_qlen,
                                calls[0].actual_seq_kvlen, calls[0].shift)
    return TndLayout(lq, lk, tuple(calls))


def _split(group: list[tuple[int, Segment, Segment]], shift: int) -> list[OperatorCall]:
    """Calls of at most MAX_SEQUENCES_PER_CALL sequences and MAX_TOKENS rows per side."""
    calls: list[OperatorCall] = []
    current: list[tuple[int, Segment, Segment]] = []
    tq = tk = 0
    for piece in group:
        _, qs, ks = piece
        if current and (len(current) == MAX_SEQUENCES_PER_CALL or tq + qs.count > MAX_TOKENS
                        or tk + ks.count > MAX_TOKENS):
            calls.append(_call(current, shift))
            current, tq, tk = [], 0, 0
        current.append(piece)
        tq, tk = tq + qs.count, tk + ks.count
    if current:
        calls.append(_call(current, shift))
    return calls


def _call(pieces: list[tuple[int, Segment, Segment]], shift: int) -> OperatorCall:
    ends_q, ends_k = _ends([p[1].count for p in pieces]), _ends([p[2].count for p in pieces])
    return OperatorCall(tuple(p[0] for p in pieces), tuple(p[1] for p in pieces),
                        tuple(p[2] for p in pieces), ends_q, ends_k, shift)


def _takes_everything(pieces: list[tuple[int, Segment, Segment]], lq: tuple[int, ...]) -> bool:
    """Every sequence computed with all its rows (the offsets cover the tensors: attnhub
    checks that the last offset is the row count)."""
    return len(pieces) == len(lq) and all(p[1].count == lq[p[0]] for p in pieces)


def _ends(lengths: list[int]) -> list[int]:
    ends, total = [], 0
    for n in lengths:
        total += n
        ends.append(total)
    return ends


def _lengths(ends: list[int]) -> list[int]:
    return [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def row_index(segments: tuple[Segment, ...], device: torch.device) -> torch.Tensor:
    """int64 indices of the rows of ``segments``, in order, on ``device`` (built on the host,
    copied without a sync)."""
    starts = torch.tensor([s.start for s in segments], dtype=torch.int64)
    counts = torch.tensor([s.count for s in segments], dtype=torch.int64)
    base = torch.repeat_interleave(starts - torch.cumsum(counts, 0) + counts, counts)
    index = base + torch.arange(int(counts.sum()), dtype=torch.int64)
    return index.to(device, non_blocking=True)


def gather(rows: tuple[Segment, ...] | None, *tensors: torch.Tensor) -> list[torch.Tensor]:
    """The given packed rows of each tensor (dim 0), or the tensors themselves for None."""
    if rows is None:
        return list(tensors)
    index = row_index(rows, tensors[0].device)
    return [t.index_select(0, index) for t in tensors]


def scatter_into(target: torch.Tensor, rows: tuple[Segment, ...], values: torch.Tensor,
                 dim: int = 0) -> None:
    """target[rows] = values along ``dim`` (in place)."""
    target.index_copy_(dim, row_index(rows, target.device), values)
