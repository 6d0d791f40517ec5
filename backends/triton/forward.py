"""Varlen FlashAttention forward in Triton: one program per (query tile, query head).

Online softmax in base 2 over the key blocks each tile can see (causal and window bands are
skipped, not masked), fp32 accumulation, GQA by indexing (no expanded K/V), softcap, ALiBi,
Philox dropout, paged K/V through the block table, attention sinks (one logit per query head
that joins each row's softmax denominator), lse in natural log. Fully visible key
blocks, and in plain calls the diagonal blocks inside the sequence, read K/V through TMA
descriptors where the layout allows (docs/triton.md, Loads).
"""

from __future__ import annotations

import functools

import torch
import triton
import triton.language as tl

from . import configs, hopper_forward, replay, tiles
from .softcap import mode as softcap_mode
from .softcap import tanh as _tanh
from .softcap import tanh_half as _tanh_half
from .tiles import program_tile

try:
    from triton.tools.tensor_descriptor import TensorDescriptor
except ImportError:  # triton < 3.4: pointer loads only
    TensorDescriptor = None

LOG2E = 1.4426950408889634
LN2 = 0.6931471805599453


@triton.jit
def kv_rows(BlockTable, b, stride_bt_b, offs_n, k_start, max_seqlen_k, PAGED: tl.constexpr,
            PAGE_SIZE: tl.constexpr):
    """Row indices of key positions ``offs_n`` (local to sequence b) in K/V: packed rows, or
    page * PAGE_SIZE + slot in the flattened page pools. Paged positions are clamped to
    max_seqlen_k - 1 (key_bound: <= the block table's capacity) before the table is read: the
    tail of the last block, or a device length beyond the capacity, never reads past the
    block table's row (no out-of-bounds read; such keys are masked, or the call broke the
    capacity contract and gets a wrong answer, never a fault)."""
    if PAGED:
        pos = tl.minimum(offs_n, max_seqlen_k - 1)
        page = tl.load(BlockTable + b * stride_bt_b + pos // PAGE_SIZE)
        return page.to(tl.int64) * PAGE_SIZE + pos % PAGE_SIZE
    else:
        return (k_start + offs_n).to(tl.int64)


@triton.jit
def sequence_bounds(CuQ, CuK, b, TOP_LEFT: tl.constexpr):
    """(first query row, sq, first key row, sk, mask offset) of sequence b; the offset
    aligns the mask bottom-right (sk - sq) or top-left (0)."""
    q_start = tl.load(CuQ + b)
    sq = tl.load(CuQ + b + 1) - q_start
    k_start = tl.load(CuK + b)
    sk = tl.load(CuK + b + 1) - k_start
    offset = 0 if TOP_LEFT else sk - sq
    return q_start, sq, k_start, sk, offset


@triton.jit
def score_tile(a, b, qi, kj, sk, offset, qk_scale, tanh_scale, softcap2, slope2,
               window_left, window_right, MASK: tl.constexpr,
               HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr, WINDOW_LEFT: tl.constexpr,
               WINDOW_RIGHT: tl.constexpr, PRECISION: tl.constexpr):
    """Scores ``a @ b`` of one tile in base-2 units (-inf where masked when MASK), and the
    softcap tanh for backward. ``qi`` / ``kj``: query and key positions broadcast to the
    tile's shape (``offs_m[:, None]``, ``offs_n[None, :]`` for q @ k^T; the transpose for
    k @ q^T). qk_scale = scale * log2(e); tanh_scale = scale / cap; softcap2 = cap * log2(e);
    slope2 = slope * log2(e). The tanh: softcap.tanh for fp32 inputs, softcap.tanh_half for
    fp16 / bf16; HAS_SOFTCAP: softcap.mode of the cap."""
    s = tl.dot(a, b, input_precision=PRECISION)
    if HAS_SOFTCAP:
        if PRECISION == "ieee":
            t = _tanh(s * tanh_scale)
        else:
            t = _tanh_half(s * tanh_scale, HAS_SOFTCAP == 2)
        s = t * softcap2
    else:
        t = s
        s = s * qk_scale
    if HAS_ALIBI or MASK:
        rel = qi + offset - kj  # i + sk - sq - j
        if HAS_ALIBI:
            s = s - slope2 * tl.abs(rel).to(tl.float32)
        if MASK:
            visible = kj < sk
            if WINDOW_LEFT:
                visible = visible & (rel <= window_left)
            if WINDOW_RIGHT:
                visible = visible & (rel >= -window_right)
            s = tl.where(visible, s, float("-inf"))
    return s, t


@triton.jit
def key_ranges(m0, sk, offset, window_left, window_right, BLOCK_M: tl.constexpr,
               BLOCK_N: tl.constexpr, WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr):
    """Key blocks of query rows [m0, m0 + BLOCK_M): [lo, a) and [b, hi) need the mask,
    [a, b) are fully visible to every row (and inside the sequence)."""
    lo = 0
    hi = sk
    full_lo = 0
    full_hi = (sk // BLOCK_N) * BLOCK_N
    if WINDOW_RIGHT:
        hi = tl.minimum(sk, m0 + BLOCK_M - 1 + offset + window_right + 1)
        full_hi = tl.minimum(full_hi,
                             (tl.maximum(m0 + offset + window_right + 1, 0) // BLOCK_N) * BLOCK_N)
    if WINDOW_LEFT:
        lo = (tl.maximum(0, m0 + offset - window_left) // BLOCK_N) * BLOCK_N
        first_full = tl.maximum(m0 + BLOCK_M - 1 + offset - window_left, 0)
        full_lo = tl.maximum(lo, (first_full + BLOCK_N - 1) // BLOCK_N * BLOCK_N)
    a = tl.minimum(tl.maximum(full_lo, lo), hi)
    b = tl.maximum(tl.minimum(full_hi, hi), a)
    return lo, a, b, hi


@triton.jit
def custom_mask_visible(MaskBits, mask_off, qi, kj, sq, sk):
    """Bits mask_off + i * sk + j of the packed per-request mask (little bit order) at query /
    key positions ``qi`` / ``kj`` (broadcast as in score_tile); False outside the sequence."""
    pos = mask_off + qi.to(tl.int64) * sk + kj
    in_seq = (qi < sq) & (kj < sk)
    byte = tl.load(MaskBits + (pos >> 3), mask=in_seq, other=0).to(tl.int32)
    return ((byte >> (pos & 7).to(tl.int32)) & 1) != 0


@triton.jit
def add_sink(acc, l_i, m_i, Sinks, h, mask):
    """The softmax state (acc, l_i, m_i in base 2, m_i -inf where a row saw nothing) with
    head ``h``'s sink logit (natural units) joined to the denominator: rescaled to the larger
    maximum so that neither exp2 overflows. A row that saw nothing ends with l = exp(0) = 1 at
    m = sink (lse = sink, out = 0); a -inf sink changes nothing. ``mask``: rows that exist
    (``h`` may be a tensor of heads)."""
    sink2 = tl.load(Sinks + h, mask=mask, other=float("-inf")) * 1.4426950408889634
    m_new = tl.maximum(m_i, sink2)
    m_new = tl.where(m_new == float("-inf"), 0.0, m_new)
    alpha = tl.exp2(m_i - m_new)
    l_i = l_i * alpha + tl.exp2(sink2 - m_new)
    return acc * alpha[:, None], l_i, m_new


@triton.jit
def dropout_keep(seed_ptr, b, h, nheads, qi, kj, max_seqlen_k, dropout_p):
    """Philox keep mask for the tile (positions ``qi`` / ``kj`` broadcast as in score_tile):
    one stream per (sequence, head), offset i * max_sk + j."""
    seed = tl.load(seed_ptr)
    stream = seed + (b * nheads + h).to(tl.int64) * 1000003
    offsets = qi * max_seqlen_k + kj
    return tl.rand(stream, offsets) >= dropout_p


# Per-batch integers must not be specialised on (== 1, % 16): new lengths would recompile.
PER_BATCH_ARGS = ["total_q", "batch", "max_seqlen_k"]


@triton.jit
def _mask_right_edge(s, kj, block_start, mask_from, kmax):
    """Scores ``s`` of a key block starting at ``block_start`` (keys ``kj``): from key
    ``mask_from`` on (the diagonal), keys past each query row's last visible key ``kmax``
    are masked (-inf); earlier blocks are fully visible and left as they are."""
    if block_start >= mask_from:
        s = tl.where(kj[None, :] <= kmax[:, None], s, float("-inf"))
    return s


@triton.jit
def _fwd_blocks(acc, l_i, m_i, q, K, V, desc_k, desc_v, BlockTable, b, h, kvh, k_start,
                stride_bt_b, stride_kt, stride_kh, stride_vt, stride_vh, offs_m, offs_d, sk,
                offset, qk_scale, tanh_scale, softcap2, slope2, window_left, window_right, Seed,
                nheads, max_seqlen_k, dropout_p, first, split, second, count, MaskBits,
                mask_off, sq, MASK: tl.constexpr, HAS_CUSTOM_MASK: tl.constexpr,
                HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr, WINDOW_LEFT: tl.constexpr,
                WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr, HAS_ALIBI: tl.constexpr,
                HAS_DROPOUT: tl.constexpr, PAGED: tl.constexpr, PAGE_SIZE: tl.constexpr,
                PRECISION: tl.constexpr, EVEN_D: tl.constexpr, USE_TMA: tl.constexpr,
                kmax, mask_from, RIGHT_EDGE: tl.constexpr):
    """Key blocks first, first + BLOCK_N, ... (split of them) then second, ... (count in all),
    masked when MASK; with RIGHT_EDGE (unmasked blocks inside the sequence), blocks from key
    ``mask_from`` on mask keys past ``kmax``, each query row's last visible key."""
    for i in range(0, count):  # blocks first, first + BLOCK_N, ... then second, ...
        start_n = tl.where(i < split, first + i * BLOCK_N, second + (i - split) * BLOCK_N)
        offs_n = start_n + tl.arange(0, BLOCK_N)
        rows = kv_rows(BlockTable, b, stride_bt_b, offs_n, k_start, max_seqlen_k, PAGED,
                       PAGE_SIZE)
        k_ptrs = K + rows[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None]
        v_ptrs = V + rows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :]
        if MASK:  # pointer loads here: TMA boxes were slower on the masked edge blocks
            n_ok = offs_n < sk
            k = tl.load(k_ptrs, mask=n_ok[None, :] & (offs_d[:, None] < HEAD_DIM), other=0.0)
            v = tl.load(v_ptrs, mask=n_ok[:, None] & (offs_d[None, :] < HEAD_DIM), other=0.0)
        elif USE_TMA:
            k = _load_kt(K, desc_k, k_start + start_n, kvh, stride_kt, stride_kh, offs_n,
                         offs_d, HEAD_DIM, True)
            v = _load_v(V, desc_v, k_start + start_n, kvh, stride_vt, stride_vh, offs_n,
                        offs_d, HEAD_DIM, True)
        elif EVEN_D:
            k = tl.load(k_ptrs)
            v = tl.load(v_ptrs)
        else:
            k = tl.load(k_ptrs, mask=offs_d[:, None] < HEAD_DIM, other=0.0)
            v = tl.load(v_ptrs, mask=offs_d[None, :] < HEAD_DIM, other=0.0)
        s, _ = score_tile(q, k, offs_m[:, None], offs_n[None, :], sk, offset, qk_scale,
                          tanh_scale, softcap2, slope2, window_left, window_right, MASK,
                          HAS_SOFTCAP, HAS_ALIBI, WINDOW_LEFT, WINDOW_RIGHT, PRECISION)
        if HAS_CUSTOM_MASK:
            s = tl.where(custom_mask_visible(MaskBits, mask_off, offs_m[:, None],
                                             offs_n[None, :], sq, sk), s, float("-inf"))
        if RIGHT_EDGE:
            s = _mask_right_edge(s, offs_n, start_n, mask_from, kmax)
        m_new = tl.maximum(m_i, tl.max(s, 1))
        m_use = m_new
        if MASK or RIGHT_EDGE:  # a row may still have seen nothing: keep exp2 away from
            # -inf - -inf, and keep m_i at -inf so that the row's first visible key sets the
            # true maximum
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        if HAS_DROPOUT:
            keep = dropout_keep(Seed, b, h, nheads, offs_m[:, None], offs_n[None, :],
                                max_seqlen_k, dropout_p)
            p = tl.where(keep, p / (1.0 - dropout_p), 0.0)
        acc = acc * alpha[:, None]
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


@triton.jit
def _load_kt(K, desc_k, row0, kvh, stride_kt, stride_kh, offs_n, offs_d,
             HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """K^T of key rows [row0, row0 + BLOCK_N) of kv head kvh: (HEAD_DIM, BLOCK_N)."""
    if USE_TMA:
        return desc_k.load([row0, kvh * HEAD_DIM]).T
    else:
        rows = (row0 + offs_n).to(tl.int64)
        return tl.load(K + rows[None, :] * stride_kt + kvh * stride_kh + offs_d[:, None])


@triton.jit
def _load_v(V, desc_v, row0, kvh, stride_vt, stride_vh, offs_n, offs_d,
            HEAD_DIM: tl.constexpr, USE_TMA: tl.constexpr):
    """V rows [row0, row0 + BLOCK_N) of kv head kvh: (BLOCK_N, HEAD_DIM)."""
    if USE_TMA:
        return desc_v.load([row0, kvh * HEAD_DIM])
    else:
        rows = (row0 + offs_n).to(tl.int64)
        return tl.load(V + rows[:, None] * stride_vt + kvh * stride_vh + offs_d[None, :])


@triton.jit
def _fwd_plain_blocks(acc, l_i, m_i, q, K, V, desc_k, desc_v, k_start, kvh, stride_kt,
                      stride_kh, stride_vt, stride_vh, offs_d, qk_scale, first, count,
                      kmax, mask_from, HEAD_DIM: tl.constexpr, BLOCK_N: tl.constexpr,
                      USE_TMA: tl.constexpr, PRECISION: tl.constexpr, RIGHT_EDGE: tl.constexpr):
    """Key blocks first, first + BLOCK_N, ... (count of them, all inside the sequence) of a
    call with no softcap, ALiBi, dropout, custom mask or pages: the scale is folded into the
    exponent's FMA, K/V come through TMA descriptors when USE_TMA. With RIGHT_EDGE, blocks
    from key ``mask_from`` on (the diagonal) mask keys past ``kmax``, each query row's last
    visible key: the diagonal blocks run in the visible blocks' loop."""
    offs_n = tl.arange(0, BLOCK_N)
    row0 = k_start + first
    for i in range(0, count):
        k = _load_kt(K, desc_k, row0 + i * BLOCK_N, kvh, stride_kt, stride_kh, offs_n, offs_d,
                     HEAD_DIM, USE_TMA)
        s = tl.dot(q, k, input_precision=PRECISION)
        if RIGHT_EDGE:
            s = _mask_right_edge(s, first + i * BLOCK_N + offs_n, first + i * BLOCK_N,
                                 mask_from, kmax)
        m_new = tl.maximum(m_i, tl.max(s, 1) * qk_scale)
        m_use = m_new
        if RIGHT_EDGE:  # rows that have seen nothing yet keep exp2 away from -inf - -inf
            m_use = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s * qk_scale - m_use[:, None])
        alpha = tl.exp2(m_i - m_use)
        l_i = l_i * alpha + tl.sum(p, 1)
        acc = acc * alpha[:, None]
        v = _load_v(V, desc_v, row0 + i * BLOCK_N, kvh, stride_vt, stride_vh, offs_n, offs_d,
                    HEAD_DIM, USE_TMA)
        acc = tl.dot(p.to(v.dtype), v, acc, input_precision=PRECISION)
        m_i = m_new
    return acc, l_i, m_i


def tma_ready(head_dim: int, *tensors: torch.Tensor) -> bool:
    """Whether every (rows, heads, head_dim) tensor can be read through a 2-D TMA descriptor
    over (rows, heads * head_dim): heads contiguous in a row, 16-byte aligned base and row
    stride, on a Hopper-or-later GPU (or the interpreter)."""
    if TensorDescriptor is None or not tensors:
        return False
    device = tensors[0].device
    if not configs.interpreting() and (device.type != "cuda" or _sm_major(device.index) < 9):
        return False
    return all(hopper_forward.tma_rows(t, head_dim) for t in tensors)


@functools.cache
def _sm_major(index: int | None) -> int:
    return torch.cuda.get_device_capability(index)[0]


def row_descriptor(t: torch.Tensor, head_dim: int, block_rows: int):
    """TMA descriptor of (rows, heads, head_dim) ``t`` as (rows, heads * head_dim), loading
    (block_rows, head_dim) boxes; descriptor_hook adapts the box to an autotuned block."""
    flat = t.as_strided((t.shape[0], t.shape[1] * head_dim), (t.stride(0), 1))
    return TensorDescriptor(flat, list(flat.shape), list(flat.stride()), [block_rows, head_dim])


def descriptor_hook(names: tuple[str, ...], block: str):
    """Autotuner pre-hook: the boxes of descriptors ``names`` follow the config's ``block``."""
    def hook(nargs: dict) -> None:
        for name in names:
            desc = nargs[name]
            if TensorDescriptor is not None and isinstance(desc, TensorDescriptor):
                desc.block_shape = [nargs[block], nargs["HEAD_DIM"]]
    return hook


def _prune(configs_, named_args, **kwargs):
    d = named_args.get("BLOCK_D", kwargs.get("BLOCK_D", 128))
    return configs.pick("fwd", configs_, d, named_args.get("BLOCK_M", kwargs.get("BLOCK_M")),
                        "BLOCK_N")


@triton.autotune(
    configs=configs.candidates("fwd", "BLOCK_N",
                               pre_hook=descriptor_hook(("desc_k", "desc_v"), "BLOCK_N")),
    key=["HEAD_DIM", "GROUP", "BLOCK_M", "WINDOW_LEFT", "WINDOW_RIGHT", "HAS_SOFTCAP",
         "HAS_ALIBI", "HAS_DROPOUT", "PAGED", "PAGE_SIZE", "HAS_CUSTOM_MASK", "HAS_SINKS"],
    prune_configs_by={"early_config_prune": _prune},
)
@triton.jit(do_not_specialize=PER_BATCH_ARGS)
def _fwd_kernel(
    Q, K, V, Out, Lse, CuQ, CuK, TileSeq, TileBlk, BlockTable, Alibi, Seed, MaskBits, MaskOffsets,
    Sinks, desc_k, desc_v, stride_qt, stride_qh, stride_kt, stride_kh, stride_vt, stride_vh,
    stride_ot, stride_oh,
    stride_bt_b, stride_ab, total_q, batch, nheads, max_seqlen_k,
    qk_scale, tanh_scale, softcap2, dropout_p, window_left, window_right,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_M: tl.constexpr, BLOCK_N: tl.constexpr, TOP_LEFT: tl.constexpr,
    WINDOW_LEFT: tl.constexpr, WINDOW_RIGHT: tl.constexpr, HAS_SOFTCAP: tl.constexpr,
    HAS_ALIBI: tl.constexpr, HAS_DROPOUT: tl.constexpr, PAGED: tl.constexpr,
    PAGE_SIZE: tl.constexpr, PRECISION: tl.constexpr, HAS_CUSTOM_MASK: tl.constexpr,
    PLAIN: tl.constexpr, USE_TMA: tl.constexpr, DEVICE_TILES: tl.constexpr,
    HAS_SINKS: tl.constexpr,
):
    h = tl.program_id(1)
    b, mblk = program_tile(TileSeq, TileBlk, CuQ, batch, BLOCK_M, DEVICE_TILES)
    if b >= batch:  # past the real tiles (DEVICE_TILES launches an upper bound)
        return
    q_start, sq, k_start, sk, offset = sequence_bounds(CuQ, CuK, b, TOP_LEFT)
    kvh = h // GROUP
    m0 = mblk * BLOCK_M

    offs_m = m0 + tl.arange(0, BLOCK_M)
    offs_d = tl.arange(0, BLOCK_D)
    row_ok = offs_m < sq
    d_ok = offs_d < HEAD_DIM
    q_ptrs = Q + (q_start + offs_m).to(tl.int64)[:, None] * stride_qt + h * stride_qh \
        + offs_d[None, :]
    q = tl.load(q_ptrs, mask=row_ok[:, None] & d_ok[None, :], other=0.0)
    slope2 = 0.0
    if HAS_ALIBI:
        slope2 = tl.load(Alibi + b * stride_ab + h) * 1.4426950408889634
    mask_off = 0
    if HAS_CUSTOM_MASK:
        mask_off = tl.load(MaskOffsets + b)

    lo, a, bnd, hi = key_ranges(m0, sk, offset, window_left, window_right, BLOCK_M, BLOCK_N,
                                WINDOW_LEFT, WINDOW_RIGHT)
    m_i = tl.full([BLOCK_M], float("-inf"), dtype=tl.float32)
    l_i = tl.zeros([BLOCK_M], dtype=tl.float32)
    acc = tl.zeros([BLOCK_M, BLOCK_D], dtype=tl.float32)
    EVEN_D: tl.constexpr = HEAD_DIM == BLOCK_D
    # the fully visible blocks, then the masked ones in one loop: before them (left window
    # edge) and after them (diagonal, right window edge, sequence end)
    n_full = (bnd - a + BLOCK_N - 1) // BLOCK_N
    n_before = (a - lo + BLOCK_N - 1) // BLOCK_N
    # right-edge blocks inside the sequence (the causal diagonal) join the visible blocks' loop,
    # masked from the edge on; a custom mask masks every block anyway, and with ALiBi or
    # dropout the joined loop was not faster (docs/performance.md)
    RIGHT_EDGE: tl.constexpr = (WINDOW_RIGHT and not HAS_CUSTOM_MASK and not HAS_ALIBI
                                and not HAS_DROPOUT)
    n_edge = 0
    if RIGHT_EDGE:
        n_edge = tl.minimum((hi - bnd + BLOCK_N - 1) // BLOCK_N,
                            tl.maximum(sk - bnd, 0) // BLOCK_N)
    kmax = offs_m + offset + window_right
    if PLAIN:
        acc, l_i, m_i = _fwd_plain_blocks(
            acc, l_i, m_i, q, K, V, desc_k, desc_v, k_start, kvh, stride_kt, stride_kh,
            stride_vt, stride_vh, offs_d, qk_scale, a, n_full + n_edge, kmax, bnd, HEAD_DIM,
            BLOCK_N, USE_TMA, PRECISION, RIGHT_EDGE)
    else:
        acc, l_i, m_i = _fwd_blocks(
            acc, l_i, m_i, q, K, V, desc_k, desc_v, BlockTable, b, h, kvh, k_start, stride_bt_b,
            stride_kt, stride_kh, stride_vt, stride_vh, offs_m, offs_d, sk, offset, qk_scale,
            tanh_scale, softcap2, slope2, window_left, window_right, Seed, nheads, max_seqlen_k,
            dropout_p, a, n_full + n_edge, a, n_full + n_edge, MaskBits, mask_off, sq,
            HAS_CUSTOM_MASK, HAS_CUSTOM_MASK, HEAD_DIM, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT,
            HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, PAGED, PAGE_SIZE, PRECISION, EVEN_D, USE_TMA,
            kmax, bnd, RIGHT_EDGE)
    bnd += n_edge * BLOCK_N
    n_masked = n_before + (hi - bnd + BLOCK_N - 1) // BLOCK_N
    acc, l_i, m_i = _fwd_blocks(
        acc, l_i, m_i, q, K, V, desc_k, desc_v, BlockTable, b, h, kvh, k_start, stride_bt_b,
        stride_kt, stride_kh, stride_vt, stride_vh, offs_m, offs_d, sk, offset, qk_scale,
        tanh_scale, softcap2, slope2, window_left, window_right, Seed, nheads, max_seqlen_k,
        dropout_p, lo, n_before, bnd, n_masked, MaskBits, mask_off, sq, True, HAS_CUSTOM_MASK,
        HEAD_DIM, BLOCK_N, WINDOW_LEFT, WINDOW_RIGHT, HAS_SOFTCAP, HAS_ALIBI, HAS_DROPOUT, PAGED,
        PAGE_SIZE, PRECISION, EVEN_D, USE_TMA, kmax, 0, False)

    if HAS_SINKS:
        acc, l_i, m_i = add_sink(acc, l_i, m_i, Sinks, h, True)
    seen = l_i > 0.0
    out = acc / tl.where(seen, l_i, 1.0)[:, None]
    lse = tl.where(seen, (m_i + tl.log2(tl.where(seen, l_i, 1.0))) * 0.6931471805599453,
                   float("-inf"))
    o_ptrs = Out + (q_start + offs_m).to(tl.int64)[:, None] * stride_ot + h * stride_oh \
        + offs_d[None, :]
    tl.store(o_ptrs, out.to(Out.dtype.element_ty), mask=row_ok[:, None] & d_ok[None, :])
    tl.store(Lse + h.to(tl.int64) * total_q + q_start + offs_m, lse, mask=row_ok)


def tile_list(problem, cu_seqlens: torch.Tensor, block: int, rows_are_queries: bool
              ) -> tuple[torch.Tensor, torch.Tensor] | None:
    """The launch's tile list planned on the host when lengths are known, else None (the
    kernels then find their tiles from the offsets: DEVICE_TILES)."""
    rows, cols = ((problem.seqlens_q, problem.seqlens_k) if rows_are_queries
                  else (problem.seqlens_k, problem.seqlens_q))
    if rows is None or cols is None:
        return None
    return tiles.host_tiles(rows, cols, block, problem.window,
                            problem.mask_alignment == "top_left", rows_are_queries,
                            cu_seqlens.device)


def launch_tiles(problem, cu_seqlens: torch.Tensor, block: int, rows_are_queries: bool,
                 planned: tuple[torch.Tensor, torch.Tensor] | None = None
                 ) -> tuple[int, torch.Tensor, torch.Tensor, bool]:
    """(programs, TileSeq, TileBlk, DEVICE_TILES) of a launch tiling ``cu_seqlens``' side by
    ``block`` rows: the ``planned`` or host-planned list, or without host lengths the upper
    bound cdiv(total, block) + batch of programs that find their own tiles (the two tile
    arguments are then placeholders)."""
    planned = planned if planned is not None else tile_list(problem, cu_seqlens, block,
                                                            rows_are_queries)
    if planned is not None:
        return planned[0].numel(), planned[0], planned[1], False
    total = problem.total_q if rows_are_queries else problem.total_k
    programs = triton.cdiv(total, block) + problem.batch if total > 0 else 0
    return programs, cu_seqlens, cu_seqlens, True


def kv_layout(problem, k: torch.Tensor) -> tuple[torch.Tensor, int, int]:
    """K or V as rows: packed (total_k, nheads_k, d), or page pools flattened to
    (num_pages * page_size, nheads_k, d) (a view when the pool is contiguous per page)."""
    if problem.paged is not None:
        k = k.reshape(-1, *k.shape[2:])
    return k, k.stride(0), k.stride(1)


# The arguments a replay of the forward's launch replaces (replay.LaunchRecord): pointer loads,
# plus the K and V descriptors when fully visible blocks are read through TMA.
REPLAY_ARGS = ("Q", "K", "V", "Out", "Lse", "CuQ", "CuK")
REPLAY_TMA_ARGS = (*REPLAY_ARGS, "desc_k", "desc_v")
_replays = replay.ReplayCache()


class ForwardReplay:
    """A recorded forward launch of the tl (``gluon`` False) or Gluon kernel; ``tma``: the
    tl kernel's record also takes K and V for its TMA descriptors. The call's ALiBi slopes
    and sinks (``replay.present``'s tensors, with replay.FEATURES) follow in the slots
    named after them."""

    __slots__ = ("gluon", "record", "tma")

    def __init__(self, record: replay.LaunchRecord, tma: bool, gluon: bool) -> None:
        self.record = record
        self.tma = tma
        self.gluon = gluon

    def launch(self, q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, features=()) -> bool:
        if self.tma:
            return self.record(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, k, v, *features)
        return self.record(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, *features)


def _replay_key(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor, gluon: bool,
                tma: bool, alibi: torch.Tensor | None = None) -> tuple:
    """What a forward record depends on beyond its problem object (which says whether the
    call has ALiBi slopes and sinks; the slopes' row stride is a launch argument)."""
    return (q.stride(), k.stride(), v.stride(), q.get_device(), gluon, tma,
            None if alibi is None else alibi.stride())


def _replayed(found: ForwardReplay, problem, q: torch.Tensor, k: torch.Tensor,
              v: torch.Tensor, cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor,
              features: tuple = ()) -> tuple[torch.Tensor, torch.Tensor] | None:
    """(out, lse) of ``found`` launched again with these tensors, or None (another device)."""
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((problem.nheads, problem.total_q), dtype=torch.float32, device=q.device)
    launched = found.launch(q, k, v, out, lse, cu_seqlens_q, cu_seqlens_k, features)
    return (out, lse) if launched else None


def replay_out(problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
               cu_seqlens_q: torch.Tensor, cu_seqlens_k: torch.Tensor) -> torch.Tensor | None:
    """out from the forward launch ``forward`` recorded for this problem (shipped gluon and
    tma settings) with these tensors' strides and device, or None (nothing recorded, or not
    aligned): the out-only path of attnhub's call plans, which then calls ``forward``. The
    problem has no dropout, sinks, ALiBi, pages or custom mask (the caller checks)."""
    found = _replays.peek(problem, _replay_key(q, k, v, gluon=True, tma=True))
    if found is None or found is True or not replay.aligned(q, k, v, cu_seqlens_q,
                                                            cu_seqlens_k):
        return None
    result = _replayed(found, problem, q, k, v, cu_seqlens_q, cu_seqlens_k)
    return None if result is None else result[0]


def tiling(problem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
           gluon: bool = True) -> tuple[bool, int]:
    """(whether the Gluon kernel runs ``problem``, query rows per program): the Gluon
    kernel's rows (hopper_forward.problem_block_m) where it serves (``gluon`` on, an sm_90
    GPU, no pages, custom mask or dropout; any head dim it reads; Q/K/V laid out for TMA)
    and the tl kernel is not measured faster, the tl kernel's (configs.forward_block_m)
    otherwise."""
    use = (gluon and hopper_forward.supports(problem, q, k, v, _gluon_features(problem))
           and not hopper_forward.tl_is_faster(problem))
    return use, hopper_forward.problem_block_m(problem) if use else configs.forward_block_m(
        problem.head_dim)


def planned_rows(problem, device: torch.device) -> int:
    """The query rows per program of a plan's tile list (Backend.prepare): tiling's for Q/K/V
    laid out for TMA. A run whose tensors are not falls back to the tl kernel's rows and,
    should they differ, plans its tiles again."""
    if (_gluon_features(problem) and hopper_forward.serves(problem, device)
            and not hopper_forward.tl_is_faster(problem)):
        return hopper_forward.problem_block_m(problem)
    return configs.forward_block_m(problem.head_dim)


def _gluon_features(problem) -> bool:
    return problem.paged is None and not problem.custom_mask and problem.dropout_p == 0


def forward(problem, inputs, seed: torch.Tensor | None, *, sinks: torch.Tensor | None = None,
            gluon: bool = True, tma: bool = True) -> tuple[torch.Tensor, torch.Tensor]:
    """out (total_q, nheads, d) in q's dtype and lse float32 (nheads, total_q); ``sinks``:
    float32 (nheads,) sink logits, or None (lse then -inf on rows that see no key).

    ``gluon``: calls on an sm_90 GPU without dropout, custom mask or pages (host or
    device lengths) run the warp-specialised Gluon kernel (hopper_forward.py);
    ``tma``: the tl kernel reads fully visible K/V blocks through TMA descriptors where
    the layout allows. Both ship on; benchmarks and tests turn them off to compare with
    the tl kernel and pointer loads.

    Repeats of a problem object (attnhub's call plans pass the same one) without dropout,
    pages, custom masks or an attnhub.plan schedule (and, unless replay.FEATURES, without
    sinks or ALiBi) replay the launch recorded at its second call (replay.py) when q, k and v
    (and the slopes) have the recorded strides and device and every address is 16-byte
    aligned: none of the preparation below runs again."""
    q, k, v = inputs.q, inputs.k, inputs.v
    cu_q, cu_k = inputs.cu_seqlens_q, inputs.cu_seqlens_k
    alibi = inputs.alibi_slopes
    recording = False
    if seed is None and inputs.schedule is None and problem.paged is None \
            and not problem.custom_mask \
            and (replay.FEATURES or (sinks is None and alibi is None)):
        feature_slots, features = ((), ()) if alibi is None and sinks is None \
            else replay.present(Alibi=alibi, Sinks=sinks)  # (a keyword call costs ~1 us)
        replay_key = _replay_key(q, k, v, gluon, tma, alibi)
        found = _replays.get(problem, replay_key)
        if found is not None and replay.aligned(q, k, v, cu_q, cu_k, *features):
            if found is True:
                recording = q.stride(-1) == 1 and k.stride(-1) == 1 and v.stride(-1) == 1
                if not recording:
                    _replays.put(problem, replay_key, None)
            else:
                result = _replayed(found, problem, q, k, v, cu_q, cu_k, features)
                if result is not None:
                    return result
    if q.stride(-1) != 1:
        q = q.contiguous()
    k, stride_kt, stride_kh = kv_layout(problem, _last_contiguous(k))
    v, stride_vt, stride_vh = kv_layout(problem, _last_contiguous(v))
    out = torch.empty(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.empty((problem.nheads, problem.total_q), dtype=torch.float32, device=q.device)
    left, right = problem.window
    block_table = inputs.block_table
    dummy = cu_q
    rows_exact = configs.block_d(problem.head_dim) == problem.head_dim and problem.paged is None
    plain = (rows_exact and not problem.custom_mask and problem.dropout_p == 0
             and problem.softcap == 0 and alibi is None)
    use_gluon, block_m = tiling(problem, q, k, v, gluon)
    # attnhub.plan: the forward's (tile_seq, tile_blk) planned with planned_rows, or None
    planned = inputs.schedule
    if planned is not None and block_m != planned_rows(problem, q.device):
        planned = None
    programs, tile_seq, tile_blk, device_tiles = launch_tiles(
        problem, cu_q, block_m, True, planned)
    if programs == 0 or problem.nheads == 0:
        if recording:
            _replays.put(problem, replay_key, None)
        return out, lse
    if use_gluon:
        recorded = hopper_forward.forward(problem, q, k, v, out, lse, cu_q, cu_k,
                                          (programs, tile_seq, tile_blk, device_tiles),
                                          score_scalars(problem), sinks, alibi,
                                          record=recording)
        if recording:
            _replays.put(problem, replay_key, ForwardReplay(recorded, False, True) if recorded
                         else None)
        return out, lse
    use_tma = rows_exact and tma and tma_ready(problem.head_dim, k, v)
    desc_k = desc_v = dummy
    if use_tma:
        block_n = configs.default("fwd", problem.head_dim, block_m)[0]
        desc_k, desc_v = (row_descriptor(t, problem.head_dim, block_n) for t in (k, v))
    grid = (programs, problem.nheads)
    record = configs.launch("fwd", _fwd_kernel, grid,
        q, k, v, out, lse, cu_q, cu_k, tile_seq, tile_blk,
        block_table if block_table is not None else dummy,
        alibi if alibi is not None else dummy, seed if seed is not None else dummy,
        inputs.custom_mask if problem.custom_mask else dummy,
        inputs.custom_mask_offsets if problem.custom_mask else dummy,
        sinks if sinks is not None else dummy, desc_k, desc_v,
        q.stride(0), q.stride(1), stride_kt, stride_kh, stride_vt, stride_vh,
        out.stride(0), out.stride(1),
        block_table.stride(0) if block_table is not None else 0,
        alibi.stride(0) if alibi is not None and alibi.dim() == 2 else 0,
        problem.total_q, problem.batch, problem.nheads, key_bound(problem),
        *score_scalars(problem), problem.dropout_p, left, right,
        record=((REPLAY_TMA_ARGS if use_tma else REPLAY_ARGS) + feature_slots) if recording
        else (),
        GROUP=problem.group_size, HEAD_DIM=problem.head_dim,
        BLOCK_D=configs.block_d(problem.head_dim), BLOCK_M=block_m,
        TOP_LEFT=problem.mask_alignment == "top_left", WINDOW_LEFT=left >= 0,
        WINDOW_RIGHT=right >= 0, HAS_SOFTCAP=softcap_mode(problem.softcap),
        HAS_ALIBI=alibi is not None, HAS_DROPOUT=problem.dropout_p > 0,
        PAGED=problem.paged is not None,
        PAGE_SIZE=problem.paged.page_size if problem.paged is not None else 1,
        PRECISION=configs.dot_precision(q.dtype), HAS_CUSTOM_MASK=problem.custom_mask,
        PLAIN=plain, USE_TMA=use_tma, DEVICE_TILES=device_tiles, HAS_SINKS=sinks is not None,
    )
    if recording:
        _replays.put(problem, replay_key, ForwardReplay(record, use_tma, False) if record
                         else None)
    return out, lse


def key_bound(problem) -> int:
    """The kernels' max_seqlen_k: the call's, and for paged K/V at most the block table's
    capacity (max_pages * page_size), so that kv_rows' clamp keeps every block-table read in
    its row whatever the device lengths hold. (With paged K/V it only seeds the forward's
    dropout positions: there is no paged backward to match.)"""
    bound = max(problem.max_seqlen_k, 1)
    if problem.paged is not None:
        bound = min(bound, max(problem.paged.max_pages * problem.paged.page_size, 1))
    return bound


def score_scalars(problem) -> tuple[float, float, float]:
    """(scale * log2 e, scale / softcap, softcap * log2 e): the kernels work in base 2."""
    cap = problem.softcap
    return (problem.scale * LOG2E, problem.scale / cap if cap > 0 else 0.0, cap * LOG2E)


def _last_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()
