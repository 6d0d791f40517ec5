"""Backend selection: overrides, priorities, fallback policy, cached per static signature."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import environment, host_copies, plans
from .backend import Backend
from .errors import (
    BackendUnavailableError,
    InvalidEnvironmentError,
    UnknownBackendError,
    error_class,
)
from .problem import VarlenProblem
from .registry import get_registry, on_reset

FALLBACK_POLICIES = ("warn", "error", "allow")

# Per-thread stack of use_backend() overrides (a threading.local, which torch.compile traces).
_local = threading.local()
# One entry per use_backend() context open in any thread (append / pop are atomic, and
# torch.compile traces them): while it is empty, forced_context() answers without touching
# the thread-local (it runs on every fast-path call).
_open_overrides: list[None] = []
_cache: dict[tuple, str] = {}  # selection key -> backend name
_warned: set[tuple] = set()


@dataclass(frozen=True)
class Verdict:
    """One backend's answer for one call. ``reasons`` empty = it can run the call."""

    backend: str
    priority: int
    reasons: tuple[str, ...]
    selected: bool = False

    @property
    def ok(self) -> bool:
        return not self.reasons


class Explanation(tuple):
    """Every registered backend's Verdict for one call, in the order they are tried."""

    @property
    def selected(self) -> str | None:
        return next((v.backend for v in self if v.selected), None)

    def __str__(self) -> str:
        lines = []
        for v in self:
            mark = "->" if v.selected else ("ok" if v.ok else "--")
            lines.append(f"{mark} {v.backend} (priority {v.priority})")
            lines.extend(f"     {r}" for r in v.reasons)
        return "\n".join(lines)


def clear_cache() -> None:
    """Forget cached selections, call plans and fallback warnings (after registry or env
    changes)."""
    _cache.clear()
    _warned.clear()
    plans.clear()


on_reset(clear_cache)  # a new registry invalidates every cached selection


def forced_context() -> str | None:
    """The innermost attnhub.use_backend() override of this thread (None: none in force).
    Reads the thread's attribute dict: getattr on a missing threading.local attribute raises
    and catches internally, about a microsecond (this runs on every fast-path call)."""
    if not _open_overrides:
        return None
    stack = _local.__dict__.get("forced")
    return stack[-1] if stack else None


@contextlib.contextmanager
def use_backend(name: str | None) -> Iterator[None]:
    """Force backend ``name`` for calls in this context (None lifts an outer override)."""
    if name is not None:
        _check_name(name, "attnhub.use_backend()")
    stack = getattr(_local, "forced", None)
    if stack is None:
        stack = _local.forced = []
    stack.append(name)
    _open_overrides.append(None)
    try:
        yield
    finally:
        stack.pop()
        _open_overrides.pop()


def forced_backend(argument: str | None = None) -> tuple[str | None, str]:
    """The override in force and where it came from: argument > context > environment."""
    if argument is not None:
        return argument, "the backend= argument"
    stack = getattr(_local, "forced", None)
    ctx = stack[-1] if stack else None
    if ctx is not None:
        return ctx, "attnhub.use_backend()"
    env = environment.get("ATTNHUB_BACKEND") or None
    return env, "ATTNHUB_BACKEND"


def fallback_policy() -> str:
    policy = environment.get("ATTNHUB_FALLBACK") or "warn"
    if policy not in FALLBACK_POLICIES:
        raise InvalidEnvironmentError("ATTNHUB_FALLBACK", "one of warn, error, allow",
                                      repr(policy))
    return policy


def select(problem: VarlenProblem, backend: str | None = None) -> Backend:
    """The backend that runs ``problem``: the forced one if any (raising with its reasons when
    it cannot), else the highest-priority backend of the device type with no reasons.

    Decided once per (static signature, override, policy); under torch.compile the decision
    is folded into the graph as a constant."""
    name, source = forced_backend(backend)
    key = (problem.signature(), name, source, fallback_policy())
    host_copies.validation_mode()  # a bad ATTNHUB_VALIDATE fails every call, not only some
    if torch.compiler.is_compiling():
        chosen, error = _select_constant(key)
        if error is not None:  # raised in traced code, where attnhub.api can defer it
            raise error_class(error[0])(*error[1:])
    else:
        chosen = _cache.get(key) or _select_uncached(key)
    return get_registry().backends[chosen]


def _select_uncached(key: tuple) -> str:
    signature, name, source, policy = key
    problem = VarlenProblem.from_signature(signature)
    if name is not None:
        chosen = _select_forced(problem, name, source).name
    else:
        chosen = _select_auto(problem, policy).name
    _cache[key] = chosen
    return chosen


def _select_constant(key: tuple) -> tuple[str | None, tuple | None]:
    """(backend name, None), or (None, (error class name, *its args)): an exception raised
    here would reach the caller as dynamo's internal error, so it is returned as constants."""
    try:
        return _cache.get(key) or _select_uncached(key), None
    except (BackendUnavailableError, UnknownBackendError) as exc:
        return None, (type(exc).__name__, *exc.args)


# What torch.compiler.assume_constant_result does, without importing torch._dynamo (about a
# second) at attnhub import: dynamo calls the function while tracing and keeps the result.
_select_constant._dynamo_marked_constant = True  # type: ignore[attr-defined]


def verdict(backend: Backend, problem: VarlenProblem) -> list[str]:
    """Why ``backend`` cannot run ``problem`` (device, availability, then its own reasons)."""
    if problem.device_type not in backend.device_types and "*" not in backend.device_types:
        return [f"runs on {', '.join(sorted(backend.device_types))} tensors, not "
                f"{problem.device_type}"]
    reasons = get_registry().unavailable_reasons(backend)
    if reasons:
        return list(reasons)
    try:
        return list(backend.why_not(problem))
    except Exception as exc:
        return [f"why_not raised {type(exc).__name__}: {exc}"]


def explain_problem(problem: VarlenProblem, backend: str | None = None) -> Explanation:
    """Every registered backend's verdict for ``problem``, marking the one ``select`` picks."""
    registry = get_registry()
    ordered = registry.for_device(problem.device_type)
    ordered += sorted((b for b in registry.backends.values() if b not in ordered),
                      key=lambda b: b.name)
    name, source = forced_backend(backend)
    try:  # decided as select() would, without caching or spending its one-time warning
        if name is not None:
            chosen: str | None = _select_forced(problem, name, source).name
        else:
            chosen = _select_auto(problem, fallback_policy(), warn=False).name
    except (BackendUnavailableError, UnknownBackendError):
        chosen = None
    return Explanation(
        Verdict(b.name, b.priority, tuple(verdict(b, problem)), b.name == chosen) for b in ordered
    )


def _check_name(name: str, source: str) -> Backend:
    registry = get_registry()
    found = registry.backends.get(name)
    if found is None:
        raise UnknownBackendError(name, source, registry.names())
    return found


def _select_forced(problem: VarlenProblem, name: str, source: str) -> Backend:
    backend = _check_name(name, source)
    reasons = verdict(backend, problem)
    if reasons:
        raise BackendUnavailableError(
            f"backend {name!r} (forced by {source}) cannot run this call "
            f"[{_describe(problem)}]:\n  - " + "\n  - ".join(reasons))
    return backend


def _select_auto(problem: VarlenProblem, policy: str, warn: bool = True) -> Backend:
    candidates = get_registry().for_device(problem.device_type)
    rejected: list[tuple[Backend, list[str]]] = []
    for backend in candidates:
        reasons = verdict(backend, problem)
        if reasons:
            rejected.append((backend, reasons))
            continue
        accelerated_rejected = [r for r in rejected if not r[0].fallback]
        if backend.fallback and accelerated_rejected:
            if policy == "error":
                raise BackendUnavailableError(
                    f"no accelerated backend can run this call [{_describe(problem)}] and "
                    "ATTNHUB_FALLBACK=error:\n" + _format_rejections(accelerated_rejected))
            if policy == "warn" and warn:
                key = (problem.signature(), backend.name)
                if key not in _warned:
                    _warned.add(key)
                    warnings.warn(
                        f"attnhub: falling back to the {backend.name!r} backend for "
                        f"[{_describe(problem)}]; set ATTNHUB_FALLBACK=allow to silence or "
                        f"=error to fail:\n" + _format_rejections(accelerated_rejected),
                        RuntimeWarning, stacklevel=5)
        return backend
    raise BackendUnavailableError(
        f"no registered backend can run this call [{_describe(problem)}] on "
        f"{problem.device_type}:\n" + (_format_rejections(rejected) if rejected else
                                       "  (no backend is registered for this device type)"))


def _format_rejections(rejected: list[tuple[Backend, list[str]]]) -> str:
    return "\n".join(f"  {b.name}: " + "; ".join(reasons) for b, reasons in rejected)


def _describe(problem: VarlenProblem) -> str:
    parts = [problem.device_type, str(problem.dtype).removeprefix("torch."),
             f"head_dim={problem.head_dim}", f"heads={problem.nheads}/{problem.nheads_k}"]
    return " ".join(parts + problem.features())
