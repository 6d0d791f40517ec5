"""Host copies of small device index tensors (cu_seqlens, block tables), read back once.

A device tensor is read back (one host-device synchronisation) at most once per tensor object
and in-place version; later calls with the same tensor, such as one call per layer, reuse the
host copy. Nothing is read while torch.compile traces or a CUDA graph is being captured.
"""

from __future__ import annotations

import weakref

import torch

from . import environment

_cache: dict[int, tuple[weakref.ref, int, tuple]] = {}


def validation_mode() -> str:
    """ATTNHUB_VALIDATE: 'auto' (default) reads device index tensors back only when the host
    needs them anyway (max_seqlen not given); 'full' also reads them back, once per tensor,
    to validate their values when max_seqlen was given."""
    mode = environment.get("ATTNHUB_VALIDATE") or "auto"
    if mode not in ("auto", "full"):
        from .errors import InvalidEnvironmentError

        raise InvalidEnvironmentError("ATTNHUB_VALIDATE", "'auto' or 'full'", repr(mode))
    return mode


def can_read_back() -> bool:
    """False while tracing (torch.compile) or capturing a CUDA graph: no data to read."""
    if torch.compiler.is_compiling():
        return False
    return not (torch.cuda.is_available() and torch.cuda.is_current_stream_capturing())


def cache_ids():
    """A live view of the ids that have a host copy (a cheap first test before ``cached``)."""
    return _cache.keys()


def cached(t: torch.Tensor) -> tuple | None:
    """The host copy of ``t`` taken earlier, if ``t`` has not been modified since."""
    entry = _cache.get(id(t))
    if entry is not None and entry[0]() is t and entry[1] == t._version:
        return entry[2]
    return None


def host_copy(t: torch.Tensor) -> tuple:
    """Nested tuples of ``t``'s values; free for CPU tensors, one sync once per device tensor."""
    if t.device.type == "cpu":
        return _as_tuple(t.tolist())
    hit = cached(t)
    if hit is not None:
        return hit
    values = _as_tuple(t.tolist())
    key = id(t)
    _cache[key] = (weakref.ref(t, lambda ref, key=key: _forget(key, ref)), t._version, values)
    return values


def _forget(key: int, ref: weakref.ref) -> None:
    entry = _cache.get(key)
    if entry is not None and entry[0] is ref:
        _cache.pop(key, None)


def _as_tuple(values: list) -> tuple:
    return tuple(_as_tuple(v) if isinstance(v, list) else v for v in values)
