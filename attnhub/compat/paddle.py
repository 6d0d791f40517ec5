"""Paddle's ``paddle.nn.functional.flash_attn_varlen_qkvpacked`` on torch tensors.

Facts from Paddle's documentation and source of that function (python/paddle/nn/functional/
flash_attention.py): qkv is [total_seq_len, num_heads / num_heads_k + 2, num_heads_k, head_dim]
(slots 0..G-1 the query heads, G the key, G + 1 the value); ``scale`` has no default;
``max_seqlen_q`` is the padding length; ``varlen_padded`` defaults to True; ``training=False``
switches dropout off; the result is (out [total_seq_len, num_heads, head_dim], softmax or None).
Paddle's kernel aligns causal masks at the top-left when q and k lengths differ.
"""

from __future__ import annotations

import torch

from ..api import attention_forward_varlen
from ..arguments import as_bool, as_int
from ..errors import InvalidArgumentError
from .seeding import seeded


def flash_attn_varlen_qkvpacked(
    qkv: torch.Tensor,
    cu_seqlens_q: torch.Tensor,
    cu_seqlens_k: torch.Tensor,
    max_seqlen_q: int,
    max_seqlen_k: int,
    scale: float,
    dropout: float = 0.0,
    causal: bool = False,
    return_softmax: bool = False,
    fixed_seed_offset: torch.Tensor | None = None,
    rng_name: str = "",
    varlen_padded: bool = True,
    training: bool = True,
    name: str | None = None,
) -> tuple[torch.Tensor, torch.Tensor | None]:
    """qkv (total, G + 2, nheads_k, d), G = nheads / nheads_k; flattened query head
    g * nheads_k + hk reads kv head (g * nheads_k + hk) // G.

    cu_seqlens_q / cu_seqlens_k: (batch + 1,) int offsets of the real lengths. With
    varlen_padded=True (Paddle's default), sequence b occupies rows [b * max_seqlen_q,
    b * max_seqlen_q + len_b) of qkv (so total = batch * max_seqlen_q, and max_seqlen_q ==
    max_seqlen_k) and the output is 0 on the padding rows; with False, sequences are packed
    back to back. ``fixed_seed_offset``: int64 [seed, offset], makes dropout reproducible
    (the same pair gives the same mask); ``rng_name`` must be '' (attnhub draws from torch's
    generator of the device). Returns (out (total, nheads, d), softmax (batch, nheads,
    max_seqlen_q, max_seqlen_k) in qkv's dtype if return_softmax else None).
    """
    del name  # Paddle's static-graph naming; nothing to name here
    if not isinstance(qkv, torch.Tensor) or qkv.dim() != 4 or qkv.shape[1] < 3:
        got = f"shape {tuple(qkv.shape)}" if isinstance(qkv, torch.Tensor) else type(qkv).__name__
        raise InvalidArgumentError("qkv", "a 4-D tensor [total, nheads / nheads_k + 2, nheads_k, "
                                   "head_dim] with at least one query slot", got)
    if rng_name:
        raise InvalidArgumentError("rng_name", "'' (attnhub draws dropout from torch's default "
                                   "generator of the device; pass fixed_seed_offset for a fixed "
                                   "mask)", repr(rng_name))
    training, causal, return_softmax, varlen_padded = (
        as_bool(arg, value) for arg, value in (
            ("training", training), ("causal", causal), ("return_softmax", return_softmax),
            ("varlen_padded", varlen_padded)))
    total, groups = qkv.shape[0], qkv.shape[1] - 2
    q = qkv[:, :groups].reshape(total, groups * qkv.shape[2], qkv.shape[3])
    k, v = qkv[:, groups], qkv[:, groups + 1]
    p = dropout if training else 0.0
    kwargs = dict(dropout_p=p, softmax_scale=scale, causal=causal,
                  return_attn_probs=return_softmax, mask_alignment="top_left")
    with seeded(fixed_seed_offset, qkv.device, p > 0):
        if varlen_padded:
            res = _padded(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q, max_seqlen_k,
                          kwargs)
        else:
            res = attention_forward_varlen(q, k, v, cu_seqlens_q, cu_seqlens_k, max_seqlen_q,
                                           max_seqlen_k, **kwargs)
    if not return_softmax:
        return res, None
    out, _, probs = res
    if varlen_padded:
        probs = probs[0::2]
    return out, probs.to(qkv.dtype)


def _padded(q, k, v, cu_q, cu_k, max_q, max_k, kwargs):
    """Sequence b at rows [b * max, b * max + len_b): a packed batch of 2 * batch sequences,
    each real one followed by its padding rows, which see no key (out 0). k / v are read as
    one page of max_k rows per sequence, so the padding keys are never visible."""
    try:
        max_q, max_k = as_int("max_seqlen_q", max_q, 1), as_int("max_seqlen_k", max_k, 1)
    except InvalidArgumentError as exc:
        raise InvalidArgumentError(exc.argument, "the padding length, an int >= 1, with "
                                   "varlen_padded=True", exc.got) from None
    total = q.shape[0]
    if max_q != max_k or total % max_q:
        raise InvalidArgumentError("qkv", f"batch * max_seqlen rows with varlen_padded=True and "
                                   f"max_seqlen_q == max_seqlen_k (got {max_q}, {max_k})",
                                   f"{total} rows")
    batch = total // max_q
    lens_q = _lengths("cu_seqlens_q", cu_q, batch, max_q, q.device)
    lens_k = _lengths("cu_seqlens_k", cu_k, batch, max_k, q.device)
    starts = torch.arange(batch, device=q.device, dtype=torch.int32) * max_q
    ends = torch.stack((starts + lens_q, starts + max_q), dim=1).flatten()
    cu_q2 = torch.nn.functional.pad(ends, (1, 0))
    cu_k2 = torch.nn.functional.pad(torch.cumsum(
        torch.stack((lens_k, torch.zeros_like(lens_k)), dim=1).flatten(), 0,
        dtype=torch.int32), (1, 0))
    pages = torch.arange(batch, device=q.device, dtype=torch.int32).repeat_interleave(2)
    k_pool = k.reshape(batch, max_k, *k.shape[1:])
    v_pool = v.reshape(batch, max_k, *v.shape[1:])
    return attention_forward_varlen(q, k_pool, v_pool, cu_q2, cu_k2, max_q, max_k,
                                    block_table=pages.view(2 * batch, 1), **kwargs)


def _lengths(arg: str, cu: object, batch: int, max_len: int, device: torch.device
             ) -> torch.Tensor:
    """Per-sequence lengths (batch,) int32 on ``device`` from offsets; validated on the host
    when the offsets are there (never read back from a device)."""
    if isinstance(cu, (list, tuple)):
        cu = torch.tensor(cu, dtype=torch.int32)
    if not isinstance(cu, torch.Tensor) or cu.dim() != 1 or cu.dtype not in (torch.int32,
                                                                               torch.int64):
        raise InvalidArgumentError(arg, "a 1-D int32 tensor of batch + 1 offsets",
                                   type(cu).__name__ if not isinstance(cu, torch.Tensor)
                                   else f"{cu.dim()}-D {cu.dtype}")
    if cu.shape[0] != batch + 1:
        raise InvalidArgumentError(arg, f"batch + 1 = {batch + 1} offsets (qkv holds {batch} "
                                   "padded sequences)", cu.shape[0])
    lengths = cu[1:] - cu[:-1]
    if cu.device.type == "cpu":
        host = cu.tolist()
        if host[0] != 0 or any(not 0 <= n <= max_len for n in lengths.tolist()):
            raise InvalidArgumentError(arg, f"offsets from 0 of lengths in [0, {max_len}] (the "
                                       "padding length) with varlen_padded=True", host)
    return lengths.to(device=device, dtype=torch.int32)
