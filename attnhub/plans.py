"""Call plans: the dispatch fast path for repeated calls of one shape (one per layer).

``attention_forward_varlen`` normalizes a call and selects its backend once per *call key*:
a tuple of cheap facts (tensor shapes, dtypes, devices, grad flags, the scalar arguments,
the kind and layout of the offsets, grad and determinism modes, the overrides in force).
Every check ``normalize`` and ``select`` make depends only on those facts, so a call whose
key was seen before reuses that call's problem and backend and runs the same validation
outcome without re-doing it. Calls are eligible when the key captures everything the problem
depends on:

* offsets given as a ``VarlenInfo`` (immutable; the plan keeps it alive, so its id is not
  reused), or as a device tensor with ``max_seqlen`` given, no host copy of it cached and
  ``ATTNHUB_VALIDATE`` auto (then normalize reads no values either);
* plain argument types (exact ``torch.Tensor`` q/k/v, int max_seqlen, bool causal, float or
  int scalars, ``window_size`` None / int / tuple of two ints), no ALiBi, no block table, no
  ``return_attn_probs``; not while torch.compile traces.

Everything else takes the full path (normalize + select) on every call.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from . import environment, host_copies
from .backend import Backend
from .inputs import VarlenInputs
from .normalize import device_offsets
from .problem import VarlenProblem
from .varlen_info import VarlenInfo

MAX_PLANS = 256
_plans: dict[tuple, Plan] = {}
_Tensor = torch.Tensor
_NUMBER = (float, int)


@dataclass(frozen=True)
class Plan:
    """A normalized, dispatched call: its problem, its backend and the offsets to pass (the
    VarlenInfo's device tensor, or None: the call's own tensor, made int32 on ``device``)."""

    problem: VarlenProblem
    backend: Backend
    device: torch.device
    cu_seqlens_q: torch.Tensor | None
    cu_seqlens_k: torch.Tensor | None
    pinned: tuple  # the VarlenInfo objects whose ids are in the key

    def inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q, cu_k
               ) -> VarlenInputs:
        """The backend's inputs for a call with this plan's key."""
        tq = self.cu_seqlens_q if self.cu_seqlens_q is not None else device_offsets(
            cu_q, self.device)
        tk = self.cu_seqlens_k if self.cu_seqlens_k is not None else device_offsets(
            cu_k, self.device)
        return VarlenInputs(q, k, v, tq, tk)


def clear() -> None:
    """Forget every plan (registry, override or cache resets)."""
    _plans.clear()


def _offsets_key(cu: object, max_seqlen: object, validate: object) -> tuple | None:
    if type(cu) is VarlenInfo:
        return (id(cu),)
    if type(cu) is _Tensor and type(max_seqlen) is int and cu.device.type != "cpu" \
            and environment.validate_is_auto(validate) and host_copies.cached(cu) is None:
        return (cu.shape, cu.dtype, cu.device)
    return None


def call_key(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size,
             softcap, alibi_slopes, deterministic, return_attn_probs, block_table, backend,
             mask_alignment, forced: str | None) -> tuple | None:
    """The call's key, or None when the call is not eligible (see the module docstring).
    ``forced``: the innermost ``use_backend`` override."""
    if alibi_slopes is not None or block_table is not None or return_attn_probs \
            or torch.compiler.is_compiling():
        return None
    if type(q) is not _Tensor or type(k) is not _Tensor or type(v) is not _Tensor:
        return None
    if not (max_q is None or type(max_q) is int) or not (max_k is None or type(max_k) is int):
        return None
    if type(dropout_p) not in _NUMBER or type(causal) is not bool \
            or not (softmax_scale is None or type(softmax_scale) in _NUMBER) \
            or not (softcap is None or type(softcap) in _NUMBER) \
            or not (deterministic is None or type(deterministic) is bool) \
            or not (return_attn_probs is None or return_attn_probs is False) \
            or type(mask_alignment) is not str or not (backend is None or type(backend) is str):
        return None
    if not (window_size is None or type(window_size) is int or (
            type(window_size) is tuple and len(window_size) == 2
            and type(window_size[0]) is int and type(window_size[1]) is int)):
        return None
    env = environment.snapshot()
    kq = _offsets_key(cu_q, max_q, env[2])
    if kq is None:
        return None
    kk = _offsets_key(cu_k, max_k, env[2])
    if kk is None:
        return None
    # The problem depends on the grad flags only through "any requires grad" (and grad mode).
    return (q.shape, q.dtype, q.device, k.shape, k.dtype, k.device, v.shape, v.dtype, v.device,
            q.requires_grad or k.requires_grad or v.requires_grad, kq, kk, max_q, max_k,
            dropout_p, softmax_scale, causal, window_size, softcap, deterministic,
            mask_alignment, backend, forced, env, torch.is_grad_enabled(),
            torch.are_deterministic_algorithms_enabled())


def get(key: tuple) -> Plan | None:
    return _plans.get(key)


def store(key: tuple, problem: VarlenProblem, backend: Backend, inputs: VarlenInputs,
          cu_q: object, cu_k: object) -> None:
    """Remember the outcome of a full-path call with ``key`` (oldest plan out beyond
    MAX_PLANS: a training loop builds a new VarlenInfo per step)."""
    if len(_plans) >= MAX_PLANS:
        del _plans[next(iter(_plans))]
    info_q, info_k = type(cu_q) is VarlenInfo, type(cu_k) is VarlenInfo
    _plans[key] = Plan(problem, backend, inputs.q.device,
                       inputs.cu_seqlens_q if info_q else None,
                       inputs.cu_seqlens_k if info_k else None,
                       tuple(c for c, pinned in ((cu_q, info_q), (cu_k, info_k)) if pinned))
