"""FlashInfer's plan() options as attnhub's: dtypes, masks, windows, soft cap, RoPE, lse.

Facts from FlashInfer's documentation of the prefill wrappers (docs.flashinfer.ai,
flashinfer.prefill): ``window_left`` -1 = no window, else key j is visible to query i iff
j >= i + kv_len - qo_len - window_left; ``causal`` is aligned at the bottom right
(query i sees j <= i + kv_len - qo_len) and is ignored when a custom mask is given;
``logits_soft_cap`` > 0 applies cap * tanh(s / cap) to the scaled logits; ``sm_scale``
defaults to 1 / sqrt(head_dim); ``custom_mask`` is each request's (qo_len, kv_len) boolean
mask flattened row-major and concatenated, ``packed_custom_mask`` the same packed per
request with ``segment_packbits`` (little bit order, each request padded to whole bytes);
the returned lse is log2-sum-exp2 of the scaled logits, shape (total_q, num_qo_heads).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from attnhub.custom_mask import PackedMask, from_segments
from attnhub.errors import InvalidArgumentError

POS_ENCODINGS = ("NONE", "ROPE_LLAMA")
KV_LAYOUTS = ("NHD", "HND")
LN2 = math.log(2.0)


def check_kv_layout(kv_layout: str) -> str:
    if kv_layout not in KV_LAYOUTS:
        raise InvalidArgumentError("kv_layout", "'NHD' or 'HND'", repr(kv_layout))
    return kv_layout


def as_dtype(name: str, value: str | torch.dtype | None, default: torch.dtype) -> torch.dtype:
    """'float16' / torch.float16 / None (the default) -> a torch dtype."""
    if value is None:
        return default
    if isinstance(value, torch.dtype):
        return value
    dtype = getattr(torch, str(value), None)
    if not isinstance(dtype, torch.dtype):
        raise InvalidArgumentError(name, "a torch dtype or its name ('float16', 'bfloat16')",
                                   repr(value))
    return dtype


def host_ints(name: str, t: torch.Tensor | list[int]) -> list[int]:
    """Index tensors read on the host at plan time (FlashInfer's plan does the same)."""
    if isinstance(t, torch.Tensor):
        if t.dim() != 1 or t.dtype.is_floating_point:
            raise InvalidArgumentError(name, "a 1-D int tensor", f"{t.dim()}-D {t.dtype}")
        return [int(x) for x in t.tolist()]
    return [int(x) for x in t]


@dataclass(frozen=True)
class PlanOptions:
    """The translated scalar options of one plan() call."""

    dtype: torch.dtype
    causal: bool
    window_size: tuple[int, int] | None
    softcap: float | None
    sm_scale: float | None
    rope: tuple[float, float] | None  # (rope_scale, rope_theta) for ROPE_LLAMA

    def core(self) -> dict:
        """Keyword arguments of attnhub.plan."""
        return dict(dtype=self.dtype, causal=self.causal, window_size=self.window_size,
                    softcap=self.softcap, softmax_scale=self.sm_scale)


def plan_options(*, head_dim_qk: int, head_dim_vo: int | None, causal: bool,
                 has_mask: bool, pos_encoding_mode: str, sm_scale: float | None,
                 window_left: int, logits_soft_cap: float | None, rope_scale: float | None,
                 rope_theta: float | None, q_data_type, kv_data_type) -> PlanOptions:
    if head_dim_vo is not None and head_dim_vo != head_dim_qk:
        raise InvalidArgumentError("head_dim_vo", f"head_dim_qk ({head_dim_qk}): attnhub "
                                   "computes one head dim for q, k and v", head_dim_vo)
    if pos_encoding_mode not in POS_ENCODINGS:
        raise InvalidArgumentError("pos_encoding_mode", "'NONE' or 'ROPE_LLAMA' (ALiBi goes "
                                   "through attnhub.attention_forward_varlen's alibi_slopes)",
                                   repr(pos_encoding_mode))
    dtype = as_dtype("q_data_type", q_data_type, torch.float16)
    kv_dtype = as_dtype("kv_data_type", kv_data_type, dtype)
    if kv_dtype != dtype:
        raise InvalidArgumentError("kv_data_type", f"q_data_type ({dtype}): attnhub takes one "
                                   "dtype for q, k and v (no fp8 KV cache)", kv_dtype)
    rope = None
    if pos_encoding_mode == "ROPE_LLAMA":
        rope = (1.0 if rope_scale is None else float(rope_scale),
                1e4 if rope_theta is None else float(rope_theta))
    window = (int(window_left), -1) if window_left is not None and window_left >= 0 else None
    cap = float(logits_soft_cap) if logits_soft_cap else None
    return PlanOptions(dtype, bool(causal) and not has_mask, window, cap, sm_scale, rope)


def custom_mask_arg(custom_mask: torch.Tensor | None, packed_custom_mask: torch.Tensor | None,
                    qo_lens: list[int], kv_lens: list[int], device: torch.device
                    ) -> torch.Tensor | PackedMask | None:
    """FlashInfer's mask arguments as attnhub's custom_mask (packed wins, as in FlashInfer)."""
    if packed_custom_mask is not None:
        nbytes = [-(-(a * b) // 8) for a, b in zip(qo_lens, kv_lens, strict=True)]
        indptr = [0]
        for n in nbytes:
            indptr.append(indptr[-1] + n)
        return from_segments(packed_custom_mask.to(device),
                             torch.tensor(indptr, dtype=torch.int64, device=device))
    if custom_mask is not None:
        return custom_mask.to(device=device, dtype=torch.bool)
    return None


def lse_base2(lse: torch.Tensor) -> torch.Tensor:
    """attnhub's lse (nheads, total_q), natural log -> FlashInfer's (total_q, nheads), log2."""
    return (lse / LN2).t().contiguous()
