"""lse <-> npu_fusion_attention's softmax_max / softmax_sum ([T, N, 8] float32).

Each row's value is repeated 8 times. By default the elements are in N-major order (the
tensor's shape says [T, N, 8] but its memory is [N, T, 8]); with ``softmax_layout="TND"``
(newer torch_npu releases) they are a true [T, N, 8]. lse = softmax_max + log(softmax_sum).
"""

from __future__ import annotations

import torch

ORDERS = ("N-major", "TND")


def lse_from_stats(softmax_max: torch.Tensor, softmax_sum: torch.Tensor, total: int,
                   nheads: int, order: str = "N-major") -> torch.Tensor:
    """lse float32 (nheads, total), natural log, from the forward's statistics."""
    return _rows(softmax_max, total, nheads, order) + torch.log(
        _rows(softmax_sum, total, nheads, order))


def stats_from_lse(lse: torch.Tensor, order: str = "N-major"
                   ) -> tuple[torch.Tensor, torch.Tensor]:
    """(softmax_max, softmax_sum) for the backward from lse (nheads, total): max = lse and
    sum = 1 describe the same normalisation exp(s - max) / sum = exp(s - lse). Rows that see
    no key (lse = -inf) get max 0, so that exp(-inf - max) is 0 rather than NaN."""
    n, t = lse.shape
    smax = torch.where(torch.isneginf(lse), torch.zeros_like(lse), lse).float()
    ssum = torch.ones_like(smax)
    return _layout(smax, order, n, t), _layout(ssum, order, n, t)


def _rows(x: torch.Tensor, total: int, nheads: int, order: str) -> torch.Tensor:
    if x.numel() != total * nheads * 8:
        raise ValueError(f"softmax statistics of {total} rows x {nheads} heads need "
                         f"{total * nheads * 8} elements, got shape {tuple(x.shape)}")
    if order == "TND":
        return x.reshape(total, nheads, 8)[..., 0].t().float()
    if order == "N-major":
        return x.reshape(nheads, total, 8)[..., 0].float()
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")


def _layout(x: torch.Tensor, order: str, n: int, t: int) -> torch.Tensor:
    if order == "TND":
        return x.t()[..., None].expand(t, n, 8).contiguous()
    if order == "N-major":
        return x[..., None].expand(n, t, 8).contiguous().view(t, n, 8)
    raise ValueError(f"order must be one of {ORDERS}, got {order!r}")
