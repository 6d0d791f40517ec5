"""FlashInfer's BatchPrefillWithRaggedKVCacheWrapper and BatchPrefillWithPagedKVCacheWrapper.

Each plan() translates FlashInfer's arguments (indptr arrays, page indices and last-page
lengths, options) into one ``attnhub.plan`` (host work, once per batch); each run() is that
plan's ``run`` on the call's tensors, with the layout views, RoPE and the base-2 lse
FlashInfer's callers expect. Constructor, plan() and run() signatures follow FlashInfer's
documentation (docs.flashinfer.ai, flashinfer.prefill).
"""

from __future__ import annotations

import torch

from attnhub.arguments import as_int
from attnhub.batch_plan import BatchPlan, plan
from attnhub.errors import InvalidArgumentError

from . import rope as rope_
from .options import (
    check_extra_plan_args,
    check_kv_layout,
    custom_mask_arg,
    host_ints,
    lse_base2,
    plan_options,
)


class _PrefillWrapper:
    """What both wrappers share: the workspace's device, the layout, CUDA-graph buffers,
    the core plan, and run()'s output handling."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str,
                 use_cuda_graph: bool, qo_indptr_buf: torch.Tensor | None,
                 custom_mask_buf: torch.Tensor | None, mask_indptr_buf: torch.Tensor | None,
                 backend: str) -> None:
        if not isinstance(float_workspace_buffer, torch.Tensor):
            raise InvalidArgumentError("float_workspace_buffer", "a torch.Tensor",
                                       type(float_workspace_buffer).__name__)
        self.device = float_workspace_buffer.device
        self._workspace = float_workspace_buffer  # kept, as FlashInfer does; attnhub needs none
        self._kv_layout = check_kv_layout(kv_layout)
        self._use_cuda_graph = bool(use_cuda_graph)
        if self._use_cuda_graph and qo_indptr_buf is None:
            raise InvalidArgumentError("qo_indptr_buf", "a (batch + 1,) int32 buffer when "
                                       "use_cuda_graph=True (it fixes the batch size)", None)
        self._qo_indptr_buf = qo_indptr_buf
        self._custom_mask_buf, self._mask_indptr_buf = custom_mask_buf, mask_indptr_buf
        self._backend = backend  # FlashInfer's kernel choice; attnhub's dispatch decides
        self._plan: BatchPlan | None = None
        self._plan_args: dict | None = None  # plan()'s attnhub.plan arguments
        self._sinks_plan: BatchPlan | None = None  # the same plan with sinks, made on demand
        self._rope: tuple[float, float] | None = None
        self._q_pos: torch.Tensor | None = None

    @property
    def is_cuda_graph_enabled(self) -> bool:
        return self._use_cuda_graph

    def reset_workspace_buffer(self, float_workspace_buffer: torch.Tensor,
                               int_workspace_buffer: torch.Tensor | None = None) -> None:
        self._workspace = float_workspace_buffer

    def _core_plan(self, qo: list[int], kv_lens: list[int], opts, *, nheads: int, nheads_k: int,
                   head_dim: int, custom_mask, packed_custom_mask, **paged) -> None:
        qo_lens = [qo[b + 1] - qo[b] for b in range(len(qo) - 1)]
        if self._use_cuda_graph and len(qo) != self._qo_indptr_buf.numel():
            raise InvalidArgumentError("qo_indptr", f"{self._qo_indptr_buf.numel()} offsets "
                                       "(the batch size fixed by qo_indptr_buf)", len(qo))
        mask = custom_mask_arg(custom_mask, packed_custom_mask, qo_lens, kv_lens, self.device)
        kv_cu = [0]
        for n in kv_lens:
            kv_cu.append(kv_cu[-1] + n)
        bounds = {}
        if self._use_cuda_graph:  # launches fixed at capture: bounds, not the batch's maxima
            bounds = dict(max_seqlen_q=qo[-1], max_seqlen_k=paged.pop("capacity", kv_cu[-1]))
        paged.pop("capacity", None)
        if self._use_cuda_graph and self._plan is not None and self._plan.cuda_graph:
            for planned in (self._plan, self._sinks_plan):
                if planned is not None:
                    planned.replan(qo, kv_cu, block_table=paged.get("block_table"),
                                   custom_mask=mask)
            assert self._plan_args is not None  # (a sinks variant planned later uses these)
            self._plan_args.update(cu_seqlens_q=qo, cu_seqlens_k=kv_cu, custom_mask=mask,
                                   **{k: v for k, v in paged.items() if k == "block_table"})
        else:
            self._plan_args = dict(cu_seqlens_q=qo, cu_seqlens_k=kv_cu, nheads=nheads,
                                   nheads_k=nheads_k, head_dim=head_dim, device=self.device,
                                   custom_mask=mask, cuda_graph=self._use_cuda_graph, **bounds,
                                   **paged, **opts.core())
            self._plan = plan(**self._plan_args)
            self._sinks_plan = None
        if self._qo_indptr_buf is not None:
            self._qo_indptr_buf.copy_(torch.tensor(qo, dtype=self._qo_indptr_buf.dtype))
        self._rope = opts.rope
        self._q_pos = (rope_.query_positions(qo_lens, kv_lens, self.device)
                       if opts.rope is not None else None)

    def _finish(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                out: torch.Tensor | None, lse: torch.Tensor | None, return_lse: bool,
                window_left: int | None, k_scale: float | None, v_scale: float | None,
                sinks: torch.Tensor | None = None):
        if self._plan is None:
            raise InvalidArgumentError("run", "a plan() call first", "no plan")
        if k_scale is not None or v_scale is not None:
            raise InvalidArgumentError("k_scale, v_scale", "None: attnhub has no fp8 KV cache "
                                       "scales", (k_scale, v_scale))
        planned = self._plan.problem.window[0]
        if window_left is not None and window_left != planned:
            raise InvalidArgumentError("window_left", f"the planned window_left ({planned})",
                                       window_left)
        if self._rope is not None:
            q = rope_.rotate(q, self._q_pos, *self._rope)
        if sinks is None:
            res, res_lse = self._plan.run(q, k, v, return_lse=True)
        else:  # FlashInfer takes sinks per run: attnhub plans a sinks variant once
            if self._sinks_plan is None:
                assert self._plan_args is not None
                self._sinks_plan = plan(**self._plan_args, sinks=True)
            res, res_lse = self._sinks_plan.run(q, k, v, return_lse=True, sinks=sinks)
        if out is not None:
            out.copy_(res)
            res = out
        if not return_lse:
            return res
        res_lse = lse_base2(res_lse)
        if lse is not None:
            lse.copy_(res_lse)
            res_lse = lse
        return res, res_lse

    def end_forward(self) -> None:
        """FlashInfer's no-op kept for old callers."""


class BatchPrefillWithRaggedKVCacheWrapper(_PrefillWrapper):
    """Prefill over a ragged (packed) K/V: q (total_q, num_qo_heads, d); k, v
    (total_kv, num_kv_heads, d) with kv_layout 'NHD', (num_kv_heads, total_kv, d) with 'HND'."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf: torch.Tensor | None = None,
                 kv_indptr_buf: torch.Tensor | None = None,
                 custom_mask_buf: torch.Tensor | None = None,
                 mask_indptr_buf: torch.Tensor | None = None, backend: str = "auto",
                 jit_args: list | None = None) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, qo_indptr_buf,
                         custom_mask_buf, mask_indptr_buf, backend)
        self._kv_indptr_buf = kv_indptr_buf
        self._k_pos: torch.Tensor | None = None

    def plan(self, qo_indptr: torch.Tensor, kv_indptr: torch.Tensor, num_qo_heads: int,
             num_kv_heads: int, head_dim_qk: int, head_dim_vo: int | None = None,
             custom_mask: torch.Tensor | None = None,
             packed_custom_mask: torch.Tensor | None = None, causal: bool = False,
             pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
             window_left: int = -1, logits_soft_cap: float | None = None,
             sm_scale: float | None = None, rope_scale: float | None = None,
             rope_theta: float | None = None, q_data_type="float16", kv_data_type=None,
             non_blocking: bool = True, **extra) -> None:
        """Plan the batch (host work). qo_indptr / kv_indptr: (batch + 1,) offsets.
        use_fp16_qk_reduction is accepted and has no effect (attnhub accumulates in fp32)."""
        qo, kv = host_ints("qo_indptr", qo_indptr), host_ints("kv_indptr", kv_indptr)
        opts = plan_options(head_dim_qk=head_dim_qk, head_dim_vo=head_dim_vo, causal=causal,
                            has_mask=custom_mask is not None or packed_custom_mask is not None,
                            pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale,
                            window_left=window_left, logits_soft_cap=logits_soft_cap,
                            rope_scale=rope_scale, rope_theta=rope_theta,
                            q_data_type=q_data_type, kv_data_type=kv_data_type)
        check_extra_plan_args(extra, opts.dtype)
        kv_lens = [kv[b + 1] - kv[b] for b in range(len(kv) - 1)]
        self._core_plan(qo, kv_lens, opts, nheads=num_qo_heads, nheads_k=num_kv_heads,
                        head_dim=head_dim_qk, custom_mask=custom_mask,
                        packed_custom_mask=packed_custom_mask)
        if self._kv_indptr_buf is not None:
            self._kv_indptr_buf.copy_(torch.tensor(kv, dtype=self._kv_indptr_buf.dtype))
        self._k_pos = (rope_.ragged_key_positions(kv_lens, self.device)
                       if opts.rope is not None else None)

    begin_forward = plan

    def run(self, q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
            out: torch.Tensor | None = None, lse: torch.Tensor | None = None,
            return_lse: bool = False, enable_pdl: bool | None = None,
            window_left: int | None = None, k_scale: float | None = None,
            v_scale: float | None = None):
        """out (total_q, num_qo_heads, d), or (out, lse) with lse float32
        (total_q, num_qo_heads) in base 2."""
        if self._kv_layout == "HND":
            k, v = k.transpose(0, 1), v.transpose(0, 1)
        if self._rope is not None:
            k = rope_.rotate(k, self._k_pos, *self._rope)
        return self._finish(q, k, v, out, lse, return_lse, window_left, k_scale, v_scale)

    forward = run


class BatchPrefillWithPagedKVCacheWrapper(_PrefillWrapper):
    """Prefill over a paged K/V cache: q (total_q, num_qo_heads, d); the cache one tensor
    (max_num_pages, 2, page_size, num_kv_heads, d) ('NHD') / (max_num_pages, 2, num_kv_heads,
    page_size, d) ('HND'), or a (k_cache, v_cache) tuple of 4-D tensors in the same layouts."""

    def __init__(self, float_workspace_buffer: torch.Tensor, kv_layout: str = "NHD",
                 use_cuda_graph: bool = False, qo_indptr_buf: torch.Tensor | None = None,
                 paged_kv_indptr_buf: torch.Tensor | None = None,
                 paged_kv_indices_buf: torch.Tensor | None = None,
                 paged_kv_last_page_len_buf: torch.Tensor | None = None,
                 custom_mask_buf: torch.Tensor | None = None,
                 mask_indptr_buf: torch.Tensor | None = None, backend: str = "auto",
                 jit_args: list | None = None) -> None:
        super().__init__(float_workspace_buffer, kv_layout, use_cuda_graph, qo_indptr_buf,
                         custom_mask_buf, mask_indptr_buf, backend)
        if self._use_cuda_graph and paged_kv_indices_buf is None:
            raise InvalidArgumentError("paged_kv_indices_buf", "a buffer when use_cuda_graph="
                                       "True (its length bounds the pages of a request)", None)
        self._indptr_buf, self._indices_buf = paged_kv_indptr_buf, paged_kv_indices_buf
        self._last_buf = paged_kv_last_page_len_buf
        self._k_pos: torch.Tensor | None = None

    def plan(self, qo_indptr: torch.Tensor, paged_kv_indptr: torch.Tensor,
             paged_kv_indices: torch.Tensor, paged_kv_last_page_len: torch.Tensor,
             num_qo_heads: int, num_kv_heads: int, head_dim_qk: int, page_size: int,
             head_dim_vo: int | None = None, custom_mask: torch.Tensor | None = None,
             packed_custom_mask: torch.Tensor | None = None, causal: bool = False,
             pos_encoding_mode: str = "NONE", use_fp16_qk_reduction: bool = False,
             sm_scale: float | None = None, window_left: int = -1,
             logits_soft_cap: float | None = None, rope_scale: float | None = None,
             rope_theta: float | None = None, q_data_type="float16", kv_data_type=None,
             non_blocking: bool = True, **extra) -> None:
        """Plan the batch (host work): request b owns pages paged_kv_indices[indptr[b]:
        indptr[b + 1]], the last one filled to paged_kv_last_page_len[b] slots (1..page_size).
        use_fp16_qk_reduction is accepted and has no effect (attnhub accumulates in fp32)."""
        opts = plan_options(head_dim_qk=head_dim_qk, head_dim_vo=head_dim_vo, causal=causal,
                            has_mask=custom_mask is not None or packed_custom_mask is not None,
                            pos_encoding_mode=pos_encoding_mode, sm_scale=sm_scale,
                            window_left=window_left, logits_soft_cap=logits_soft_cap,
                            rope_scale=rope_scale, rope_theta=rope_theta,
                            q_data_type=q_data_type, kv_data_type=kv_data_type)
        check_extra_plan_args(extra, opts.dtype)
        page_size = as_int("page_size", page_size, 1)
        qo = host_ints("qo_indptr", qo_indptr)
        indptr = host_ints("paged_kv_indptr", paged_kv_indptr)
        indices = host_ints("paged_kv_indices", paged_kv_indices)
        last = host_ints("paged_kv_last_page_len", paged_kv_last_page_len)
        batch = len(indptr) - 1
        if len(last) != batch or len(qo) != batch + 1:
            raise InvalidArgumentError("paged_kv_last_page_len", f"{batch} entries and qo_indptr "
                                       f"{batch + 1} (the batch of paged_kv_indptr)",
                                       f"{len(last)} and {len(qo)}")
        pages = [indices[indptr[b]:indptr[b + 1]] for b in range(batch)]
        kv_lens = []
        for b, ids in enumerate(pages):
            if ids and not 1 <= last[b] <= page_size:
                raise InvalidArgumentError("paged_kv_last_page_len", f"values in [1, {page_size}]"
                                           " for requests with pages",
                                           f"request {b}: {last[b]}")
            kv_lens.append((len(ids) - 1) * page_size + last[b] if ids else 0)
        width = max([len(ids) for ids in pages] + [1])
        if self._use_cuda_graph:
            width = self._indices_buf.numel()
        table = torch.zeros(batch, width, dtype=torch.int32)
        for b, ids in enumerate(pages):
            table[b, :len(ids)] = torch.tensor(ids, dtype=torch.int32)
        num_pages = max([*indices, 0]) + 1
        self._core_plan(qo, kv_lens, opts, nheads=num_qo_heads, nheads_k=num_kv_heads,
                        head_dim=head_dim_qk, custom_mask=custom_mask,
                        packed_custom_mask=packed_custom_mask, block_table=table.to(self.device),
                        page_size=page_size, num_pages=num_pages, capacity=width * page_size)
        for buf, values in ((self._indptr_buf, indptr), (self._indices_buf, indices),
                            (self._last_buf, last)):
            if buf is not None and values:
                buf[:len(values)].copy_(torch.tensor(values, dtype=buf.dtype))
        self._page_size = page_size
        self._k_pos = None
        if opts.rope is not None:
            self._k_pos = (pages, page_size)

    begin_forward = plan

    def run(self, q: torch.Tensor, paged_kv_cache, k_scale: float | None = None,
            v_scale: float | None = None, out: torch.Tensor | None = None,
            lse: torch.Tensor | None = None, return_lse: bool = False,
            enable_pdl: bool | None = None, window_left: int | None = None,
            sinks: torch.Tensor | None = None):
        """out (total_q, num_qo_heads, d), or (out, lse) with lse float32
        (total_q, num_qo_heads) in base 2. ``sinks``: float32 (num_qo_heads,) attention-sink
        logits, one per query head, joining every row's softmax denominator (FlashInfer's
        run-time argument; the lse includes them)."""
        k, v = self._pools(paged_kv_cache)
        if self._rope is not None:
            pages, page_size = self._k_pos
            pos = rope_.paged_key_positions(pages, page_size, k.shape[0], k.device)
            flat = (-1, *k.shape[2:])
            k = rope_.rotate(k.reshape(flat), pos, *self._rope).view(k.shape)
        return self._finish(q, k, v, out, lse, return_lse, window_left, k_scale, v_scale, sinks)

    forward = run

    def _pools(self, cache) -> tuple[torch.Tensor, torch.Tensor]:
        """(k, v) page pools as attnhub reads them: (num_pages, page_size, num_kv_heads, d)
        views of the caller's cache."""
        if isinstance(cache, (tuple, list)):
            if len(cache) != 2:
                raise InvalidArgumentError("paged_kv_cache", "a (k_cache, v_cache) pair",
                                           f"{len(cache)} tensors")
            k, v = cache
        elif isinstance(cache, torch.Tensor) and cache.dim() == 5 and cache.shape[1] == 2:
            k, v = cache[:, 0], cache[:, 1]
        else:
            raise InvalidArgumentError(
                "paged_kv_cache", "a 5-D tensor (max_num_pages, 2, ...) or a (k_cache, v_cache)"
                " tuple", tuple(cache.shape) if isinstance(cache, torch.Tensor) else type(cache))
        if self._kv_layout == "HND":
            k, v = k.transpose(1, 2), v.transpose(1, 2)
        return k, v
