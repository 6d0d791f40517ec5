"""flash_attn 2.8's flash_attn_with_kvcache: decoding against a KV cache.

The in-place append of the new k/v into the cache and the rotary embedding are tensor ops done
here, before the core call; the attention itself is one attention_forward_varlen call on the
paged path. A paged cache is passed as it is (pools and block_table); a contiguous cache
(batch_cache, seqlen_cache, nheads_k, d) is the same thing with one page of seqlen_cache rows
per sequence, so neither layout is copied.

Capacity (cache_seqlens + seqlen_new beyond the cache): host lengths (an int, a CPU tensor)
are checked on the host. Device lengths with a paged cache are read back once per call
(``.max()`` in flash_attn 2.8's mha_fwd_kvcache, the whole (batch,) vector here, reused for the
call), so both raise CapacityError, a RuntimeError naming block_table as flash_attn's does.
Device lengths with a contiguous cache are not read back (flash_attn does not check them
either) unless ATTNHUB_VALIDATE=full; nor is anything read while a CUDA graph is captured or
torch.compile traces. There, no input can read or write outside the cache: the append
clamps its positions to the cache and the kernels bound every block-table read by
max_seqlen_k (= the capacity); an over-long sequence gets a wrong answer, never a device
assert or an out-of-bounds access.
"""

from __future__ import annotations

import torch

from .. import host_copies
from ..api import attention_forward_varlen
from ..arguments import as_bool, as_int, as_window
from ..errors import CapacityError, InvalidArgumentError
from ..normalize import WindowSize
from .layouts import check_batched, pack, uniform_layout, unpack_lse
from .rotary import apply_rotary


def flash_attn_with_kvcache(
    q: torch.Tensor,
    k_cache: torch.Tensor,
    v_cache: torch.Tensor,
    k: torch.Tensor | None = None,
    v: torch.Tensor | None = None,
    rotary_cos: torch.Tensor | None = None,
    rotary_sin: torch.Tensor | None = None,
    cache_seqlens: int | torch.Tensor | None = None,
    cache_batch_idx: torch.Tensor | None = None,
    cache_leftpad: torch.Tensor | None = None,
    block_table: torch.Tensor | None = None,
    softmax_scale: float | None = None,
    causal: bool = False,
    window_size: WindowSize = (-1, -1),
    softcap: float = 0.0,
    rotary_interleaved: bool = True,
    alibi_slopes: torch.Tensor | None = None,
    num_splits: int = 0,
    return_softmax_lse: bool = False,
):
    """Attention of q (batch, seqlen_q, nheads, d) over a KV cache.

    k_cache / v_cache: (batch_cache, seqlen_cache, nheads_k, d), or page pools
    (num_blocks, page_block_size, nheads_k, d) with block_table (batch, max_blocks) int32.
    k / v (batch, seqlen_new, nheads_k, d), if given, are written into the cache in place at
    rows cache_seqlens[b] + i, then attended to. cache_seqlens: int or (batch,) int tensor, the
    cached lengths (None = the whole cache, only without k / v). cache_batch_idx (batch,):
    cache row of each sequence (contiguous caches). cache_leftpad (batch,): first valid cache
    row of each sequence (contiguous caches). rotary_cos / rotary_sin (seqlen_ro,
    rotary_dim / 2): rotate the new k at positions cache_seqlens + i and q at the same
    positions when causal or windowed, else at cache_seqlens. num_splits is a performance hint
    of flash_attn's kernel: accepted and ignored. Returns out (batch, seqlen_q, nheads, d), or
    (out, softmax_lse (batch, nheads, seqlen_q) float32) with return_softmax_lse.
    """
    check_batched("q", q, "(batch, seqlen_q, nheads, head_dim)")
    paged = block_table is not None
    pool_shape = ("(num_blocks, page_block_size, nheads_k, head_dim)" if paged
                  else "(batch_cache, seqlen_cache, nheads_k, head_dim)")
    check_batched("k_cache", k_cache, pool_shape)
    check_batched("v_cache", v_cache, pool_shape)
    if v_cache.shape != k_cache.shape:
        raise InvalidArgumentError("v_cache", f"the shape of k_cache {tuple(k_cache.shape)}",
                                   tuple(v_cache.shape))
    as_int("num_splits", num_splits, 0)  # a hint of flash_attn's kernel: validated, ignored
    batch, seqlen_q = q.shape[0], q.shape[1]
    device = q.device
    if paged:
        if not isinstance(block_table, torch.Tensor) or block_table.dim() != 2:
            raise InvalidArgumentError("block_table", "an int32 tensor (batch, max_blocks)",
                                       _describe(block_table))
        for name, t in (("cache_batch_idx", cache_batch_idx), ("cache_leftpad", cache_leftpad)):
            if t is not None:
                raise InvalidArgumentError(name, "None with a paged cache (block_table), as in "
                                           "flash_attn", "a tensor")
        capacity = block_table.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[1]
    seqlen_new = _new_kv(k, v, batch, k_cache)
    seqlens, seqlens_host = _cache_seqlens(cache_seqlens, batch, capacity, device, k is not None)
    if seqlens_host is None and host_copies.can_read_back() and (
            paged or host_copies.validation_mode() == "full"):
        seqlens_host = host_copies.host_copy(cache_seqlens)  # one sync, as flash_attn's .max()
    leftpad, leftpad_host = _optional_lengths("cache_leftpad", cache_leftpad, batch, device)
    rows = _cache_rows(cache_batch_idx, batch, k_cache, paged, device)
    if seqlens_host is not None:
        for b, n in enumerate(seqlens_host):
            if n + seqlen_new > capacity:
                where = (f"the capacity of block_table (max_blocks * page_block_size = "
                         f"{capacity} rows): allocate more columns in block_table" if paged
                         else f"the KV cache's seqlen_cache ({capacity} rows)")
                raise CapacityError("cache_seqlens", f"cache_seqlens + seqlen_new <= {where}",
                                    f"sequence {b}: {n} + {seqlen_new}")
            if leftpad_host is not None and not 0 <= leftpad_host[b] <= n:
                raise InvalidArgumentError("cache_leftpad", "0 <= cache_leftpad <= cache_seqlens",
                                           f"sequence {b}: {leftpad_host[b]} (length {n})")

    new_pos = seqlens.long()[:, None] + torch.arange(seqlen_new, device=device)
    if seqlens_host is None:  # unchecked device lengths: keep the append inside the cache
        new_pos = new_pos.clamp_max(capacity - 1)
    if rotary_cos is not None or rotary_sin is not None:
        local = as_bool("causal", causal) or as_window(window_size) != (-1, -1)
        q, k = _rotate(q, k, rotary_cos, rotary_sin, seqlens, seqlens_host, new_pos,
                       rotary_interleaved, local, seqlen_new)
    if k is not None and v is not None:
        _append(k_cache, v_cache, k, v, rows, block_table, new_pos)

    lengths = seqlens + seqlen_new
    if leftpad is not None:
        lengths = lengths - leftpad
    if seqlens_host is not None and (leftpad is None or leftpad_host is not None):
        cu_k: list[int] | torch.Tensor = [0]
        for b, n in enumerate(seqlens_host):
            cu_k.append(cu_k[-1] + n + seqlen_new - (leftpad_host[b] if leftpad_host else 0))
    else:
        cu_k = torch.nn.functional.pad(torch.cumsum(lengths, 0, dtype=torch.int32), (1, 0))
    if paged:
        k_pool, v_pool, table = k_cache, v_cache, block_table
    elif leftpad is None:
        k_pool, v_pool, table = k_cache, v_cache, rows.view(batch, 1).to(torch.int32)
    else:  # shift each sequence's rows so that its first valid row is row 0 of its page
        shift = (leftpad.long()[:, None] + torch.arange(capacity, device=device))
        shift = shift.clamp_max(capacity - 1)
        k_pool, v_pool = k_cache[rows[:, None], shift], v_cache[rows[:, None], shift]
        table = torch.arange(batch, dtype=torch.int32, device=device).view(batch, 1)
    res = attention_forward_varlen(
        pack(q), k_pool, v_pool, uniform_layout(batch, seqlen_q, device), cu_k, None, capacity,
        0.0, softmax_scale, causal, window_size, softcap, alibi_slopes, block_table=table,
        return_lse=return_softmax_lse)
    if not return_softmax_lse:
        return res.reshape(q.shape)
    out, lse = res
    return out.reshape(q.shape), unpack_lse(lse, batch, seqlen_q)


def _describe(t: object) -> str:
    return f"shape {tuple(t.shape)}" if isinstance(t, torch.Tensor) else type(t).__name__


def _new_kv(k: torch.Tensor | None, v: torch.Tensor | None, batch: int,
            k_cache: torch.Tensor) -> int:
    """Validate the new k / v; -> seqlen_new (0 without them)."""
    if (k is None) != (v is None):
        raise InvalidArgumentError("v" if v is None else "k", "k and v given together, or neither",
                                   "only one of them")
    if k is None:
        return 0
    shape = (batch, k.shape[1] if isinstance(k, torch.Tensor) and k.dim() == 4 else -1,
             k_cache.shape[2], k_cache.shape[3])
    for name, t in (("k", k), ("v", v)):
        if not isinstance(t, torch.Tensor) or tuple(t.shape) != shape:
            raise InvalidArgumentError(name, f"shape (batch, seqlen_new, nheads_k, head_dim) = "
                                       f"{shape}", _describe(t))
        if t.dtype != k_cache.dtype:
            raise InvalidArgumentError(name, f"the dtype of k_cache ({k_cache.dtype})", t.dtype)
    return k.shape[1]


def _optional_lengths(name: str, t: torch.Tensor | None, batch: int, device: torch.device
                      ) -> tuple[torch.Tensor | None, tuple[int, ...] | None]:
    """A (batch,) int tensor -> (int32 on device, host values when it lives on the CPU)."""
    if t is None:
        return None, None
    if not isinstance(t, torch.Tensor) or t.dtype not in (torch.int32, torch.int64) \
            or tuple(t.shape) != (batch,):
        raise InvalidArgumentError(name, f"an int32 tensor of shape (batch,) = ({batch},)",
                                   _describe(t) if not isinstance(t, torch.Tensor)
                                   else f"{t.dtype} of shape {tuple(t.shape)}")
    host = tuple(int(x) for x in t.tolist()) if t.device.type == "cpu" else None
    if host is not None and any(x < 0 for x in host):
        raise InvalidArgumentError(name, "values >= 0", host)
    return t.to(device=device, dtype=torch.int32), host


def _cache_seqlens(cache_seqlens: int | torch.Tensor | None, batch: int, capacity: int,
                   device: torch.device, appending: bool
                   ) -> tuple[torch.Tensor, tuple[int, ...] | None]:
    if cache_seqlens is None:
        if appending:
            raise InvalidArgumentError("cache_seqlens", "the cached lengths when k and v are "
                                       "appended", None)
        host = (capacity,) * batch
    elif not isinstance(cache_seqlens, torch.Tensor):  # an int for every sequence
        host = (as_int("cache_seqlens", cache_seqlens, 0),) * batch
    else:
        tensor, host_t = _optional_lengths("cache_seqlens", cache_seqlens, batch, device)
        assert tensor is not None
        return tensor, host_t
    return torch.tensor(host, dtype=torch.int32, device=device), host


def _cache_rows(cache_batch_idx: torch.Tensor | None, batch: int, k_cache: torch.Tensor,
                paged: bool, device: torch.device) -> torch.Tensor:
    """int64 (batch,): the cache row of each sequence (contiguous caches)."""
    if paged:
        return torch.arange(batch, device=device)
    if cache_batch_idx is None:
        if k_cache.shape[0] < batch:
            raise InvalidArgumentError("k_cache", f"at least batch = {batch} rows (dimension 0) "
                                       "without cache_batch_idx", k_cache.shape[0])
        return torch.arange(batch, device=device)
    idx, host = _optional_lengths("cache_batch_idx", cache_batch_idx, batch, device)
    assert idx is not None
    if host is not None and any(x >= k_cache.shape[0] for x in host):
        raise InvalidArgumentError("cache_batch_idx", f"indices in [0, {k_cache.shape[0]})", host)
    return idx.long()


def _rotate(q, k, cos, sin, seqlens, seqlens_host, new_pos, interleaved, local, seqlen_new):
    if k is None:
        raise InvalidArgumentError("rotary_cos", "None unless new k and v are appended (flash_attn "
                                   "rotates the new keys)", "a tensor")
    for name, t in (("rotary_cos", cos), ("rotary_sin", sin)):
        if not isinstance(t, torch.Tensor) or t.dim() != 2:
            raise InvalidArgumentError(name, "a 2-D tensor (seqlen_ro, rotary_dim / 2)",
                                       _describe(t))
    if sin.shape != cos.shape:
        raise InvalidArgumentError("rotary_sin", f"the shape of rotary_cos {tuple(cos.shape)}",
                                   tuple(sin.shape))
    if 2 * cos.shape[1] > q.shape[-1]:
        raise InvalidArgumentError("rotary_cos", f"rotary_dim / 2 <= head_dim / 2 = "
                                   f"{q.shape[-1] // 2}", cos.shape[1])
    seqlen_q = q.shape[1]
    steps = seqlen_q if local else 1
    if seqlens_host is not None:
        last = max(seqlens_host) + max(seqlen_new, steps) - 1
        if last >= cos.shape[0]:
            raise InvalidArgumentError("rotary_cos", f"at least {last + 1} rows (the last "
                                       "rotated position + 1)", cos.shape[0])
    q_pos = seqlens.long()[:, None] + torch.arange(seqlen_q, device=q.device) * int(local)
    return (apply_rotary(q, cos, sin, q_pos, interleaved),
            apply_rotary(k, cos, sin, new_pos, interleaved))


def _append(k_cache, v_cache, k, v, rows, block_table, new_pos) -> None:
    """Write the new k / v into the cache in place at rows cache_seqlens + i."""
    if block_table is None:
        k_cache[rows[:, None], new_pos] = k
        v_cache[rows[:, None], new_pos] = v
        return
    page_size = k_cache.shape[1]
    batch = block_table.shape[0]
    b = torch.arange(batch, device=new_pos.device)[:, None]
    pages = block_table.long()[b, new_pos // page_size]
    k_cache[pages, new_pos % page_size] = k
    v_cache[pages, new_pos % page_size] = v
