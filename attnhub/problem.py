"""VarlenProblem: the validated, immutable description of one varlen attention call."""

from __future__ import annotations

import dataclasses
import operator
from typing import Literal

import torch

from .features import FEATURES, FIELDS, identity
from .paged_layout import PagedLayout

MaskAlignment = Literal["bottom_right", "top_left"]
AlibiKind = Literal["head", "batch_head"]

__all__ = ["AlibiKind", "MaskAlignment", "PagedLayout", "VarlenProblem"]

# The call's shape: selection depends on these (besides the features).
_CORE = (("device_type", "str"), ("dtype", "torch.dtype"), ("batch", "int"), ("total_q", "int"),
         ("total_k", "int"), ("nheads", "int"), ("nheads_k", "int"), ("head_dim", "int"),
         ("max_seqlen_q", "int"), ("max_seqlen_k", "int"), ("scale", "float"))
_NAMES = tuple(f.name for f in FIELDS)
_is_compiling = torch.compiler.is_compiling
_VALUES = operator.attrgetter(*_NAMES)  # (one C call: signature() runs on every full-path call)
_KEYED = tuple((i, f.to_key) for i, f in enumerate(FIELDS) if f.to_key is not identity)
_FROM_KEY = tuple(f.from_key for f in FIELDS)
_N = len(FIELDS)


class _Problem:
    """Everything a backend needs to decide whether, and how, it computes one call.

    Lengths are in tokens. ``scale`` multiplies q.k. ``seqlens_q`` / ``seqlens_k`` are
    host tuples when the caller gave host data (a list, a CPU tensor, a VarlenInfo), else
    None. ``total_k`` is the packed K/V row count, or for a paged layout the sum of the kv
    lengths when known (else -1). ``requires_grad``: autograd will run backward.

    The feature fields (attnhub.features, one declaration each; the default is "off"):
    """

    __slots__ = ()

    @property
    def group_size(self) -> int:
        """Query heads per kv head (1 = MHA, nheads = MQA)."""
        return self.nheads // self.nheads_k

    @property
    def has_window(self) -> bool:
        """A bound other than plain causal: a finite left side, or a finite right side > 0."""
        left, right = self.window
        return left >= 0 or (right >= 0 and not self.causal)

    @property
    def lengths_known(self) -> bool:
        return self.seqlens_q is not None and self.seqlens_k is not None

    def length_facts(self) -> tuple[bool | None, bool | None]:
        """(every sq <= sk, every sq == sk), or None where the host lengths are unknown."""
        if self.seqlens_q is None or self.seqlens_k is None:
            return self._facts
        if self.seqlens_q is self.seqlens_k:  # one layout for both sides (self-attention)
            return True, True
        pairs = tuple(zip(self.seqlens_q, self.seqlens_k, strict=True))
        return all(a <= b for a, b in pairs), all(a == b for a, b in pairs)

    def signature(self) -> tuple:
        """The static part that backend selection depends on, as a tuple of plain constants
        (so torch.compile can fold it): the dtype, device type, heads, head dim, scale, grad
        mode and every feature field's key (attnhub.features), plus the length facts
        (sq <= sk, sq == sk) and whether every sequence has at most one query row (decode:
        max_seqlen_q <= 1, which some kernels treat as a separate regime). Lengths, page
        counts and the block table width are left out."""
        # (dynamo cannot trace an attrgetter call; traced, this runs once per graph)
        keys = [getattr(self, n) for n in _NAMES] if _is_compiling() else _VALUES(self)
        if _KEYED:
            keys = list(keys)
            for i, to_key in _KEYED:
                keys[i] = to_key(keys[i])
        return (
            self.device_type, self.dtype, self.nheads, self.nheads_k, self.head_dim,
            self.scale, self.requires_grad, *keys, self.length_facts(),
            True if self.max_seqlen_q <= 1 else False,  # noqa: SIM210 (a branch guards a
            # traced int into a constant; bool() would keep it symbolic)
        )

    @classmethod
    def from_signature(cls, sig: tuple) -> VarlenProblem:
        """A problem with ``sig``'s static part and no lengths: what ``Backend.why_not`` sees
        when selection runs from a signature (torch.compile tracing, cached selections).
        max_seqlen_q is 1 for a decode signature, else 0 (unknown)."""
        device_type, dtype, nheads, nheads_k, head_dim, scale, requires_grad = sig[:7]
        keys, facts, decode = sig[7:7 + _N], sig[7 + _N], sig[8 + _N]
        problem = cls(
            device_type=device_type, dtype=dtype, batch=0, total_q=0, total_k=0, nheads=nheads,
            nheads_k=nheads_k, head_dim=head_dim, max_seqlen_q=1 if decode else 0,
            max_seqlen_k=0, scale=scale, requires_grad=requires_grad,
            **{name: back(key) for name, back, key in zip(_NAMES, _FROM_KEY, keys,
                                                           strict=True)})
        object.__setattr__(problem, "_facts", facts)
        return problem

    def features(self) -> list[str]:
        """Short names of the optional features this call uses (for reports and errors)."""
        out = []
        if self.nheads != self.nheads_k:
            out.append("mqa" if self.nheads_k == 1 else "gqa")
        for feature in FEATURES:
            out += feature.tags(self)
        if self.requires_grad:
            out.append("grad")
        return out


_Problem.__doc__ = (_Problem.__doc__ or "") + "".join(
    f"\n    * {feature.doc}" for feature in FEATURES if feature.doc) + "\n"

# The class is built from the feature table, so that a feature's fields are declared once.
VarlenProblem = dataclasses.make_dataclass(
    "VarlenProblem",
    [*_CORE,
     *((f.name, f.annotation, dataclasses.field(default=f.default)) for f in FIELDS),
     ("requires_grad", "bool", dataclasses.field(default=False)),
     ("seqlens_q", "tuple[int, ...] | None", dataclasses.field(default=None, repr=False)),
     ("seqlens_k", "tuple[int, ...] | None", dataclasses.field(default=None, repr=False)),
     ("_facts", "tuple[bool | None, bool | None]",
      dataclasses.field(default=(None, None), repr=False, compare=False))],
    bases=(_Problem,), frozen=True, namespace={"__doc__": _Problem.__doc__})
VarlenProblem.__module__ = __name__
