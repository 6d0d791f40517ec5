"""Tensors for a case: NaN padding around every input, shuffled page tables, poisoned memory."""

from __future__ import annotations

import contextlib
import math
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from .cases import Case

PAD_ROWS = 3  # NaN rows after every packed input: a kernel reading past the end sees NaN


@dataclass
class CaseInputs:
    """Keyword arguments of attention_forward_varlen for one case (low dtype), and dout."""

    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    cu_seqlens_q: list[int]
    cu_seqlens_k: list[int]
    alibi_slopes: torch.Tensor | None
    block_table: torch.Tensor | None
    dout: torch.Tensor
    sinks: torch.Tensor | None = None  # float32 (nheads,), always float32 (the API's dtype)

    def kwargs(self, case: Case) -> dict:
        return dict(
            cu_seqlens_q=self.cu_seqlens_q, cu_seqlens_k=self.cu_seqlens_k,
            max_seqlen_q=max(case.seqlens_q, default=0),
            max_seqlen_k=max(case.seqlens_k, default=0), dropout_p=case.dropout_p,
            causal=case.causal, window_size=case.window, softcap=case.softcap,
            alibi_slopes=self.alibi_slopes, block_table=self.block_table,
            # Explicit: normalize() would otherwise read torch's global deterministic mode,
            # which poisoned() below switches on around the backend's run.
            deterministic=False, sinks=self.sinks)

    def tensors(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q, self.k, self.v


def _cumsum(lengths: tuple[int, ...]) -> list[int]:
    out = [0]
    for n in lengths:
        out.append(out[-1] + n)
    return out


def _padded(values: torch.Tensor) -> torch.Tensor:
    """``values`` as a view into a buffer with PAD_ROWS NaN rows after it."""
    buf = torch.full((values.shape[0] + PAD_ROWS, *values.shape[1:]), float("nan"),
                     dtype=values.dtype, device=values.device)
    buf[:values.shape[0]] = values
    return buf[:values.shape[0]]


def alibi_slopes(nheads: int) -> torch.Tensor:
    """The ALiBi paper's geometric slopes for ``nheads`` heads (any count)."""
    closest = 2 ** math.floor(math.log2(nheads))
    base = [2 ** (-8 * (i + 1) / closest) for i in range(closest)]
    extra = [2 ** (-4 * (2 * i + 1) / closest) for i in range(nheads - closest)]
    return torch.tensor(base + extra, dtype=torch.float32)


def build(case: Case, device: torch.device | str) -> CaseInputs:
    """Seeded inputs for ``case``: packed q/k/v (or shuffled page pools whose unused pages and
    tails are NaN), each followed by NaN padding, and a random dout."""
    gen = torch.Generator().manual_seed(case.seed)
    tq, tk = sum(case.seqlens_q), sum(case.seqlens_k)

    def randn(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen, dtype=torch.float32)
        return x.to(device=device, dtype=case.dtype)

    q = _padded(randn(tq, case.nheads, case.head_dim))
    k = randn(tk, case.nheads_k, case.head_dim)
    v = randn(tk, case.nheads_k, case.head_dim)
    block_table = None
    if case.page_size is not None:
        k, v, block_table = _paged(case, k, v, gen, device)
    else:
        k, v = _padded(k), _padded(v)
    slopes = None
    if case.alibi == "head":
        slopes = alibi_slopes(case.nheads).to(device)
    elif case.alibi == "batch_head":
        scale = 0.5 + torch.rand(len(case.seqlens_q), 1, generator=gen)
        slopes = (alibi_slopes(case.nheads)[None, :] * scale).to(device)
    dout = _padded(randn(tq, case.nheads, case.head_dim))
    sinks = None
    if case.sinks:  # logits around the scores' scale, some above every score of a row
        sinks = (2.0 * torch.randn(case.nheads, generator=gen)).to(device)
    return CaseInputs(q, k, v, _cumsum(case.seqlens_q), _cumsum(case.seqlens_k), slopes,
                      block_table, dout, sinks)


def _paged(case: Case, k: torch.Tensor, v: torch.Tensor, gen: torch.Generator,
           device: torch.device | str) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    ps = case.page_size
    assert ps is not None
    pages_per_seq = [-(-n // ps) for n in case.seqlens_k]
    max_pages = max(max(pages_per_seq, default=0), 1)
    num_pages = sum(pages_per_seq) + 2  # two pages nobody owns
    order = torch.randperm(num_pages, generator=gen).tolist()
    shape = (num_pages, ps, case.nheads_k, case.head_dim)
    k_pool = torch.full(shape, float("nan"), dtype=case.dtype, device=device)
    v_pool = torch.full_like(k_pool, float("nan"))
    table = torch.full((len(case.seqlens_k), max_pages), -1, dtype=torch.int32)
    start = 0
    for b, n in enumerate(case.seqlens_k):
        for p in range(pages_per_seq[b]):
            page = order.pop()
            table[b, p] = page
            rows = slice(p * ps, min((p + 1) * ps, n))
            width = rows.stop - rows.start
            k_pool[page, :width] = k[start + rows.start:start + rows.stop]
            v_pool[page, :width] = v[start + rows.start:start + rows.stop]
        start += n
    # Unused slots name a page nobody owns, all NaN: a kernel reading past a length sees it.
    table[table < 0] = order[0]
    return k_pool, v_pool, table.to(device)


def poison(device: torch.device | str, shapes: list[tuple[tuple[int, ...], torch.dtype]]) -> None:
    """Fill freed memory of the sizes a backend will allocate with NaN, so that an output
    row the backend forgets to write reads NaN instead of a lucky zero (reliable with the
    CUDA caching allocator; best effort with the CPU allocator, hence ``poisoned``)."""
    held = [torch.full(shape, float("nan"), dtype=dtype, device=device)
            for shape, dtype in shapes]
    del held


# Warnings that torch raises in warn-only deterministic mode; they say nothing about the
# backend under test.
_DETERMINISM_WARNINGS = (r".*does not have a deterministic implementation.*",
                         r".*Deterministic behavior was enabled.*")


@contextlib.contextmanager
def poisoned(device: torch.device | str, shapes: list[tuple[tuple[int, ...], torch.dtype]]
             ) -> Iterator[None]:
    """Run the backend under test with every fresh allocation holding NaN.

    ``poison`` fills freed memory of the output sizes (``shapes``: out, lse, dq, dk, dv) for
    caching allocators; on top of that, torch's ``fill_uninitialized_memory`` is switched on
    (with deterministic algorithms in warn-only mode, which it needs), so that every
    ``torch.empty`` / ``empty_like`` / ``new_empty`` float tensor starts as NaN (integers as
    their maximum) on any device and allocator. An output row or gradient row the backend
    never writes then reads NaN, and NaN never passes. The previous settings are restored.
    """
    poison(device, shapes)
    was_on = torch.are_deterministic_algorithms_enabled()
    was_warn_only = torch.is_deterministic_algorithms_warn_only_enabled()
    was_fill = torch.utils.deterministic.fill_uninitialized_memory
    torch.use_deterministic_algorithms(True, warn_only=was_warn_only or not was_on)
    torch.utils.deterministic.fill_uninitialized_memory = True
    try:
        with warnings.catch_warnings():
            for message in _DETERMINISM_WARNINGS:
                warnings.filterwarnings("ignore", message=message)
            yield
    finally:
        torch.use_deterministic_algorithms(was_on, warn_only=was_warn_only)
        torch.utils.deterministic.fill_uninitialized_memory = was_fill
