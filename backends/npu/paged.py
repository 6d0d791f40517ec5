"""Paged K/V (block_table) on ``torch_npu.npu_fused_infer_attention_score``, forward only.

Ascend's documentation (torch_npu 2.14.0, cited in docs/npu.md) allows page attention only
with the layouts BSH / BSND / BNSD (TND: "不支持 ... page attention"), so the queries go in as
BSND ``(B, Q_S, N, D)``: the rows of each computed sequence (rows that see no key dropped, as
in layout.py) padded to the longest, ``actual_seq_lengths`` the per-sequence query lengths.
K/V stay where they are: attnhub's pools ``(num_pages, page_size, nheads_k, head_dim)`` are
viewed as the documented ``(blocknum, blocksize, H)`` (H = KV_N * D, the only cache layout
BSND takes), ``block_table`` int32 ``(B, max_pages)`` and ``block_size`` = page size,
``actual_seq_lengths_kv`` the per-sequence kv lengths (required with page attention).

Rules (reasons in ``reasons``):

* Q_S > 1 (prefill): block_size a multiple of 128 in 128..512; D a multiple of 16 for
  float16 / bfloat16 and at most 512; N * D < 65535 for BSND; sparse_mode 0 (no mask),
  3 (rightDownCausal) or 4 (band, pre/next) with the 2048 x 2048 compressed mask;
* Q_S = 1 (decode, the IncreFlashAttention branch): block_size a multiple of 16, at most 512;
  sparse_mode, pre_tokens and next_tokens are ignored (causal decode sees every key anyway),
  so a window with a left bound goes in as the documented ``(B, KV_S)`` atten_mask of Q_S = 1
  (True = masked: keys left of ``sk - 1 - left``), KV_S = block_table width * block_size as
  page attention requires; when every query has one row but the problem is not a decode
  (rows were dropped), Q_S is padded to 2 to keep the sparse mode;
* queries float16 or bfloat16 (no float32); num_heads / num_key_value_heads at most 64; KV_N
  * D at most 65535 for the (blocknum, blocksize, H) cache; no dropout, no ALiBi (only an
  explicit pse_shift (B, N, Q_S, KV_S) exists), no backward (an inference operator);
* softmax_lse_flag=True returns lse (B, N, Q_S, 1).
"""

from __future__ import annotations

import torch

from attnhub.inputs import VarlenInputs
from attnhub.problem import VarlenProblem

from .layout import Segment, host_lengths, row_index, rows_seeing_no_key
from .translate import compressed_mask, mask_arguments

OPERATOR = "npu_fused_infer_attention_score"
MAX_BLOCK_SIZE = 512
PREFILL_BLOCK_MULTIPLE = 128
DECODE_BLOCK_MULTIPLE = 16
MAX_HEAD_DIM = 512
MAX_GROUP = 64
MAX_HIDDEN = 65535
INT32_MAX = 2**31 - 1


def is_decode(problem: VarlenProblem) -> bool:
    """Every query sequence has at most one row: the operator's Q_S = 1 branch (part of the
    problem's signature, so known at selection)."""
    return problem.max_seqlen_q == 1


def reasons(problem: VarlenProblem, module: object | None) -> list[str]:
    """Why npu_fused_infer_attention_score cannot compute this paged problem exactly."""
    out: list[str] = []
    if module is not None and not hasattr(module, OPERATOR):
        out.append(f"paged K/V needs torch_npu.{OPERATOR}, which this torch_npu lacks")
    if problem.requires_grad:
        out.append(f"paged K/V runs on {OPERATOR}, an inference operator without a backward")
    if problem.dtype not in (torch.float16, torch.bfloat16):
        out.append(f"{OPERATOR} takes float16 or bfloat16 queries with paged K/V, got "
                   f"{str(problem.dtype).removeprefix('torch.')}")
    if problem.dropout_p > 0:
        out.append(f"{OPERATOR} has no dropout")
    if problem.alibi is not None:
        out.append(f"ALiBi with paged K/V: {OPERATOR} generates no ALiBi (only an explicit "
                   "pse_shift of shape (B, N, Q_S, KV_S))")
    if problem.sinks:
        out.append(f"attention sinks with paged K/V: {OPERATOR} takes no sink (the "
                   "learnable_sink of its _v2 is bfloat16 only, in layouts TND / NTD_TND, which "
                   "take no page attention)")
    if problem.nheads // problem.nheads_k > MAX_GROUP:
        out.append(f"{OPERATOR}: num_heads / num_key_value_heads must be at most {MAX_GROUP}, "
                   f"got {problem.nheads // problem.nheads_k}")
    if problem.head_dim > MAX_HEAD_DIM:
        out.append(f"{OPERATOR} takes head_dim at most {MAX_HEAD_DIM}, got {problem.head_dim}")
    if problem.nheads_k * problem.head_dim > MAX_HIDDEN:
        out.append(f"{OPERATOR}: the (blocknum, blocksize, H) cache needs KV_N * D <= "
                   f"{MAX_HIDDEN}, got {problem.nheads_k * problem.head_dim}")
    page = problem.paged.page_size
    if is_decode(problem):
        if page % DECODE_BLOCK_MULTIPLE or page > MAX_BLOCK_SIZE:
            out.append(f"paged decode (Q_S = 1) on {OPERATOR} needs block_size a multiple of "
                       f"{DECODE_BLOCK_MULTIPLE} up to {MAX_BLOCK_SIZE}, got page_size {page}")
    else:
        if page % PREFILL_BLOCK_MULTIPLE or page > MAX_BLOCK_SIZE:
            out.append(f"paged prefill (Q_S > 1) on {OPERATOR} needs block_size a multiple of "
                       f"{PREFILL_BLOCK_MULTIPLE} in {PREFILL_BLOCK_MULTIPLE}..{MAX_BLOCK_SIZE}"
                       f", got page_size {page}")
        if problem.head_dim % 16:
            out.append(f"paged prefill on {OPERATOR} needs head_dim a multiple of 16 for "
                       f"float16 / bfloat16, got {problem.head_dim}")
        if problem.nheads * problem.head_dim >= MAX_HIDDEN:
            out.append(f"paged prefill on {OPERATOR} in BSND needs N * D < {MAX_HIDDEN}")
    return out


def forward(module: object, problem: VarlenProblem, inputs: VarlenInputs
            ) -> tuple[torch.Tensor, torch.Tensor]:
    """out (total_q, nheads, head_dim) and lse float32 (nheads, total_q)."""
    q = inputs.q
    lq = host_lengths(inputs.cu_seqlens_q, problem.seqlens_q)
    lk = host_lengths(inputs.cu_seqlens_k, problem.seqlens_k)
    out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
    lse = torch.full((problem.nheads, problem.total_q), float("-inf"), dtype=torch.float32,
                     device=q.device)
    active, rows, q0 = [], [], 0
    for b, (sq, sk) in enumerate(zip(lq, lk, strict=True)):
        skip = rows_seeing_no_key(problem, sq, sk)
        if sq - skip > 0 and sk > 0:
            active.append(b)
            rows.append(Segment(q0 + skip, sq - skip))
        q0 += sq
    if not active:
        return out, lse
    seq_q = [s.count for s in rows]
    width = max(seq_q)
    if width == 1 and not is_decode(problem):
        width = 2  # keep the Q_S > 1 branch, which honors the sparse mode
    batch, n, d = len(active), problem.nheads, problem.head_dim
    src = row_index(tuple(rows), q.device)
    dst = row_index(tuple(Segment(i * width, c) for i, c in enumerate(seq_q)), q.device)
    q_pad = torch.zeros(batch * width, n, d, dtype=q.dtype, device=q.device)
    q_pad.index_copy_(0, dst, q.index_select(0, src))
    table = inputs.block_table
    if len(active) != len(lq):
        table = table.index_select(0, torch.tensor(active, dtype=torch.int64).to(
            table.device, non_blocking=True))
    seq_kv = [lk[b] for b in active]
    kwargs = infer_kwargs(problem, table.to(torch.int32), seq_q, seq_kv, width, q.device)
    if width == 1 and problem.window[0] >= 0:
        kwargs["atten_mask"] = decode_window_mask(seq_kv, problem.window[0],
                                                  table.shape[1] * problem.paged.page_size,
                                                  q.device)
    res_out, res_lse = getattr(module, OPERATOR)(
        q_pad.view(batch, width, n, d), _as_blocks(inputs.k), _as_blocks(inputs.v), **kwargs)
    out.index_copy_(0, src, res_out.reshape(batch * width, n, d).index_select(0, dst))
    lse_rows = res_lse.reshape(batch, n, width).permute(1, 0, 2).reshape(n, batch * width)
    lse.index_copy_(1, src, lse_rows.index_select(1, dst).float())
    return out, lse


def decode_window_mask(seq_kv: list[int], left: int, width: int, device: torch.device
                       ) -> torch.Tensor:
    """(B, width) bool, True where key j lies left of the window of the one query row
    (``j < sk - 1 - left``); built on the host from host lengths, copied without a sync."""
    first = torch.tensor([sk - 1 - left for sk in seq_kv], dtype=torch.int64)
    mask = torch.arange(width, dtype=torch.int64)[None, :] < first[:, None]
    return mask.to(device, non_blocking=True)


def _as_blocks(pool: torch.Tensor) -> torch.Tensor:
    """(num_pages, page_size, nheads_k, head_dim) -> the documented (blocknum, blocksize, H)."""
    pages, size, heads, dim = pool.shape
    return pool.reshape(pages, size, heads * dim)


def infer_kwargs(problem: VarlenProblem, block_table: torch.Tensor, seq_q: list[int],
                 seq_kv: list[int], width: int, device: torch.device) -> dict:
    """Keyword arguments of npu_fused_infer_attention_score for one paged call."""
    sparse_mode, pre, nxt, needs_mask = mask_arguments(problem)
    if width == 1:  # Q_S = 1 ignores the sparse arguments: pass the defaults
        sparse_mode, pre, nxt, needs_mask = 0, INT32_MAX, INT32_MAX, False
    return {
        "atten_mask": compressed_mask(device) if needs_mask else None,
        "actual_seq_lengths": list(seq_q),
        "actual_seq_lengths_kv": list(seq_kv),
        "block_table": block_table,
        "num_heads": problem.nheads,
        "scale": problem.scale,
        "pre_tokens": pre,
        "next_tokens": nxt,
        "input_layout": "BSND",
        "num_key_value_heads": problem.nheads_k,
        "sparse_mode": sparse_mode,
        "inner_precise": 0,
        "block_size": problem.paged.page_size,
        "softmax_lse_flag": True,
    }
