"""PagedLayout: the shape of a paged KV cache (page pools and a block table)."""

from __future__ import annotations

from dataclasses import dataclass


@dataclass(frozen=True)
class PagedLayout:
    """K/V page pools of shape (num_pages, page_size, nheads_k, head_dim) and a block table
    of shape (batch, max_pages) naming each sequence's pages in order."""

    num_pages: int
    page_size: int
    max_pages: int
