"""Conformance cases: seeded problem descriptions, and the quick (CPU) and full (GPU) tiers."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

HEAD_DIMS = (32, 64, 72, 80, 96, 128, 192, 256)
_DTYPE_NAMES = {torch.float16: "fp16", torch.bfloat16: "bf16", torch.float32: "fp32",
                torch.float64: "fp64"}


@dataclass(frozen=True)
class Case:
    """One conformance problem. ``feature`` is the report column it belongs to."""

    feature: str
    label: str
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    dtype: torch.dtype = torch.float16
    head_dim: int = 64
    nheads: int = 4
    nheads_k: int = 2
    causal: bool = False
    window: tuple[int, int] | None = None
    softcap: float = 0.0
    alibi: str | None = None  # "head" or "batch_head"
    page_size: int | None = None
    dropout_p: float = 0.0
    sinks: bool = False  # attention sinks: seeded float32 (nheads,) logits, with gradient
    grad: bool = True
    seed: int = 0

    @property
    def id(self) -> str:
        """A stable, readable identifier (pytest ids, report rows)."""
        parts = [self.feature, self.label, _DTYPE_NAMES[self.dtype], f"d{self.head_dim}",
                 f"h{self.nheads}-{self.nheads_k}"]
        if self.causal:
            parts.append("causal")
        if self.window is not None:
            parts.append(f"w{self.window[0]}_{self.window[1]}")
        if self.softcap:
            parts.append(f"cap{self.softcap:g}")
        if self.alibi:
            parts.append(f"alibi-{self.alibi}")
        if self.page_size:
            parts.append(f"page{self.page_size}")
        if self.dropout_p:
            parts.append(f"drop{self.dropout_p:g}")
        if self.sinks:
            parts.append("sinks")
        if not self.grad:
            parts.append("fwd")
        return "-".join(parts)


def _lengths(kind: str, rng: random.Random, scale: int) -> tuple[tuple[int, ...], tuple[int, ...]]:
    """Named length distributions; ``scale`` is the typical long length."""
    if kind == "uniform":
        q = tuple(rng.randint(1, scale) for _ in range(4))
        return q, q
    if kind == "long-short":
        q = (scale * 3, *(rng.randint(1, 8) for _ in range(6)))
        return q, q
    if kind == "all-1":
        q = (1,) * 7
        return q, q
    if kind == "zeros":  # zero-length sequences on either side
        q = (rng.randint(1, scale), 0, rng.randint(1, scale), 0, rng.randint(1, scale), 3)
        k = (rng.randint(1, scale), 0, 0, rng.randint(1, scale), rng.randint(1, scale), 3)
        return q, k
    if kind == "sq<sk":
        q = tuple(rng.randint(1, scale) for _ in range(4))
        return q, tuple(n + rng.randint(1, scale) for n in q)
    if kind == "sq>sk":
        k = tuple(rng.randint(1, scale) for _ in range(4))
        return tuple(n + rng.randint(1, scale) for n in k), k
    if kind == "decode":  # one query row per sequence against a longer cache, one empty
        k = (*(rng.randint(1, scale * 3) for _ in range(4)), 0)
        return (1,) * len(k), k
    raise ValueError(f"unknown length distribution {kind!r}")


LENGTH_KINDS = ("uniform", "long-short", "all-1", "zeros", "sq<sk", "sq>sk")


def _cases(scale: int, dtypes: tuple[torch.dtype, ...], seed: int) -> list[Case]:
    rng = random.Random(seed)
    cases: list[Case] = []

    def add(feature: str, label: str, kind: str = "uniform", **kw) -> None:
        q, k = _lengths(kind, rng, scale)
        cases.append(Case(feature, label, q, k, seed=rng.randrange(2**31), **kw))

    for dtype in dtypes:
        for d in HEAD_DIMS:
            add("dtype-headdim", "uniform", dtype=dtype, head_dim=d)
    main = dtypes[0]
    for dtype in dtypes:
        for h, hk in ((4, 4), (4, 2), (8, 2), (6, 1)):
            add("gqa", f"{h}-{hk}", dtype=dtype, nheads=h, nheads_k=hk, causal=True)
        for kind in LENGTH_KINDS:
            for causal in (False, True):
                add("lengths", kind, kind, dtype=dtype, causal=causal)
        for kind in ("uniform", "sq<sk", "sq>sk"):
            add("causal", kind, kind, dtype=dtype, causal=True, nheads=8, nheads_k=2)
    windows = ((3, -1), (-1, 2), (4, 1), (0, 0), (5, 5))
    for kind in ("uniform", "sq<sk", "sq>sk", "zeros"):
        for w in windows:
            add("window", kind, kind, dtype=main, window=w)
            if w[1] != 0:
                add("window", kind, kind, dtype=main, window=w, causal=True)
    for kind in ("uniform", "sq>sk"):
        for causal in (False, True):
            add("softcap", kind, kind, dtype=main, softcap=5.0, causal=causal)
            add("softcap", kind, kind, dtype=main, softcap=30.0, causal=causal, window=(6, 0))
    for alibi in ("head", "batch_head"):
        for kind in ("uniform", "sq<sk", "sq>sk"):
            for causal in (False, True):
                add("alibi", kind, kind, dtype=main, alibi=alibi, causal=causal)
    for page in (1, 3, 16, 64):
        for kind in ("uniform", "sq<sk", "zeros"):
            add("paged", kind, kind, dtype=main, page_size=page, causal=kind != "zeros")
        add("paged", "window", "sq<sk", dtype=main, page_size=page, window=(5, 0))
    for dtype in dtypes:
        add("forward-only", "uniform", dtype=dtype, causal=True, grad=False)
        add("forward-only", "long-short", "long-short", dtype=dtype, grad=False, alibi="head")
    # Page sizes of inference kernels (Ascend's paged prefill needs multiples of 128) and
    # decode; drawn last so that the cases above keep their seeds.
    add("paged", "uniform", "uniform", dtype=main, page_size=128, causal=True)
    add("paged", "window", "sq<sk", dtype=main, page_size=128, window=(5, 0))
    add("paged", "decode", "decode", dtype=main, page_size=16, causal=True)
    # Attention sinks, with every feature they combine with; rows that see no key (sq > sk
    # causal, zero lengths) check lse = sink. Drawn after the cases above (their seeds stay).
    for kind in ("uniform", "sq>sk", "zeros"):
        for causal in (False, True):
            add("sinks", kind, kind, dtype=main, sinks=True, causal=causal)
    add("sinks", "gqa", dtype=main, sinks=True, nheads=8, nheads_k=2, causal=True)
    add("sinks", "window", "sq<sk", dtype=main, sinks=True, window=(5, 0))
    add("sinks", "softcap", dtype=main, sinks=True, softcap=5.0, causal=True)
    add("sinks", "alibi", "sq<sk", dtype=main, sinks=True, alibi="head", causal=True)
    add("sinks", "paged", "sq<sk", dtype=main, sinks=True, page_size=16, causal=True)
    add("sinks", "decode", "decode", dtype=main, sinks=True, causal=True)
    for dtype in dtypes[1:]:
        add("sinks", "uniform", dtype=dtype, sinks=True, causal=True)
    add("sinks", "forward-only", "long-short", dtype=main, sinks=True, grad=False)
    return cases


def dropout_cases(dtypes: tuple[torch.dtype, ...], seed: int) -> list[Case]:
    """Short sequences (sk <= head_dim): the output then reveals the dropout mask."""
    rng = random.Random(seed)
    out = []
    for dtype in dtypes:
        for causal, p in ((False, 0.17), (True, 0.3)):
            q = tuple(rng.randint(8, 28) for _ in range(5))
            k = tuple(min(n + rng.randint(-3, 3), 30) for n in q)
            out.append(Case("dropout", "short", q, k, dtype=dtype, head_dim=32, nheads=4,
                            nheads_k=2, causal=causal, dropout_p=p, seed=rng.randrange(2**31)))
    return out


def quick_cases(seed: int = 0) -> list[Case]:
    """The CI tier: small shapes, CPU-friendly, every feature, fp16 / bf16 / fp32."""
    dtypes = (torch.float16, torch.bfloat16, torch.float32)
    return _cases(24, dtypes, seed) + dropout_cases((torch.float16, torch.float32), seed)


def full_tier_cases(seed: int = 0) -> list[Case]:
    """The GPU tier: longer sequences, bf16 and fp16, the same features."""
    dtypes = (torch.bfloat16, torch.float16)
    cases = _cases(300, dtypes, seed) + dropout_cases(dtypes, seed)
    rng = random.Random(seed + 1)
    for dtype in dtypes:  # a few long ones, where tiling bugs show
        for causal in (False, True):
            q = tuple(rng.randint(512, 2048) for _ in range(3))
            cases.append(Case("long", "uniform", q, q, dtype=dtype, head_dim=128, nheads=8,
                              nheads_k=2, causal=causal, seed=rng.randrange(2**31)))
    return cases


def tier_cases(tier: str, seed: int = 0) -> list[Case]:
    if tier == "quick":
        return quick_cases(seed)
    if tier == "full":
        return full_tier_cases(seed)
    raise ValueError(f"unknown tier {tier!r} (expected 'quick' or 'full')")
