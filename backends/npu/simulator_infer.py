"""The simulator's model of ``torch_npu.npu_fused_infer_attention_score`` with page attention.

From Ascend's documentation (torch_npu 2.14.0 ``_op_plugin_docs.py``; docs/npu.md): query
float16 / bfloat16 in layout BSND ``(B, Q_S, N, D)``; with ``block_table`` (int32, 2-D,
``(B, >= maxBlockNumPerSeq)``) key and value are block pools ``(blocknum, block_size, H)``,
H = num_key_value_heads * D (the only cache layout BSND takes), and ``actual_seq_lengths_kv``
(per-batch kv lengths) is required; ``block_size``: Q_S > 1 a multiple of 128 in 128..512,
Q_S = 1 a multiple of 16 (float16 / bfloat16) up to 512; Q_S > 1 needs D a multiple of 16;
num_heads / num_key_value_heads at most 64; ``actual_seq_lengths`` the per-batch query
lengths (ignored when Q_S = 1). Q_S > 1 honors sparse_mode 0 (no mask), 3 (rightDownCausal)
and 4 (band, bottom-right, pre/next) with the compressed 2048 x 2048 mask; Q_S = 1 ignores
sparse_mode, pre_tokens and next_tokens and takes an explicit ``(B, KV_S)`` atten_mask (bool,
int8 or uint8, True = masked) whose KV_S is at least block_table width * block_size. Rows
past a batch's actual length are undefined (NaN here); a row that sees no key is undefined
(NaN) unless inner_precise is 2 or 3 (row-invalid correction: zeros). With
``softmax_lse_flag`` the second output is lse ``(B, N, Q_S, 1)`` float32, else a [1] zero
tensor. Only page attention without quantization,
pse_shift, prefix, padding or rope is modeled; anything else raises NotImplementedError.
"""

from __future__ import annotations

import torch

INT32_MAX = 2**31 - 1
COMPRESSED_MASK_SIZE = 2048
_UNMODELED = ("pse_shift", "dequant_scale1", "quant_scale1", "dequant_scale2", "quant_scale2",
              "quant_offset2", "antiquant_scale", "antiquant_offset", "query_padding_size",
              "kv_padding_size", "key_antiquant_scale", "key_antiquant_offset",
              "value_antiquant_scale", "value_antiquant_offset", "key_shared_prefix",
              "value_shared_prefix", "actual_shared_prefix_len", "query_rope", "key_rope",
              "key_rope_antiquant_scale")


def npu_fused_infer_attention_score(query, key, value, *, pse_shift=None, atten_mask=None,
                                    actual_seq_lengths=None, actual_seq_lengths_kv=None,
                                    dequant_scale1=None, quant_scale1=None, dequant_scale2=None,
                                    quant_scale2=None, quant_offset2=None, antiquant_scale=None,
                                    antiquant_offset=None, key_antiquant_scale=None,
                                    key_antiquant_offset=None, value_antiquant_scale=None,
                                    value_antiquant_offset=None, block_table=None,
                                    query_padding_size=None, kv_padding_size=None,
                                    key_shared_prefix=None, value_shared_prefix=None,
                                    actual_shared_prefix_len=None, query_rope=None,
                                    key_rope=None, key_rope_antiquant_scale=None, num_heads=1,
                                    scale=1.0, pre_tokens=INT32_MAX, next_tokens=INT32_MAX,
                                    input_layout="BSH", num_key_value_heads=0, sparse_mode=0,
                                    inner_precise=0, block_size=0, antiquant_mode=0,
                                    key_antiquant_mode=0, value_antiquant_mode=0,
                                    softmax_lse_flag=False):
    """-> (attention_out (B, Q_S, N, D), softmax_lse (B, N, Q_S, 1) or a [1] zero)."""
    given = {k: v for k, v in locals().items() if k in _UNMODELED and v is not None}
    if given:
        raise NotImplementedError(f"the simulator does not model {sorted(given)}")
    if input_layout != "BSND":
        raise NotImplementedError(f"the simulator models input_layout 'BSND', got "
                                  f"{input_layout!r}")
    if block_table is None:
        raise NotImplementedError("the simulator models page attention (block_table) only")
    if query.dtype not in (torch.float16, torch.bfloat16):
        raise TypeError(f"query must be float16 or bfloat16 with page attention, got "
                        f"{query.dtype}")
    if query.dim() != 4:
        raise ValueError(f"BSND query must be 4-D, got {tuple(query.shape)}")
    batch, qs, n, d = query.shape
    nk = num_key_value_heads or n
    if num_heads != n:
        raise ValueError(f"num_heads {num_heads} != N of query {n}")
    if n % nk or n // nk > 64:
        raise ValueError(f"num_heads ({n}) must be a multiple of num_key_value_heads ({nk}), "
                         "ratio at most 64")
    _check_pages(key, value, block_table, block_size, qs, batch, nk, d, query.dtype)
    if qs > 1 and d % 16:
        raise ValueError(f"Q_S > 1: D must be 16-aligned for float16 / bfloat16, got {d}")
    lk = _lengths("actual_seq_lengths_kv", actual_seq_lengths_kv, batch, required=True)
    lq = [1] * batch if qs == 1 else _lengths("actual_seq_lengths", actual_seq_lengths, batch,
                                               default=qs)
    if any(x > qs for x in lq):
        raise ValueError(f"actual_seq_lengths {lq} exceed Q_S = {qs}")
    mode = _mask_mode(atten_mask, sparse_mode, pre_tokens, next_tokens, qs)
    if qs == 1 and atten_mask is not None and (
            atten_mask.dtype not in (torch.bool, torch.int8, torch.uint8)
            or atten_mask.dim() != 2 or atten_mask.shape[0] != batch
            or atten_mask.shape[1] < block_table.shape[1] * block_size):
        raise ValueError("Q_S = 1 with page attention takes atten_mask (B, KV_S), KV_S >= "
                             "block_table.shape[1] * block_size, bool / int8 / uint8")
    out = torch.full(query.shape, float("nan"), dtype=query.dtype, device=query.device)
    lse = torch.full((batch, n, qs, 1), float("nan"), dtype=torch.float32, device=query.device)
    group = n // nk
    for b in range(batch):
        sq, sk = lq[b], lk[b]
        if sq == 0:
            continue
        pages = block_table[b, :(sk + block_size - 1) // block_size].long()
        kb = key[pages].reshape(-1, nk, d)[:sk].float().repeat_interleave(group, 1)
        vb = value[pages].reshape(-1, nk, value.shape[-1] // nk)[:sk].float()
        vb = vb.repeat_interleave(group, 1)
        qb = query[b, :sq].float()
        s = torch.einsum("ihd,jhd->hij", qb, kb) * float(scale)
        visible = _visible(mode, sq, sk, pre_tokens, next_tokens, query.device)
        if qs == 1 and atten_mask is not None:
            visible = visible & ~atten_mask[b, :sk].bool()[None, :]
        s = s.masked_fill(~visible[None], float("-inf"))
        m = s.amax(-1, keepdim=True)
        e = torch.exp(s - m)
        total = e.sum(-1, keepdim=True)
        o = torch.einsum("hij,jhd->ihd", e / total, vb)
        row_lse = (m + torch.log(total))[..., 0]  # (N, sq)
        dead = ~visible.any(-1)
        if dead.any():
            fill = 0.0 if inner_precise in (2, 3) else float("nan")
            o[dead] = fill
            row_lse[:, dead] = float("-inf") if inner_precise in (2, 3) else fill
        out[b, :sq] = o.to(query.dtype)
        lse[b, :, :sq, 0] = row_lse
    if not softmax_lse_flag:
        lse = torch.zeros(1, dtype=torch.float32, device=query.device)
    return out, lse


def _check_pages(key, value, block_table, block_size, qs, batch, nk, d, dtype) -> None:
    if key.dim() != 3 or key.shape != value.shape[:2] + key.shape[2:] \
            or key.shape[:2] != value.shape[:2]:
        raise ValueError("with BSND, page attention takes key / value as (blocknum, "
                         f"block_size, H), got {tuple(key.shape)} and {tuple(value.shape)}")
    if key.dtype != dtype or value.dtype != dtype:
        raise TypeError("key / value must have the query's dtype")
    if key.shape[2] != nk * d:
        raise ValueError(f"H of key ({key.shape[2]}) must be num_key_value_heads * D = "
                         f"{nk * d}")
    if nk * d > 65535:
        raise ValueError("(blocknum, block_size, H) with KV_N * D > 65535 is rejected")
    if key.shape[1] != block_size:
        raise ValueError(f"block_size {block_size} != the pools' block dimension "
                         f"{key.shape[1]}")
    if qs > 1:
        if block_size % 128 or not 128 <= block_size <= 512:
            raise ValueError(f"Q_S > 1: block_size must be a multiple of 128 in 128..512, got "
                             f"{block_size}")
    elif block_size <= 0 or block_size % 16 or block_size > 512:
        raise ValueError(f"Q_S = 1: block_size must be a non-zero multiple of 16 up to 512, "
                         f"got {block_size}")
    if block_table.dtype != torch.int32 or block_table.dim() != 2 \
            or block_table.shape[0] != batch:
        raise ValueError(f"block_table must be int32 (B = {batch}, max blocks), got "
                         f"{block_table.dtype} {tuple(block_table.shape)}")


def _lengths(name, values, batch, *, required=False, default=None) -> list[int]:
    if values is None:
        if required:
            raise ValueError(f"{name} is required with page attention")
        return [default] * batch
    if isinstance(values, torch.Tensor) or not isinstance(values, (list, tuple)):
        raise TypeError(f"{name} must be a list of ints")
    if not all(isinstance(x, int) and x >= 0 for x in values):
        raise ValueError(f"{name} must hold non-negative ints, got {values!r}")
    if len(values) == 1:
        return list(values) * batch
    if len(values) < batch:
        raise ValueError(f"{name} needs 1 or at least B = {batch} entries, got {len(values)}")
    return list(values[:batch])


def _mask_mode(mask, sparse_mode, pre, nxt, qs) -> int:
    """The effective mask: 0 none, 3 rightDownCausal, 4 band."""
    if qs == 1:
        return 0  # IncreFlashAttention: sparse_mode / pre / next are ignored
    if sparse_mode == 0:
        if mask is not None:
            raise NotImplementedError("the simulator does not model an explicit atten_mask")
        return 0
    if sparse_mode not in (3, 4):
        raise NotImplementedError(f"the simulator models sparse_mode 0, 3, 4, got {sparse_mode}")
    ones = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool,
                      device=mask.device if mask is not None else "cpu")
    if mask is None or tuple(mask.shape) != (COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE) \
            or not torch.equal(mask.bool(), torch.triu(ones, 1)):
        raise ValueError(f"sparse_mode {sparse_mode} needs the compressed mask "
                         "triu(ones(2048, 2048), 1)")
    if sparse_mode == 4 and pre + nxt < 0:
        raise ValueError("sparse_mode 4: pre_tokens and next_tokens must overlap")
    return sparse_mode


def _visible(mode, sq, sk, pre, nxt, device) -> torch.Tensor:
    i = torch.arange(sq, device=device)[:, None]
    j = torch.arange(sk, device=device)[None, :]
    if mode == 0:
        return torch.ones(sq, sk, dtype=torch.bool, device=device)
    diag = i + sk - sq
    if mode == 3:
        return j <= diag
    return (j >= diag - pre) & (j <= diag + nxt)
