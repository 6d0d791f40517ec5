"""VarlenProblem: the validated, immutable description of one varlen attention call."""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Literal

import torch

MaskAlignment = Literal["bottom_right", "top_left"]
AlibiKind = Literal["head", "batch_head"]


@dataclass(frozen=True)
class PagedLayout:
    """K/V page pools of shape (num_pages, page_size, nheads_k, head_dim) and a block table
    of shape (batch, max_pages) naming each sequence's pages in order."""

    num_pages: int
    page_size: int
    max_pages: int


@dataclass(frozen=True)
class VarlenProblem:
    """Everything a backend needs to decide whether, and how, it computes one call.

    Lengths are in tokens. ``window`` is (left, right) with -1 meaning unbounded, already
    folded with ``causal`` (causal implies right == 0, and right == 0 implies causal).
    ``softcap`` 0.0 means off. ``custom_mask``: the call carries a per-request boolean mask
    (attnhub.custom_mask), applied on top of ``window``. ``seqlens_q`` / ``seqlens_k`` are
    host tuples when the caller gave host data (a list, a CPU tensor, a VarlenInfo), else
    None. ``total_k`` is the packed K/V row count, or for a paged layout the sum of the kv
    lengths when known (else -1).
    """

    device_type: str
    dtype: torch.dtype
    batch: int
    total_q: int
    total_k: int
    nheads: int
    nheads_k: int
    head_dim: int
    max_seqlen_q: int
    max_seqlen_k: int
    scale: float
    causal: bool = False
    window: tuple[int, int] = (-1, -1)
    softcap: float = 0.0
    alibi: AlibiKind | None = None
    dropout_p: float = 0.0
    paged: PagedLayout | None = None
    requires_grad: bool = False
    deterministic: bool = False
    mask_alignment: MaskAlignment = "bottom_right"
    return_probs: bool = False
    custom_mask: bool = False
    seqlens_q: tuple[int, ...] | None = field(default=None, repr=False)
    seqlens_k: tuple[int, ...] | None = field(default=None, repr=False)
    _facts: tuple[bool | None, bool | None] = field(default=(None, None), repr=False,
                                                    compare=False)

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
        (so torch.compile can fold it): every field except the lengths, the page count and the
        block table width, plus the length facts (sq <= sk, sq == sk) and whether every
        sequence has at most one query row (decode: max_seqlen_q <= 1, which some kernels
        treat as a separate regime)."""
        return (
            self.device_type, self.dtype, self.nheads, self.nheads_k, self.head_dim,
            self.scale, self.causal, self.window, self.softcap, self.alibi, self.dropout_p,
            self.paged.page_size if self.paged is not None else None, self.requires_grad,
            self.deterministic, self.mask_alignment, self.return_probs, self.length_facts(),
            self.custom_mask, True if self.max_seqlen_q <= 1 else False,  # noqa: SIM210 (a branch
            # guards a traced int into a constant; bool() would keep it symbolic)
        )

    @classmethod
    def from_signature(cls, sig: tuple) -> VarlenProblem:
        """A problem with ``sig``'s static part and no lengths: what ``Backend.why_not`` sees
        when selection runs from a signature (torch.compile tracing, cached selections).
        max_seqlen_q is 1 for a decode signature, else 0 (unknown)."""
        (device_type, dtype, nheads, nheads_k, head_dim, scale, causal, window, softcap, alibi,
         dropout_p, page_size, requires_grad, deterministic, mask_alignment, return_probs,
         facts, custom_mask, decode) = sig
        problem = cls(
            device_type=device_type, dtype=dtype, batch=0, total_q=0, total_k=0, nheads=nheads,
            nheads_k=nheads_k, head_dim=head_dim, max_seqlen_q=1 if decode else 0,
            max_seqlen_k=0, scale=scale,
            causal=causal, window=window, softcap=softcap, alibi=alibi, dropout_p=dropout_p,
            paged=PagedLayout(0, page_size, 0) if page_size is not None else None,
            requires_grad=requires_grad, deterministic=deterministic,
            mask_alignment=mask_alignment, return_probs=return_probs, custom_mask=custom_mask)
        object.__setattr__(problem, "_facts", facts)
        return problem

    def features(self) -> list[str]:
        """Short names of the optional features this call uses (for reports and errors)."""
        out = []
        if self.nheads != self.nheads_k:
            out.append("mqa" if self.nheads_k == 1 else "gqa")
        if self.causal:
            out.append("causal")
        if self.has_window:
            out.append("window")
        if self.softcap > 0:
            out.append("softcap")
        if self.alibi is not None:
            out.append(f"alibi({self.alibi})")
        if self.dropout_p > 0:
            out.append("dropout")
        if self.paged is not None:
            out.append(f"paged(page_size={self.paged.page_size})")
        if self.custom_mask:
            out.append("custom_mask")
        if self.mask_alignment != "bottom_right":
            out.append("top_left")
        if self.requires_grad:
            out.append("grad")
        if self.deterministic:
            out.append("deterministic")
        if self.return_probs:
            out.append("probs")
        return out

