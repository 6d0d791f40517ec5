"""normalize(): every supported call -> (VarlenProblem, VarlenInputs), validated once."""

from __future__ import annotations

import operator
from collections.abc import Sequence
from typing import Any, Union

import torch

from . import host_copies
from .arguments import as_float, as_int
from .errors import CapacityError, InvalidArgumentError
from .features import GRAD_TENSORS, Call
from .features import convert as convert_features
from .inputs import VarlenInputs
from .problem import PagedLayout, VarlenProblem
from .varlen_info import VarlenInfo, check_cu_seqlens_values

CuSeqlens = Union[torch.Tensor, Sequence[int], VarlenInfo]  # noqa: UP007 (a runtime alias)
WindowSize = Union[int, Sequence[int], None]  # noqa: UP007


def normalize(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    cu_seqlens_q: CuSeqlens,
    cu_seqlens_k: CuSeqlens,
    max_seqlen_q: int | None = None,
    max_seqlen_k: int | None = None,
    *,
    softmax_scale: float | None = None,
    block_table: torch.Tensor | None = None,
    **features: Any,
) -> tuple[VarlenProblem, VarlenInputs]:
    """Validate one call and describe it. Shapes: q (total_q, nheads, head_dim); k, v
    (total_k, nheads_k, head_dim), or with ``block_table`` page pools (num_pages, page_size,
    nheads_k, head_dim).

    ``features``: the feature keyword arguments of attention_forward_varlen, each converted
    and validated by its declaration in attnhub.features: dropout_p, causal, window_size,
    softcap, alibi_slopes, deterministic, return_attn_probs, mask_alignment, custom_mask (a
    1-D bool tensor: each request's row-major (sq, sk) block, True = visible, concatenated;
    or a PackedMask from attnhub.custom_mask) and sinks (float32 (nheads,)).
    Raises InvalidArgumentError naming the argument at fault (TypeError for an unknown one)."""
    paged = block_table is not None
    _check_tensor("q", q, 3, "(total_q, nheads, head_dim)")
    kv_shape = ("(num_pages, page_size, nheads_k, head_dim)" if paged
                else "(total_k, nheads_k, head_dim)")
    _check_tensor("k", k, 4 if paged else 3, kv_shape)
    _check_tensor("v", v, 4 if paged else 3, kv_shape)
    if not q.dtype.is_floating_point:
        raise InvalidArgumentError(
            "q", "a floating-point dtype (float16, bfloat16, float32, float64)", q.dtype)
    for name, t in (("k", k), ("v", v)):
        if t.dtype != q.dtype:
            raise InvalidArgumentError(name, f"the dtype of q ({q.dtype})", t.dtype)
        if t.device != q.device:
            raise InvalidArgumentError(name, f"the device of q ({q.device})", t.device)
    total_q = q.shape[0]
    # Heads and head dim select kernels: traced as dynamic, they are specialized here
    # (operator.index does that; int() would not).
    nheads, head_dim, nheads_k = (operator.index(x) for x in (q.shape[1], q.shape[2],
                                                               k.shape[-2]))
    if head_dim == 0:
        raise InvalidArgumentError("q", "head_dim >= 1", tuple(q.shape))
    if nheads == 0:
        raise InvalidArgumentError("q", "at least one head: shape (total_q, nheads >= 1, "
                                   "head_dim)", f"shape {tuple(q.shape)}")
    if k.shape[-1] != head_dim:
        raise InvalidArgumentError("k", f"head_dim {head_dim} (the last dimension of q)",
                                   k.shape[-1])
    if k.shape != v.shape:
        raise InvalidArgumentError("v", f"the shape of k {tuple(k.shape)}", tuple(v.shape))
    if nheads_k == 0 or nheads % nheads_k != 0:
        raise InvalidArgumentError(
            "k", f"nheads_k dividing nheads = {nheads} (query head j reads kv head "
            "j // (nheads // nheads_k))", f"nheads_k = {nheads_k}")
    device = q.device

    cu_q, seqlens_q, max_q = _cu_seqlens("cu_seqlens_q", cu_seqlens_q, total_q, device,
                                         max_seqlen_q, "max_seqlen_q")
    cu_k, seqlens_k, max_k = _cu_seqlens("cu_seqlens_k", cu_seqlens_k,
                                         None if paged else k.shape[0], device, max_seqlen_k,
                                         "max_seqlen_k")
    batch = cu_q.shape[0] - 1
    if cu_k.shape[0] - 1 != batch:
        raise InvalidArgumentError("cu_seqlens_k", f"{batch + 1} offsets (the batch size of "
                                   f"cu_seqlens_q is {batch})", f"{cu_k.shape[0]} offsets")

    layout = None
    if paged:
        layout, block_table = _paged_layout(block_table, k, batch, device, seqlens_k, max_k)
        total_k = sum(seqlens_k) if seqlens_k is not None else -1
    else:
        total_k = k.shape[0]

    if isinstance(softmax_scale, float):  # traced as dynamic: specialized (see features)
        softmax_scale = softmax_scale.__float__()
    scale = _scale(softmax_scale, head_dim)
    fields, tensors = convert_features(
        Call(q, batch, nheads, device, cu_q, cu_k, seqlens_q, seqlens_k, max_q, max_k, layout,
             block_table), features)
    requires_grad = torch.is_grad_enabled() and (
        q.requires_grad or k.requires_grad or v.requires_grad
        or any(tensors[t.name] is not None and tensors[t.name].requires_grad
               for t in GRAD_TENSORS))
    problem = VarlenProblem(
        device_type=device.type,
        dtype=q.dtype,
        batch=batch,
        total_q=total_q,
        total_k=total_k,
        nheads=nheads,
        nheads_k=nheads_k,
        head_dim=head_dim,
        max_seqlen_q=max_q,
        max_seqlen_k=max_k,
        scale=scale,
        requires_grad=requires_grad,
        seqlens_q=seqlens_q,
        seqlens_k=seqlens_k,
        **fields,
    )
    inputs = VarlenInputs(q=q, k=k, v=v, cu_seqlens_q=cu_q, cu_seqlens_k=cu_k, **tensors)
    return problem, inputs


def _check_tensor(name: str, t: object, ndim: int, shape: str) -> None:
    if not isinstance(t, torch.Tensor):
        raise InvalidArgumentError(name, f"a torch.Tensor of shape {shape}", type(t).__name__)
    if t.dim() != ndim:
        raise InvalidArgumentError(name, f"a {ndim}-D tensor of shape {shape}",
                                   f"shape {tuple(t.shape)}")


def _cu_seqlens(name: str, cu: CuSeqlens, total: int | None, device: torch.device,
                max_seqlen: int | None, max_name: str
                ) -> tuple[torch.Tensor, tuple[int, ...] | None, int]:
    """-> (int32 offsets on ``device``, per-sequence lengths or None, max_seqlen)."""
    host: tuple[int, ...] | None
    if isinstance(cu, VarlenInfo):  # validated at construction: O(1) checks only
        info = cu if cu.cu_seqlens.device == device else cu.to(device)
        if torch.compiler.is_compiling():
            # Every host fact read here would be guarded: the lengths (one graph per batch
            # size), the total (specializing q's rows), the max (one graph per value). Traced,
            # a VarlenInfo is trusted like device offsets: its tensor, and max_seqlen or the
            # info's power-of-two bound of it.
            if max_seqlen is None:
                return info.cu_seqlens, None, info.max_seqlen_bound
            return info.cu_seqlens, None, as_int(max_name, max_seqlen, 0)
        if total is not None and info.total != total:
            raise InvalidArgumentError(name, f"a last offset equal to the number of rows "
                                       f"({total})", info.total)
        if max_seqlen is None:
            return info.cu_seqlens, info.seqlens, info.max_seqlen
        max_seqlen = as_int(max_name, max_seqlen, 0)
        if max_seqlen < info.max_seqlen:
            raise InvalidArgumentError(max_name, f"at least the longest sequence "
                                       f"({info.max_seqlen} tokens)", max_seqlen)
        return info.cu_seqlens, info.seqlens, max_seqlen
    if isinstance(cu, torch.Tensor):
        if cu.dim() != 1 or cu.dtype not in (torch.int32, torch.int64):
            raise InvalidArgumentError(name, "a 1-D int32 or int64 tensor of batch + 1 offsets",
                                       f"{cu.dim()}-D tensor of {cu.dtype}")
        if cu.shape[0] == 0:
            raise InvalidArgumentError(name, "at least one element (batch + 1 offsets)",
                                       "an empty tensor")
        if cu.device.type not in ("cpu", device.type):
            raise InvalidArgumentError(name, f"a tensor on the CPU or on q's device ({device})",
                                       f"a tensor on {cu.device}")
        host = None
        if host_copies.can_read_back():
            if cu.device.type == "cpu" or max_seqlen is None \
                    or host_copies.validation_mode() == "full":
                host = host_copies.host_copy(cu)
                check_cu_seqlens_values(name, host)
            else:
                host = host_copies.cached(cu)
        tensor = device_offsets(cu, device)
    elif isinstance(cu, (list, tuple)):
        if torch.compiler.is_compiling():  # as_int / operator.index specialize traced ints
            if not all(isinstance(x, (int, torch.SymInt)) and not isinstance(x, bool)
                       for x in cu):
                raise InvalidArgumentError(name, "a sequence of ints", repr(cu)[:80])
            host = tuple(cu)
        else:
            try:  # not int(): int(2.5) would truncate silently, and True is not an offset
                host = (tuple(cu) if all(type(x) is int for x in cu)
                        else tuple(as_int(name, x) for x in cu))
            except InvalidArgumentError:
                raise InvalidArgumentError(name, "a sequence of ints", repr(cu)[:80]) from None
        check_cu_seqlens_values(name, host)
        tensor = _host_offsets_on(host, device)
    else:
        raise InvalidArgumentError(name, "a 1-D int tensor, a list or tuple of ints, or a "
                                   "VarlenInfo", type(cu).__name__)
    if host is not None and total is not None and host[-1] != total:
        raise InvalidArgumentError(name, f"a last offset equal to the number of rows ({total})",
                                   host[-1])
    lengths = None if host is None else tuple(host[b + 1] - host[b] for b in range(len(host) - 1))
    # (not max(..., default=0): torch.compile cannot trace max's default keyword)
    known_max = None if lengths is None else max((0, *lengths))
    if torch.compiler.is_compiling():
        lengths = None  # traced host lengths would be guarded by value
    if max_seqlen is None:
        if known_max is None:
            raise InvalidArgumentError(max_name, "an int: the offsets are on the device and cannot "
                                       "be read back here (torch.compile tracing or CUDA graph "
                                       "capture); pass max_seqlen or a VarlenInfo")
        return tensor, lengths, known_max
    max_seqlen = as_int(max_name, max_seqlen, 0)
    if known_max is not None and max_seqlen < known_max:
        raise InvalidArgumentError(max_name, f"at least the longest sequence ({known_max} tokens)",
                                   max_seqlen)
    return tensor, lengths, max_seqlen


_CAPTURED_OFFSETS: dict[tuple, torch.Tensor] = {}


def _host_offsets_on(host: tuple, device: torch.device) -> torch.Tensor:
    """Host offsets as an int32 tensor on ``device``. While a CUDA graph is captured the copy
    is replayed from its host buffer: that buffer must be pinned (capture rejects pageable
    memory) and outlive the graph, so it is kept, one per distinct layout."""
    if device.type == "cuda" and not torch.compiler.is_compiling() \
            and torch.cuda.is_current_stream_capturing():
        buf = _CAPTURED_OFFSETS.get(host)
        if buf is None:
            buf = _CAPTURED_OFFSETS[host] = torch.tensor(host, dtype=torch.int32).pin_memory()
        return buf.to(device, non_blocking=True)
    return torch.tensor(host, dtype=torch.int32, device=device)


def device_offsets(cu: torch.Tensor, device: torch.device) -> torch.Tensor:
    """cu_seqlens as backends receive them: int32 on ``device`` (no copy when it already is)."""
    if cu.dtype != torch.int32:
        cu = cu.to(torch.int32)
    if cu.device != device:
        cu = cu.to(device, non_blocking=True)
    return cu


def _paged_layout(block_table: torch.Tensor, k: torch.Tensor, batch: int, device: torch.device,
                  seqlens_k: tuple[int, ...] | None, max_k: int
                  ) -> tuple[PagedLayout, torch.Tensor]:
    if not isinstance(block_table, torch.Tensor):
        raise InvalidArgumentError("block_table", "an int32 tensor of shape (batch, max_pages)",
                                   type(block_table).__name__)
    if block_table.dim() != 2 or block_table.shape[0] != batch:
        raise InvalidArgumentError("block_table", f"shape (batch = {batch}, max_pages)",
                                   f"shape {tuple(block_table.shape)}")
    if block_table.dtype not in (torch.int32, torch.int64):
        raise InvalidArgumentError("block_table", "dtype int32", block_table.dtype)
    if block_table.device.type not in ("cpu", device.type):
        raise InvalidArgumentError("block_table", f"a tensor on the CPU or on q's device "
                                   f"({device})", f"a tensor on {block_table.device}")
    num_pages, page_size = k.shape[0], operator.index(k.shape[1])
    if page_size == 0:
        raise InvalidArgumentError("k", "page_size (dimension 1 of the page pool) >= 1", 0)
    max_pages = block_table.shape[1]
    capacity = max_pages * page_size
    if seqlens_k is not None:
        for b, n in enumerate(seqlens_k):
            if n > capacity:
                raise CapacityError(
                    "cu_seqlens_k", f"kv lengths of at most max_pages * page_size = {capacity} "
                    "(the capacity of block_table)", f"sequence {b} of length {n}")
    elif max_k > capacity:
        raise CapacityError("max_seqlen_k", f"at most max_pages * page_size = {capacity} (the "
                            "capacity of block_table)", max_k)
    if host_copies.can_read_back() and (block_table.device.type == "cpu"
                                        or host_copies.validation_mode() == "full"):
        rows = host_copies.host_copy(block_table)
        for b, row in enumerate(rows):
            needed = len(row) if seqlens_k is None else -(-seqlens_k[b] // page_size)
            for p in range(needed):
                if not 0 <= row[p] < num_pages:
                    raise InvalidArgumentError(
                        "block_table", f"page indices in [0, {num_pages}) (the page pool size)",
                        f"block_table[{b}, {p}] = {row[p]}")
    if block_table.dtype != torch.int32:
        block_table = block_table.to(torch.int32)
    if block_table.device != device:
        block_table = block_table.to(device, non_blocking=True)
    return PagedLayout(num_pages=num_pages, page_size=page_size, max_pages=max_pages), block_table


def _scale(softmax_scale: float | None, head_dim: int) -> float:
    if softmax_scale is None:
        return head_dim ** -0.5
    return as_float("softmax_scale", softmax_scale,
                    "a finite float, or None for head_dim ** -0.5")


