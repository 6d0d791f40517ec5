"""Problem classes: the coarse description of a call that measured selection ranks backends by.

A class is what a measured cost table (attnhub.cost_tables) stores one {backend: ms} entry
for: dtype, head-dim bucket, GQA ratio bucket, mask kind, length bucket, and whether the call
runs backward. Everything but the length bucket comes from the problem's static part
(``VarlenProblem.signature()``); the length bucket comes from sizes the host knows without a
device sync (``total_q``, ``max_seqlen_k``, heads, head dim), so selection stays a cached,
sync-free lookup.

Length buckets, in this order of precedence:

* ``decode``: every sequence has at most one query row (the signature's decode flag);
* ``tiny`` / ``tiny-host``: ``total_q * max_seqlen_k * nheads * head_dim <= TINY_WORK``
  (2**31, at most ~8.6 GFLOP of forward work: tens of microseconds on an H100 / H200, where
  host paths of 30-250 us per call dominate; 8 sequences of 64 tokens with 32 heads of 128
  are 2**27); on an accelerator ``tiny-host`` when the host knows the lengths (a VarlenInfo
  or host lists), ``tiny`` when the call has device offsets only: the backends' host paths
  differ between the two (a table without ``tiny-host`` figures uses ``tiny``'s); on the CPU
  offsets are host data, and a tiny call is ``tiny``. Not used while
  torch.compile traces (``total_q`` changes from step to step there and is not read, so it
  adds no guard);
* ``short`` / ``medium`` / ``long``: ``max_seqlen_k`` at most 256, at most 4096, above 4096
  (traced, a max_seqlen that is not a constant gets a guard on its bucket: at most one graph
  per bucket).
"""

from __future__ import annotations

from typing import NamedTuple

import torch

from .problem import VarlenProblem

TINY_WORK = 2**31
SHORT_MAX = 256
MEDIUM_MAX = 4096
HEAD_DIM_BUCKETS = (64, 96, 128, 192, 256)
GROUPS = ("1", "2-8", "9+")
MASKS = ("none", "causal", "window", "softcap", "alibi", "dropout", "paged", "custom")
LENGTHS = ("tiny", "tiny-host", "decode", "short", "medium", "long")
PASSES = ("fwd", "fwd+bwd")


class ProblemClass(NamedTuple):
    """One cell of a cost table. ``head_dim``: the smallest of HEAD_DIM_BUCKETS at or above
    the call's head dim (the next power of two above 256); ``group``: query heads per kv head,
    "1" (MHA), "2-8" (GQA) or "9+" (wide GQA, MQA with many heads); ``mask``: the costliest
    masking feature the call uses (MASKS, later wins); ``length``: LENGTHS;
    ``backward``: inputs require grad (the table then holds forward + backward times)."""

    dtype: str
    head_dim: int
    group: str
    mask: str
    length: str
    backward: bool

    def key(self) -> str:
        """The table key, e.g. ``bfloat16/d128/g2-8/causal/short/fwd+bwd``."""
        return "/".join((self.dtype, f"d{self.head_dim}", f"g{self.group}", self.mask,
                         self.length, PASSES[self.backward]))

    @classmethod
    def parse(cls, key: str) -> ProblemClass:
        """The inverse of ``key``; ValueError naming what is wrong."""
        parts = key.split("/")
        if len(parts) != 6:
            raise ValueError(f"class key {key!r}: expected dtype/dHEAD_DIM/gGROUP/mask/length/"
                             "pass (6 fields)")
        dtype, head, group, mask, length, passes = parts
        if not isinstance(getattr(torch, dtype, None), torch.dtype):
            raise ValueError(f"class key {key!r}: unknown dtype {dtype!r}")
        if not (head.startswith("d") and head[1:].isdigit()):
            raise ValueError(f"class key {key!r}: head dim field {head!r} is not dN")
        checks = ((group[1:] if group.startswith("g") else group, GROUPS, "group"),
                  (mask, MASKS, "mask"), (length, LENGTHS, "length"), (passes, PASSES, "pass"))
        for value, allowed, what in checks:
            if value not in allowed:
                raise ValueError(f"class key {key!r}: {what} {value!r} is not one of "
                                 f"{', '.join(allowed)}")
        return cls(dtype, int(head[1:]), group[1:], mask, length, passes == "fwd+bwd")


def size_bucket(problem: VarlenProblem) -> str:
    """decode / tiny / short / medium / long from the call's host-known sizes (no device
    sync)."""
    max_k = problem.max_seqlen_k
    if problem.max_seqlen_q <= 1:
        return "decode"
    if not torch.compiler.is_compiling() and \
            problem.total_q * max_k * problem.nheads * problem.head_dim <= TINY_WORK:
        host = problem.lengths_known and problem.device_type != "cpu"
        return "tiny-host" if host else "tiny"
    if max_k <= SHORT_MAX:
        return "short"
    return "medium" if max_k <= MEDIUM_MAX else "long"


def head_dim_bucket(head_dim: int) -> int:
    for edge in HEAD_DIM_BUCKETS:
        if head_dim <= edge:
            return edge
    return 1 << (head_dim - 1).bit_length()


def group_bucket(nheads: int, nheads_k: int) -> str:
    group = nheads // nheads_k
    return "1" if group == 1 else ("2-8" if group <= 8 else "9+")


def mask_kind(problem: VarlenProblem) -> str:
    """The costliest masking feature of the call (MASKS order: a later one wins)."""
    kind = "causal" if problem.causal else "none"
    for name, used in (("window", problem.has_window), ("softcap", problem.softcap > 0),
                       ("alibi", problem.alibi is not None), ("dropout", problem.dropout_p > 0),
                       ("paged", problem.paged is not None), ("custom", problem.custom_mask)):
        if used:
            kind = name
    return kind


def classify(problem: VarlenProblem, size: str) -> ProblemClass:
    """The class of ``problem`` (only its static part is read: a problem rebuilt from its
    signature classifies the same) with length bucket ``size`` (from ``size_bucket``)."""
    return ProblemClass(
        dtype=str(problem.dtype).removeprefix("torch."),
        head_dim=head_dim_bucket(problem.head_dim),
        group=group_bucket(problem.nheads, problem.nheads_k),
        mask=mask_kind(problem),
        length=size,
        backward=problem.requires_grad,
    )
