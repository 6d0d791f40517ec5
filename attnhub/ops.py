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

The ops' schemas are built from the feature table (attnhub.features): after the core
tensors come every feature's tensors (optional tensors; a differentiable one gets its
gradient back from varlen_bwd), after the core scalars every feature field the op carries
as a scalar (a field without an op type is rebuilt inside the op by its feature's
``from_op``). ``pack`` and ``problem_from_op_args`` are the only places that order them.
"""

from __future__ import annotations

import dataclasses
from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.utils._python_dispatch import _get_current_dispatch_mode

from .backend import Backend, ForwardResult
from .features import FEATURES, FIELDS, TENSORS
from .inputs import VarlenInputs
from .problem import VarlenProblem
from .registry import get_registry
from .results import check_forward, check_gradients, check_out

Tensor = torch.Tensor

_TENSOR_NAMES = tuple(t.name for t in TENSORS)
_CARRIED = tuple(f for f in FIELDS if f.op is not None)  # fields passed as op scalars
_CARRIED_NAMES = tuple(f.name for f in _CARRIED)
_REBUILDERS = tuple(feature.from_op for feature in FEATURES if feature.from_op is not None)
_GRAD_INPUTS = tuple(i for i, t in enumerate(TENSORS) if t.grad is not None)
_NT = len(TENSORS)
# Forward arguments: q k v cu_q cu_k schedule_0 schedule_1 | feature tensors | max_q max_k
# scale requires_grad backend seqlens_q seqlens_k | carried feature fields.
_FWD_TENSORS = 7
_FWD_CORE = _FWD_TENSORS + _NT + 7
_FWD_ARGS = _FWD_CORE + len(_CARRIED)
_RNG = _TENSOR_NAMES.index("rng_state")

_TENSOR_SCHEMA = "".join(f", Tensor? {name}" for name in _TENSOR_NAMES)
_FIELD_SCHEMA = "".join(f", {f.op} {f.name}" for f in _CARRIED)
_SCALARS_SCHEMA = ("SymInt max_seqlen_q, SymInt max_seqlen_k, float scale{}, str backend, "
                   "SymInt[]? seqlens_q, SymInt[]? seqlens_k")
FWD_SCHEMA = (
    "(Tensor q, Tensor k, Tensor v, Tensor cu_seqlens_q, Tensor cu_seqlens_k, "
    f"Tensor? schedule_0, Tensor? schedule_1{_TENSOR_SCHEMA}, "
    f"{_SCALARS_SCHEMA.format(', bool requires_grad')}{_FIELD_SCHEMA}) "
    "-> (Tensor, Tensor, Tensor, Tensor)")
BWD_SCHEMA = (
    "(Tensor? dout, Tensor? dlse, Tensor q, Tensor k, Tensor v, Tensor out, Tensor lse, "
    f"Tensor cu_seqlens_q, Tensor cu_seqlens_k{_TENSOR_SCHEMA}, "
    f"{_SCALARS_SCHEMA.format('')}{_FIELD_SCHEMA}) "
    f"-> (Tensor, Tensor, Tensor{', Tensor' * len(_GRAD_INPUTS)})")


def pack(problem: VarlenProblem, inputs: VarlenInputs, backend: str) -> tuple:
    """varlen_fwd's arguments for ``problem`` / ``inputs`` on ``backend``."""
    compiling = torch.compiler.is_compiling()
    return (
        inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
        *_schedule_args(inputs.schedule), *[getattr(inputs, n) for n in _TENSOR_NAMES],
        problem.max_seqlen_q, problem.max_seqlen_k, problem.scale, problem.requires_grad,
        backend,
        # Host lengths would be guarded constants under torch.compile: leave them out there.
        None if compiling or problem.seqlens_q is None else list(problem.seqlens_q),
        None if compiling or problem.seqlens_k is None else list(problem.seqlens_k),
        *[f.to_op(getattr(problem, f.name)) for f in _CARRIED],
    )


def run_forward(problem: VarlenProblem, inputs: VarlenInputs, backend: Backend,
                out_only: bool = False) -> ForwardResult:
    """Run ``backend`` on the call: directly without autograd, through ``_EagerVarlen`` with
    eager autograd, through the custom op when tracing. ``out_only``: the caller reads out
    alone (no lse, no probs), so an eager call with autograd first asks the backend for out
    under its own autograd (Backend.autograd_out_runner: no Python in the backward); the
    result's lse is then None."""
    compiling = torch.compiler.is_compiling()
    if not (problem.requires_grad or compiling):
        return check_forward(backend.name, problem, inputs.q, backend.forward(problem, inputs))
    if not compiling and type(inputs.q) is Tensor and _get_current_dispatch_mode() is None:
        if out_only:
            run = backend.autograd_out_runner(problem)
            if run is not None:
                out = run(inputs.q, inputs.k, inputs.v, inputs.cu_seqlens_q,
                          inputs.cu_seqlens_k)
                return ForwardResult(check_out(backend.name, out, inputs.q), None)
        out, lse, probs, rng = _EagerVarlen.apply(
            problem, inputs, backend, inputs.q, inputs.k, inputs.v,
            *[getattr(inputs, _TENSOR_NAMES[i]) for i in _GRAD_INPUTS])
        return ForwardResult(out, lse, probs, rng)
    out, lse, probs, rng = varlen_fwd(*pack(problem, inputs, backend.name))
    return ForwardResult(out, lse, probs if problem.return_probs else None,
                         rng if problem.dropout_p > 0 else None)


class _EagerVarlen(torch.autograd.Function):
    """Eager autograd without the op: the same backend forward / backward and result checks
    as attnhub::varlen_fwd / varlen_bwd. Differentiable inputs: q, k, v and the feature
    tensors that have a gradient (e.g. sinks). Returns (out, lse, probs or None, rng_state
    or None); probs and rng_state are not differentiable."""

    @staticmethod
    def forward(ctx, problem: VarlenProblem, inputs: VarlenInputs, backend: Backend,
                q: Tensor, k: Tensor, v: Tensor, *_grad_tensors: Tensor | None):
        res = check_forward(backend.name, problem, q, backend.forward(problem, inputs))
        probs = res.probs if problem.return_probs else None
        rng = res.rng_state if problem.dropout_p > 0 else None
        if rng is not None and rng is inputs.rng_state:  # an output may not be an input
            rng = rng.clone()
        ctx.set_materialize_grads(False)
        ctx.mark_non_differentiable(*(t for t in (probs, rng) if t is not None))
        tensors = [getattr(inputs, name) for name in _TENSOR_NAMES]
        tensors[_RNG] = rng  # backward replays forward's dropout state
        # Every tensor through save_for_backward (version checks, saved-tensor hooks such as
        # activation offloading): none is kept on ctx directly.
        ctx.save_for_backward(q, k, v, res.out, res.lse, inputs.cu_seqlens_q,
                              inputs.cu_seqlens_k, *tensors)
        ctx.call = (dataclasses.replace(problem, return_probs=False) if problem.return_probs
                    else problem, backend)
        return res.out, res.lse, probs, rng

    @staticmethod
    def backward(ctx, dout, dlse, _dprobs, _drng):
        q, k, v, out, lse, cu_q, cu_k, *tensors = ctx.saved_tensors
        if dout is None and dlse is None:
            return (None,) * (6 + len(_GRAD_INPUTS))
        problem, backend = ctx.call
        if torch.is_grad_enabled():  # create_graph=True: gradients of gradients are wanted
            raise RuntimeError(
                "attnhub: double backward (create_graph=True) through attention is not "
                f"supported: backend {backend.name!r} computes first-order gradients only")
        if dout is None:
            dout = torch.zeros_like(out)
        named = dict(zip(_TENSOR_NAMES, tensors, strict=True))
        grads = check_gradients(backend.name, backend.backward(
            problem, VarlenInputs(q, k, v, cu_q, cu_k, **named), out, lse, dout, dlse),
            q, k, v, named)
        extra = tuple(getattr(grads, TENSORS[i].grad) if tensors[i] is not None else None
                      for i in _GRAD_INPUTS)
        return (None, None, None, grads.dq, grads.dk, grads.dv, *extra)


def _schedule_args(schedule: tuple | None) -> tuple:
    """A plan's schedule (Backend.prepare: None or up to two tensors) as the op's two
    optional tensor arguments."""
    if schedule is None:
        return None, None
    if len(schedule) > 2 or not all(isinstance(t, Tensor) for t in schedule):
        raise TypeError("Backend.prepare must return None or a tuple of at most two tensors")
    return (*schedule, None, None)[:2]


def problem_from_op_args(q: Tensor, k: Tensor, cu_seqlens_q: Tensor,
                         tensors: Mapping[str, Tensor | None], max_seqlen_q: int,
                         max_seqlen_k: int, scale: float, requires_grad: bool,
                         seqlens_q: Sequence[int] | None, seqlens_k: Sequence[int] | None,
                         fields: Mapping[str, Any]) -> VarlenProblem:
    """Rebuild the (already validated) problem inside the op from its arguments.
    ``tensors``: the features' tensors by name (missing = None); ``fields``: the carried
    feature fields by name, as problem values (missing = the default, feature off)."""
    tensors = {name: tensors.get(name) for name in _TENSOR_NAMES}
    values: dict[str, Any] = {"total_k": k.shape[0], **fields}
    for rebuild in _REBUILDERS:
        values.update(rebuild(q, k, tensors, seqlens_k))
    return VarlenProblem(
        device_type=q.device.type, dtype=q.dtype, batch=cu_seqlens_q.shape[0] - 1,
        total_q=q.shape[0], nheads=q.shape[1], nheads_k=k.shape[-2], head_dim=q.shape[-1],
        max_seqlen_q=max_seqlen_q, max_seqlen_k=max_seqlen_k, scale=scale,
        requires_grad=requires_grad,
        seqlens_q=tuple(seqlens_q) if seqlens_q is not None else None,
        seqlens_k=tuple(seqlens_k) if seqlens_k is not None else None, **values)


def _unpack(q: Tensor, k: Tensor, cu_seqlens_q: Tensor, tensors: Sequence[Tensor | None],
            scalars: Sequence[Any], carried: Sequence[Any], requires_grad: bool
            ) -> tuple[VarlenProblem, dict[str, Tensor | None], str]:
    """(problem, feature tensors by name, backend) from an op's arguments. ``scalars``:
    (max_q, max_k, scale, backend, seqlens_q, seqlens_k)."""
    max_q, max_k, scale, backend, seqlens_q, seqlens_k = scalars
    named = dict(zip(_TENSOR_NAMES, tensors, strict=True))
    fields = {f.name: f.from_op(x) for f, x in zip(_CARRIED, carried, strict=True)}
    problem = problem_from_op_args(q, k, cu_seqlens_q, named, max_q, max_k, scale,
                                   requires_grad, seqlens_q, seqlens_k, fields)
    return problem, named, backend


@torch.library.custom_op("attnhub::varlen_fwd", mutates_args=(), schema=FWD_SCHEMA)
def varlen_fwd(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Arguments: see FWD_SCHEMA (``pack`` builds them). -> out (q's shape), lse float32
    (nheads, total_q), probs (batch, nheads, max_q, max_k) or empty, rng_state int64 (2,)
    or empty. schedule_*: a plan's schedule (Backend.prepare), so a planned call runs the
    same kernel with or without the op."""
    q, k, v, cu_q, cu_k, schedule_0, schedule_1 = args[:_FWD_TENSORS]
    tensors = args[_FWD_TENSORS:_FWD_TENSORS + _NT]
    max_q, max_k, scale, requires_grad, backend, seqlens_q, seqlens_k = \
        args[_FWD_TENSORS + _NT:_FWD_CORE]
    problem, named, backend = _unpack(q, k, cu_q, tensors, (max_q, max_k, scale, backend,
                                      seqlens_q, seqlens_k), args[_FWD_CORE:], requires_grad)
    schedule = tuple(t for t in (schedule_0, schedule_1) if t is not None) or None
    inputs = VarlenInputs(q, k, v, cu_q, cu_k, **named, schedule=schedule)
    res = check_forward(backend, problem, q,
                        get_registry().backends[backend].forward(problem, inputs))
    probs = res.probs if res.probs is not None else q.new_empty((0,), dtype=torch.float32)
    rng = res.rng_state if res.rng_state is not None else q.new_empty((0,), dtype=torch.int64)
    if rng is named["rng_state"]:  # a custom op's output may not be (or alias) an input
        rng = rng.clone()
    return res.out, res.lse, probs, rng


@varlen_fwd.register_fake
def _varlen_fwd_fake(*args: Any) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    q, cu_q = args[0], args[3]
    max_q, max_k = args[_FWD_TENSORS + _NT:_FWD_TENSORS + _NT + 2]
    carried = dict(zip(_CARRIED_NAMES, args[_FWD_CORE:], strict=True))
    out = torch.empty_like(q, memory_format=torch.contiguous_format)
    lse = q.new_empty((q.shape[1], q.shape[0]), dtype=torch.float32)
    probs_shape = ((cu_q.shape[0] - 1, q.shape[1], max_q, max_k)
                   if carried["return_probs"] else (0,))
    probs = q.new_empty(probs_shape, dtype=torch.float32)
    rng = q.new_empty((2,) if carried["dropout_p"] > 0 else (0,), dtype=torch.int64)
    return out, lse, probs, rng


@torch.library.custom_op("attnhub::varlen_bwd", mutates_args=(), schema=BWD_SCHEMA)
def varlen_bwd(*args: Any) -> tuple[Tensor, ...]:
    """Arguments: see BWD_SCHEMA. -> dq, dk, dv, then the gradient of each differentiable
    feature tensor (empty when the call had none). dout / dlse: gradients of out and lse
    (None where unused)."""
    dout, dlse, q, k, v, out, lse, cu_q, cu_k = args[:9]
    tensors = args[9:9 + _NT]
    problem, named, backend = _unpack(q, k, cu_q, tensors, args[9 + _NT:15 + _NT],
                                      args[15 + _NT:], True)
    inputs = VarlenInputs(q, k, v, cu_q, cu_k, **named)
    if dout is None:
        dout = torch.zeros_like(out)
    grads = check_gradients(backend, get_registry().backends[backend].backward(
        problem, inputs, out, lse, dout, dlse), q, k, v, named)
    extra = tuple(getattr(grads, TENSORS[i].grad) if tensors[i] is not None
                  else q.new_empty((0,), dtype=torch.float32) for i in _GRAD_INPUTS)
    return (grads.dq, grads.dk, grads.dv, *extra)


@varlen_bwd.register_fake
def _varlen_bwd_fake(*args: Any) -> tuple[Tensor, ...]:
    q, k, v = args[2:5]
    tensors = args[9:9 + _NT]
    extra = tuple(torch.empty_like(tensors[i], memory_format=torch.contiguous_format)
                  if tensors[i] is not None else q.new_empty((0,), dtype=torch.float32)
                  for i in _GRAD_INPUTS)
    return (torch.empty_like(q, memory_format=torch.contiguous_format),
            torch.empty_like(k, memory_format=torch.contiguous_format),
            torch.empty_like(v, memory_format=torch.contiguous_format), *extra)


def _setup_context(ctx, inputs, output) -> None:
    out, lse, probs, rng = output
    ctx.set_materialize_grads(False)
    ctx.mark_non_differentiable(probs, rng)
    tensors = list(inputs[_FWD_TENSORS:_FWD_TENSORS + _NT])
    tensors[_RNG] = rng if rng.numel() else None  # backward replays forward's dropout state
    q, k, v, cu_q, cu_k = inputs[:5]
    ctx.save_for_backward(q, k, v, out, lse, cu_q, cu_k, *tensors)
    max_q, max_k, scale, _requires_grad, backend, seqlens_q, seqlens_k = \
        inputs[_FWD_TENSORS + _NT:_FWD_CORE]
    ctx.scalars = (max_q, max_k, scale, backend, seqlens_q, seqlens_k, *inputs[_FWD_CORE:])
    ctx.grad_inputs = tuple(i for i in _GRAD_INPUTS if tensors[i] is not None)


def _backward(ctx, dout, dlse, _dprobs, _drng) -> tuple[Tensor | None, ...]:
    grads: list[Tensor | None] = [None] * _FWD_ARGS
    if dout is None and dlse is None:
        return tuple(grads)
    saved = ctx.saved_tensors
    dq, dk, dv, *extra = varlen_bwd(dout, dlse, *saved, *ctx.scalars)
    grads[0], grads[1], grads[2] = dq, dk, dv
    for i, g in zip(_GRAD_INPUTS, extra, strict=True):
        if i in ctx.grad_inputs:
            grads[_FWD_TENSORS + i] = g
    return tuple(grads)


varlen_fwd.register_autograd(_backward, setup_context=_setup_context)
