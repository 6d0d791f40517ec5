"""Varlen attention through PyTorch's fused CPU attention kernel, one group of sequences at a
time (under a window bounded on both sides, one block of query rows at a time: ``_blocks``).

The kernel is ``aten::_scaled_dot_product_flash_attention_for_cpu`` (what
``torch.nn.functional.scaled_dot_product_attention`` runs on the CPU) and its backward
``aten::_scaled_dot_product_flash_attention_for_cpu_backward``. Facts (torch 2.13, checked
here): inputs (batch, heads, seq, head_dim) with any strides, so a run of packed sequences of
equal lengths is a free view; K/V may have fewer heads than Q (GQA read natively, forward and
backward); ``is_causal`` is aligned top-left; ``attn_mask`` must have the query's
dtype (additive, -inf = masked; 2-D or 4-D, broadcast over batch and heads); out comes back in
(batch, seq, heads, head_dim) memory order, logsumexp (batch, heads, seq) float32 (float64
for float64 inputs). A row whose mask hides every key gets out 0 and lse 0: attnhub says -inf
there, so such rows are fixed from the mask geometry.

float16 / bfloat16 inputs are computed in float32 (as the reference does): the kernel's
half-precision backward accumulates GQA's dk / dv near the edge of the conformance tolerance,
and a bias (ALiBi) in half precision would not be exact. The backward takes the forward's lse
(float32, the kernel's own) and out (for half inputs rounded to the input dtype, as every
flash backward uses it in ``D_i = dout_i . out_i``: conformance quick tier, largest dk error
0.49 of the tolerance, the reference's own 0.44); float64 recomputes both in float64, since
attnhub keeps lse in float32.

The backward takes no gradient of lse. attnhub's backward needs one (``dlse``): the kernel
forms ``ds = p * (dp - D)`` with ``D_i = dout_i . out_i`` and ``dp_ij = dout_i . v_j``; the
gradient of lse adds ``p_ij * dlse_i`` to ``ds``. Appending one column to the head dimension
(0 in q, k and v, 1 in dout, ``-dlse`` in out) leaves the scores and ``dp`` unchanged and makes
``D_i`` into ``D_i - dlse_i``: one exact kernel call.
"""

from __future__ import annotations

from collections.abc import Iterator
from dataclasses import dataclass

import torch

from attnhub import custom_mask
from attnhub.backend import ForwardResult, Gradients
from attnhub.backends.reference.kernel import host_offsets, mask_offsets, window_visible
from attnhub.inputs import VarlenInputs
from attnhub.problem import VarlenProblem

_forward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_backward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


@dataclass
class _Group:
    """``n`` consecutive sequences of sq query and sk key rows each, starting at packed rows
    q0 and k0; ``b`` the first one's index, ``mask_offset`` its custom-mask bit offset."""

    b: int
    n: int
    q0: int
    k0: int
    sq: int
    sk: int
    mask_offset: int = 0

    @property
    def q_rows(self) -> slice:
        return slice(self.q0, self.q0 + self.n * self.sq)

    @property
    def k_rows(self) -> slice:
        return slice(self.k0, self.k0 + self.n * self.sk)


@dataclass(frozen=True)
class _Block:
    """Query rows [i0, i1) and the key rows [j0, j1) that hold every key they may see, of
    each sequence of a group."""

    i0: int
    i1: int
    j0: int
    j1: int


# Windowed groups are computed in blocks of at least this many query rows (a row block as
# tall as the window is wide otherwise), each against the keys its window reaches, when that
# at least halves the keys a row is scored against.
BLOCK_ROWS = 64


def _blocks(problem: VarlenProblem, g: _Group) -> list[_Block]:
    """The group as one block, or, under a window bounded on both sides (causal windows
    included), as blocks of query rows with their window's key range."""
    whole = [_Block(0, g.sq, 0, g.sk)]
    left, right = problem.window
    if left < 0 or right < 0:
        return whole
    rows = max(BLOCK_ROWS, left + right + 1)
    if rows + left + right > g.sk // 2 or g.sq <= rows:
        return whole
    offset = g.sk - g.sq if problem.mask_alignment == "bottom_right" else 0
    blocks = []
    for i0 in range(0, g.sq, rows):
        i1 = min(i0 + rows, g.sq)
        j0 = min(max(i0 + offset - left, 0), g.sk)
        j1 = max(min(i1 - 1 + offset + right + 1, g.sk), j0)
        if j1 > j0:
            blocks.append(_Block(i0, i1, j0, j1))
    return blocks


@dataclass
class _Mask:
    """How one group is masked: ``is_causal`` (top-left, the kernel's own), or an additive
    ``bias`` (sq, sk) or (1, nheads, sq, sk) in the compute dtype, or neither; ``dead`` the
    query rows (indices into the group's sq) that see no key, or None."""

    is_causal: bool = False
    bias: torch.Tensor | None = None
    dead: torch.Tensor | None = None


def _groups(problem: VarlenProblem, inputs: VarlenInputs) -> Iterator[_Group]:
    """Non-empty sequences, consecutive ones of equal (sq, sk) merged into one group when
    their masks are equal (no custom mask, no per-sequence ALiBi slopes)."""
    cu_q = host_offsets("cu_seqlens_q", inputs.cu_seqlens_q, problem.seqlens_q,
                        problem.total_q, problem.max_seqlen_q)
    cu_k = host_offsets("cu_seqlens_k", inputs.cu_seqlens_k, problem.seqlens_k,
                        problem.total_k, problem.max_seqlen_k)
    offsets = mask_offsets(problem, inputs, cu_q, cu_k)
    mergeable = offsets is None and problem.alibi != "batch_head"
    group: _Group | None = None
    for b in range(problem.batch):
        sq, sk = cu_q[b + 1] - cu_q[b], cu_k[b + 1] - cu_k[b]
        if sq == 0 or sk == 0:  # out rows stay 0, lse -inf, gradients 0
            continue
        if (mergeable and group is not None and group.sq == sq and group.sk == sk
                and group.b + group.n == b):
            group.n += 1
            continue
        if group is not None:
            yield group
        group = _Group(b, 1, cu_q[b], cu_k[b], sq, sk,
                       offsets[b] if offsets is not None else 0)
    if group is not None:
        yield group


def _mask(problem: VarlenProblem, inputs: VarlenInputs, g: _Group, block: _Block) -> _Mask:
    """The mask of the group's ``block`` in the kernel's terms, built from attnhub's
    geometry: key j is visible to query i when ``-right <= i + offset - j <= left`` (offset
    = sk - sq bottom-right, 0 top-left), and the custom mask allows it; ALiBi adds
    ``-slope * |i + offset - j|``."""
    offset = g.sk - g.sq if problem.mask_alignment == "bottom_right" else 0
    left, right = problem.window
    # the shortcuts below see whole groups: _blocks splits windowed groups only
    if problem.alibi is None and not problem.custom_mask:
        if left < 0 and right < 0:
            return _Mask()
        if problem.causal and left < 0 and offset == 0:
            return _Mask(is_causal=True)
    dev = inputs.q.device
    rows, cols = range(block.i0, block.i1), range(block.j0, block.j1)
    rel = (torch.arange(rows.start, rows.stop, device=dev)[:, None] + offset
           - torch.arange(cols.start, cols.stop, device=dev)[None, :])
    visible = window_visible(rel, problem.window)
    if problem.custom_mask:
        assert inputs.custom_mask is not None
        visible &= custom_mask.read_block(inputs.custom_mask, g.mask_offset, g.sk, rows,
                                          cols)
    dtype = compute_dtype(problem.dtype)
    if problem.alibi is not None:  # (heads, rows, cols): one product, then the mask in place
        slopes = inputs.alibi_slopes
        assert slopes is not None
        slope = slopes if problem.alibi == "head" else slopes[g.b]
        bias = torch.mul(rel.to(dtype).abs_(), -slope.to(dtype)[:, None, None])
    else:
        bias = torch.zeros(rel.shape, dtype=dtype, device=dev)
    bias.masked_fill_(~visible, float("-inf"))
    if bias.dim() == 3:  # the kernel takes a 2-D or 4-D mask
        bias = bias.unsqueeze(0)
    dead = (~visible.any(-1)).nonzero().squeeze(-1)
    return _Mask(bias=bias, dead=dead if dead.numel() else None)


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """float64 for float64 inputs, else float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def _heads_first(x: torch.Tensor, n: int, dtype: torch.dtype) -> torch.Tensor:
    """Packed rows (n * s, heads, d) -> (n, heads, s, d) in ``dtype`` (a view when x has it)."""
    return x.view(n, -1, *x.shape[1:]).transpose(1, 2).to(dtype)


def _run_forward(problem: VarlenProblem, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                 m: _Mask) -> tuple[torch.Tensor, torch.Tensor]:
    return _forward_op(q, k, v, 0.0, m.is_causal, attn_mask=m.bias, scale=problem.scale)


def forward(problem: VarlenProblem, inputs: VarlenInputs, need_lse: bool = True
            ) -> ForwardResult:
    """out (total_q, nheads, head_dim) in q's dtype; lse float32 (nheads, total_q), -inf on
    rows that see no key (all -inf when ``need_lse`` is False: the caller drops it)."""
    q, k, v = inputs.q, inputs.k, inputs.v
    ctype = compute_dtype(problem.dtype)
    out = q.new_zeros(q.shape)
    lse = torch.full((problem.nheads, problem.total_q), float("-inf"), dtype=torch.float32,
                     device=q.device)
    for g in _groups(problem, inputs):
        rows = g.q_rows
        qg, kg, vg = (_heads_first(q[rows], g.n, ctype), _heads_first(k[g.k_rows], g.n, ctype),
                      _heads_first(v[g.k_rows], g.n, ctype))
        out_g = out[rows].view(g.n, g.sq, problem.nheads, problem.head_dim)  # views: the
        lse_g = lse[:, rows].view(problem.nheads, g.n, g.sq)  # blocks write into out, lse
        for bl in _blocks(problem, g):
            m = _mask(problem, inputs, g, bl)
            o, lg = _run_forward(problem, qg[:, :, bl.i0:bl.i1], kg[:, :, bl.j0:bl.j1],
                                 vg[:, :, bl.j0:bl.j1], m)
            o = o.transpose(1, 2)
            if m.dead is not None:
                o[:, m.dead] = 0
            out_g[:, bl.i0:bl.i1] = o
            if need_lse:
                if m.dead is not None:
                    lg[:, :, m.dead] = float("-inf")
                lse_g[:, :, bl.i0:bl.i1] = lg.transpose(0, 1)
    return ForwardResult(out, lse)


def backward(problem: VarlenProblem, inputs: VarlenInputs, out: torch.Tensor,
             lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None = None
             ) -> Gradients:
    """dq, dk, dv (shapes and dtypes of q, k, v) from dout and, when given, dlse
    (nheads, total_q). out and lse are the forward's."""
    q, k, v = inputs.q, inputs.k, inputs.v
    dq, dk, dv = q.new_zeros(q.shape), k.new_zeros(k.shape), v.new_zeros(v.shape)
    h, d = problem.nheads, problem.head_dim
    ctype = compute_dtype(problem.dtype)
    for g in _groups(problem, inputs):
        rows, keys, n = g.q_rows, g.k_rows, g.n
        qg, kg, vg = (_heads_first(q[rows], n, ctype), _heads_first(k[keys], n, ctype),
                      _heads_first(v[keys], n, ctype))
        dog = _heads_first(dout[rows], n, ctype)
        if ctype == torch.float32:  # lse is the kernel's own; out rounded for half inputs
            og = _heads_first(out[rows], n, ctype)
            lg = lse[:, rows].reshape(h, n, g.sq).transpose(0, 1)
        if dlse is not None:
            dl = dlse[:, rows].reshape(h, n, g.sq).transpose(0, 1).to(ctype)
            qg, kg, vg = _append(qg, 0.0), _append(kg, 0.0), _append(vg, 0.0)
            dog = _append(dog, 1.0)
        blocks = _blocks(problem, g)
        if len(blocks) > 1:  # dk / dv summed over the blocks whose key ranges overlap
            gk_sum = kg.new_zeros((*kg.shape[:-1], d))
            gv_sum = vg.new_zeros((*vg.shape[:-1], d))
        for bl in blocks:
            m = _mask(problem, inputs, g, bl)
            r, c = slice(bl.i0, bl.i1), slice(bl.j0, bl.j1)
            if ctype == torch.float32:
                og_b, lg_b = og[:, :, r], lg[:, :, r]
            else:  # float64: lse is kept in float32, so out and lse again in float64
                og_b, lg_b = _run_forward(problem, qg[:, :, r, :problem.head_dim],
                                          kg[:, :, c, :problem.head_dim],
                                          vg[:, :, c, :problem.head_dim], m)
            if m.dead is not None:  # the kernel's convention there: lse 0 (p = exp(-inf) = 0)
                lg_b = lg_b.clone()
                lg_b[:, :, m.dead] = 0.0
            if dlse is not None:
                og_b = torch.cat([og_b, -dl[:, :, r].unsqueeze(-1)], -1)
            gq, gk, gv = _backward_op(dog[:, :, r], qg[:, :, r], kg[:, :, c], vg[:, :, c],
                                      og_b, lg_b.contiguous(), 0.0, m.is_causal,
                                      attn_mask=m.bias, scale=problem.scale)
            dq[rows].view(n, g.sq, h, d)[:, r] = gq[..., :d].transpose(1, 2)
            if len(blocks) > 1:
                gk_sum[:, :, c] += gk[..., :d]
                gv_sum[:, :, c] += gv[..., :d]
        if len(blocks) > 1:
            gk, gv = gk_sum, gv_sum
        dk[keys] = gk[..., :d].transpose(1, 2).reshape(n * g.sk, problem.nheads_k, d)
        dv[keys] = gv[..., :d].transpose(1, 2).reshape(n * g.sk, problem.nheads_k, d)
    return Gradients(dq, dk, dv)


def _append(x: torch.Tensor, value: float) -> torch.Tensor:
    """x with one more column of ``value`` on the last dimension."""
    return torch.cat([x, x.new_full((*x.shape[:-1], 1), value)], -1)
