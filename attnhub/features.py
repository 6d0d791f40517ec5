"""The feature table: every optional feature of a call, declared once.

A :class:`Feature` says, for one feature (causal / window, softcap, ALiBi, dropout, paged KV,
custom masks, mask alignment, determinism, returned probabilities, attention sinks):

* which user arguments it reads and how they are converted and validated (``convert``, built
  on attnhub.arguments), giving its :class:`VarlenProblem` fields (static, part of the
  selection signature) and its :class:`VarlenInputs` tensors;
* its fields (:class:`Field`: name, type, default = feature off, signature key, how the custom
  op carries it) and tensors (:class:`TensorArg`: the op passes each as an optional tensor;
  ``grad`` names the :class:`Gradients` field of a differentiable one);
* its :class:`Capabilities` flags (:class:`Flag`), the sentence a backend's ``why_not`` gives
  when a call uses it outside those flags (``reasons``), its `attnhub info` columns
  (``columns``) and its short names in reports (``tags``).

VarlenProblem, VarlenInputs and Capabilities take their feature fields from this table;
``normalize``, ``Capabilities.reasons`` / ``summary``, ``VarlenProblem.signature`` /
``from_signature`` / ``features`` and the custom ops' packing (attnhub.ops) iterate over it.
A new feature is a declaration here, the reference backend's math, the kernels that opt in
(their Capabilities) and conformance cases.

This module imports nothing else of attnhub's core except arguments, errors, custom_mask and
the plain PagedLayout record: problem.py, inputs.py and capabilities.py are built from it.
"""

from __future__ import annotations

import operator
from collections.abc import Callable, Hashable
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, NamedTuple

import torch

from . import custom_mask as masks
from .arguments import as_bool, as_float, as_optional_bool, as_window, bound_window
from .errors import InvalidArgumentError
from .paged_layout import PagedLayout

if TYPE_CHECKING:
    from .capabilities import Capabilities
    from .problem import VarlenProblem


class Call(NamedTuple):
    """What a feature's ``convert`` may read about the call (already validated by normalize).

    cu_seqlens_*: int32 offsets on q's device; seqlens_*: host lengths or None; layout /
    block_table: the paged layout and the int32 table on q's device (None when not paged)."""

    q: torch.Tensor
    batch: int
    nheads: int
    device: torch.device
    cu_seqlens_q: torch.Tensor
    cu_seqlens_k: torch.Tensor
    seqlens_q: tuple[int, ...] | None
    seqlens_k: tuple[int, ...] | None
    max_seqlen_q: int
    max_seqlen_k: int
    layout: PagedLayout | None
    block_table: torch.Tensor | None


# (problem field -> value, inputs field -> tensor or None)
Converted = tuple[dict[str, Any], dict[str, "torch.Tensor | None"]]


def identity(value: Any) -> Any:
    return value


@dataclass(frozen=True)
class Field:
    """One VarlenProblem field. ``op``: the custom-op schema type that carries the value
    (``None``: the op rebuilds it from tensors and shapes through ``Feature.from_op``).
    ``to_key`` / ``from_key``: the value in the selection signature and back (identity by
    default); ``to_op`` / ``from_op``: the value as the op argument and back."""

    name: str
    annotation: str
    default: Any
    op: str | None
    to_key: Callable[[Any], Hashable] = identity
    from_key: Callable[[Any], Any] = identity
    to_op: Callable[[Any], Any] = identity
    from_op: Callable[[Any], Any] = identity


@dataclass(frozen=True)
class TensorArg:
    """One VarlenInputs tensor (an optional tensor argument of the custom ops). ``grad``: the
    Gradients field holding its gradient (differentiable inputs, e.g. ``dsinks``)."""

    name: str
    grad: str | None = None


@dataclass(frozen=True)
class Flag:
    """One Capabilities field: name, annotation, default (what a backend that does not
    mention it claims)."""

    name: str
    annotation: str
    default: Any


@dataclass(frozen=True)
class Feature:
    """One optional feature, declared once (see the module docstring).

    ``arguments``: the user keyword arguments ``convert`` reads, with ``defaults``.
    ``convert(call, *values)``: validated problem fields and input tensors.
    ``from_op(q, k, tensors, seqlens_k)``: fields the op cannot carry as scalars (``Field.op``
    None), rebuilt inside the op from its tensors (``tensors``: name -> tensor or None).
    ``reasons(caps, problem)``: sentences for what ``caps`` cannot compute of this feature.
    ``columns``: (`attnhub info` column, text of caps). ``tags(problem)``: short names for
    reports and errors (empty when the call does not use it)."""

    name: str
    fields: tuple[Field, ...]
    arguments: tuple[str, ...]
    defaults: tuple[Any, ...]
    convert: Callable[..., Converted]
    reasons: Callable[[Capabilities, VarlenProblem], list[str]]
    columns: tuple[tuple[str, Callable[[Capabilities], str]], ...]
    tags: Callable[[VarlenProblem], list[str]]
    flags: tuple[Flag, ...] = ()
    tensors: tuple[TensorArg, ...] = ()
    from_op: Callable[..., dict[str, Any]] | None = None
    doc: str = ""


def _yes(flag: bool) -> str:
    return "yes" if flag else "no"


def _specialized(x: Any) -> Any:
    """A float traced as dynamic (torch.compile) is specialized here: it is a constant of the
    op and of the selection key. (float.__float__: float() keeps it symbolic.)"""
    return x.__float__() if isinstance(x, float) else x


# -- causal and sliding window --------------------------------------------------------------

def window_argument(window_size: Any, causal: Any) -> tuple[int, int]:
    """``window_size`` and ``causal`` -> (left, right), -1 = unbounded (causal: right = 0)."""
    left, right = as_window(window_size)
    if as_bool("causal", causal):
        right = 0
    return left, right


def _convert_window(call: Call, window_size: Any, causal: Any) -> Converted:
    left, right = window_argument(window_size, causal)
    window = bound_window((operator.index(left), operator.index(right)), call.max_seqlen_q,
                          call.max_seqlen_k)
    return {"causal": window[1] == 0, "window": window}, {}


def _window_reasons(caps: Capabilities, p: VarlenProblem) -> list[str]:
    out = []
    if not caps.causal and p.causal:
        out.append("causal masking is not supported")
    if not caps.window and p.has_window:
        out.append(f"sliding window {p.window} is not supported")
    return out


def _window_tags(p: VarlenProblem) -> list[str]:
    return (["causal"] if p.causal else []) + (["window"] if p.has_window else [])


WINDOW = Feature(
    name="window",
    fields=(Field("causal", "bool", False, "bool"),
            Field("window", "tuple[int, int]", (-1, -1), "int[]", to_op=list, from_op=tuple)),
    arguments=("window_size", "causal"), defaults=(None, False),
    convert=_convert_window, reasons=_window_reasons,
    columns=(("causal", lambda c: _yes(c.causal)), ("window", lambda c: _yes(c.window))),
    tags=_window_tags,
    flags=(Flag("causal", "bool", True), Flag("window", "bool", True)),
    doc="``window`` (left, right), -1 = unbounded, folded with ``causal`` (causal implies "
        "right == 0, and right == 0 implies causal).")


# -- softcap -------------------------------------------------------------------------------

def softcap_argument(softcap: Any) -> float:
    """``softcap`` -> a float >= 0, 0.0 = off (None too)."""
    if softcap is None:
        return 0.0
    softcap = _specialized(softcap)
    expected = "a finite float >= 0 (0 or None = off)"
    cap = as_float("softcap", softcap, expected)
    if cap < 0:
        raise InvalidArgumentError("softcap", expected, repr(softcap))
    return cap


def _convert_softcap(call: Call, softcap: Any) -> Converted:
    return {"softcap": softcap_argument(softcap)}, {}


SOFTCAP = Feature(
    name="softcap",
    fields=(Field("softcap", "float", 0.0, "float"),),
    arguments=("softcap",), defaults=(None,),
    convert=_convert_softcap,
    reasons=lambda c, p: [f"softcap ({p.softcap}) is not supported"]
    if not c.softcap and p.softcap > 0 else [],
    columns=(("softcap", lambda c: _yes(c.softcap)),),
    tags=lambda p: ["softcap"] if p.softcap > 0 else [],
    flags=(Flag("softcap", "bool", True),),
    doc="``softcap`` 0.0 means off.")


# -- ALiBi ---------------------------------------------------------------------------------

def _convert_alibi(call: Call, slopes: Any) -> Converted:
    if slopes is None:
        return {"alibi": None}, {"alibi_slopes": None}
    if not isinstance(slopes, torch.Tensor):
        raise InvalidArgumentError("alibi_slopes", "a float32 tensor", type(slopes).__name__)
    if slopes.dtype != torch.float32:
        raise InvalidArgumentError("alibi_slopes", "dtype float32", slopes.dtype)
    if slopes.device != call.device:
        raise InvalidArgumentError("alibi_slopes", f"the device of q ({call.device})",
                                   slopes.device)
    batch, nheads = call.batch, call.nheads
    if tuple(slopes.shape) == (nheads,):
        kind = "head"
    elif tuple(slopes.shape) == (batch, nheads):
        kind = "batch_head"
    else:
        raise InvalidArgumentError("alibi_slopes", f"shape (nheads,) = ({nheads},) or (batch, "
                                   f"nheads) = ({batch}, {nheads})", f"shape {tuple(slopes.shape)}")
    return {"alibi": kind}, {"alibi_slopes": slopes}


def _alibi_reasons(c: Capabilities, p: VarlenProblem) -> list[str]:
    if p.alibi is None or p.alibi in c.alibi:
        return []
    shape = "(nheads,)" if p.alibi == "head" else "(batch, nheads)"
    return [f"ALiBi slopes of shape {shape} are not supported"]


ALIBI = Feature(
    name="alibi",
    fields=(Field("alibi", "AlibiKind | None", None, "str?"),),
    arguments=("alibi_slopes",), defaults=(None,),
    convert=_convert_alibi, reasons=_alibi_reasons,
    columns=(("alibi", lambda c: "/".join(sorted(c.alibi)) or "no"),),
    tags=lambda p: [f"alibi({p.alibi})"] if p.alibi is not None else [],
    flags=(Flag("alibi", "frozenset[str]", frozenset({"head", "batch_head"})),),
    tensors=(TensorArg("alibi_slopes"),),
    doc="``alibi``: the shape of the float32 slopes, 'head' (nheads,) or 'batch_head' "
        "(batch, nheads), or None.")


# -- dropout -------------------------------------------------------------------------------

def _convert_dropout(call: Call, dropout_p: Any) -> Converted:
    dropout_p = _specialized(dropout_p)
    p = as_float("dropout_p", dropout_p, "a float in [0, 1)")
    if not 0.0 <= p < 1.0:
        raise InvalidArgumentError("dropout_p", "a float in [0, 1)", repr(dropout_p))
    return {"dropout_p": p}, {}


DROPOUT = Feature(
    name="dropout",
    fields=(Field("dropout_p", "float", 0.0, "float"),),
    arguments=("dropout_p",), defaults=(0.0,),
    convert=_convert_dropout,
    reasons=lambda c, p: [f"dropout (p = {p.dropout_p}) is not supported"]
    if not c.dropout and p.dropout_p > 0 else [],
    columns=(("dropout", lambda c: _yes(c.dropout)),),
    tags=lambda p: ["dropout"] if p.dropout_p > 0 else [],
    flags=(Flag("dropout", "bool", True),),
    # In forward, None (the backend draws from torch's generator) or, for the reference
    # backend, a fixed int64 (2,) seed pair; in backward, what the same backend's forward
    # returned.
    tensors=(TensorArg("rng_state"),),
    doc="``dropout_p`` in [0, 1), 0.0 = off.")


# -- paged KV ------------------------------------------------------------------------------

def _convert_paged(call: Call) -> Converted:  # the layout is part of normalize's shape checks
    return {"paged": call.layout}, {"block_table": call.block_table}


def _paged_from_op(q: torch.Tensor, k: torch.Tensor, tensors: dict, seqlens_k: Any
                   ) -> dict[str, Any]:
    table = tensors["block_table"]
    if table is None:
        return {"paged": None}
    return {"paged": PagedLayout(num_pages=k.shape[0], page_size=k.shape[1],
                                 max_pages=table.shape[1]),
            "total_k": sum(seqlens_k) if seqlens_k is not None else -1}


def _paged_reasons(c: Capabilities, p: VarlenProblem) -> list[str]:
    if p.paged is None:
        return []
    m = c.page_size_multiple
    if m is None:
        return ["paged KV (block_table) is not supported"]
    if p.paged.page_size % m:
        return [f"paged KV with page_size {p.paged.page_size} is not supported (needs a "
                f"multiple of {m})"]
    return []


def _paged_column(c: Capabilities) -> str:
    m = c.page_size_multiple
    return "no" if m is None else ("yes" if m == 1 else f"page%{m}")


PAGED = Feature(
    name="paged",
    # The signature keeps the page size only (pool size and table width are lengths).
    fields=(Field("paged", "PagedLayout | None", None, None,
                  to_key=lambda x: x.page_size if x is not None else None,
                  from_key=lambda x: PagedLayout(0, x, 0) if x is not None else None),),
    arguments=(), defaults=(),
    convert=_convert_paged, reasons=_paged_reasons,
    columns=(("paged", _paged_column),),
    tags=lambda p: [f"paged(page_size={p.paged.page_size})"] if p.paged is not None else [],
    flags=(Flag("page_size_multiple", "int | None", 1),),
    tensors=(TensorArg("block_table"),),
    from_op=_paged_from_op,
    doc="``paged``: the page pools' layout (block_table), or None.")


# -- custom masks --------------------------------------------------------------------------

def _convert_custom_mask(call: Call, mask: Any) -> Converted:
    if mask is None:
        return {"custom_mask": False}, {"custom_mask": None, "custom_mask_offsets": None}
    if not isinstance(mask, masks.PackedMask):
        mask = masks.from_bool(mask, call.cu_seqlens_q, call.cu_seqlens_k, call.seqlens_q,
                               call.seqlens_k)
    packed = masks.check(mask, call.batch, call.device)
    return {"custom_mask": True}, {"custom_mask": packed.bits,
                                   "custom_mask_offsets": packed.offsets}


def _custom_mask_reasons(c: Capabilities, p: VarlenProblem) -> list[str]:
    if p.custom_mask and not c.custom_mask:
        return ["custom masks (a per-request boolean mask) are not supported"]
    if p.custom_mask and p.requires_grad and not c.custom_mask_backward:
        return ["backward with a custom mask is not implemented"]
    return []


CUSTOM_MASK = Feature(
    name="custom_mask",
    fields=(Field("custom_mask", "bool", False, None),),
    arguments=("custom_mask",), defaults=(None,),
    convert=_convert_custom_mask, reasons=_custom_mask_reasons,
    columns=(("mask", lambda c: ("fwd" if not c.custom_mask_backward else "yes")
              if c.custom_mask else "no"),),
    tags=lambda p: ["custom_mask"] if p.custom_mask else [],
    flags=(Flag("custom_mask", "bool", False), Flag("custom_mask_backward", "bool", True)),
    # The bit-packed per-request mask (uint8, little bit order) and the int64 (batch,) bit
    # offset of each request's (sq, sk) block (attnhub.custom_mask).
    tensors=(TensorArg("custom_mask"), TensorArg("custom_mask_offsets")),
    from_op=lambda q, k, tensors, seqlens_k: {"custom_mask": tensors["custom_mask"] is not None},
    doc="``custom_mask``: the call carries a per-request boolean mask (attnhub.custom_mask), "
        "applied on top of ``window``.")


# -- mask alignment ------------------------------------------------------------------------

_ALIGNMENTS = ("bottom_right", "top_left")


def _convert_alignment(call: Call, alignment: Any) -> Converted:
    if alignment not in _ALIGNMENTS:
        raise InvalidArgumentError("mask_alignment", "'bottom_right' or 'top_left'",
                                   repr(alignment))
    return {"mask_alignment": alignment}, {}


MASK_ALIGNMENT = Feature(
    name="top_left",
    fields=(Field("mask_alignment", "MaskAlignment", "bottom_right", "str"),),
    arguments=("mask_alignment",), defaults=("bottom_right",),
    convert=_convert_alignment,
    reasons=lambda c, p: ["top-left mask alignment (Paddle's convention) is not supported"]
    if not c.top_left and p.mask_alignment == "top_left" else [],
    columns=(("top_left", lambda c: _yes(c.top_left)),),
    tags=lambda p: ["top_left"] if p.mask_alignment != "bottom_right" else [],
    flags=(Flag("top_left", "bool", True),),
    doc="``mask_alignment``: where a (sq, sk) sequence's causal / window diagonal sits.")


# -- determinism ---------------------------------------------------------------------------

def _convert_deterministic(call: Call, deterministic: Any) -> Converted:
    flag = as_optional_bool("deterministic", deterministic)
    if flag is None:
        flag = torch.are_deterministic_algorithms_enabled()
    return {"deterministic": bool(flag)}, {}


DETERMINISTIC = Feature(
    name="deterministic",
    fields=(Field("deterministic", "bool", False, "bool"),),
    arguments=("deterministic",), defaults=(None,),
    convert=_convert_deterministic,
    reasons=lambda c, p: ["a deterministic backward is not available"]
    if p.requires_grad and p.deterministic and not c.deterministic_backward else [],
    columns=(("determ.", lambda c: _yes(c.deterministic_backward)),),
    tags=lambda p: ["deterministic"] if p.deterministic else [],
    flags=(Flag("deterministic_backward", "bool", True),),
    doc="``deterministic``: the backward must be bitwise reproducible.")


# -- returned probabilities ----------------------------------------------------------------

def _convert_probs(call: Call, return_attn_probs: Any) -> Converted:
    return {"return_probs": bool(as_optional_bool("return_attn_probs", return_attn_probs))}, {}


RETURN_PROBS = Feature(
    name="probs",
    fields=(Field("return_probs", "bool", False, "bool"),),
    arguments=("return_attn_probs",), defaults=(None,),
    convert=_convert_probs,
    reasons=lambda c, p: ["return_attn_probs is not supported"]
    if not c.return_probs and p.return_probs else [],
    columns=(("probs", lambda c: _yes(c.return_probs)),),
    tags=lambda p: ["probs"] if p.return_probs else [],
    flags=(Flag("return_probs", "bool", True),),
    doc="``return_probs``: the call returns the attention probabilities.")


# -- attention sinks -----------------------------------------------------------------------

def check_sinks(sinks: Any, nheads: int, device: torch.device) -> torch.Tensor:
    """``sinks`` validated: a float32 (nheads,) tensor on ``device``, made contiguous."""
    if not isinstance(sinks, torch.Tensor):
        raise InvalidArgumentError("sinks", f"a float32 tensor of shape (nheads,) = ({nheads},)",
                                   type(sinks).__name__)
    if sinks.dtype != torch.float32:
        raise InvalidArgumentError("sinks", "dtype float32 (one logit per query head)",
                                   sinks.dtype)
    if tuple(sinks.shape) != (nheads,):
        raise InvalidArgumentError("sinks", f"shape (nheads,) = ({nheads},) (one logit per "
                                   "query head)", f"shape {tuple(sinks.shape)}")
    if sinks.device != device:
        raise InvalidArgumentError("sinks", f"the device of q ({device})", sinks.device)
    return sinks if sinks.is_contiguous() else sinks.contiguous()


def _convert_sinks(call: Call, sinks: Any) -> Converted:
    if sinks is None:
        return {"sinks": False}, {"sinks": None}
    return {"sinks": True}, {"sinks": check_sinks(sinks, call.nheads, call.device)}


def _sinks_reasons(c: Capabilities, p: VarlenProblem) -> list[str]:
    if p.sinks and not c.sinks:
        return ["attention sinks (sinks=) are not supported"]
    if p.sinks and p.requires_grad and not c.sinks_backward:
        return ["backward with attention sinks is not implemented"]
    return []


SINKS = Feature(
    name="sinks",
    fields=(Field("sinks", "bool", False, None),),
    arguments=("sinks",), defaults=(None,),
    convert=_convert_sinks, reasons=_sinks_reasons,
    columns=(("sinks", lambda c: ("fwd" if not c.sinks_backward else "yes")
              if c.sinks else "no"),),
    tags=lambda p: ["sinks"] if p.sinks else [],
    flags=(Flag("sinks", "bool", False), Flag("sinks_backward", "bool", True)),
    # float32 (nheads,): one logit per query head joining every row's softmax denominator.
    tensors=(TensorArg("sinks", grad="dsinks"),),
    from_op=lambda q, k, tensors, seqlens_k: {"sinks": tensors["sinks"] is not None},
    doc="``sinks``: the call carries attention sinks, one float32 logit per query head that "
        "joins every row's softmax denominator and takes no value (docs/semantics.md).")


FEATURES: tuple[Feature, ...] = (WINDOW, SOFTCAP, ALIBI, PAGED, DROPOUT, CUSTOM_MASK,
                                 MASK_ALIGNMENT, DETERMINISTIC, RETURN_PROBS, SINKS)
"""Every optional feature, in the order of the problem's fields, the op's arguments, the
reasons and the `attnhub info` columns."""

FIELDS: tuple[Field, ...] = tuple(f for feature in FEATURES for f in feature.fields)
TENSORS: tuple[TensorArg, ...] = tuple(t for feature in FEATURES for t in feature.tensors)
GRAD_TENSORS: tuple[TensorArg, ...] = tuple(t for t in TENSORS if t.grad is not None)
FLAGS: tuple[Flag, ...] = tuple(f for feature in FEATURES for f in feature.flags)
ARGUMENTS: dict[str, Any] = {a: d for feature in FEATURES
                             for a, d in zip(feature.arguments, feature.defaults, strict=True)}
"""The feature keyword arguments ``normalize`` takes, with their defaults (feature off)."""


def convert(call: Call, options: dict[str, Any]) -> tuple[dict[str, Any], dict[str, Any]]:
    """Every feature's problem fields and input tensors for a call with keyword ``options``
    (feature argument -> value; a missing one takes its default)."""
    unknown = options.keys() - ARGUMENTS.keys()
    if unknown:
        raise TypeError(f"unexpected keyword argument {sorted(unknown)[0]!r} (attnhub's "
                        f"feature arguments: {', '.join(ARGUMENTS)})")
    fields: dict[str, Any] = {}
    tensors: dict[str, Any] = {}
    get = options.get
    for feature in FEATURES:
        f, t = feature.convert(call, *(get(a, d) for a, d in zip(
            feature.arguments, feature.defaults, strict=True)))
        fields.update(f)
        tensors.update(t)
    return fields, tensors
