"""The custom ops attnhub::varlen_fwd / attnhub::varlen_bwd: autograd and torch.compile.

Forward and backward are torch.library custom ops with fake implementations and a
registered autograd formula, so torch.compile(fullgraph=True) traces calls without graph
breaks. The op carries the backend's name: backward runs on the backend that ran forward.
Eager calls skip the op wrapper and call the backend directly: without autograd as a plain
call, with autograd through ``_EagerVarlen`` (a torch.autograd.Function). A custom op's eager
call imports torch._dynamo on its first use (1-2 s of a short program's start) and adds host
time to every call; eager code gains nothing from the op. Traced calls (torch.compile,
make_fx / non-strict export: a dispatch mode is active or q is a tensor subclass such as a
FakeTensor) keep the op and its fake implementation.
"""

from __future__ import annotations

import dataclasses

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .backend import Backend, ForwardResult
from .inputs import VarlenInputs
from .problem import PagedLayout, VarlenProblem
from .registry import get_registry
from .results import check_forward, check_gradients

Tensor = torch.Tensor


def run_forward(problem: VarlenProblem, inputs: VarlenInputs, backend: Backend) -> ForwardResult:
    """Run ``backend`` on the call, through the custom op when autograd or tracing needs it."""
    compiling = torch.compiler.is_compiling()
    if not (problem.requires_grad or compiling):
        return check_forward(backend.name, problem, inputs.q, backend.forward(problem, inputs))
    if not compiling and type(inputs.q) is Tensor and _get_current_dispatch_mode() is None:
        out, lse, probs, rng = _EagerVarlen.apply(problem, inputs, backend, inputs.q,
                                                  inputs.k, inputs.v)
        return ForwardResult(out, lse, probs, rng)
    out, lse, probs, rng = varlen_fwd(
        inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
        inputs.alibi_slopes, inputs.block_table, inputs.rng_state,
        problem.max_seqlen_q, problem.max_seqlen_k, problem.scale, problem.window[0],
        problem.window[1], problem.softcap, problem.dropout_p,
        problem.mask_alignment == "top_left", problem.deterministic, problem.return_probs,
        problem.requires_grad, backend.name,
        # Host lengths would be guarded constants under torch.compile: leave them out there.
        None if compiling or problem.seqlens_q is None else list(problem.seqlens_q),
        None if compiling or problem.seqlens_k is None else list(problem.seqlens_k),
        inputs.custom_mask, inputs.custom_mask_offsets, *_schedule_args(inputs.schedule),
    )
    return ForwardResult(out, lse, probs if problem.return_probs else None,
                         rng if problem.dropout_p > 0 else None)


class _EagerVarlen(torch.autograd.Function):
    """Eager autograd without the op: the same backend forward / backward and result checks
    as attnhub::varlen_fwd / varlen_bwd. Returns (out, lse, probs or None, rng_state or
    None); probs and rng_state are not differentiable."""

    @staticmethod
    def forward(ctx, problem: VarlenProblem, inputs: VarlenInputs, backend: Backend,
                q: Tensor, k: Tensor, v: Tensor):
        res = check_forward(backend.name, problem, q, backend.forward(problem, inputs))
        probs = res.probs if problem.return_probs else None
        rng = res.rng_state if problem.dropout_p > 0 else None
        if rng is not None and rng is inputs.rng_state:  # an output may not be an input
            rng = rng.clone()
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in (probs, rng) if t is not None))
        # Every tensor through save_for_backward (version checks, saved-tensor hooks such as
        # activation offloading): none is kept on ctx directly.
        ctx.save_for_backward(q, k, v, res.out, res.lse, inputs.cu_seqlens_q,
                              inputs.cu_seqlens_k, inputs.alibi_slopes, inputs.block_table, rng,
                              inputs.custom_mask, inputs.custom_mask_offsets)
        ctx.call = (dataclasses.replace(problem, return_probs=False), backend)
        return res.out, res.lse, probs, rng

    @staticmethod
    def backward(ctx, dout, dlse, _dprobs, _drng):
        q, k, v, out, lse, cu_q, cu_k, alibi, block_table, rng, mask, mask_offsets = \
            ctx.saved_tensors
        if dout is None and dlse is None:
            return (None,) * 6
        problem, backend = ctx.call
        if torch.is_grad_enabled():  # create_graph=True: gradients of gradients are wanted
            raise RuntimeError(
                "attnhub: double backward (create_graph=True) through attention is not "
                f"supported: backend {backend.name!r} computes first-order gradients only")
        if dout is None:
            dout = torch.zeros_like(out)
        inputs = VarlenInputs(q, k, v, cu_q, cu_k, alibi, block_table, rng, mask, mask_offsets)
        grads = check_gradients(backend.name, backend.backward(
            problem, inputs, out, lse, dout, dlse), q, k, v)
        return None, None, None, grads.dq, grads.dk, grads.dv


def _schedule_args(schedule: tuple | None) -> tuple:
    """A plan's schedule (Backend.prepare: None or up to two tensors) as the op's two
    optional tensor arguments."""
    if schedule is None:
        return None, None
    if len(schedule) > 2 or not all(isinstance(t, Tensor) for t in schedule):
        raise TypeError("Backend.prepare must return None or a tuple of at most two tensors")
    return (*schedule, None, None)[:2]


def problem_from_op_args(q: Tensor, k: Tensor, cu_seqlens_q: Tensor,
                         alibi_slopes: Tensor | None, block_table: Tensor | None,
                         max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int,
                         window_right: int, softcap: float, dropout_p: float, top_left: bool,
                         deterministic: bool, return_probs: bool, requires_grad: bool,
                         seqlens_q: list[int] | None, seqlens_k: list[int] | None,
                         custom_mask: bool = False) -> VarlenProblem:
    """Rebuild the (already validated) problem inside the op from its arguments."""
    batch = cu_seqlens_q.shape[0] - 1
    paged = None
    total_k = k.shape[0]
    if block_table is not None:
        paged = PagedLayout(num_pages=k.shape[0], page_size=k.shape[1],
                            max_pages=block_table.shape[1])
        total_k = sum(seqlens_k) if seqlens_k is not None else -1
    alibi = None
    if alibi_slopes is not None:
        alibi = "head" if alibi_slopes.dim() == 1 else "batch_head"
    return VarlenProblem(
        device_type=q.device.type, dtype=q.dtype, batch=batch, total_q=q.shape[0],
        total_k=total_k, nheads=q.shape[1], nheads_k=k.shape[-2], head_dim=q.shape[-1],
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, scale=scale,
        causal=window_right == 0, window=(window_left, window_right), softcap=softcap,
        alibi=alibi, dropout_p=dropout_p, paged=paged, requires_grad=requires_grad,
        deterministic=deterministic, mask_alignment="top_left" if top_left else "bottom_right",
        return_probs=return_probs, custom_mask=custom_mask,
        seqlens_q=tuple(seqlens_q) if seqlens_q is not None else None,
        seqlens_k=tuple(seqlens_k) if seqlens_k is not None else None,
    )


@torch.library.custom_op("attnhub::varlen_fwd", mutates_args=())
def varlen_fwd(q: Tensor, k: Tensor, v: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
               alibi_slopes: Tensor | None, block_table: Tensor | None, rng_seed: Tensor | None,
               max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int,
               window_right: int, softcap: float, dropout_p: float, top_left: bool,
               deterministic: bool, return_probs: bool, requires_grad: bool, backend: str,
               seqlens_q: list[int] | None, seqlens_k: list[int] | None,
               custom_mask: Tensor | None = None, custom_mask_offsets: Tensor | None = None,
               schedule_0: Tensor | None = None, schedule_1: Tensor | None = None
               ) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """-> out (q's shape), lse float32 (nheads, total_q), probs (batch, nheads, max_q, max_k)
    or empty, rng_state int64 (2,) or empty. custom_mask / custom_mask_offsets: the packed
    per-request mask (attnhub.custom_mask) or None. schedule_*: a plan's schedule
    (Backend.prepare), so a planned call runs the same kernel with or without the op."""
    problem = problem_from_op_args(q, k, cu_seqlens_q, alibi_slopes, block_table, max_seqlen_q,
                                   max_seqlen_k, scale, window_left, window_right, softcap,
                                   dropout_p, top_left, deterministic, return_probs,
                                   requires_grad, seqlens_q, seqlens_k, custom_mask is not None)
    schedule = tuple(t for t in (schedule_0, schedule_1) if t is not None) or None
    inputs = VarlenInputs(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, block_table,
                          rng_seed, custom_mask, custom_mask_offsets, schedule)
    res = check_forward(backend, problem, q,
                        get_registry().backends[backend].forward(problem, inputs))
    probs = res.probs if res.probs is not None else q.new_empty((0,), dtype=torch.float32)
    rng = res.rng_state if res.rng_state is not None else q.new_empty((0,), dtype=torch.int64)
    if rng is rng_seed:  # a custom op's output may not be (or alias) one of its inputs
        rng = rng.clone()
    return res.out, res.lse, probs, rng


@varlen_fwd.register_fake
def _varlen_fwd_fake(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, block_table, rng_seed,
                     max_seqlen_q, max_seqlen_k, scale, window_left, window_right, softcap,
                     dropout_p, top_left, deterministic, return_probs, requires_grad, backend,
                     seqlens_q, seqlens_k, custom_mask=None, custom_mask_offsets=None,
                     schedule_0=None, schedule_1=None):
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    probs_shape = ((cu_seqlens_q.shape[0] - 1, q.shape[1], max_seqlen_q, max_seqlen_k)
                   if return_probs else (0,))
    probs = q.new_empty(probs_shape, dtype=torch.float32)
    rng = q.new_empty((2,) if dropout_p > 0 else (0,), dtype=torch.int64)
    return out, lse, probs, rng


@torch.library.custom_op("attnhub::varlen_bwd", mutates_args=())
def varlen_bwd(dout: Tensor | None, dlse: Tensor | None, q: Tensor, k: Tensor, v: Tensor,
               out: Tensor, lse: Tensor, cu_seqlens_q: Tensor, cu_seqlens_k: Tensor,
               alibi_slopes: Tensor | None, block_table: Tensor | None, rng_state: Tensor | None,
               max_seqlen_q: int, max_seqlen_k: int, scale: float, window_left: int,
               window_right: int, softcap: float, dropout_p: float, top_left: bool,
               deterministic: bool, backend: str, seqlens_q: list[int] | None,
               seqlens_k: list[int] | None, custom_mask: Tensor | None = None,
               custom_mask_offsets: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """-> dq, dk, dv. dout / dlse: gradients of out and lse (None where unused)."""
    problem = problem_from_op_args(q, k, cu_seqlens_q, alibi_slopes, block_table, max_seqlen_q,
                                   max_seqlen_k, scale, window_left, window_right, softcap,
                                   dropout_p, top_left, deterministic, False, True, seqlens_q,
                                   seqlens_k, custom_mask is not None)
    inputs = VarlenInputs(q, k, v, cu_seqlens_q, cu_seqlens_k, alibi_slopes, block_table,
                          rng_state if rng_state is not None and rng_state.numel() else None,
                          custom_mask, custom_mask_offsets)
    if dout is None:
        dout = torch.zeros_like(out)
    grads = check_gradients(backend, get_registry().backends[backend].backward(
        problem, inputs, out, lse, dout, dlse), q, k, v)
    return grads.dq, grads.dk, grads.dv


@varlen_bwd.register_fake
def _varlen_bwd_fake(dout, dlse, q, k, v, *rest):
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format))


def _setup_context(ctx, inputs, output) -> None:
    (q, k, v, cu_q, cu_k, alibi, block_table, _seed, max_q, max_k, scale, wl, wr, softcap,
     dropout_p, top_left, deterministic, _return_probs, _requires_grad, backend, seqlens_q,
     seqlens_k, mask, mask_offsets, _schedule_0, _schedule_1) = inputs
    out, lse, probs, rng = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(probs, rng)
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, alibi, block_table, rng, mask,
                          mask_offsets)
    ctx.scalars = (max_q, max_k, scale, wl, wr, softcap, dropout_p, top_left, deterministic,
                   backend, seqlens_q, seqlens_k)


def _backward(ctx, dout, dlse, _dprobs, _drng):
    q, k, v, out, lse, cu_q, cu_k, alibi, block_table, rng, mask, mask_offsets = \
        ctx.saved_tensors
    if dout is None and dlse is None:
        return (None,) * 26
    dq, dk, dv = varlen_bwd(dout, dlse, q, k, v, out, lse, cu_q, cu_k, alibi, block_table, rng,
                            *ctx.scalars, mask, mask_offsets)
    return (dq, dk, dv) + (None,) * 23


varlen_fwd.register_autograd(_backward, setup_context=_setup_context)
