"""Exact merging of partial attention results through their log-sum-exp, and the weights
that carry gradients back to each partial result.

Partial results (out_i, lse_i) over disjoint key sets combine as
lse = log(sum_i exp(lse_i)) and out = sum_i exp(lse_i - lse) * out_i. Rows that no key
reaches have lse -inf in every part: they stay out = 0, lse = -inf, with no NaN.
"""

from __future__ import annotations

import torch


def accumulation_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, float32 otherwise: the dtype of every running sum."""
    return torch.float64 if dtype == torch.float64 else torch.float32


class PartialSum:
    """Running (out, lse) of one rank's queries: out (total_q, nheads, head_dim) in
    accumulation_dtype(q.dtype), lse float32 (nheads, total_q)."""

    def __init__(self, q: torch.Tensor) -> None:
        self.out: torch.Tensor | None = None
        self.lse: torch.Tensor | None = None
        self._q = q

    def add(self, out: torch.Tensor, lse: torch.Tensor) -> None:
        """Fold one partial result in (``out`` any float dtype, ``lse`` float32)."""
        if self.out is None:
            self.out, self.lse = out.to(accumulation_dtype(out.dtype), copy=True), lse.clone()
            return
        assert self.lse is not None
        new = torch.logaddexp(self.lse, lse)
        mine, theirs = merge_weights(self.lse, new), merge_weights(lse, new)
        self.out.mul_(mine.T.unsqueeze(-1)).add_(out * theirs.T.unsqueeze(-1))
        self.lse = new

    def result(self, dtype: torch.dtype) -> tuple[torch.Tensor, torch.Tensor]:
        """(out in ``dtype``, lse float32); zeros / -inf when nothing was added."""
        q = self._q
        if self.out is None:
            return (torch.zeros_like(q, dtype=dtype),
                    torch.full((q.shape[1], q.shape[0]), float("-inf"), dtype=torch.float32,
                               device=q.device))
        assert self.lse is not None
        return self.out.to(dtype), self.lse


def merge_weights(lse_part: torch.Tensor, lse_total: torch.Tensor) -> torch.Tensor:
    """exp(lse_part - lse_total), (nheads, total_q) float32: the share of a partial result in
    the merged one; 0 where either is -inf."""
    safe = torch.where(torch.isneginf(lse_total), torch.zeros_like(lse_total), lse_total)
    return torch.exp(lse_part - safe)


def partial_grads(dout: torch.Tensor, dlse: torch.Tensor | None, out: torch.Tensor,
                  lse: torch.Tensor, out_part: torch.Tensor, lse_part: torch.Tensor
                  ) -> tuple[torch.Tensor, torch.Tensor]:
    """Gradients reaching one partial result (out_part, lse_part) from those of the merged
    (out, lse): d out_part = w * dout and d lse_part = w * (rowsum(dout * (out_part - out))
    + dlse), w = exp(lse_part - lse). Shapes as out (float32) and lse."""
    w = merge_weights(lse_part, lse)
    dout32 = dout.float()
    row = (dout32 * (out_part.float() - out.float())).sum(-1).T
    if dlse is not None:
        row = row + dlse.float()
    return dout32 * w.T.unsqueeze(-1), w * row
