"""attnhub's environment variables, read cheaply on every call.

``os.environ.get`` of an unset variable costs about a microsecond (it raises and catches a
KeyError inside); the dispatch fast path reads four variables per call, so it reads the
process environment's raw mapping (``os.environ._data``, which os.environ itself writes
through) where CPython has one, and falls back to ``os.environ.get`` elsewhere.
"""

from __future__ import annotations

import os

NAMES = ("ATTNHUB_BACKEND", "ATTNHUB_FALLBACK", "ATTNHUB_VALIDATE", "ATTNHUB_SELECTION")

_raw = getattr(os.environ, "_data", None)
_encode = getattr(os.environ, "encodekey", None)
_RAW_KEYS = tuple(_encode(n) for n in NAMES) if _raw is not None and _encode else None
_ENCODED = dict(zip(NAMES, _RAW_KEYS, strict=True)) if _RAW_KEYS is not None else {}


def snapshot() -> tuple:
    """The raw values of NAMES (None when unset), in a form only compared for equality."""
    if _RAW_KEYS is not None:
        get = _raw.get  # type: ignore[union-attr]
        return get(_RAW_KEYS[0]), get(_RAW_KEYS[1]), get(_RAW_KEYS[2]), get(_RAW_KEYS[3])
    return tuple(os.environ.get(n) for n in NAMES)


def raw_get():
    """The raw mapping's ``get`` (keys from ``raw_keys``), or None where there is none."""
    return _raw.get if _RAW_KEYS is not None else None  # type: ignore[union-attr]


def raw_keys() -> tuple:
    """NAMES as keys of the raw mapping (empty where there is none)."""
    return _RAW_KEYS or ()


def validate_is_auto(value: object) -> bool:
    """Whether a raw ATTNHUB_VALIDATE value from ``snapshot`` means 'auto' (or unset)."""
    return value is None or value in ("auto", b"auto")


def get(name: str) -> str | None:
    """``os.environ.get(name)`` through the raw mapping where there is one: torch.compile
    guards a read of that dict (not one of os.environ), so a variable set after compiling
    recompiles instead of being ignored."""
    if _raw is None or _encode is None:
        return os.environ.get(name)
    key = _ENCODED.get(name)
    value = _raw.get(key if key is not None else _encode(name))
    return None if value is None else os.environ.decodevalue(value)  # type: ignore[attr-defined]
