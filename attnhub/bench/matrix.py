"""The workload matrix of `attnhub bench`: cells, seeded length draws, exact FLOP counts.

A cell is one attention call shape: per-sequence query and key lengths, heads, head dim,
dtype and mask features. The matrix is not a cross product: a base cell (d128, GQA 4,
causal, medium lengths, bf16 on a GPU) and one axis varied at a time, plus the cells the
project's performance issue names (the tiny call, short sequences at GQA 8, head dim 64 MHA).
Two profiles share the cell names: ``gpu`` (bf16, 32 query heads, ~16k-token batches) and
``cpu`` (fp32, 8 query heads, ~1k-token batches, sized for a few cores).
"""

from __future__ import annotations

import fnmatch
import functools
import random
from dataclasses import asdict, dataclass, field

# FLOPs per visible (query, key) pair and head: q.k (2 * d) and p.v (2 * d).
FORWARD_FLOPS_PER_PAIR_PER_DIM = 4
# Backward over forward, FlashAttention's convention (5 matmuls against 2).
BACKWARD_FLOP_FACTOR = 2.5
MODES = ("fwd", "fwd+bwd")


@dataclass(frozen=True)
class Cell:
    """One benchmark call shape.

    ``seqlens_q`` / ``seqlens_k``: per-sequence lengths (equal lengths: self-attention).
    ``window``: (left, right) as attnhub's ``window_size`` (-1 = unbounded) or None;
    ``causal`` sets right = 0, bottom-right aligned. ``page_size``: keys and values in page
    pools of this many tokens (a ``block_table`` call). ``tiny``: timed as host time per call
    in microseconds (a host loop that never waits for the device) instead of device time.
    """

    name: str
    axis: str
    description: str
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    nheads: int
    nheads_k: int
    head_dim: int
    dtype: str
    causal: bool = True
    window: tuple[int, int] | None = None
    softcap: float = 0.0
    alibi: bool = False
    page_size: int | None = None
    tiny: bool = False
    modes: tuple[str, ...] = MODES
    quick: bool = False

    @property
    def batch(self) -> int:
        return len(self.seqlens_q)

    @property
    def total_q(self) -> int:
        return sum(self.seqlens_q)

    @property
    def total_k(self) -> int:
        return sum(self.seqlens_k)

    @property
    def heads_label(self) -> str:
        if self.nheads == self.nheads_k:
            return f"MHA {self.nheads}"
        if self.nheads_k == 1:
            return f"MQA {self.nheads}/1"
        return f"GQA {self.nheads}/{self.nheads_k}"

    @property
    def mask_label(self) -> str:
        parts = ["causal" if self.causal else "full"]
        if self.window is not None:
            parts.append(f"window {self.window[0]},{self.window[1]}")
        if self.total_k != self.total_q:
            parts.append("sq<sk")
        if self.softcap:
            parts.append(f"softcap {self.softcap:g}")
        if self.alibi:
            parts.append("ALiBi")
        if self.page_size:
            parts.append(f"paged {self.page_size}")
        return ", ".join(parts)

    def visible_pairs(self) -> int:
        """Visible (query, key) pairs summed over the sequences, counted exactly."""
        return sum(visible_pairs(sq, sk, self.causal, self.window)
                   for sq, sk in zip(self.seqlens_q, self.seqlens_k, strict=True))

    def flops(self, mode: str) -> float:
        """FLOPs of one call: 4 * head_dim per visible pair and query head forward;
        ``fwd+bwd`` adds 2.5x that for the backward (FlashAttention's convention)."""
        if mode not in MODES:
            raise ValueError(f"mode must be one of {MODES}, got {mode!r}")
        fwd = (FORWARD_FLOPS_PER_PAIR_PER_DIM * self.head_dim * self.nheads
               * self.visible_pairs())
        return float(fwd * (1 + BACKWARD_FLOP_FACTOR if mode == "fwd+bwd" else 1))

    def as_dict(self) -> dict:
        data = asdict(self)
        data.update(batch=self.batch, total_q=self.total_q, total_k=self.total_k,
                    heads=self.heads_label, mask=self.mask_label,
                    visible_pairs=self.visible_pairs())
        return data


@functools.lru_cache(maxsize=4096)
def visible_pairs(sq: int, sk: int, causal: bool, window: tuple[int, int] | None) -> int:
    """Number of (i, j) pairs, 0 <= i < sq, 0 <= j < sk, with key j visible to query i under
    attnhub's bottom-right mask: i + sk - sq - left <= j <= i + sk - sq + right (-1 = that
    side unbounded; causal sets right = 0)."""
    left, right = window if window is not None else (-1, -1)
    if causal:
        right = 0 if right < 0 else min(right, 0)
    offset = sk - sq
    total = 0
    for i in range(sq):
        lo = 0 if left < 0 else max(0, i + offset - left)
        hi = sk - 1 if right < 0 else min(sk - 1, i + offset + right)
        if hi >= lo:
            total += hi - lo + 1
    return total


def draw_lengths(total: int, lo: int, hi: int, seed: int) -> tuple[int, ...]:
    """Lengths uniform in [lo, hi] from ``random.Random(seed)`` until they sum to ``total``
    (the last one cut to fit)."""
    rng = random.Random(seed)
    out: list[int] = []
    filled = 0
    while filled < total:
        n = min(rng.randint(lo, hi), total - filled)
        out.append(n)
        filled += n
    return tuple(out)


def draw_skewed(total: int, n_long: int, long_range: tuple[int, int], short_hi: int,
                seed: int) -> tuple[int, ...]:
    """``n_long`` long sequences and short ones (1..short_hi) filling up to ``total``,
    shuffled (seeded)."""
    rng = random.Random(seed)
    longs = [rng.randint(*long_range) for _ in range(n_long)]
    shorts = list(draw_lengths(total - sum(longs), 1, short_hi, seed + 1))
    out = longs + shorts
    rng.shuffle(out)
    return tuple(out)


def with_prefix(seqlens_q: tuple[int, ...], max_prefix: int, seed: int) -> tuple[int, ...]:
    """Key lengths of a prefix-cache prefill: each sequence's queries plus 0..max_prefix
    cached tokens before them (seeded)."""
    rng = random.Random(seed)
    return tuple(sq + rng.randint(0, max_prefix) for sq in seqlens_q)


@dataclass(frozen=True)
class Profile:
    """Sizes of one device class. ``heads``: (nheads, nheads_k) per head layout."""

    name: str
    dtype: str
    heads: dict[str, tuple[int, int]]
    base_total: int
    medium: tuple[int, int]
    long_total: int
    long: tuple[int, int]
    skew_long: tuple[int, int]
    prefix: int
    windows: tuple[int, int]
    decode_batch: int
    decode_keys: tuple[int, int]
    softcap: float = 50.0
    page_size: int = 16
    tiny: tuple[int, int] = (8, 64)
    tiny_heads: tuple[int, int] = (32, 8)
    extra_dtypes: tuple[str, ...] = field(default_factory=tuple)


GPU = Profile(
    name="gpu", dtype="bfloat16",
    heads={"mha": (32, 32), "gqa4": (32, 8), "gqa8": (32, 4), "mqa": (32, 1)},
    base_total=16384, medium=(256, 4096), long_total=65536, long=(1024, 16384),
    skew_long=(4096, 8192), prefix=4096, windows=(512, 4096), decode_batch=64,
    decode_keys=(256, 8192), extra_dtypes=("float16",))

CPU = Profile(
    name="cpu", dtype="float32",
    heads={"mha": (8, 8), "gqa4": (8, 2), "gqa8": (16, 2), "mqa": (8, 1)},
    base_total=1024, medium=(128, 512), long_total=2048, long=(256, 1024),
    skew_long=(256, 384), prefix=256, windows=(64, 256), decode_batch=8,
    decode_keys=(64, 512), tiny_heads=(8, 2))

PROFILES = {"gpu": GPU, "cpu": CPU}

# The cells `--quick` runs: the base, the named cells, one per mask feature.
QUICK = frozenset({"base", "d64-mha", "short-gqa8", "prefix-cache", "window-large", "softcap",
                   "paged-decode", "tiny"})


def profile_for(device_type: str) -> Profile:
    """``cpu`` sizes on the CPU, ``gpu`` sizes on every accelerator."""
    return CPU if device_type == "cpu" else GPU


def build_matrix(profile: Profile, seed: int = 0) -> list[Cell]:
    """Every cell of ``profile``; length draws depend only on ``seed`` and the profile."""
    p = profile
    medium = draw_lengths(p.base_total, *p.medium, seed)
    short = draw_lengths(p.base_total, 1, 256, seed + 1)
    long = draw_lengths(p.long_total, *p.long, seed + 2)
    skewed = draw_skewed(p.base_total, 2, p.skew_long, 256 if p.name == "gpu" else 64,
                         seed + 3)
    prefix_q = draw_lengths(p.base_total, *p.medium, seed + 4)
    decode_k = tuple(random.Random(seed + 5).randint(*p.decode_keys)
                     for _ in range(p.decode_batch))
    h, hk = p.heads["gqa4"]
    base = dict(seqlens_q=medium, seqlens_k=medium, nheads=h, nheads_k=hk, head_dim=128,
                dtype=p.dtype)

    def cell(name: str, axis: str, description: str, **changes) -> Cell:
        fields = {**base, **changes}
        return Cell(name=name, axis=axis, description=description, quick=name in QUICK,
                    **fields)

    mix = f"{p.medium[0]}-{p.medium[1]}"
    cells = [cell("base", "base", f"d128, GQA {h}/{hk}, causal, medium lengths ({mix}), "
                                  f"{p.base_total} tokens")]
    for d in (64, 96, 192, 256):
        cells.append(cell(f"d{d}", "head_dim", f"base with head_dim {d}", head_dim=d))
    for layout in ("mha", "gqa8", "mqa"):
        nh, nk = p.heads[layout]
        cells.append(cell(layout, "heads", f"base with {nh}/{nk} heads", nheads=nh,
                          nheads_k=nk))
    cells += [
        cell("short", "lengths", f"base with short lengths (1-256), {p.base_total} tokens",
             seqlens_q=short, seqlens_k=short),
        cell("long", "lengths", f"base with long lengths ({p.long[0]}-{p.long[1]}), "
                                f"{p.long_total} tokens", seqlens_q=long, seqlens_k=long),
        cell("skewed", "lengths", f"base with 2 long sequences ({p.skew_long[0]}-"
                                  f"{p.skew_long[1]}) among many short ones",
             seqlens_q=skewed, seqlens_k=skewed),
        cell("noncausal", "mask", "base without the causal mask", causal=False),
        cell("prefix-cache", "mask", f"causal prefill after a cached prefix: sk = sq + "
                                     f"0..{p.prefix}", seqlens_q=prefix_q,
             seqlens_k=with_prefix(prefix_q, p.prefix, seed + 6)),
        # On the long lengths: a window only changes the work on sequences longer than it.
        cell("window-small", "mask", f"long lengths, causal sliding window {p.windows[0]} "
                                     "(left)", seqlens_q=long, seqlens_k=long,
             window=(p.windows[0], 0)),
        cell("window-large", "mask", f"long lengths, causal sliding window {p.windows[1]} "
                                     "(left)", seqlens_q=long, seqlens_k=long,
             window=(p.windows[1], 0)),
        cell("softcap", "features", f"base with softcap {p.softcap:g}", softcap=p.softcap),
        cell("alibi", "features", "base with ALiBi slopes", alibi=True),
    ]
    for dtype in p.extra_dtypes:
        cells.append(cell(dtype, "dtype", f"base in {dtype}", dtype=dtype))
    cells += [
        cell("paged-decode", "decode", f"decode: {p.decode_batch} sequences of 1 query over "
                                       f"a paged cache of {p.decode_keys[0]}-"
                                       f"{p.decode_keys[1]} keys (pages of {p.page_size})",
             seqlens_q=(1,) * p.decode_batch, seqlens_k=decode_k, page_size=p.page_size,
             modes=("fwd",)),
        cell("tiny", "tiny", f"{p.tiny[0]} x {p.tiny[1]} tokens, {p.tiny_heads[0]}/"
                             f"{p.tiny_heads[1]} heads, d128, causal: host time per call",
             seqlens_q=(p.tiny[1],) * p.tiny[0], seqlens_k=(p.tiny[1],) * p.tiny[0],
             nheads=p.tiny_heads[0], nheads_k=p.tiny_heads[1], tiny=True),
    ]
    nh, nk = p.heads["gqa8"]
    cells.append(cell("short-gqa8", "issue", f"short lengths (1-256), {p.base_total} tokens, "
                                             f"GQA {nh}/{nk}", seqlens_q=short,
                      seqlens_k=short, nheads=nh, nheads_k=nk))
    nh, nk = p.heads["mha"]
    cells.append(cell("d64-mha", "issue", f"head_dim 64, MHA {nh}/{nk}", head_dim=64,
                      nheads=nh, nheads_k=nk))
    return cells


def select_cells(cells: list[Cell], quick: bool = False,
                 patterns: list[str] | None = None) -> list[Cell]:
    """The quick subset and/or the cells whose name matches one of ``patterns`` (shell-style
    wildcards). Raises ValueError naming a pattern that matches no cell."""
    if quick:
        cells = [c for c in cells if c.quick]
    if patterns:
        for pattern in patterns:
            if not any(fnmatch.fnmatchcase(c.name, pattern) for c in cells):
                raise ValueError(f"--cells {pattern!r} matches no cell; cells: "
                                 + ", ".join(c.name for c in cells))
        cells = [c for c in cells if any(fnmatch.fnmatchcase(c.name, p) for p in patterns)]
    return cells
