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
  int scalars, ``window_size`` None / int / tuple of two ints), no block table, custom mask
  or ``return_attn_probs``; ALiBi slopes and sinks as exact tensors (sinks contiguous), whose
  shape, dtype, device and grad flag the key holds (their values are the call's own, passed
  to the backend on every call); not while torch.compile traces.

Everything else takes the full path (normalize + select) on every call.
"""

from __future__ import annotations

import threading

import torch

from . import environment, host_copies
from .backend import Backend
from .inputs import VarlenInputs
from .normalize import device_offsets
from .problem import VarlenProblem
from .results import checked_out_runner
from .varlen_info import VarlenInfo

MAX_PLANS = 256
_plans: dict[tuple, Plan] = {}
_lock = threading.Lock()  # writers: store() and clear()
_Tensor = torch.Tensor
_NUMBER = (float, int)
_AUTO = ("auto", b"auto")
# Looked up once: this module runs on every call.
_is_compiling = torch.compiler.is_compiling
_grad_enabled = torch.is_grad_enabled
_deterministic_algorithms = torch.are_deterministic_algorithms_enabled
_env = environment.snapshot
# snapshot()'s raw-mapping reads, inlined into call_key where CPython offers the mapping.
_env_raw = environment.raw_get()
_ENV_KEYS = environment.raw_keys()
_host_copy_ids = host_copies.cache_ids()  # ids with a host copy (a live view of the cache)


class Plan:
    """A normalized, dispatched call: its problem, its backend and the offsets to pass (the
    VarlenInfo's device tensor, or None: the call's own tensor, which is already int32 on
    q's device when ``offsets_as_given``, else converted per call)."""

    __slots__ = ("backend", "cu_seqlens_k", "cu_seqlens_q", "device", "offsets_as_given",
                 "out_only", "pinned", "problem", "run_grad", "run_out")

    def __init__(self, problem: VarlenProblem, backend: Backend, device: torch.device,
                 cu_seqlens_q: torch.Tensor | None, cu_seqlens_k: torch.Tensor | None,
                 offsets_as_given: bool, pinned: tuple) -> None:
        self.problem = problem
        self.backend = backend
        self.device = device
        self.cu_seqlens_q = cu_seqlens_q
        self.cu_seqlens_k = cu_seqlens_k
        self.offsets_as_given = offsets_as_given
        self.pinned = pinned  # the VarlenInfo objects whose ids are in the key
        # ALiBi slopes or sinks: the call's tensors go with q, k, v through the full run
        # (the runners below take q, k, v and the offsets only)
        features = problem.alibi is not None or problem.sinks
        # Neither lse nor autograd: Backend.forward_out (torch.compile never gets here).
        self.out_only = not (problem.return_probs or problem.requires_grad or features)
        self.run_out = checked_out_runner(backend, problem, device) if self.out_only else None
        # With autograd and out alone wanted: the backend's own autograd, if it has one
        # (Backend.autograd_out_runner; eager calls only, outside dispatch modes).
        grad = (backend.autograd_out_runner(problem)
                if problem.requires_grad and not (problem.return_probs or features)
                else None)
        self.run_grad = None if grad is None else checked_out_runner(backend, problem, device,
                                                                      grad)

    def offsets(self, cu_q, cu_k) -> tuple[torch.Tensor, torch.Tensor]:
        """int32 offsets on q's device for a call with this plan's key."""
        if self.offsets_as_given:
            return cu_q, cu_k
        tq = self.cu_seqlens_q if self.cu_seqlens_q is not None else device_offsets(
            cu_q, self.device)
        tk = self.cu_seqlens_k if self.cu_seqlens_k is not None else device_offsets(
            cu_k, self.device)
        return tq, tk

    def inputs(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, cu_q, cu_k,
               alibi_slopes: torch.Tensor | None = None, sinks: torch.Tensor | None = None
               ) -> VarlenInputs:
        """The backend's inputs for a call with this plan's key (its ALiBi slopes and sinks
        are valid as given: the key holds what normalize checked of them)."""
        return VarlenInputs(q, k, v, *self.offsets(cu_q, cu_k), alibi_slopes=alibi_slopes,
                            sinks=sinks)


def clear() -> None:
    """Forget every plan (registry, override or cache resets)."""
    with _lock:
        _plans.clear()


def call_key(q, k, v, cu_q, cu_k, max_q, max_k, dropout_p, softmax_scale, causal, window_size,
             softcap, deterministic, backend, mask_alignment, forced: str | None,
             alibi_slopes=None, sinks=None) -> tuple | None:
    """The call's key, or None when the call is not eligible (see the module docstring; the
    caller has checked that there is no block table, custom mask or probs).
    ``forced``: the innermost ``use_backend`` override."""
    if type(q) is not _Tensor or type(k) is not _Tensor or type(v) is not _Tensor \
            or _is_compiling():
        return None
    if type(causal) is not bool or type(dropout_p) not in _NUMBER \
            or (max_q is not None and type(max_q) is not int) \
            or (max_k is not None and type(max_k) is not int) \
            or (softmax_scale is not None and type(softmax_scale) not in _NUMBER) \
            or (softcap is not None and type(softcap) not in _NUMBER) \
            or (deterministic is not None and type(deterministic) is not bool) \
            or type(mask_alignment) is not str or (backend is not None and type(backend)
                                                    is not str):
        return None
    if window_size is not None and type(window_size) is not int and not (
            type(window_size) is tuple and len(window_size) == 2
            and type(window_size[0]) is int and type(window_size[1]) is int):
        return None
    env = _env() if _env_raw is None else (
        _env_raw(_ENV_KEYS[0]), _env_raw(_ENV_KEYS[1]), _env_raw(_ENV_KEYS[2]),
        _env_raw(_ENV_KEYS[3]))
    kq = _offsets_key(cu_q, max_q, env[2])
    if kq is None:
        return None
    kk = kq if cu_k is cu_q and max_k == max_q else _offsets_key(cu_k, max_k, env[2])
    if kk is None:
        return None
    features = None
    if alibi_slopes is not None or sinks is not None:
        features = (_feature_key(alibi_slopes), _feature_key(sinks))
        if False in features:
            return None
    # The problem depends on the grad flags only through "any requires grad" (and grad mode).
    return (q.shape, k.shape, v.shape, q.dtype, k.dtype, v.dtype, q.device, k.device, v.device,
            q.requires_grad or k.requires_grad or v.requires_grad, _grad_enabled(), kq,
            True if kk is kq else kk,
            max_q, max_k, dropout_p, softmax_scale, causal, window_size, softcap, deterministic,
            mask_alignment, backend, forced, env,
            _deterministic_algorithms(), features)


def _feature_key(t: object) -> object:
    """What normalize checks of an ALiBi slopes or sinks tensor (shape, dtype, device, and
    the grad flag: sinks may require grad), None for none, False when not eligible (not an
    exact tensor, or not contiguous: normalize would copy sinks)."""
    if t is None:
        return None
    if type(t) is not _Tensor or not t.is_contiguous():
        return False
    return (t.shape, t.dtype, t.device, t.requires_grad)


def _offsets_key(cu: object, max_seqlen: object, validate: object) -> object:
    if type(cu) is VarlenInfo:
        return id(cu)
    if type(cu) is _Tensor and max_seqlen is not None and not cu.is_cpu \
            and (validate is None or validate in _AUTO) \
            and (id(cu) not in _host_copy_ids or host_copies.cached(cu) is None):
        return (cu.shape, cu.dtype, cu.device)
    return None


get = _plans.get  # (key) -> Plan | None


def store(key: tuple, problem: VarlenProblem, backend: Backend, inputs: VarlenInputs,
          cu_q: object, cu_k: object) -> None:
    """Remember the outcome of a full-path call with ``key`` (oldest plan out beyond
    MAX_PLANS: a training loop builds a new VarlenInfo per step)."""
    info_q, info_k = type(cu_q) is VarlenInfo, type(cu_k) is VarlenInfo
    # Offsets given as int32 tensors on q's device reach the backend as they are (the key
    # holds their dtype and device): no per-call conversion check.
    as_given = not info_q and not info_k and inputs.cu_seqlens_q is cu_q \
        and inputs.cu_seqlens_k is cu_k
    plan = Plan(problem, backend, inputs.q.device, inputs.cu_seqlens_q if info_q else None,
                inputs.cu_seqlens_k if info_k else None, as_given,
                tuple(c for c, pinned in ((cu_q, info_q), (cu_k, info_k)) if pinned))
    with _lock:  # readers (get) take no lock: a dict lookup is atomic
        while len(_plans) >= MAX_PLANS:
            del _plans[next(iter(_plans))]
        _plans[key] = plan
