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

from attnhub.arguments import as_bool, as_float, as_int
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
        if t.dim() != 1 or t.dtype.is_floating_point or t.dtype == torch.bool:
            raise InvalidArgumentError(name, "a 1-D int tensor", f"{t.dim()}-D {t.dtype}")
        return [int(x) for x in t.tolist()]
    return [as_int(name, x) for x in t]


# plan() keywords of FlashInfer (flashinfer/prefill.py) that only tune its kernels or repeat
# what the indptr arrays say: accepted and ignored
PLAN_HINTS = frozenset({"non_blocking", "fixed_split_size", "disable_split_kv", "seq_lens",
                        "seq_lens_q", "block_tables", "max_token_per_sequence",
                        "max_sequence_kv"})
# plan() keywords that change the result: refused unless at their "off" value
PLAN_UNSUPPORTED = {
    "prefix_len_ptr": "multi-item scoring", "token_pos_in_items_ptr": "multi-item scoring",
    "token_pos_in_items_len": "multi-item scoring", "max_item_len_ptr": "multi-item scoring",
    "v_indptr": "a separate indptr for v", "o_indptr": "a separate indptr for the output",
}


def check_extra_plan_args(extra: dict, q_dtype: torch.dtype) -> None:
    """FlashInfer's plan() keywords beyond attnhub's translation: hints pass, output dtypes
    other than q's and semantic features attnhub lacks raise, unknown names raise TypeError
    as Python would."""
    for name, value in extra.items():
        if name in PLAN_HINTS:
            continue
        if name == "o_data_type":
            if value is not None and as_dtype(name, value, q_dtype) != q_dtype:
                raise InvalidArgumentError(name, f"None or q's dtype ({q_dtype}): attnhub "
                                           "returns out in q's dtype", repr(value))
            continue
        if name in PLAN_UNSUPPORTED:
            if value is not None and not (isinstance(value, int) and value == 0):
                raise InvalidArgumentError(name, f"None: {PLAN_UNSUPPORTED[name]} is not "
                                           "supported by attnhub.compat.flashinfer",
                                           type(value).__name__)
            continue
        raise TypeError(f"plan() got an unexpected keyword argument {name!r}")


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
    left = -1 if window_left is None else as_int("window_left", window_left, -1)
    window = (left, -1) if left >= 0 else None
    cap = None
    if logits_soft_cap is not None:
        cap = as_float("logits_soft_cap", logits_soft_cap, "a finite float >= 0") or None
    return PlanOptions(dtype, as_bool("causal", causal) and not has_mask, window, cap,
                       sm_scale, rope)


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
