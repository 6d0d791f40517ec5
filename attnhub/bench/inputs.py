"""Random inputs of one benchmark cell, and the attnhub call that computes it."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass

import torch

from ..varlen_info import VarlenInfo
from .matrix import Cell

OFFSETS = ("varlen-info", "tensors")


@dataclass
class CellInputs:
    """Tensors of one cell on its device.

    q, dout: (total_q, nheads, head_dim); k, v: (total_k, nheads_k, head_dim), or page pools
    (num_pages, page_size, nheads_k, head_dim) with ``block_table`` (batch, pages) int32.
    cu_q / cu_k: int32 (batch + 1,) offsets on the device; max_q / max_k: longest sequence.
    alibi_slopes: float32 (nheads,) or None. ``requires_grad``: q, k, v are autograd leaves.
    """

    cell: Cell
    q: torch.Tensor
    k: torch.Tensor
    v: torch.Tensor
    dout: torch.Tensor
    info_q: VarlenInfo
    info_k: VarlenInfo
    block_table: torch.Tensor | None
    alibi_slopes: torch.Tensor | None
    requires_grad: bool

    @property
    def cu_q(self) -> torch.Tensor:
        return self.info_q.cu_seqlens

    @property
    def cu_k(self) -> torch.Tensor:
        return self.info_k.cu_seqlens

    @property
    def max_q(self) -> int:
        return self.info_q.max_seqlen

    @property
    def max_k(self) -> int:
        return self.info_k.max_seqlen

    @property
    def scale(self) -> float:
        return self.cell.head_dim ** -0.5

    @property
    def leaves(self) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
        return self.q, self.k, self.v


def alibi_slopes(nheads: int) -> list[float]:
    """The ALiBi paper's geometric slopes 2^(-8 (h + 1) / nheads)."""
    return [2.0 ** (-8.0 * (h + 1) / nheads) for h in range(nheads)]


def cell_slopes(cell: Cell, device: torch.device | str) -> torch.Tensor | None:
    """float32 (nheads,) ALiBi slopes on ``device`` for a cell with ALiBi, else None."""
    if not cell.alibi:
        return None
    return torch.tensor(alibi_slopes(cell.nheads), dtype=torch.float32, device=device)


def make_inputs(cell: Cell, device: torch.device, requires_grad: bool,
                seed: int = 0) -> CellInputs:
    """Normal random q, k, v, dout for ``cell`` (never zeros), from ``seed``."""
    dtype = getattr(torch, cell.dtype)
    on_device = device.type in ("cpu", "cuda")
    gen = torch.Generator(device=device if on_device else "cpu").manual_seed(seed)

    def rand(*shape: int) -> torch.Tensor:
        x = torch.randn(*shape, generator=gen, dtype=dtype,
                        device=device if on_device else "cpu")
        return x if on_device else x.to(device)

    d, h, hk = cell.head_dim, cell.nheads, cell.nheads_k
    info_q = VarlenInfo.from_lengths(cell.seqlens_q, device)
    info_k = VarlenInfo.from_lengths(cell.seqlens_k, device)
    block_table = None
    if cell.page_size:
        ps = cell.page_size
        pages = [-(-n // ps) for n in cell.seqlens_k]
        width = max(pages)
        k = rand(sum(pages), ps, hk, d)
        v = rand(sum(pages), ps, hk, d)
        order = torch.randperm(sum(pages), generator=torch.Generator().manual_seed(seed))
        table = torch.zeros(len(pages), width, dtype=torch.int32)
        start = 0
        for b, n in enumerate(pages):  # each sequence's pages, scattered over the pool
            table[b, :n] = order[start:start + n]
            start += n
        block_table = table.to(device)
    else:
        k = rand(cell.total_k, hk, d)
        v = rand(cell.total_k, hk, d)
    q = rand(cell.total_q, h, d)
    dout = rand(cell.total_q, h, d)
    if requires_grad:
        q, k, v = (t.requires_grad_(True) for t in (q, k, v))
    return CellInputs(cell, q, k, v, dout, info_q, info_k, block_table,
                      cell_slopes(cell, device), requires_grad)


def attnhub_call_args(x: CellInputs, offsets: str = "varlen-info") -> tuple[tuple, dict]:
    """Positional and keyword arguments of ``attnhub.attention_forward_varlen`` for the cell:
    offsets as VarlenInfo (host lengths known, no device read) or as device int32 tensors
    with max_seqlen given (what flash_attn callers pass)."""
    if offsets not in OFFSETS:
        raise ValueError(f"offsets must be one of {OFFSETS}, got {offsets!r}")
    cell = x.cell
    if offsets == "varlen-info":
        args = (x.q, x.k, x.v, x.info_q, x.info_k)
    else:
        args = (x.q, x.k, x.v, x.cu_q, x.cu_k, x.max_q, x.max_k)
    return args, {"causal": cell.causal, **feature_kwargs(x, cell.window)}


def feature_kwargs(x: CellInputs, window: tuple | None) -> dict:
    """The cell's optional-feature keywords in flash_attn's spelling, which attnhub's call
    shares: ``window_size`` (``window`` as the callee spells it; omitted when the cell has
    none), ``softcap``, ``alibi_slopes``, ``block_table``, each only when the cell uses it."""
    kwargs: dict = {}
    if x.cell.window is not None:
        kwargs["window_size"] = window
    if x.cell.softcap:
        kwargs["softcap"] = x.cell.softcap
    if x.alibi_slopes is not None:
        kwargs["alibi_slopes"] = x.alibi_slopes
    if x.block_table is not None:
        kwargs["block_table"] = x.block_table
    return kwargs


def attnhub_runner(x: CellInputs, backend: str | None, backward: bool,
                   offsets: str = "varlen-info") -> Callable[[], object]:
    """One call through ``attnhub.attention_forward_varlen`` (``backend`` forced, or None
    for the automatic choice), then ``torch.autograd.grad`` of out against dout when
    ``backward``."""
    from ..api import attention_forward_varlen

    args, kwargs = attnhub_call_args(x, offsets)
    kwargs["backend"] = backend

    if not backward:
        return lambda: attention_forward_varlen(*args, **kwargs)

    def run() -> object:
        out = attention_forward_varlen(*args, **kwargs)
        return torch.autograd.grad(out, x.leaves, x.dout)

    return run
