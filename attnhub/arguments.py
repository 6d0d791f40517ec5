"""Scalar argument conversion: the one place every surface's scalars become Python values.

flash_attn 2.8 hands its scalars to its kernels through ``torch.library`` custom ops and
pybind11, so callers pass them in many forms: ``window_size`` as a tuple, a list, a 1-D tensor
of two ints (flash_attn's own tests pass ``torch.randint(0, seqlen, (2,))``) or a pair of 0-d
tensors; ints, floats and bools as Python values, numpy scalars or one-element tensors. These
functions accept exactly those forms and reject everything else (strings, floats where an int
is meant, ``True`` where a length is meant, ...) with an InvalidArgumentError naming the
argument. ``normalize`` calls them; a surface that needs a scalar before the core call (e.g.
``flash_attn_with_kvcache`` deciding whether to rotate q) calls them too, never a copy.

A one-element tensor is read with ``.item()``: a host sync for a CUDA tensor, as in flash_attn.
"""

from __future__ import annotations

import math
import numbers
from typing import Any

import torch

from .errors import InvalidArgumentError

INT32_MAX = 2**31 - 1


def _scalar_tensor(value: Any) -> Any:
    """A one-element tensor or numpy array -> its Python value; anything else unchanged."""
    if isinstance(value, torch.Tensor):
        if value.numel() != 1:
            return value
        return value.item()
    if type(value).__module__ == "numpy" and getattr(value, "shape", None) in ((), (1,)):
        return value.item()
    return value


def _is_bool(value: Any) -> bool:
    return isinstance(value, bool) or (type(value).__module__ == "numpy"
                                       and type(value).__name__ in ("bool_", "bool"))


def as_int(name: str, value: Any, minimum: int | None = None) -> int:
    """An int-like (Python or numpy int, ``torch.SymInt``, one-element integer tensor) -> int.
    Bools, floats (even 3.0) and strings are rejected: ``int(2.5)`` would truncate silently."""
    if isinstance(value, torch.SymInt):
        result: Any = value
    else:
        scalar = _scalar_tensor(value)
        if _is_bool(scalar) or not isinstance(scalar, numbers.Integral):
            raise InvalidArgumentError(name, "an int" + (f" >= {minimum}" if minimum is not None
                                                         else ""), _describe(value))
        result = int(scalar)
    if minimum is not None and result < minimum:
        raise InvalidArgumentError(name, f"an int >= {minimum}", result)
    return result


def as_bool(name: str, value: Any) -> bool:
    """A bool-like (Python or numpy bool, the ints 0 / 1, a one-element bool or integer tensor
    holding 0 / 1) -> bool. Strings ("no" is truthy), floats and other ints are rejected."""
    scalar = _scalar_tensor(value)
    if _is_bool(scalar):
        return bool(scalar)
    if isinstance(scalar, numbers.Integral) and int(scalar) in (0, 1):
        return bool(int(scalar))
    raise InvalidArgumentError(name, "a bool", _describe(value))


def as_optional_bool(name: str, value: Any) -> bool | None:
    """as_bool, with None passed through (an argument whose None means a default)."""
    return None if value is None else as_bool(name, value)


def as_float(name: str, value: Any, expected: str = "a finite float") -> float:
    """A real number (Python or numpy int / float, one-element tensor) -> a finite float.
    ``expected`` describes the valid values in the error message."""
    scalar = _scalar_tensor(value)
    if _is_bool(scalar) or not isinstance(scalar, numbers.Real) \
            or not math.isfinite(float(scalar)):
        raise InvalidArgumentError(name, expected, _describe(value))
    return float(scalar)


def as_window(value: Any) -> tuple[int, int]:
    """``window_size`` -> (left, right), each an int >= -1 (-1 = unbounded).

    Accepted: None (unbounded), one int-like w (meaning (w, w)), a tuple or list of two
    int-likes, a 1-D tensor or numpy array of two ints. Sides are not bounded above here;
    ``bound_window`` maps sides beyond any sequence's reach to -1."""
    expected = ("None, an int w (meaning (w, w)) or a pair of ints (left, right), -1 meaning "
                "unbounded: a tuple, a list or a 1-D int tensor of 2 elements")
    if value is None:
        return -1, -1
    if isinstance(value, torch.Tensor) or type(value).__module__ == "numpy":
        shape = tuple(value.shape)
        if shape in ((), (1,)):
            sides: Any = (value, value)
        elif shape == (2,):
            sides = (value[0], value[1])
        else:
            raise InvalidArgumentError("window_size", expected, f"a tensor of shape {shape}")
    elif isinstance(value, (list, tuple)):
        if len(value) != 2:
            raise InvalidArgumentError("window_size", expected, _describe(value))
        sides = value
    else:
        sides = (value, value)
    try:
        left, right = (as_int("window_size", s) for s in sides)
    except InvalidArgumentError:
        raise InvalidArgumentError("window_size", expected, _describe(value)) from None
    for side, w in (("left", left), ("right", right)):
        if w < -1:
            raise InvalidArgumentError("window_size", f"a {side} value >= -1 (-1 = unbounded)", w)
    return left, right


def bound_window(window: tuple[int, int], max_seqlen_q: int, max_seqlen_k: int
                 ) -> tuple[int, int]:
    """Replace each side that no sequence can reach with -1 (unbounded).

    Query i of a (sq, sk) sequence sees keys [i + sk - sq - left, i + sk - sq + right]
    (bottom-right alignment; top-left drops the sk - sq): a left side >= max(sq, sk) - 1 or
    a right side >= max(sq, sk) - 1 bounds nothing. Replacing sides >= max(max_seqlen_q,
    max_seqlen_k, 1) therefore changes no answer, and keeps every side a kernel sees far from
    int32 overflow (a side near 2**31 - 1 would wrap in the kernels' index arithmetic). A
    right side of 0 (causal) is never replaced."""
    reach = min(max(max_seqlen_q, max_seqlen_k, 1), INT32_MAX)
    left, right = window
    return (-1 if left >= reach else left), (-1 if right >= reach else right)


def _describe(value: Any) -> str:
    if isinstance(value, torch.Tensor):
        return f"a {value.dtype} tensor of shape {tuple(value.shape)}"
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
