"""RoPE as FlashInfer's ``pos_encoding_mode="ROPE_LLAMA"`` applies it inside attention.

Facts from FlashInfer's documentation (docs.flashinfer.ai, flashinfer.rope.apply_rope_pos_ids
and the prefill wrappers' ``pos_encoding_mode``): the non-interleaved ("rotate half") layout,
rotating dimension i < d/2 with i + d/2 by the angle pos / rope_scale * rope_theta^(-2i/d),
defaults rope_scale 1 and rope_theta 1e4; a query row i of a request with qo_len queries and
kv_len keys sits at position kv_len - qo_len + i, key j at position j.
"""

from __future__ import annotations

import torch


def rotate(x: torch.Tensor, positions: torch.Tensor, rope_scale: float, rope_theta: float
           ) -> torch.Tensor:
    """x (rows, heads, d) rotated by ``positions`` (rows,) in fp32; returns x's dtype."""
    d = x.shape[-1]
    half = d // 2
    inv_freq = rope_theta ** (-torch.arange(half, device=x.device, dtype=torch.float32)
                              * 2.0 / d)
    angle = positions.to(torch.float32)[:, None] / rope_scale * inv_freq[None, :]
    cos, sin = torch.cos(angle)[:, None, :], torch.sin(angle)[:, None, :]
    xf = x.to(torch.float32)
    x1, x2 = xf[..., :half], xf[..., half:2 * half]
    out = torch.cat((x1 * cos - x2 * sin, x2 * cos + x1 * sin, xf[..., 2 * half:]), dim=-1)
    return out.to(x.dtype)


def query_positions(qo_lens: list[int], kv_lens: list[int], device: torch.device
                    ) -> torch.Tensor:
    """int64 (total_q,): kv_len - qo_len + i for each request's query row i."""
    pos = [kv - qo + i for qo, kv in zip(qo_lens, kv_lens, strict=True) for i in range(qo)]
    return torch.tensor(pos, dtype=torch.int64, device=device)


def ragged_key_positions(kv_lens: list[int], device: torch.device) -> torch.Tensor:
    """int64 (total_k,): j for each request's key row j."""
    return torch.tensor([j for n in kv_lens for j in range(n)], dtype=torch.int64,
                        device=device)


def paged_key_positions(pages: list[list[int]], page_size: int, num_pages: int,
                        device: torch.device) -> torch.Tensor:
    """int64 (num_pages * page_size,): the position of every slot of the page pool in the
    request that owns its page (0 for unused pages). A page shared by requests at different
    positions cannot be rotated once for all of them: an error."""
    owner: dict[int, int] = {}
    pos = torch.zeros(num_pages, page_size, dtype=torch.int64)
    for b, ids in enumerate(pages):
        for n, p in enumerate(ids):
            if owner.get(p, n) != n:
                from attnhub.errors import InvalidArgumentError

                raise InvalidArgumentError(
                    "paged_kv_indices", "pages at one position in every request that "
                    "shares them (pos_encoding_mode='ROPE_LLAMA' rotates the cache once)",
                    f"page {p} at page index {owner[p]} and {n} (request {b})")
            owner[p] = n
            pos[p] = torch.arange(n * page_size, (n + 1) * page_size)
    return pos.reshape(-1).to(device)
