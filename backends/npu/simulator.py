"""A CPU model of torch_npu's fused attention operators (TND), for tests without Ascend.

``npu_fusion_attention`` / ``_grad`` and their v2 / v3 variants; ``npu_fused_infer_attention_score``
(paged K/V, BSND) lives in simulator_infer and is re-exported here. Pure PyTorch, written
from Ascend's documentation (torch_npu 2.14.0; sources in docs/npu.md), quirks included:
scale defaults to 1.0; without ``atten_mask`` the sparse mode and pre/next tokens are ignored
(full attention), and sparse modes 2, 3, 4 require the compressed 2048 x 2048 mask
``triu(ones, 1).bool()`` (True = masked out); ``actual_seq_qlen`` / ``actual_seq_kvlen`` are
cumulative END offsets without the leading 0 (Python int lists; int64 tensors for v3), at
most 1024 of them, T at most 1M; a sequence may have S = 0 (a repeated offset) but not
Sq > 0 with Skv = 0, and not with a pse; mode 3 rejects sq > skv; an atten_mask row with no
visible key is an error ("atten_mask中不能存在某一行全1的场景"), as is D of value above D of
key; keep_prob must lie in (0, 1]; softmax_max / softmax_sum are float32 ``[T, N, 8]``
tensors whose elements are in N-major order unless ``softmax_layout="TND"``.

``sink`` (float32 ``[head_num]``, every forward and grad operator): one logit per query head
that joins each row's softmax, as documented for npu_fusion_attention_v2 ("S = Q*K^T,
m = max(sink, max(S)), Attention = e^{S-m}*V / (sum(e^{S-m}) + e^{sink-m})") and in the
npu_fusion_attention example (the raw sink appended as one more column of the scaled scores,
softmax, the column dropped before multiplying by V): softmax_max and softmax_sum include it;
the grad operators return its gradient dsink ``[head_num]`` float32 (last output),
``-sum_rows exp(sink - max) / sum * rowsum(dy * attention_in)``.

Where the documentation leaves a choice, the model is the strict reading. Only the TND
layout and sparse modes 0-4 are modeled; of ``pse``, only the ALiBi that
``npu_fusion_attention_v2`` generates from slopes (pse_type 2 and 3, simulator_pse); anything
else raises NotImplementedError.

The dropout keep mask is a counter-based hash of (seed, offset, head, query row, key row):
reproducible from the (seed, offset) that forward returns and backward takes back. The seed
comes from torch's default CPU generator, so ``torch.manual_seed`` makes it reproducible.
"""

from __future__ import annotations

import torch

from . import simulator_pse
from .simulator_infer import npu_fused_infer_attention_score  # noqa: F401  (re-exported)

SIMULATOR = True  # marks this module when it stands in for torch_npu
INT32_MAX = 2**31 - 1
COMPRESSED_MASK_SIZE = 2048
MAX_SEQUENCES = 1024  # varlen: "actual_seq_qlen ... varlen场景下长度最大支持1K"
MAX_TOKENS = 1 << 20  # T and S: 1 ~ 1M
_M32 = 0xFFFFFFFF


def npu_fusion_attention(query, key, value, head_num, input_layout, pse=None, padding_mask=None,
                         atten_mask=None, scale=1.0, keep_prob=1.0, pre_tockens=INT32_MAX,
                         next_tockens=INT32_MAX, inner_precise=0, prefix=None,
                         actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                         gen_mask_parallel=True, sync=False, softmax_layout="", sink=None,
                         dropout_mask=None, seed=0, offset=0):
    """-> (attention_out [T, N, D], softmax_max, softmax_sum, softmax_in (empty), seed,
    offset, numels), as torch_npu documents for layout TND. No pse_type: a pse tensor (the
    compressed [B, N, 1024, Skv] form) is not modeled."""
    _v2_unmodeled(None, None, dropout_mask, seed, offset)
    call = _Call(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask,
                 keep_prob, pre_tockens, next_tockens, prefix, actual_seq_qlen,
                 actual_seq_kvlen, sparse_mode, softmax_layout, sink=sink)
    return _forward(call, float(scale), inner_precise, softmax_layout)


def npu_fusion_attention_v2(query, key, value, head_num, input_layout, *, pse=None,
                            padding_mask=None, atten_mask=None, query_rope=None, key_rope=None,
                            scale=1.0, keep_prob=1.0, pre_tokens=INT32_MAX,
                            next_tokens=INT32_MAX, inner_precise=0, prefix=None,
                            actual_seq_qlen=None, actual_seq_kvlen=None, sparse_mode=0,
                            gen_mask_parallel=True, sync=False, pse_type=1, q_start_idx=None,
                            kv_start_idx=None, softmax_layout="", sink=None, dropout_mask=None,
                            seed=0, offset=0):
    """npu_fusion_attention with v2's keywords (pre_tokens / next_tokens) and pse_type,
    q_start_idx, kv_start_idx: the operator-generated ALiBi of pse_type 2 and 3 is modeled
    (simulator_pse). Same 7 outputs as npu_fusion_attention."""
    _v2_unmodeled(query_rope, key_rope, dropout_mask, seed, offset)
    call = _Call(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask,
                 keep_prob, pre_tokens, next_tokens, prefix, actual_seq_qlen,
                 actual_seq_kvlen, sparse_mode, softmax_layout, pse_type, q_start_idx,
                 kv_start_idx, sink)
    return _forward(call, float(scale), inner_precise, softmax_layout)


def npu_fusion_attention_v3(query, key, value, head_num, input_layout, pse=None,
                            padding_mask=None, atten_mask=None, scale=1.0, keep_prob=1.0,
                            pre_tockens=INT32_MAX, next_tockens=INT32_MAX, inner_precise=0,
                            prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                            sparse_mode=0, gen_mask_parallel=True, sync=False, softmax_layout="",
                            sink=None):
    """npu_fusion_attention with the lengths as int64 tensors (on the device) and 6 tensor
    outputs: (attention_out, softmax_max, softmax_sum, softmax_out, seed, offset), seed and
    offset as int64 CPU tensors (the non-aclgraph case)."""
    call = _v3_call(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask,
                    keep_prob, pre_tockens, next_tockens, prefix, actual_seq_qlen,
                    actual_seq_kvlen, sparse_mode, softmax_layout, sink)
    out, smax, ssum, sout, seed, offset, _ = _forward(call, float(scale), inner_precise,
                                                       softmax_layout)
    return (out, smax, ssum, sout, torch.tensor([seed], dtype=torch.int64),
            torch.tensor([offset], dtype=torch.int64))


def _v3_call(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask,
             keep_prob, pre_tockens, next_tockens, prefix, actual_seq_qlen, actual_seq_kvlen,
             sparse_mode, softmax_layout, sink) -> _Call:
    """The v3 operators' call: lengths as int64 device tensors of end offsets."""
    return _Call(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask,
                 keep_prob, pre_tockens, next_tockens, prefix,
                 _tensor_ends("actual_seq_qlen", actual_seq_qlen, query),
                 _tensor_ends("actual_seq_kvlen", actual_seq_kvlen, query), sparse_mode,
                 softmax_layout, sink=sink)


def _forward(call: _Call, scale: float, inner_precise: int, softmax_layout: str):
    query, value, keep_prob = call.query, call.value, call.keep_prob
    seed = int(torch.randint(0, INT32_MAX, (1,)).item()) if keep_prob < 1.0 else 0
    offset = 0
    t, n, _ = query.shape
    out = torch.zeros(t, n, value.shape[-1], dtype=query.dtype, device=query.device)
    smax = torch.zeros(n, t, dtype=torch.float32, device=query.device)
    ssum = torch.zeros(n, t, dtype=torch.float32, device=query.device)
    for seq in call.sequences():
        s, visible = call.scores(seq, scale)
        m = s.amax(-1)
        if call.sink is not None:  # m = max(sink, max(S)); sum(e^{S-m}) + e^{sink-m}
            m = torch.maximum(m, call.sink[:, None])
        e = torch.exp(s - m[..., None])
        total = e.sum(-1)
        if call.sink is not None:
            total = total + torch.exp(call.sink[:, None] - m)
        p = e / total[..., None]
        dead = ~visible.any(-1)  # (1, sq): rows that see no key
        if dead.any():
            row = int(dead.nonzero()[0, 1])
            raise ValueError(f"atten_mask masks every key of query row {row} of batch "
                             f"{seq.index}: varlen does not support all-masked rows "
                             "('atten_mask中不能存在某一行全1的场景')")
        p = p * call.keep(seed, offset, seq)
        o = torch.einsum("hij,hjd->ihd", p, seq.v(call))
        out[seq.q0:seq.q1] = o.to(query.dtype)
        smax[:, seq.q0:seq.q1] = m
        ssum[:, seq.q0:seq.q1] = total
    softmax_max = _stats_out(smax, softmax_layout)
    softmax_sum = _stats_out(ssum, softmax_layout)
    softmax_in = torch.empty(0, dtype=query.dtype, device=query.device)
    return out, softmax_max, softmax_sum, softmax_in, seed, offset, call.numels()


def npu_fusion_attention_grad(query, key, value, dy, head_num, input_layout, *, pse=None,
                              padding_mask=None, atten_mask=None, softmax_max=None,
                              softmax_sum=None, softmax_in=None, attention_in=None,
                              scale_value=1.0, keep_prob=1.0, pre_tockens=INT32_MAX,
                              next_tockens=INT32_MAX, inner_precise=0, seed=0, offset=0,
                              numels=0, prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                              sparse_mode=0, gen_mask_parallel=True, sync=False,
                              softmax_layout="", sink=None):
    """-> (dq, dk, dv, dpse (empty), dsink (empty without sink)). Recomputes the
    probabilities from the given softmax_max and softmax_sum (p = exp(s - max) / sum) and
    delta = rowsum(dy * attention_in), as FlashAttention's backward does; the dropout mask
    comes from (seed, offset)."""
    call = _Call(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask,
                 keep_prob, pre_tockens, next_tockens, prefix, actual_seq_qlen,
                 actual_seq_kvlen, sparse_mode, softmax_layout, sink=sink)
    return _grad(call, dy, softmax_max, softmax_sum, attention_in, float(scale_value),
                 seed, offset, numels, softmax_layout)


def npu_fusion_attention_grad_v2(query, key, value, dy, head_num, input_layout, *, pse=None,
                                 padding_mask=None, atten_mask=None, softmax_max=None,
                                 softmax_sum=None, softmax_in=None, attention_in=None,
                                 query_rope=None, key_rope=None, scale_value=1.0, keep_prob=1.0,
                                 pre_tokens=INT32_MAX, next_tokens=INT32_MAX, inner_precise=0,
                                 seed=0, offset=0, numels=0, prefix=None, actual_seq_qlen=None,
                                 actual_seq_kvlen=None, sparse_mode=0, gen_mask_parallel=True,
                                 sync=False, pse_type=1, q_start_idx=None, kv_start_idx=None,
                                 softmax_layout="", sink=None):
    """-> (dq, dk, dv, dpse, dq_rope, dk_rope, dsink), dpse and the rope gradients empty,
    dsink empty without sink: the backward of npu_fusion_attention_v2, with the same pse /
    pse_type arguments as its forward."""
    _v2_unmodeled(query_rope, key_rope, None, 0, 0)
    call = _Call(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask,
                 keep_prob, pre_tokens, next_tokens, prefix, actual_seq_qlen,
                 actual_seq_kvlen, sparse_mode, softmax_layout, pse_type, q_start_idx,
                 kv_start_idx, sink)
    dq, dk, dv, dpse, dsink = _grad(call, dy, softmax_max, softmax_sum, attention_in,
                                    float(scale_value), seed, offset, numels, softmax_layout)
    return dq, dk, dv, dpse, dpse.clone(), dpse.clone(), dsink


def npu_fusion_attention_grad_v3(query, key, value, dy, head_num, input_layout, *, pse=None,
                                 padding_mask=None, atten_mask=None, softmax_max=None,
                                 softmax_sum=None, softmax_in=None, attention_in=None,
                                 scale_value=1.0, keep_prob=1.0, pre_tockens=INT32_MAX,
                                 next_tockens=INT32_MAX, inner_precise=0, seed=None, offset=None,
                                 prefix=None, actual_seq_qlen=None, actual_seq_kvlen=None,
                                 sparse_mode=0, gen_mask_parallel=True, sync=False,
                                 softmax_layout="", sink=None):
    """-> (dq, dk, dv, dpse, dsink) (dpse empty, dsink empty without sink): the backward of
    npu_fusion_attention_v3, seed and offset as tensors (None without dropout), the lengths as
    int64 tensors, no numels."""
    call = _v3_call(query, key, value, head_num, input_layout, pse, padding_mask, atten_mask,
                    keep_prob, pre_tockens, next_tockens, prefix, actual_seq_qlen,
                    actual_seq_kvlen, sparse_mode, softmax_layout, sink)
    seeds = []
    for name, x in (("seed", seed), ("offset", offset)):
        if x is None:
            seeds.append(0)
        elif not isinstance(x, torch.Tensor) or x.numel() != 1:
            raise TypeError(f"{name} of the v3 grad must be a one-element tensor, got {x!r}")
        else:
            seeds.append(int(x.reshape(()).cpu()))
    if call.keep_prob < 1.0 and seed is None:
        raise ValueError("dropout (keep_prob < 1) needs the forward's seed and offset tensors")
    return _grad(call, dy, softmax_max, softmax_sum, attention_in, float(scale_value),
                 seeds[0], seeds[1], call.numels(), softmax_layout)


def _tensor_ends(name: str, ends: object, like: torch.Tensor) -> list[int]:
    """The v3 length arguments: an int64 tensor on the inputs' device (read here, as the
    operator reads it on the device)."""
    if not isinstance(ends, torch.Tensor):
        raise TypeError(f"{name} of the v3 operators must be a tensor, got {type(ends).__name__}")
    if ends.dtype != torch.int64 or ends.dim() != 1 or ends.device != like.device:
        raise TypeError(f"{name} must be a 1-D int64 tensor on {like.device}, got "
                        f"{ends.dtype} {tuple(ends.shape)} on {ends.device}")
    return [int(x) for x in ends.cpu()]


def _v2_unmodeled(query_rope, key_rope, dropout_mask, seed, offset) -> None:
    if query_rope is not None or key_rope is not None or dropout_mask is not None:
        raise NotImplementedError("the simulator does not model query_rope, key_rope or "
                                  "dropout_mask")
    if seed or offset:
        raise NotImplementedError("the simulator draws the dropout seed itself; seed/offset "
                                  "inputs of the v2 forward are not modeled")


def _grad(call: _Call, dy, softmax_max, softmax_sum, attention_in, scale_value: float, seed,
          offset, numels, softmax_layout: str):
    query, key, value, keep_prob = call.query, call.key, call.value, call.keep_prob
    if softmax_max is None or softmax_sum is None or attention_in is None:
        raise ValueError("npu_fusion_attention_grad needs softmax_max, softmax_sum and "
                         "attention_in from the forward call")
    if keep_prob < 1.0 and numels != call.numels():
        raise ValueError(f"numels {numels} does not match this call's dropout mask size "
                         f"{call.numels()}")
    t, n, _ = query.shape
    smax = _stats_in(softmax_max, t, n, softmax_layout)
    ssum = _stats_in(softmax_sum, t, n, softmax_layout)
    dq = torch.zeros(query.shape, dtype=torch.float32, device=query.device)
    dk = torch.zeros(key.shape, dtype=torch.float32, device=key.device)
    dv = torch.zeros(value.shape, dtype=torch.float32, device=value.device)
    dsink = None if call.sink is None else torch.zeros_like(call.sink)
    g = call.group
    for seq in call.sequences():
        s, visible = call.scores(seq, scale_value)
        rows = slice(seq.q0, seq.q1)
        p = torch.exp(s - smax[:, rows, None]) / ssum[:, rows, None]
        p = torch.where(visible, p, torch.zeros_like(p))
        keep = call.keep(int(seed), int(offset), seq)
        do = dy[rows].float().transpose(0, 1)  # (N, sq, Dv)
        o = attention_in[rows].float().transpose(0, 1)
        vb, kb = seq.v(call), seq.k(call)
        dpd = torch.einsum("hid,hjd->hij", do, vb) * keep
        delta = (do * o).sum(-1, keepdim=True)
        if dsink is not None:  # the sink's probability exp(sink - max) / sum, per row
            p_sink = torch.exp(call.sink[:, None] - smax[:, rows]) / ssum[:, rows]
            dsink -= (p_sink * delta[..., 0]).sum(-1)
        ds = p * (dpd - delta) * scale_value
        dq[rows] = torch.einsum("hij,hjd->ihd", ds, kb)
        qb = query[rows].float().transpose(0, 1)
        dk_h = torch.einsum("hij,hid->jhd", ds, qb)
        dv_h = torch.einsum("hij,hid->jhd", p * keep, do)
        kv = slice(seq.k0, seq.k1)
        dk[kv] = dk_h.reshape(seq.sk, -1, g, dk_h.shape[-1]).sum(2)
        dv[kv] = dv_h.reshape(seq.sk, -1, g, dv_h.shape[-1]).sum(2)
    dpse = torch.empty(0, dtype=query.dtype, device=query.device)
    if dsink is None:
        dsink = torch.empty(0, dtype=torch.float32, device=query.device)
    return dq.to(query.dtype), dk.to(key.dtype), dv.to(value.dtype), dpse, dsink


def compressed_causal_mask(device: torch.device | str = "cpu") -> torch.Tensor:
    """The documented compressed mask of sparse modes 2, 3, 4: triu(ones(2048, 2048), 1)."""
    ones = torch.ones(COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE, dtype=torch.bool,
                      device=device)
    return torch.triu(ones, diagonal=1)


class _Seq:
    """One sequence of the TND batch: packed query rows [q0, q1), key rows [k0, k1)."""

    def __init__(self, index: int, q0: int, q1: int, k0: int, k1: int) -> None:
        self.index, self.q0, self.q1, self.k0, self.k1 = index, q0, q1, k0, k1
        self.sq, self.sk = q1 - q0, k1 - k0

    def k(self, call: _Call) -> torch.Tensor:
        """(N, sk, D) float32, kv heads repeated to the query heads (GQA)."""
        return call.key[self.k0:self.k1].float().repeat_interleave(call.group, 1).transpose(0, 1)

    def v(self, call: _Call) -> torch.Tensor:
        return call.value[self.k0:self.k1].float().repeat_interleave(call.group, 1).transpose(0, 1)


class _Call:
    """The validated arguments of one forward or backward call."""

    def __init__(self, query, key, value, head_num, input_layout, pse, padding_mask, atten_mask,
                 keep_prob, pre_tockens, next_tockens, prefix, actual_seq_qlen, actual_seq_kvlen,
                 sparse_mode, softmax_layout, pse_type=None, q_start_idx=None,
                 kv_start_idx=None, sink=None) -> None:
        """pse_type None: the v1 operator (no pse_type; its pse is not modeled)."""
        if input_layout != "TND":
            raise NotImplementedError(f"the simulator models input_layout 'TND' only, got "
                                      f"{input_layout!r}")
        if prefix is not None or (pse is not None and pse_type is None):
            raise NotImplementedError("the simulator does not model prefix, nor pse without "
                                      "pse_type (npu_fusion_attention_v2 models pse_type 2, 3)")
        if padding_mask is not None:
            raise ValueError("padding_mask is not supported (Ascend: reserved)")
        if softmax_layout not in ("", "TND"):
            raise ValueError(f"softmax_layout must be '' or 'TND', got {softmax_layout!r}")
        for name, t in (("query", query), ("key", key), ("value", value)):
            if t.dim() != 3:
                raise ValueError(f"{name} must be [T, N, D] for layout TND, got "
                                 f"{tuple(t.shape)}")
            if t.dtype not in (torch.float16, torch.bfloat16, torch.float32):
                raise TypeError(f"{name}: dtype {t.dtype} is not supported")
        n1, n2 = query.shape[1], key.shape[1]
        if head_num != n1:
            raise ValueError(f"head_num {head_num} != N of query {n1}")
        if not 1 <= n1 <= 256 or n1 % n2:
            raise ValueError(f"N of query ({n1}) must be in 1..256 and a multiple of N of key "
                             f"({n2})")
        if not 1 <= query.shape[2] <= 768 or query.shape[2] != key.shape[2] \
                or value.shape[2] > key.shape[2]:
            raise ValueError("D must be in 1..768, equal for query and key, and D of value "
                             "at most D of key (Dq = Dk, Dk >= Dv)")
        if key.shape[:2] != value.shape[:2]:
            raise ValueError("key and value must have the same T and N")
        if not 0.0 < keep_prob <= 1.0:
            raise ValueError(f"keep_prob must be in (0, 1], got {keep_prob}")
        self.query, self.key, self.value = query, key, value
        self.group = n1 // n2
        self.keep_prob = float(keep_prob)
        self.ends_q = _end_offsets("actual_seq_qlen", actual_seq_qlen, query.shape[0])
        self.ends_k = _end_offsets("actual_seq_kvlen", actual_seq_kvlen, key.shape[0])
        if len(self.ends_q) != len(self.ends_k):
            raise ValueError("actual_seq_qlen and actual_seq_kvlen must have one entry per "
                             f"sequence (got {len(self.ends_q)} and {len(self.ends_k)})")
        for b, (sq, sk) in enumerate(zip(_lengths(self.ends_q), _lengths(self.ends_k),
                                         strict=True)):
            if sq > 0 and sk == 0:
                raise ValueError(f"batch {b} has Sq {sq} > 0 but Skv 0, which is not "
                                 "supported")
        self.mode = int(sparse_mode)
        self.mask = atten_mask
        self.pre, self.next = int(pre_tockens), int(next_tockens)
        self._check_mask()
        self.alibi = None if pse_type is None else simulator_pse.parse(
            pse, pse_type, q_start_idx, kv_start_idx, n1, _lengths(self.ends_q),
            _lengths(self.ends_k))
        self.sink = _check_sink(sink, head_num, query.device)

    def _check_mask(self) -> None:
        if self.mask is None:
            return  # sparse_mode, pre_tockens and next_tockens are ignored: full attention
        if self.mask.dtype not in (torch.bool, torch.uint8):
            raise TypeError(f"atten_mask must be bool or uint8, got {self.mask.dtype}")
        if self.mode in (2, 3, 4):
            size = (COMPRESSED_MASK_SIZE, COMPRESSED_MASK_SIZE)
            if tuple(self.mask.shape) != size or not torch.equal(
                    self.mask.bool(), compressed_causal_mask(self.mask.device)):
                raise ValueError(f"sparse_mode {self.mode} needs the compressed mask "
                                 "triu(ones(2048, 2048), 1)")
            if self.mode == 4 and self.pre + self.next < 0:
                raise ValueError("sparse_mode 4: pre_tockens and next_tockens must overlap")
        elif self.mode in (0, 1):
            longest_q = max(_lengths(self.ends_q), default=0)
            longest_k = max(_lengths(self.ends_k), default=0)
            if self.mask.dim() != 2 or self.mask.shape[0] < longest_q \
                    or self.mask.shape[1] < longest_k:
                raise ValueError("with TND, sparse_mode 0/1 take a [maxSq, maxSkv] atten_mask")
        else:
            raise NotImplementedError(f"the simulator models sparse modes 0-4, got {self.mode}")
        if self.mode == 3:
            for b, (sq, sk) in enumerate(zip(_lengths(self.ends_q), _lengths(self.ends_k),
                                             strict=True)):
                if sq > sk:
                    raise ValueError(f"sparse_mode 3 needs Sq <= Skv in every batch; batch {b} "
                                     f"has Sq {sq} > Skv {sk}")

    def sequences(self):
        """The sequences with rows (an empty one has no rows to compute)."""
        q0 = k0 = 0
        for b, (q1, k1) in enumerate(zip(self.ends_q, self.ends_k, strict=True)):
            if q1 > q0:
                yield _Seq(b, q0, q1, k0, k1)
            q0, k0 = q1, k1

    def visible(self, seq: _Seq) -> torch.Tensor:
        """(sq, sk) bool: key j visible to query i under this call's mask arguments."""
        dev = self.query.device
        i = torch.arange(seq.sq, device=dev)[:, None]
        j = torch.arange(seq.sk, device=dev)[None, :]
        if self.mask is None:
            return torch.ones(seq.sq, seq.sk, dtype=torch.bool, device=dev)
        if self.mode == 0:  # explicit mask and a top-left band
            band = (j >= i - self.pre) & (j <= i + self.next)
            return band & ~self.mask[:seq.sq, :seq.sk].bool()
        if self.mode == 1:
            return ~self.mask[:seq.sq, :seq.sk].bool()
        if self.mode == 2:
            return j <= i
        diag = i + seq.sk - seq.sq  # bottom-right: the last query row ends at the last key
        if self.mode == 3:
            return j <= diag
        return (j >= diag - self.pre) & (j <= diag + self.next)

    def scores(self, seq: _Seq, scale: float) -> tuple[torch.Tensor, torch.Tensor]:
        """Masked scaled scores (N, sq, sk) in float32 (-inf where masked) and visibility
        (1, sq, sk)."""
        q = self.query[seq.q0:seq.q1].float().transpose(0, 1)
        s = torch.einsum("hid,hjd->hij", q, seq.k(self)) * scale
        if self.alibi is not None:
            s = s + self.alibi.bias(seq.index, seq.sq, seq.sk)
        visible = self.visible(seq)[None]
        return s.masked_fill(~visible, float("-inf")), visible

    def keep(self, seed: int, offset: int, seq: _Seq) -> torch.Tensor | float:
        """Dropout factor (N, sq, sk): keep / keep_prob, or 1.0 without dropout."""
        if self.keep_prob >= 1.0:
            return 1.0
        dev = self.query.device
        n = self.query.shape[1]
        h = torch.arange(n, device=dev, dtype=torch.int64)[:, None, None]
        i = torch.arange(seq.q0, seq.q1, device=dev, dtype=torch.int64)[None, :, None]
        j = torch.arange(seq.k0, seq.k1, device=dev, dtype=torch.int64)[None, None, :]
        x = _mix(torch.full((1, 1, 1), (seed ^ offset) & _M32, dtype=torch.int64, device=dev))
        x = _mix(x ^ h)
        x = _mix(x ^ i)
        x = _mix(x ^ j)
        kept = x < round(self.keep_prob * 2**32)
        return kept.float() / self.keep_prob

    def numels(self) -> int:
        """Elements of the dropout mask: N * sum(sq * skv)."""
        n = self.query.shape[1]
        return n * sum(a * b for a, b in zip(_lengths(self.ends_q), _lengths(self.ends_k),
                                             strict=True))


def _check_sink(sink: object, head_num: int, device: torch.device) -> torch.Tensor | None:
    """The documented sink: a float32 tensor of shape [head_num] ("shape为[head_num],
    数据类型仅支持float32"), on the inputs' device."""
    if sink is None:
        return None
    if not isinstance(sink, torch.Tensor):
        raise TypeError(f"sink must be a tensor, got {type(sink).__name__}")
    if sink.dtype != torch.float32:
        raise TypeError(f"sink must be float32, got {sink.dtype}")
    if tuple(sink.shape) != (head_num,):
        raise ValueError(f"sink must have shape [head_num] = [{head_num}], got "
                         f"{list(sink.shape)}")
    if sink.device != device:
        raise ValueError(f"sink must be on the inputs' device {device}, got {sink.device}")
    return sink


def _end_offsets(name: str, ends: object, total: int) -> list[int]:
    """Validate a TND length list: Python ints, cumulative END offsets without the leading 0
    (a repeated offset is an empty sequence), at most 1024 entries, last == T <= 1M."""
    if isinstance(ends, torch.Tensor):
        raise TypeError(f"{name} must be a list of ints (host data), got a tensor")
    if not isinstance(ends, (list, tuple)) or not ends:
        raise ValueError(f"{name} is required for layout TND (a non-empty list of ints)")
    if not all(isinstance(x, int) and not isinstance(x, bool) for x in ends):
        raise TypeError(f"{name} must hold Python ints, got {ends!r}")
    if len(ends) > MAX_SEQUENCES:
        raise ValueError(f"{name} holds {len(ends)} sequences; varlen takes at most "
                         f"{MAX_SEQUENCES} per call")
    for b in range(1, len(ends)):
        if ends[b] < ends[b - 1]:
            raise ValueError(f"{name} must be non-decreasing END offsets, got {list(ends)}")
    if ends[0] < 0 or ends[-1] != total:
        raise ValueError(f"{name}: the last offset must equal T = {total}, got {list(ends)}")
    if total > MAX_TOKENS:
        raise ValueError(f"T = {total} exceeds the documented 1M ({MAX_TOKENS}) tokens")
    return list(ends)


def _lengths(ends: list[int]) -> list[int]:
    return [b - a for a, b in zip([0, *ends[:-1]], ends, strict=True)]


def _stats_out(x: torch.Tensor, layout: str) -> torch.Tensor:
    """(N, T) per-row values -> the [T, N, 8] output: N-major elements by default, true
    [T, N, 8] with softmax_layout='TND'."""
    n, t = x.shape
    if layout == "TND":
        return x.t()[..., None].expand(t, n, 8).contiguous()
    return x[..., None].expand(n, t, 8).contiguous().view(t, n, 8)


def _stats_in(x: torch.Tensor, t: int, n: int, layout: str) -> torch.Tensor:
    """The [T, N, 8] input of the backward -> (N, T) float32."""
    if x.numel() != t * n * 8:
        raise ValueError(f"softmax statistics need T * N * 8 = {t * n * 8} elements, got "
                         f"{tuple(x.shape)}")
    if layout == "TND":
        return x.reshape(t, n, 8)[..., 0].t().float()
    return x.reshape(n, t, 8)[..., 0].float()


def _mix(x: torch.Tensor) -> torch.Tensor:
    """A 32-bit avalanche mix (xorshift-multiply) on int64 values in [0, 2**32)."""
    x = x ^ (x >> 16)
    x = (x * 0x7FEB352D) & _M32
    x = x ^ (x >> 15)
    x = (x * 0x2C1B3C6D) & _M32
    return x ^ (x >> 16)
