"""FlashInfer's single_prefill_with_kv_cache: one request, as a batch of one."""

from __future__ import annotations

import torch

from attnhub.batch_plan import plan
from attnhub.errors import InvalidArgumentError

from . import rope as rope_
from .options import check_kv_layout, custom_mask_arg, lse_base2, plan_options


def single_prefill_with_kv_cache(
    q: torch.Tensor,
    k: torch.Tensor,
    v: torch.Tensor,
    scale_q: torch.Tensor | None = None,
    scale_k: torch.Tensor | None = None,
    scale_v: torch.Tensor | None = None,
    o_dtype: torch.dtype | None = None,
    custom_mask: torch.Tensor | None = None,
    packed_custom_mask: torch.Tensor | None = None,
    causal: bool = False,
    kv_layout: str = "NHD",
    pos_encoding_mode: str = "NONE",
    use_fp16_qk_reduction: bool = False,
    sm_scale: float | None = None,
    window_left: int = -1,
    logits_soft_cap: float | None = None,
    rope_scale: float | None = None,
    rope_theta: float | None = None,
    backend: str = "auto",
    return_lse: bool = False,
    kv_cache_sf: tuple[torch.Tensor, torch.Tensor] | None = None,
    k_scale: float | None = None,
    v_scale: float | None = None,
):
    """q (qo_len, num_qo_heads, d); k, v (kv_len, num_kv_heads, d) 'NHD' or (num_kv_heads,
    kv_len, d) 'HND'; custom_mask (qo_len, kv_len) bool or packed_custom_mask uint8 (little
    bit order). Returns out, or (out, lse) with lse float32 (qo_len, num_qo_heads) in base 2.
    FlashInfer's signature (flashinfer/prefill.py); the fp8 / NVFP4 scales (scale_q, scale_k,
    scale_v, kv_cache_sf, k_scale, v_scale) must be None and o_dtype None or q's dtype
    (attnhub takes one dtype for q, k and v); backend is FlashInfer's kernel choice, ignored
    (attnhub's dispatch decides)."""
    for name, value in (("scale_q", scale_q), ("scale_k", scale_k), ("scale_v", scale_v),
                        ("kv_cache_sf", kv_cache_sf), ("k_scale", k_scale),
                        ("v_scale", v_scale)):
        if value is not None:
            raise InvalidArgumentError(name, "None: attnhub has no fp8 / NVFP4 inputs",
                                       type(value).__name__)
    if o_dtype is not None and o_dtype != q.dtype:
        raise InvalidArgumentError("o_dtype", f"None or q's dtype ({q.dtype})", o_dtype)
    if q.dim() != 3 or k.dim() != 3:
        raise InvalidArgumentError("q, k", "3-D tensors", f"{q.dim()}-D, {k.dim()}-D")
    if check_kv_layout(kv_layout) == "HND":
        k, v = k.transpose(0, 1), v.transpose(0, 1)
    qo_len, kv_len = q.shape[0], k.shape[0]
    opts = plan_options(head_dim_qk=q.shape[-1], head_dim_vo=None, causal=causal,
                        has_mask=custom_mask is not None or packed_custom_mask is not None,
                        pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale,
                        window_left=window_left, logits_soft_cap=logits_soft_cap,
                        rope_scale=rope_scale, rope_theta=rope_theta, q_data_type=q.dtype,
                        kv_data_type=k.dtype)
    mask = custom_mask_arg(None if custom_mask is None else custom_mask.reshape(-1),
                           packed_custom_mask, [qo_len], [kv_len], q.device)
    p = plan([0, qo_len], [0, kv_len], nheads=q.shape[1], nheads_k=k.shape[1],
             head_dim=q.shape[2], device=q.device, custom_mask=mask, **opts.core())
    if opts.rope is not None:
        q = rope_.rotate(q, rope_.query_positions([qo_len], [kv_len], q.device), *opts.rope)
        k = rope_.rotate(k, rope_.ragged_key_positions([kv_len], k.device), *opts.rope)
    out, lse = p.run(q, k, v, return_lse=True)
    return (out, lse_base2(lse)) if return_lse else out
