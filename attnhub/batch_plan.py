"""BatchPlan: a batch layout normalized and dispatched once, run once per layer.

``attnhub.plan(...)`` takes everything about a call except q, k and v: the offsets, the
shapes, the features, optionally a block table and a custom mask. It runs attnhub's one
normalization (``normalize``, on zero-stride placeholders of the right shapes) and one
selection (``dispatch.select``), and asks the chosen backend to ``prepare`` its launch
metadata (the Triton backend's tile list). ``BatchPlan.run(q, k, v)`` then does O(1) checks
(shapes, dtype, device, grad mode) and calls the backend: no host-device synchronisation and
no allocation besides the output.

With ``cuda_graph=True`` the plan keeps its device tensors (offsets, block table, mask) in
fixed buffers and hides the host lengths from the backend, so that the launches depend only
on the buffers' contents: capture ``run`` in a CUDA graph, ``replan`` with new lengths of the
same batch size and token totals (written into the same buffers), replay.
"""

from __future__ import annotations

import dataclasses

import torch

from .arguments import as_bool
from .backend import Backend
from .custom_mask import PackedMask
from .dispatch import select
from .errors import BackendUnavailableError, InvalidArgumentError
from .features import TENSORS, check_sinks
from .inputs import VarlenInputs
from .normalize import CuSeqlens, WindowSize, normalize
from .ops import run_forward
from .problem import VarlenProblem
from .results import check_out, checked_out_runner


@dataclasses.dataclass(frozen=True)
class _Static:
    """What a plan keeps across replans: the call's shapes and scalar options."""

    nheads: int
    nheads_k: int
    head_dim: int
    dtype: torch.dtype
    device: torch.device
    page_size: int | None
    num_pages: int | None
    max_seqlen_q: int | None
    max_seqlen_k: int | None
    backend: str | None
    options: dict
    sinks: bool = False


class BatchPlan:
    """A planned batch: ``run(q, k, v)`` per layer, ``replan(...)`` for a new batch.

    q: (total_q, nheads, head_dim); k, v: (total_k, nheads_k, head_dim), or page pools
    (num_pages, page_size, nheads_k, head_dim) when the plan has a block table.
    """

    def __init__(self, static: _Static, cu_seqlens_q: CuSeqlens, cu_seqlens_k: CuSeqlens,
                 block_table: torch.Tensor | None, custom_mask, cuda_graph: bool) -> None:
        self._static = static
        self.cuda_graph = cuda_graph
        self._grad: tuple[VarlenProblem, Backend] | BackendUnavailableError
        problem, inputs = self._normalize(cu_seqlens_q, cu_seqlens_k, block_table, custom_mask)
        if cuda_graph:
            problem = _without_lengths(problem)
            inputs = dataclasses.replace(inputs, **{  # buffers the graph reads, owned here
                f.name: getattr(inputs, f.name).clone() for f in dataclasses.fields(inputs)
                if f.name in _BUFFERS and getattr(inputs, f.name) is not None})
        self._install(problem, inputs)

    # -- planning (host work) ----------------------------------------------------------------

    def _normalize(self, cu_q, cu_k, block_table, custom_mask
                   ) -> tuple[VarlenProblem, VarlenInputs]:
        st = self._static
        total_q = _total(cu_q, "cu_seqlens_q")
        q = _placeholder((total_q, st.nheads, st.head_dim), st.dtype, st.device)
        if block_table is not None:
            if st.page_size is None:
                raise InvalidArgumentError("page_size", "the page size of the KV page pools "
                                           "(a plan with a block table)", None)
            num_pages = st.num_pages if st.num_pages is not None else _pages_needed(block_table)
            k = _placeholder((num_pages, st.page_size, st.nheads_k, st.head_dim), st.dtype,
                             st.device)
        else:
            k = _placeholder((_total(cu_k, "cu_seqlens_k"), st.nheads_k, st.head_dim), st.dtype,
                             st.device)
        sinks = _placeholder((st.nheads,), torch.float32, st.device) if st.sinks else None
        return normalize(q, k, k, cu_q, cu_k, st.max_seqlen_q, st.max_seqlen_k,
                         block_table=block_table, custom_mask=custom_mask, sinks=sinks,
                         **st.options)

    def _install(self, problem: VarlenProblem, inputs: VarlenInputs) -> None:
        backend = select(problem, self._static.backend)
        self.problem, self.backend = problem, backend
        self._inputs = dataclasses.replace(inputs, schedule=backend.prepare(problem, inputs))
        self._q_shape = (problem.total_q, problem.nheads, problem.head_dim)
        self._kv_tail = inputs.k.shape[1:]
        self._kv_rows = inputs.k.shape[0]
        i = self._inputs
        # Out-only calls on plain inputs go straight to the backend's bound launch.
        self._tensors = tuple(getattr(i, t.name) for t in TENSORS)  # the features' tensors
        plain = i.schedule is None and all(t is None for t in self._tensors)
        self._run_out = checked_out_runner(backend, problem) if plain else None
        grad = dataclasses.replace(problem, requires_grad=True)  # decided now, not while
        try:  # torch.compile traces run()
            self._grad = (grad, select(grad, self._static.backend))
        except BackendUnavailableError as exc:
            self._grad = exc

    def replan(self, cu_seqlens_q: CuSeqlens, cu_seqlens_k: CuSeqlens,
               block_table: torch.Tensor | None = None,
               custom_mask: torch.Tensor | PackedMask | None = None) -> BatchPlan:
        """Plan a new batch on this plan (host work: validation, and for CUDA graphs copies
        into the same buffers). Under ``cuda_graph`` the batch size, the token totals, the
        block table width and the static features must stay, and the mask must fit."""
        problem, inputs = self._normalize(cu_seqlens_q, cu_seqlens_k, block_table, custom_mask)
        if not self.cuda_graph:
            self._install(problem, inputs)
            return self
        new = _without_lengths(problem)
        if new.paged is not None and self.problem.paged is not None \
                and new.paged.max_pages == self.problem.paged.max_pages:
            new = dataclasses.replace(new, paged=self.problem.paged)  # (the pool may grow)
        if new != self.problem:  # same static part, same totals (lengths are not compared)
            raise InvalidArgumentError(
                "cu_seqlens", "a batch with the planned batch size, token totals, block table "
                "width and features (a CUDA-graph plan replays fixed launches)",
                f"batch {problem.batch}, totals {problem.total_q}/{inputs.k.shape[0]}")
        for name in _BUFFERS:
            src, dst = getattr(inputs, name), getattr(self._inputs, name)
            if src is None:
                continue
            if src.numel() > dst.numel():
                raise InvalidArgumentError(name, f"at most {dst.numel()} elements (the buffer "
                                           "planned first)", src.numel())
            dst.view(-1)[:src.numel()].copy_(src.reshape(-1), non_blocking=True)
        return self

    def _grad_variant(self) -> tuple[VarlenProblem, Backend]:
        if isinstance(self._grad, BackendUnavailableError):
            raise self._grad
        return self._grad

    # -- per call -----------------------------------------------------------------------------

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, *,
            return_lse: bool = False, sinks: torch.Tensor | None = None):
        """out (q's shape and dtype), or (out, lse) with lse float32 (nheads, total_q).
        ``sinks``: float32 (nheads,), required by a plan made with ``sinks=True`` (this
        layer's sink logits), refused otherwise."""
        if q.shape != self._q_shape or k.shape[1:] != self._kv_tail or v.shape != k.shape:
            raise InvalidArgumentError(
                "q, k, v", f"q {self._q_shape} and k, v (*, {', '.join(map(str, self._kv_tail))})"
                " as planned", f"q {tuple(q.shape)}, k {tuple(k.shape)}, v {tuple(v.shape)}")
        if self.problem.paged is None and k.shape[0] != self._kv_rows:
            raise InvalidArgumentError("k", f"{self._kv_rows} rows as planned", k.shape[0])
        if q.dtype != self.problem.dtype or q.device != self._static.device:
            raise InvalidArgumentError("q", f"{self.problem.dtype} on {self._static.device}",
                                       f"{q.dtype} on {q.device}")
        if self.problem.sinks:
            if sinks is None:
                raise InvalidArgumentError("sinks", "a float32 (nheads,) tensor (the plan was "
                                           "made with sinks=True)", None)
            sinks = check_sinks(sinks, self.problem.nheads, self._static.device)
        elif sinks is not None:
            raise InvalidArgumentError("sinks", "None (the plan was made without sinks: "
                                       "plan(..., sinks=True))", "a tensor")
        grad = torch.is_grad_enabled() and (q.requires_grad or k.requires_grad
                                            or v.requires_grad or (sinks is not None
                                                                   and sinks.requires_grad))
        i = self._inputs
        if not (return_lse or grad or torch.compiler.is_compiling()):
            if self._run_out is not None:
                return self._run_out(q, k, v, i.cu_seqlens_q, i.cu_seqlens_k)
            return check_out(self.backend.name, self.backend.forward_out(
                self.problem, self._call_inputs(q, k, v, sinks)), q)
        problem, backend = self._grad_variant() if grad else (self.problem, self.backend)
        inputs = self._call_inputs(q, k, v, sinks)
        result = run_forward(problem, inputs, backend, out_only=not return_lse)
        return (result.out, result.lse) if return_lse else result.out

    __call__ = run

    def _call_inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                     sinks: torch.Tensor | None) -> VarlenInputs:
        i = self._inputs
        tensors = self._tensors
        if sinks is not None:
            tensors = (*tensors[:_SINKS], sinks, *tensors[_SINKS + 1:])
        return VarlenInputs(q, k, v, i.cu_seqlens_q, i.cu_seqlens_k, *tensors, i.schedule)

    def __repr__(self) -> str:
        p = self.problem
        return (f"BatchPlan(backend={self.backend.name!r}, batch={p.batch}, total_q={p.total_q},"
                f" features={p.features()}, cuda_graph={self.cuda_graph})")


_SINKS = [t.name for t in TENSORS].index("sinks")
_BUFFERS = ("cu_seqlens_q", "cu_seqlens_k", "block_table", "custom_mask", "custom_mask_offsets")


def plan(
    cu_seqlens_q: CuSeqlens,
    cu_seqlens_k: CuSeqlens,
    *,
    nheads: int,
    nheads_k: int,
    head_dim: int,
    dtype: torch.dtype,
    device: torch.device | str | None = None,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = None,
    softcap: float | None = None,
    alibi_slopes: torch.Tensor | None = None,
    deterministic: bool | None = None,
    block_table: torch.Tensor | None = None,
    page_size: int | None = None,
    num_pages: int | None = None,
    custom_mask: torch.Tensor | PackedMask | None = None,
    mask_alignment: str = "bottom_right",
    sinks: bool = False,
    backend: str | None = None,
    cuda_graph: bool = False,
) -> BatchPlan:
    """Normalize and dispatch a batch once; ``.run(q, k, v)`` per layer.

    Takes attention_forward_varlen's arguments (same meaning) without q, k, v: their shapes
    come from the offsets and ``nheads`` / ``nheads_k`` / ``head_dim``, with ``block_table``
    the page pools' ``page_size`` (and ``num_pages``, default: the largest page index + 1).
    ``device``: default, the offsets' device (CPU for lists). ``cuda_graph``: fixed buffers
    and no host lengths in the launches (see the module docstring). ``sinks``: the calls
    carry attention sinks, passed per layer as ``run(q, k, v, sinks=...)``.
    """
    if device is None:
        device = getattr(cu_seqlens_q, "device", None) or "cpu"
    dev = torch.device(device)
    if dev.type == "cuda" and dev.index is None:
        dev = torch.device("cuda", torch.cuda.current_device())
    options = dict(softmax_scale=softmax_scale, causal=causal, window_size=window_size,
                   softcap=softcap, alibi_slopes=alibi_slopes, deterministic=deterministic,
                   mask_alignment=mask_alignment)
    if cuda_graph and (max_seqlen_q is None or max_seqlen_k is None):
        raise InvalidArgumentError("max_seqlen_q, max_seqlen_k", "upper bounds (ints) for a "
                                   "CUDA-graph plan: the captured launches keep them", None)
    static = _Static(nheads, nheads_k, head_dim, dtype, dev, page_size, num_pages, max_seqlen_q,
                     max_seqlen_k, backend, options, as_bool("sinks", sinks))
    return BatchPlan(static, cu_seqlens_q, cu_seqlens_k, block_table, custom_mask, cuda_graph)


def _placeholder(shape: tuple[int, ...], dtype: torch.dtype, device: torch.device
                 ) -> torch.Tensor:
    """A tensor of ``shape`` that allocates one element (normalize reads only metadata)."""
    return torch.empty((), dtype=dtype, device=device).expand(shape)


def _total(cu: CuSeqlens, name: str) -> int:
    """The token total of offsets given on the host (a plan's offsets must be readable)."""
    total = getattr(cu, "total", None)
    if isinstance(total, int):
        return total
    if isinstance(cu, torch.Tensor):
        if cu.dim() != 1 or cu.shape[0] == 0:
            raise InvalidArgumentError(name, "a 1-D tensor of batch + 1 offsets",
                                       tuple(cu.shape))
        return int(cu[-1].item())  # plan time: one read, never in run()
    if isinstance(cu, (list, tuple)) and cu:
        return int(cu[-1])
    raise InvalidArgumentError(name, "a VarlenInfo, a list or tuple of ints, or a 1-D int "
                               "tensor of batch + 1 offsets", repr(cu)[:80])


def _pages_needed(block_table: torch.Tensor) -> int:
    return int(block_table.max().item()) + 1 if block_table.numel() else 1


def _without_lengths(problem: VarlenProblem) -> VarlenProblem:
    """The problem as a CUDA-graph plan launches it: no host lengths and no facts about
    them, so neither the backend choice nor the launch depends on them (kernels read the
    lengths from the offset buffers)."""
    total_k = -1 if problem.paged is not None else problem.total_k
    return dataclasses.replace(problem, seqlens_q=None, seqlens_k=None, total_k=total_k,
                               _facts=(None, None))
