"""External kernels called directly, without attnhub, to measure attnhub's overhead.

Each entry pairs an attnhub backend with the kernel it wraps: torch's bundled
FlashAttention-2 three times (the aten op, forward and backward called explicitly, as a
framework would, with no autograd; the same aten op through torch's autograd, forward+backward
only; and torch's public ``torch.nn.attention.varlen.varlen_attn``, through autograd as a
PyTorch user calls it), flash_attn 2.8's ``flash_attn_varlen_func``, FA3's
``flash_attn_interface`` and FA4's ``flash_attn.cute.flash_attn_varlen_func`` (their own
autograd functions). A direct kernel is
measured only on cells its attnhub backend can run (the backend's reasons apply to it too)
and whose features its public call takes; otherwise ``unsupported`` says why.
"""

from __future__ import annotations

import importlib
import inspect
from collections.abc import Callable
from dataclasses import dataclass

import torch

from .inputs import CellInputs, feature_kwargs
from .matrix import Cell

Runner = Callable[[], object]


@dataclass(frozen=True)
class DirectKernel:
    """``label``: the report's column (``name``, else ``<backend> (direct)``); ``backend``: the
    attnhub backend that wraps the same kernel; ``lacks``: cell features the direct call
    cannot take (``softcap``, ``alibi``, ``paged``); ``build(inputs, backward)``: a
    zero-argument callable running one forward (and backward); ``why_not(cell)``: what else
    the installed version of the call cannot express, or None; ``modes``: the bench modes it
    is timed in."""

    backend: str
    lacks: frozenset[str]
    build: Callable[[CellInputs, bool], Runner]
    name: str | None = None
    why_not: Callable[[Cell], str | None] | None = None
    modes: frozenset[str] = frozenset({"fwd", "fwd+bwd"})

    @property
    def label(self) -> str:
        return self.name or f"{self.backend} (direct)"

    def unsupported(self, cell: Cell) -> str | None:
        """Why the direct call cannot express ``cell``, or None."""
        wanted = {"softcap": bool(cell.softcap), "alibi": cell.alibi,
                  "paged": bool(cell.page_size)}
        missing = sorted(f for f, on in wanted.items() if on and f in self.lacks)
        if missing:
            return f"the direct call takes no {', '.join(missing)}"
        return self.why_not(cell) if self.why_not is not None else None


def _window(cell: Cell) -> tuple[int, int]:
    """attnhub's (left, right) for the cell, -1 = unbounded, causal -> right 0."""
    left, right = cell.window if cell.window is not None else (-1, -1)
    if cell.causal:
        right = 0
    return left, right


def _first(result: object) -> torch.Tensor:
    return result[0] if isinstance(result, tuple) else result  # type: ignore[return-value]


def _grad(out: torch.Tensor, x: CellInputs) -> object:
    return torch.autograd.grad(out, x.leaves, x.dout)


def _aten_arguments(x: CellInputs) -> tuple[tuple, dict]:
    """The aten FA2 ops' arguments after q, k, v shared by forward and backward (offsets,
    maxima, dropout 0, causal), and their keyword arguments (scale, window)."""
    cell = x.cell
    left, right = _window(cell)
    window = ({} if cell.window is None
              else {"window_size_left": left, "window_size_right": right})
    return (x.cu_q, x.cu_k, x.max_q, x.max_k, 0.0, cell.causal), {"scale": x.scale, **window}


def _torch_flash(x: CellInputs, backward: bool) -> Runner:
    """torch.ops.aten._flash_attention_forward / _backward (torch's bundled FA2), the
    overloads the torch-flash adapter resolves."""
    from ..backends.cuda import torch_flash

    fwd, bwd = torch_flash.aten_forward, torch_flash.aten_backward
    q, k, v = (t.detach() for t in x.leaves)
    args, kwargs = _aten_arguments(x)

    def forward() -> tuple:
        return fwd(q, k, v, *args, False, **kwargs)

    if not backward:
        return lambda: forward()[0]

    def run() -> object:
        out, lse, seed, offset, _ = forward()
        return bwd(x.dout, q, k, v, out, lse, *args, seed, offset, **kwargs)

    return run


def _torch_flash_autograd(x: CellInputs, backward: bool) -> Runner:
    """torch.ops.aten._flash_attention_forward on the leaves, its gradient from the autograd
    node torch registers for it (FlashAttentionBackward0): what a PyTorch user calling the
    aten op with inputs that require grad pays, the autograd engine included. Timed
    forward+backward only (its forward is the explicit call's)."""
    from ..backends.cuda import torch_flash

    fwd = torch_flash.aten_forward
    args, kwargs = _aten_arguments(x)

    def forward() -> torch.Tensor:
        return fwd(x.q, x.k, x.v, *args, False, **kwargs)[0]

    if not backward:
        return forward
    return lambda: _grad(forward(), x)


def _varlen_attn() -> Callable | None:
    """torch.nn.attention.varlen.varlen_attn, or None in a torch without it (before 2.10)."""
    try:
        from torch.nn.attention.varlen import varlen_attn
    except ImportError:
        return None
    return varlen_attn


def _varlen_attn_why_not(cell: Cell) -> str | None:
    fn = _varlen_attn()
    if fn is None:
        return f"torch {torch.__version__} has no torch.nn.attention.varlen.varlen_attn"
    params = inspect.signature(fn).parameters
    if cell.window is not None and "window_size" not in params:
        return f"torch {torch.__version__}'s varlen_attn takes no window"
    if cell.nheads_k != cell.nheads and "enable_gqa" not in params:
        return f"torch {torch.__version__}'s varlen_attn takes no GQA"
    return None


def _torch_varlen_attn(x: CellInputs, backward: bool) -> Runner:
    """torch's public varlen call over its bundled FA2, with torch's own autograd: a causal
    mask as window (-1, 0) where it takes windows, else is_causal (torch 2.10)."""
    fn = _varlen_attn()
    params = inspect.signature(fn).parameters
    cell = x.cell
    kwargs: dict = {"scale": x.scale}
    if "window_size" in params:
        kwargs["window_size"] = _window(cell)
    else:
        kwargs["is_causal"] = cell.causal
    if cell.nheads_k != cell.nheads:
        kwargs["enable_gqa"] = True

    def forward() -> torch.Tensor:
        return fn(x.q, x.k, x.v, x.cu_q, x.cu_k, x.max_q, x.max_k, **kwargs)

    if not backward:
        return forward
    return lambda: _grad(forward(), x)


def _call_with_known(fn: Callable, /, *args: object, **kwargs: object) -> object:
    """``fn`` with only the keyword arguments its signature names (versions differ)."""
    params = inspect.signature(fn).parameters
    if not any(p.kind is p.VAR_KEYWORD for p in params.values()):
        kwargs = {k: v for k, v in kwargs.items() if k in params}
    return fn(*args, **kwargs)


def _flash_attn_style(module: str, window_none: bool) -> Callable[[CellInputs, bool], Runner]:
    """A builder for ``<module>.flash_attn_varlen_func`` (flash_attn 2.8, FA3 and FA4 share
    the varlen call; FA4 spells an unbounded window side None instead of -1)."""

    def build(x: CellInputs, backward: bool) -> Runner:
        fn = importlib.import_module(module).flash_attn_varlen_func
        cell = x.cell
        left, right = _window(cell)
        if window_none:
            left, right = (None if left < 0 else left), (None if right < 0 else right)
        kwargs: dict = {"cu_seqlens_q": x.cu_q, "cu_seqlens_k": x.cu_k, "max_seqlen_q": x.max_q,
                        "max_seqlen_k": x.max_k, "softmax_scale": x.scale,
                        "causal": cell.causal, **feature_kwargs(x, (left, right))}

        def forward() -> torch.Tensor:
            return _first(_call_with_known(fn, x.q, x.k, x.v, **kwargs))

        if not backward:
            return forward
        return lambda: _grad(forward(), x)

    return build


_FA2_LACKS = frozenset({"softcap", "alibi", "paged"})  # torch's bundled FA2, every entry point

DIRECT_KERNELS: tuple[DirectKernel, ...] = (
    DirectKernel("torch-flash", _FA2_LACKS, _torch_flash),
    DirectKernel("torch-flash", _FA2_LACKS, _torch_flash_autograd,
                 name="torch-flash aten (autograd)", modes=frozenset({"fwd+bwd"})),
    DirectKernel("torch-flash", _FA2_LACKS, _torch_varlen_attn,
                 name="torch varlen_attn (direct)", why_not=_varlen_attn_why_not),
    DirectKernel("flash-attn", frozenset(), _flash_attn_style("flash_attn", False)),
    DirectKernel("fa3", frozenset({"alibi", "paged"}),
                 _flash_attn_style("flash_attn_interface", False)),
    DirectKernel("fa4", frozenset({"alibi", "paged"}),
                 _flash_attn_style("flash_attn.cute", True)),
)


def direct_kernels_for(backends: list[str]) -> list[DirectKernel]:
    """The direct kernels whose attnhub backend is among ``backends``, in that order (a
    backend's own in DIRECT_KERNELS' order)."""
    return [d for b in backends for d in DIRECT_KERNELS if d.backend == b]
