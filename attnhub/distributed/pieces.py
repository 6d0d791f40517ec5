"""Pieces: the exact mask between a run of query rows and a run of key rows at known global
positions, expressed with attnhub's bottom-right aligned window.

A piece pairs query rows holding consecutive positions [p0, p1) of one sequence with key
rows holding consecutive positions [t0, t1) of the same sequence. The global mask of the
sequence (self-attention, sq == sk) lets position p see position t iff
p - left <= t <= p + right (-1 = unbounded side; causal is right = 0). Inside a piece,
attnhub's bottom-right alignment makes local query i see local key j iff
i + (lk - lq) - L <= j <= i + (lk - lq) + R. Trimming the rows that see nothing and the keys
that nobody sees makes L = left + D and R = right - D (D = key end - query end) both >= 0,
so every piece is one ordinary window; a side that cannot bind inside the piece becomes -1.
"""

from __future__ import annotations

from dataclasses import dataclass

FULL = (-1, -1)


@dataclass(frozen=True)
class Piece:
    """Query rows [q0, q1) against key rows [k0, k1) under ``window`` (left, right), bottom-
    right aligned on the piece, -1 = unbounded; FULL = no mask."""

    q0: int
    q1: int
    k0: int
    k1: int
    window: tuple[int, int]


def band_piece(q_row: int, q_pos: tuple[int, int], k_row: int, k_pos: tuple[int, int],
               left: int, right: int) -> Piece | None:
    """The piece of query positions ``q_pos`` (stored from row ``q_row``) against key
    positions ``k_pos`` (from row ``k_row``) of one sequence under the global band
    (left, right); None when no query sees any key."""
    p0, p1 = q_pos
    t0, t1 = k_pos
    if p0 >= p1 or t0 >= t1:
        return None
    # Rows seeing nothing lie at the ends: p + right < t0, or p - left > t1 - 1.
    pa = max(p0, t0 - right) if right >= 0 else p0
    pb = min(p1, t1 + left) if left >= 0 else p1
    if pa >= pb:
        return None
    # Keys nobody sees: t < pa - left, or t > pb - 1 + right.
    ta = max(t0, pa - left) if left >= 0 else t0
    tb = min(t1, pb + right) if right >= 0 else t1
    if ta >= tb:
        return None
    lq, lk, shift = pb - pa, tb - ta, tb - pb
    lo = left + shift if left >= 0 else -1
    hi = right - shift if right >= 0 else -1
    if lo >= lk - 1:  # the lower side never binds inside the piece
        lo = -1
    if hi >= lq - 1:
        hi = -1
    return Piece(q_row + pa - p0, q_row + pb - p0, k_row + ta - t0, k_row + tb - t0, (lo, hi))


def merge_full(pieces: list[Piece]) -> list[Piece]:
    """Join unmasked pieces that share their key rows and have adjacent query rows, or share
    their query rows and have adjacent key rows (fewer, larger segments)."""
    out: list[Piece] = []
    for p in sorted(pieces, key=lambda x: (x.q0, x.k0)):
        joined = False
        if p.window == FULL:
            for i, o in enumerate(out):
                if o.window != FULL:
                    continue
                if (o.k0, o.k1) == (p.k0, p.k1) and o.q1 == p.q0:
                    out[i] = Piece(o.q0, p.q1, o.k0, o.k1, FULL)
                elif (o.q0, o.q1) == (p.q0, p.q1) and o.k1 == p.k0:
                    out[i] = Piece(o.q0, o.q1, o.k0, p.k1, FULL)
                else:
                    continue
                joined = True
                break
        if not joined:
            out.append(p)
    return out
