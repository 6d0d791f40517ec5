"""NpuBackend: attnhub's problem on Ascend's torch_npu fused attention operators.

torch_npu is imported lazily: attnhub imports and runs without it, and the backend then
reports "torch_npu not installed". Training-style calls go to npu_fusion_attention (layout
TND) and its grad, with the statistics rebuilt from lse and the (seed, offset) that forward
returned; ALiBi calls use npu_fusion_attention_v2 / _grad_v2 (the only ones with pse_type);
calls whose lengths exist only on the device use npu_fusion_attention_v3 / _grad_v3, which
take them as tensors. Paged K/V (block_table) goes to npu_fused_infer_attention_score
(paged.py), forward only. Attention sinks go to every training operator as ``sink``; their
gradient is the grad operators' last output (dsink).
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import torch

from attnhub.backend import Backend, ForwardResult, Gradients
from attnhub.capabilities import Capabilities
from attnhub.inputs import VarlenInputs
from attnhub.problem import VarlenProblem

from . import paged, simulation, softmax_stats, translate
from .layout import (
    MAX_SEQUENCES_PER_CALL,
    MAX_TOKENS,
    TndLayout,
    gather,
    row_index,
    scatter_into,
    tnd_layout,
)

MAX_HEADS = 256  # N of query, per Ascend's constraints


def torch_npu():
    """The torch_npu module (or the simulator standing in for it)."""
    return importlib.import_module("torch_npu")


class NpuBackend(Backend):
    """Ascend's fused attention operators with every attnhub argument honored or declined."""

    name: ClassVar[str] = "npu"
    device_types: ClassVar[frozenset[str]] = frozenset({"npu"})
    priority: ClassVar[int] = 100
    backward_uses_forward_stats: ClassVar[bool] = True
    description: ClassVar[str] = ("torch_npu.npu_fusion_attention (TND) and "
                                  "npu_fused_infer_attention_score (paged K/V), Ascend")
    capabilities: ClassVar[Capabilities] = Capabilities(
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        head_dims=(1, 768),
        softcap=False,
        alibi=frozenset({"head", "batch_head"}),
        page_size_multiple=1,  # the block-size rules of paged.reasons apply
        deterministic_backward=False,
        top_left=False,
        return_probs=False,
        sinks=True,
    )

    def __init__(self) -> None:
        if simulation.requested_by_env() and not simulation.active():
            simulation.install()
        if simulation.active():
            # The simulator computes on CPU tensors: ranked below the reference there, so only
            # calls that ask for "npu" reach it (as the triton backend does under its
            # interpreter).
            self.device_types = frozenset({*type(self).device_types, "cpu"})
            self.priority = -2000
            self.description = "torch_npu simulator (CPU): " + type(self).description

    def unavailable_reasons(self) -> list[str]:
        try:
            module = torch_npu()
        except ImportError:
            return ["torch_npu not installed (pip install attnhub[npu] with Ascend's CANN "
                    f"toolkit; or {simulation.ENV_VAR}=1 for the CPU simulator)"]
        missing = [f for f in translate.V1 if not hasattr(module, f)]
        if missing:
            return [f"this torch_npu has no {' or '.join(missing)}; upgrade torch_npu"]
        return []

    def why_not(self, problem: VarlenProblem) -> list[str]:
        reasons = super().why_not(problem)
        if problem.softcap > 0:
            reasons.append("npu_fusion_attention has no logit softcap")
        if problem.nheads > MAX_HEADS:
            reasons.append(f"Ascend's attention operators take at most {MAX_HEADS} query "
                           f"heads (Nq 1~256), got {problem.nheads}")
        if max(problem.max_seqlen_q, problem.max_seqlen_k) > MAX_TOKENS:
            reasons.append(f"a sequence of {max(problem.max_seqlen_q, problem.max_seqlen_k)} "
                           f"tokens: npu_fusion_attention takes S of at most 1M ({MAX_TOKENS})")
        if problem.paged is not None:
            return reasons + paged.reasons(problem, _module_or_none())
        if problem.alibi is not None:
            reasons.extend(self._alibi_reasons())
        if problem.sinks:
            reasons.extend(self._sink_reasons(problem))
        if problem.dropout_p > 0:
            reasons.extend(self._dropout_reasons(problem))
        return reasons

    @staticmethod
    def _alibi_reasons() -> list[str]:
        module = _module_or_none()
        if module is not None and not all(hasattr(module, f) for f in translate.V2):
            return ["ALiBi needs npu_fusion_attention_v2 and npu_fusion_attention_grad_v2 "
                    "(pse_type), which this torch_npu lacks; upgrade torch_npu"]
        return []

    @staticmethod
    def _sink_reasons(problem: VarlenProblem) -> list[str]:
        """The operators of this call must have the ``sink`` parameter (torch_npu 2.14 has
        it on every training operator; older releases do not)."""
        module = _module_or_none()
        if module is None:
            return []
        names = [*translate.operators(problem), *translate.V3]
        lacking = [f for f in names if hasattr(module, f)
                   and not translate.takes_argument(getattr(module, f), "sink")]
        if lacking:
            return [f"attention sinks need the sink argument of {', '.join(lacking)}, which "
                    "this torch_npu lacks; upgrade torch_npu (2.14 has it)"]
        return []

    @staticmethod
    def _dropout_reasons(problem: VarlenProblem) -> list[str]:
        """Dropout needs the whole call in one operator call: attnhub carries one (seed,
        offset) from forward to backward."""
        if problem.batch > MAX_SEQUENCES_PER_CALL or max(problem.total_q,
                                                          problem.total_k) > MAX_TOKENS:
            return [f"dropout with more than {MAX_SEQUENCES_PER_CALL} sequences or 1M tokens: "
                    "the operator takes at most that many per call, and each call draws its "
                    "own dropout mask (attnhub keeps one seed and offset per attention call)"]
        if problem.alibi is not None and problem.length_facts()[1] is False:
            return ["dropout with ALiBi where some sq != sk: each value of sk - sq is its own "
                    "npu_fusion_attention_v2 call with its own dropout mask (attnhub keeps one "
                    "seed and offset per attention call)"]
        return []

    def forward(self, problem: VarlenProblem, inputs: VarlenInputs) -> ForwardResult:
        """out (total_q, nheads, head_dim), lse float32 (nheads, total_q); with dropout an
        int64 (2,) rng_state holding the operator's (seed, offset)."""
        if problem.paged is not None:
            out, lse = paged.forward(torch_npu(), problem, inputs)
            return ForwardResult(out, lse, None, None)
        if self._device_lengths(problem, inputs):
            return self._forward_v3(problem, inputs)
        layout = self._layout(problem, inputs)
        q = inputs.q
        fwd = getattr(torch_npu(), translate.operators(problem)[0])
        rng = torch.zeros(2, dtype=torch.int64, device=q.device) if problem.dropout_p > 0 \
            else None
        if not layout.whole:
            out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
            lse = _lse_of_rows_without_keys(problem, inputs)
        for call in layout.calls:
            qc, = gather(call.q_rows, q)
            kc, vc = gather(call.k_rows, inputs.k, inputs.v)
            res = fwd(qc, kc, vc, **translate.forward_kwargs(
                problem, call, q.device, len(layout.seqlens_q), inputs.alibi_slopes,
                inputs.sinks))
            out_c, smax, ssum, _, seed, offset, _ = res
            lse_c = softmax_stats.lse_from_stats(smax, ssum, qc.shape[0], problem.nheads)
            if layout.whole:
                out, lse = out_c, lse_c
            else:
                scatter_into(out, call.q_rows, out_c)
                scatter_into(lse, call.q_rows, lse_c, dim=1)
            if rng is not None:
                rng = torch.tensor([int(seed), int(offset)], dtype=torch.int64).to(
                    q.device, non_blocking=True)
        return ForwardResult(out, lse, None, rng)

    def backward(self, problem: VarlenProblem, inputs: VarlenInputs, out: torch.Tensor,
                 lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None = None
                 ) -> Gradients:
        """dq, dk, dv (and dsinks, the sum of the calls' dsink: rows that see no key add
        exp(sink - lse) * (dlse - delta) = 0 without dlse) from npu_fusion_attention_grad (v2
        with ALiBi, v3 with device lengths); a gradient through lse (dlse) has no counterpart
        in Ascend's operator and raises."""
        if dlse is not None:
            raise NotImplementedError(
                "the npu backend cannot take a gradient through lse: npu_fusion_attention_grad "
                "has no input for it; compute lse-dependent losses with backend='reference'")
        if problem.paged is not None:
            raise NotImplementedError("paged K/V runs on npu_fused_infer_attention_score, an "
                                      "inference operator without a backward")
        if self._device_lengths(problem, inputs):
            return self._backward_v3(problem, inputs, out, lse, dout)
        layout = self._layout(problem, inputs)
        q, k, v = inputs.q, inputs.k, inputs.v
        seed = offset = 0
        if problem.dropout_p > 0 and not layout.empty:
            if inputs.rng_state is None:
                raise ValueError("dropout backward needs the rng_state that forward returned")
            seed, offset = (int(x) for x in inputs.rng_state.tolist())
        bwd = getattr(torch_npu(), translate.operators(problem)[1])
        if not layout.whole:
            dq, dk, dv = torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v)
        dsinks = None if inputs.sinks is None else torch.zeros_like(inputs.sinks)
        for call in layout.calls:
            qc, out_c, dout_c = gather(call.q_rows, q, out, dout)
            kc, vc = gather(call.k_rows, k, v)
            lse_c = lse if call.q_rows is None else lse.index_select(
                1, row_index(call.q_rows, lse.device))
            smax, ssum = softmax_stats.stats_from_lse(lse_c)
            grads = bwd(qc, kc, vc, dout_c, **translate.grad_kwargs(
                problem, call, q.device, len(layout.seqlens_q), smax, ssum, out_c, seed,
                offset, inputs.alibi_slopes, inputs.sinks))
            dq_c, dk_c, dv_c = grads[:3]  # v2 returns 6 or 7 tensors depending on the release
            if dsinks is not None:
                dsinks += grads[-1]  # dsink: the last output of v1 (5), v2 (7) and v3 (5)
            if layout.whole:
                dq, dk, dv = dq_c, dk_c, dv_c
            else:
                scatter_into(dq, call.q_rows, dq_c)
                scatter_into(dk, call.k_rows, dk_c)
                scatter_into(dv, call.k_rows, dv_c)
        return Gradients(dq, dk, dv, dsinks)

    # Lengths that exist only on the device: the v3 operators take them as tensors.

    @staticmethod
    def _device_lengths(problem: VarlenProblem, inputs: VarlenInputs) -> bool:
        """True when the v3 operators compute the call without any host copy of the lengths:
        the lengths are not on the host, one offsets tensor serves q and k (so sq == sk in
        every sequence: no row without keys, zero-length sequences empty on both sides, which
        the operator documents as supported), no ALiBi, and the batch is within one call."""
        if problem.seqlens_q is not None and problem.seqlens_k is not None:
            return False
        if problem.alibi is not None or problem.paged is not None:
            return False
        module = _module_or_none()
        if module is None or not all(hasattr(module, f) for f in translate.V3):
            return False
        return (_same_offsets(inputs.cu_seqlens_q, inputs.cu_seqlens_k)
                and problem.batch <= MAX_SEQUENCES_PER_CALL
                and max(problem.total_q, problem.total_k) <= MAX_TOKENS)

    @staticmethod
    def _forward_v3(problem: VarlenProblem, inputs: VarlenInputs) -> ForwardResult:
        q = inputs.q
        fwd = getattr(torch_npu(), translate.V3[0])
        out, smax, ssum, _, seed, offset = fwd(q, inputs.k, inputs.v, **translate.v3_forward_kwargs(
            problem, inputs.cu_seqlens_q, inputs.cu_seqlens_k, q.device, inputs.sinks))
        lse = softmax_stats.lse_from_stats(smax, ssum, problem.total_q, problem.nheads)
        rng = None
        if problem.dropout_p > 0:  # CPU or device tensors: moved, never read on the host
            rng = torch.cat([seed.reshape(1), offset.reshape(1)]).to(
                device=q.device, dtype=torch.int64, non_blocking=True)
        return ForwardResult(out, lse, None, rng)

    @staticmethod
    def _backward_v3(problem: VarlenProblem, inputs: VarlenInputs, out: torch.Tensor,
                     lse: torch.Tensor, dout: torch.Tensor) -> Gradients:
        seed = offset = None
        if problem.dropout_p > 0:
            if inputs.rng_state is None:
                raise ValueError("dropout backward needs the rng_state that forward returned")
            seed, offset = inputs.rng_state[0:1], inputs.rng_state[1:2]
        smax, ssum = softmax_stats.stats_from_lse(lse)
        bwd = getattr(torch_npu(), translate.V3[1])
        grads = bwd(inputs.q, inputs.k, inputs.v, dout, **translate.v3_grad_kwargs(
            problem, inputs.cu_seqlens_q, inputs.cu_seqlens_k, inputs.q.device, smax, ssum,
            out, seed, offset, inputs.sinks))
        return Gradients(*grads[:3], None if inputs.sinks is None else grads[-1])

    @staticmethod
    def _layout(problem: VarlenProblem, inputs: VarlenInputs) -> TndLayout:
        layout = tnd_layout(problem, inputs.cu_seqlens_q, inputs.cu_seqlens_k,
                            by_shift=problem.alibi is not None)
        if problem.dropout_p > 0 and len(layout.calls) > 1:
            raise ValueError("dropout over several npu_fusion_attention calls (more than 1024 "
                             "sequences or 1M tokens, or ALiBi with different sk - sq) cannot "
                             "carry one seed and offset to the backward"
                             + translate.UNKNOWN_LENGTHS_HINT)
        return layout


def _lse_of_rows_without_keys(problem: VarlenProblem, inputs: VarlenInputs) -> torch.Tensor:
    """lse (nheads, total_q) of rows no operator call computes (they see no key): -inf, or
    with sinks the sink of the row's head (the sink is the row's only softmax term)."""
    if inputs.sinks is None:
        return torch.full((problem.nheads, problem.total_q), float("-inf"),
                          dtype=torch.float32, device=inputs.q.device)
    return inputs.sinks[:, None].expand(problem.nheads, problem.total_q).clone()


def _module_or_none():
    try:
        return torch_npu()
    except ImportError:
        return None


def _same_offsets(a: torch.Tensor, b: torch.Tensor) -> bool:
    """One offsets tensor for both sides (the same memory, shape and dtype)."""
    return a is b or (a.device == b.device and a.dtype == b.dtype and a.shape == b.shape
                      and a.stride() == b.stride() and a.data_ptr() == b.data_ptr())
