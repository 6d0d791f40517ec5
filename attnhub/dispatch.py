"""Backend selection: overrides, measured cost (attnhub.cost_tables) with priority as the
tie-break, fallback policy; cached per static signature and size class."""

from __future__ import annotations

import contextlib
import threading
import warnings
from collections.abc import Iterator
from dataclasses import dataclass

import torch

from . import cost_tables, environment, host_copies, plans
from .backend import Backend
from .errors import (
    BackendUnavailableError,
    InvalidEnvironmentError,
    UnknownBackendError,
    error_class,
)
from .problem import VarlenProblem
from .problem_class import ProblemClass, classify, size_bucket
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
    cost_ms: float | None = None  # measured time of the call's class (attnhub.cost_tables)

    @property
    def ok(self) -> bool:
        return not self.reasons


class Explanation(tuple):
    """Every registered backend's Verdict for one call, in priority order. ``basis``: how the
    choice was made (forced, measured cost of the call's class and the table, or priority)."""

    basis: str = ""

    @property
    def selected(self) -> str | None:
        return next((v.backend for v in self if v.selected), None)

    def __str__(self) -> str:
        lines = [f"selection: {self.basis}"] if self.basis else []
        for v in self:
            mark = "->" if v.selected else ("ok" if v.ok else "--")
            cost = f", measured {v.cost_ms:.4g} ms" if v.cost_ms is not None else ""
            lines.append(f"{mark} {v.backend} (priority {v.priority}{cost})")
            lines.extend(f"     {r}" for r in v.reasons)
        return "\n".join(lines)


def clear_cache() -> None:
    """Forget cached selections, call plans and fallback warnings (after registry or env
    changes)."""
    _cache.clear()
    _warned.clear()
    plans.clear()
    cost_tables.clear()


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
    ctx = forced_context()  # (not getattr on the thread-local: about a microsecond)
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
    it cannot), else among the device type's backends with no reasons the fastest measured
    for the call's class (attnhub.cost_tables; within 3% the higher priority), the highest
    priority where the class was never measured.

    Decided once per (static signature, size class, override, policy, selection mode); under
    torch.compile the decision is folded into the graph as a constant."""
    name, source = forced_backend(backend)
    mode = cost_tables.selection_mode()
    size = size_bucket(problem) if name is None and _measured(problem.device_type, mode) \
        else None
    key = (problem.signature(), size, name, source, fallback_policy(), mode)
    host_copies.validation_mode()  # a bad ATTNHUB_VALIDATE fails every call, not only some
    if torch.compiler.is_compiling():
        chosen, error = _select_constant(key)
        if error is not None:  # raised in traced code, where attnhub.api can defer it
            raise error_class(error[0])(*error[1:])
    else:
        chosen = _cache.get(key) or _select_uncached(key)
    return get_registry().backends[chosen]


def _select_uncached(key: tuple) -> str:
    signature, size, name, source, policy, mode = key
    problem = VarlenProblem.from_signature(signature)
    if name is not None:
        chosen = _select_forced(problem, name, source).name
    else:
        chosen = _select_auto(problem, policy, size, mode)[0].name
    _cache[key] = chosen
    return chosen


def _select_constant(key: tuple) -> tuple[str | None, tuple | None]:
    """(backend name, None), or (None, (error class name, *its args)): an exception raised
    here would reach the caller as dynamo's internal error, so it is returned as constants."""
    try:
        return _cache.get(key) or _select_uncached(key), None
    except (BackendUnavailableError, UnknownBackendError) as exc:
        return None, (type(exc).__name__, *exc.args)


def _measured(device_type: str, mode: str) -> bool:
    """Whether a cost table ranks this device type's backends (loaded once per process): only
    then does the call's size class enter the selection key (no table, no size guard)."""
    return mode == "measured" and cost_tables.active(device_type) is not None


# What torch.compiler.assume_constant_result does, without importing torch._dynamo (about a
# second) at attnhub import: dynamo calls the function while tracing and keeps the result.
_select_constant._dynamo_marked_constant = True  # type: ignore[attr-defined]
_measured._dynamo_marked_constant = True  # type: ignore[attr-defined]


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
    mode = cost_tables.selection_mode()
    size = size_bucket(problem) if _measured(problem.device_type, mode) else None
    costs = {}
    if size is not None:
        costs = _class_costs(problem.device_type, classify(problem, size), mode) or {}
    try:  # decided as select() would, without caching or spending its one-time warning
        if name is not None:
            chosen: str | None = _select_forced(problem, name, source).name
            basis = f"forced by {source}"
        else:
            picked, basis = _select_auto(problem, fallback_policy(), size, mode, warn=False)
            chosen = picked.name
    except (BackendUnavailableError, UnknownBackendError) as exc:
        chosen, basis = None, f"none: {str(exc).splitlines()[0]}"
    explanation = Explanation(
        Verdict(b.name, b.priority, tuple(verdict(b, problem)), b.name == chosen,
                costs.get(b.name)) for b in ordered
    )
    explanation.basis = basis
    return explanation


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


def _class_costs(device_type: str, cls: ProblemClass, mode: str) -> dict[str, float] | None:
    """Measured {backend: ms} of ``cls`` on this process's device of ``device_type``, or None
    (selection by priority, no table, or the class never measured)."""
    if mode == "priority":
        return None
    table = cost_tables.active(device_type)
    return table.costs(cls) if table is not None else None


def _select_auto(problem: VarlenProblem, policy: str, size: str | None, mode: str,
                 warn: bool = True) -> tuple[Backend, str]:
    """(the backend, how it was chosen). The backends of the device type are walked in
    priority order; the first that can run the call is the priority choice. When the call's
    class has measured costs, the contenders are every backend that can run it from there down
    to the first fallback backend that can (backends ranked below a fallback, like the
    interpreted Triton kernels, run only when forced), and ``cost_tables.choose`` ranks them."""
    candidates = get_registry().for_device(problem.device_type)
    rejected: list[tuple[Backend, list[str]]] = []
    for i, backend in enumerate(candidates):
        reasons = verdict(backend, problem)
        if reasons:
            rejected.append((backend, reasons))
            continue
        if not backend.fallback:
            return _rank(problem, candidates[i:], size, mode)
        accelerated_rejected = [r for r in rejected if not r[0].fallback]
        if accelerated_rejected:
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
        return backend, "priority (no accelerated backend can run the call)"
    raise BackendUnavailableError(
        f"no registered backend can run this call [{_describe(problem)}] on "
        f"{problem.device_type}:\n" + (_format_rejections(rejected) if rejected else
                                       "  (no backend is registered for this device type)"))


def _rank(problem: VarlenProblem, candidates: list[Backend], size: str | None, mode: str
          ) -> tuple[Backend, str]:
    """The choice among ``candidates`` (priority order, the first can run the call); ``size``
    None: no table applies."""
    first = candidates[0]
    if mode == "priority":
        return first, "priority (ATTNHUB_SELECTION=priority)"
    if size is None:
        return first, "priority (no cost table for this device)"
    cls = classify(problem, size)
    costs = _class_costs(problem.device_type, cls, mode)
    if not costs:
        return first, f"priority (class {cls.key()} never measured)"
    contenders = [first]
    for backend in candidates[1:]:
        if not verdict(backend, problem):
            contenders.append(backend)
            if backend.fallback:
                break
    name = cost_tables.choose([(b.name, b.priority) for b in contenders], costs)
    if name is None:
        return first, f"priority (no contender measured in class {cls.key()})"
    table = cost_tables.active(problem.device_type)
    sources = "; ".join(table.describe()) if table is not None else ""
    return (next(b for b in contenders if b.name == name),
            f"measured cost of class {cls.key()} ({sources})")


def _format_rejections(rejected: list[tuple[Backend, list[str]]]) -> str:
    return "\n".join(f"  {b.name}: " + "; ".join(reasons) for b, reasons in rejected)


def _describe(problem: VarlenProblem) -> str:
    parts = [problem.device_type, str(problem.dtype).removeprefix("torch."),
             f"head_dim={problem.head_dim}", f"heads={problem.nheads}/{problem.nheads_k}"]
    return " ".join(parts + problem.features())
