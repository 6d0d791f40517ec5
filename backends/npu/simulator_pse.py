"""The simulator's model of ``pse`` / ``pse_type`` of ``npu_fusion_attention_v2`` (TND).

From Ascend's documentation (sources in docs/npu.md): pse_type 0 and 1 add a caller-given
pse tensor (0: ``scale * qk + pse``, 1: ``scale * (qk + pse)``); pse_type 2 and 3 make the
operator generate an ALiBi bias itself from float32 slopes of shape [B, N] or [N], added after
the scale (``scale * qk + pse``), whose zero line is aligned with the top-left corner of
Q @ K^T, moved up by ``q_start_idx`` and left by ``kv_start_idx``; type 3 takes the square root
of the distance. pse_type 2 and 3 support only Sq == Skv; the start indices describe the
outer-cut case ("外切场景": the block's start in the whole sequence), so the model requires
Sq == Skv of the whole sequence, ``Sq + q_start_idx == Skv + kv_start_idx`` (the rule CANN's
aclnnFlashAttentionVarLenScoreV2 states for sparse_mode 8 with a q cut). No pse may
accompany a zero-length S. The sign comes from the operator's
kernel (``pse.h``: the slope is multiplied by -1):
``pse[h, i, j] = -slope[h] * |j + kv_start_idx - i - q_start_idx|`` (type 3: ``sqrt(|...|)``).

Only the generated forms are modeled; a caller-given pse tensor raises NotImplementedError.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

PSE_TYPES = (0, 1, 2, 3)
GENERATED = (2, 3)


@dataclass(frozen=True)
class GeneratedAlibi:
    """slopes: float32 (B, N) (an [N] input broadcast over the batch); sqrt: pse_type 3;
    q_start / kv_start: the zero line's shift (q_start_idx, kv_start_idx)."""

    slopes: torch.Tensor
    sqrt: bool
    q_start: int
    kv_start: int

    def bias(self, b: int, sq: int, sk: int) -> torch.Tensor:
        """(N, sq, sk) float32 bias of sequence b, added to the scaled scores."""
        dev = self.slopes.device
        i = torch.arange(sq, device=dev, dtype=torch.float32)[:, None] + self.q_start
        j = torch.arange(sk, device=dev, dtype=torch.float32)[None, :] + self.kv_start
        dist = (j - i).abs()
        if self.sqrt:
            dist = dist.sqrt()
        return -self.slopes[b].float()[:, None, None] * dist


def parse(pse: torch.Tensor | None, pse_type: int, q_start_idx: object, kv_start_idx: object,
          heads: int, lengths_q: list[int], lengths_k: list[int]) -> GeneratedAlibi | None:
    """Validate pse / pse_type / q_start_idx / kv_start_idx as documented; the generated bias,
    or None without pse."""
    if pse_type not in PSE_TYPES:
        raise ValueError(f"pse_type must be one of {PSE_TYPES}, got {pse_type!r}")
    q_start = _start_index("q_start_idx", q_start_idx)
    kv_start = _start_index("kv_start_idx", kv_start_idx)
    if pse is None:
        if pse_type in GENERATED:
            raise ValueError(f"pse_type {pse_type} generates ALiBi from slopes: pass float32 "
                             "slopes of shape [B, N] or [N] as pse")
        return None
    if pse_type not in GENERATED:
        raise NotImplementedError("the simulator models only the generated ALiBi of pse_type "
                                  "2 and 3, not a given pse tensor")
    if pse.dtype != torch.float32:
        raise TypeError(f"pse_type {pse_type} needs float32 slopes, got {pse.dtype}")
    batch = len(lengths_q)
    if tuple(pse.shape) == (heads,):
        slopes = pse[None].expand(batch, heads)
    elif tuple(pse.shape) == (batch, heads):
        slopes = pse
    else:
        raise ValueError(f"pse_type {pse_type} takes slopes of shape [B, N] = [{batch}, "
                         f"{heads}] or [N] = [{heads}], got {tuple(pse.shape)}")
    for b, (sq, sk) in enumerate(zip(lengths_q, lengths_k, strict=True)):
        if sq == 0 or sk == 0:
            raise ValueError(f"pse is not supported when some S is 0; batch {b} has Sq {sq}, "
                             f"Skv {sk}")
        if sq + q_start != sk + kv_start:
            raise ValueError(f"pse_type {pse_type} supports only Sq == Skv of the sequence "
                             f"before the cut (Sq + q_start_idx == Skv + kv_start_idx); batch "
                             f"{b} has Sq {sq} + {q_start} != Skv {sk} + {kv_start}")
    return GeneratedAlibi(slopes, pse_type == 3, q_start, kv_start)


def _start_index(name: str, value: object) -> int:
    """q_start_idx / kv_start_idx: None (0) or a host int list of length 1."""
    if value is None:
        return 0
    if isinstance(value, torch.Tensor):
        raise TypeError(f"{name} must be a list of one int (host data), got a tensor")
    if not isinstance(value, (list, tuple)) or len(value) != 1 \
            or not isinstance(value[0], int) or isinstance(value[0], bool):
        raise ValueError(f"{name} must be a list of exactly one int, got {value!r}")
    return value[0]
