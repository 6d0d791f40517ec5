"""Errors found while torch.compile traces a call, raised when the compiled code runs.

Under ``torch.compile(fullgraph=True)`` any exception raised while tracing reaches the caller
as dynamo's ``Unsupported``, whatever its type and message. So a call whose validation fails
while it is traced is compiled into the op ``attnhub::raise_error``, which raises the same
error (same class, same message) every time the compiled code runs. The graph carries the
guards of the facts that failed: a corrected call compiles anew.
"""

from __future__ import annotations

import operator

import torch

from .errors import AttnhubError, error_class

_SEP = "\x1f"


@torch.library.custom_op("attnhub::raise_error", mutates_args=())
def raise_error(like: torch.Tensor, error: str, args: str) -> torch.Tensor:
    """Raise ``error`` (a class name of attnhub.errors) built from ``args`` (its arguments
    as text, separated by \\x1f). ``like``: a tensor that makes the op part of the graph."""
    raise error_class(error)(*args.split(_SEP))


@raise_error.register_fake
def _raise_error_fake(like: torch.Tensor, error: str, args: str) -> torch.Tensor:
    return torch.empty_like(like)


if hasattr(torch.fx.node, "has_side_effect"):  # kept in the graph even when its output is not
    torch.fx.node.has_side_effect(torch.ops.attnhub.raise_error.default)


def _text(value: object) -> str:
    if isinstance(value, str):
        return value
    if isinstance(value, (list, tuple)) and all(isinstance(v, str) for v in value):
        return ", ".join(value)
    if isinstance(value, (int, torch.SymInt)):
        # operator.index specializes a traced int (int() would not): this graph only raises
        return str(operator.index(value))
    return str(value)


def deferred(exc: AttnhubError, like: object) -> torch.Tensor:
    """While tracing: a tensor shaped like ``like`` whose computation raises ``exc``."""
    if not isinstance(like, torch.Tensor):
        like = torch.empty(0)
    return raise_error(like, type(exc).__name__, _SEP.join([_text(a) for a in exc.args]))
