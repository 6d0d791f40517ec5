"""NpuBackend: attnhub's problem on Ascend's torch_npu.npu_fusion_attention (layout TND).

torch_npu is imported lazily: attnhub imports and runs without it, and the backend then
reports "torch_npu not installed". Forward calls npu_fusion_attention; backward calls
npu_fusion_attention_grad, the operator torch_npu's own autograd formula runs, with the
statistics rebuilt from lse and the (seed, offset) that forward returned. ALiBi calls use
npu_fusion_attention_v2 / npu_fusion_attention_grad_v2, the only ones with pse_type.
"""

from __future__ import annotations

import importlib
from typing import ClassVar

import torch

from attnhub.backend import Backend, ForwardResult, Gradients
from attnhub.capabilities import Capabilities
from attnhub.inputs import VarlenInputs
from attnhub.problem import VarlenProblem

from . import simulation, softmax_stats, translate
from .layout import TndLayout, gather, scatter_rows, tnd_layout

MAX_HEADS = 256  # N of query, per Ascend's constraints


def torch_npu():
    """The torch_npu module (or the simulator standing in for it)."""
    return importlib.import_module("torch_npu")


class NpuBackend(Backend):
    """Ascend's fused attention operator with every attnhub argument honored or declined."""

    name: ClassVar[str] = "npu"
    device_types: ClassVar[frozenset[str]] = frozenset({"npu"})
    priority: ClassVar[int] = 100
    backward_uses_forward_stats: ClassVar[bool] = True
    description: ClassVar[str] = "torch_npu.npu_fusion_attention, layout TND (Ascend)"
    capabilities: ClassVar[Capabilities] = Capabilities(
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        head_dims=(1, 768),
        softcap=False,
        alibi=frozenset({"head", "batch_head"}),
        page_size_multiple=None,
        deterministic_backward=False,
        top_left=False,
        return_probs=False,
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
        missing = [f for f in ("npu_fusion_attention", "npu_fusion_attention_grad")
                   if not hasattr(module, f)]
        if missing:
            return [f"this torch_npu has no {' or '.join(missing)}; upgrade torch_npu"]
        return []

    def why_not(self, problem: VarlenProblem) -> list[str]:
        reasons = super().why_not(problem)
        if problem.alibi is not None:
            reasons.extend(self._alibi_reasons(problem))
        if problem.softcap > 0:
            reasons.append("npu_fusion_attention has no logit softcap")
        if problem.nheads > MAX_HEADS:
            reasons.append(f"npu_fusion_attention takes at most {MAX_HEADS} query heads, got "
                           f"{problem.nheads}")
        sq_le_sk, _ = problem.length_facts()
        if problem.window == (-1, 0) and sq_le_sk is False:
            reasons.append("causal with a sequence whose queries outnumber its keys (sq > sk): "
                           "npu_fusion_attention's sparse_mode 3 requires sq <= sk")
        return reasons

    @staticmethod
    def _alibi_reasons(problem: VarlenProblem) -> list[str]:
        reasons = []
        _, sq_eq_sk = problem.length_facts()
        if sq_eq_sk is False:
            reasons.append("ALiBi with a sequence whose sq != sk: npu_fusion_attention_v2 "
                           "generates ALiBi (pse_type 2) only where 'Sq and Skv are of equal "
                           "length'")
        try:
            module = torch_npu()
        except ImportError:
            return reasons  # unavailable_reasons says why
        if not all(hasattr(module, f) for f in translate.V2):
            reasons.append("ALiBi needs npu_fusion_attention_v2 and npu_fusion_attention_grad_v2 "
                           "(pse_type), which this torch_npu lacks; upgrade torch_npu")
        return reasons

    def forward(self, problem: VarlenProblem, inputs: VarlenInputs) -> ForwardResult:
        """out (total_q, nheads, head_dim), lse float32 (nheads, total_q); with dropout an
        int64 (2,) rng_state holding the operator's (seed, offset)."""
        layout = self._layout(problem, inputs)
        q = inputs.q
        out = torch.zeros(q.shape, dtype=q.dtype, device=q.device)
        lse = torch.full((problem.nheads, problem.total_q), float("-inf"), dtype=torch.float32,
                         device=q.device)
        rng = None
        if not layout.empty:
            qc, = gather(layout.q_rows, q)
            kc, vc = gather(layout.k_rows, inputs.k, inputs.v)
            fwd = getattr(torch_npu(), translate.operators(problem)[0])
            res = fwd(qc, kc, vc, **translate.forward_kwargs(problem, layout, q.device,
                                                          inputs.alibi_slopes))
            out_c, smax, ssum, _, seed, offset, _ = res
            lse_c = softmax_stats.lse_from_stats(smax, ssum, qc.shape[0], problem.nheads)
            out = scatter_rows(layout.q_rows, out_c, problem.total_q)
            lse = scatter_rows(layout.q_rows, lse_c, problem.total_q, float("-inf"), dim=1)
            if problem.dropout_p > 0:
                rng = torch.tensor([int(seed), int(offset)], dtype=torch.int64).to(
                    q.device, non_blocking=True)
        elif problem.dropout_p > 0:
            rng = torch.zeros(2, dtype=torch.int64, device=q.device)
        if layout.dead_rows:
            dead = self._rows(layout.dead_rows, q.device)
            out = out.index_fill(0, dead, 0.0)
            lse = lse.index_fill(1, dead, float("-inf"))
        return ForwardResult(out, lse, None, rng)

    def backward(self, problem: VarlenProblem, inputs: VarlenInputs, out: torch.Tensor,
                 lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None = None
                 ) -> Gradients:
        """dq, dk, dv from npu_fusion_attention_grad; a gradient through lse (dlse) has no
        counterpart in Ascend's operator and raises."""
        if dlse is not None:
            raise NotImplementedError(
                "the npu backend cannot take a gradient through lse: npu_fusion_attention_grad "
                "has no input for it; compute lse-dependent losses with backend='reference'")
        layout = self._layout(problem, inputs)
        q, k, v = inputs.q, inputs.k, inputs.v
        if layout.empty:
            return Gradients(torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v))
        seed = offset = 0
        if problem.dropout_p > 0:
            if inputs.rng_state is None:
                raise ValueError("dropout backward needs the rng_state that forward returned")
            seed, offset = (int(x) for x in inputs.rng_state.tolist())
        qc, out_c, dout_c = gather(layout.q_rows, q, out, dout)
        kc, vc = gather(layout.k_rows, k, v)
        lse_c = lse if layout.q_rows is None else lse.index_select(
            1, self._rows(layout.q_rows, lse.device))
        smax, ssum = softmax_stats.stats_from_lse(lse_c)
        bwd = getattr(torch_npu(), translate.operators(problem)[1])
        grads = bwd(qc, kc, vc, dout_c, **translate.grad_kwargs(
            problem, layout, q.device, smax, ssum, out_c, seed, offset, inputs.alibi_slopes))
        dq_c, dk_c, dv_c = grads[:3]  # v2 returns 6 or 7 tensors depending on the release
        dq = scatter_rows(layout.q_rows, dq_c, q.shape[0])
        dk = scatter_rows(layout.k_rows, dk_c, k.shape[0])
        dv = scatter_rows(layout.k_rows, dv_c, v.shape[0])
        if layout.dead_rows:
            dq = dq.index_fill(0, self._rows(layout.dead_rows, q.device), 0.0)
        return Gradients(dq, dk, dv)

    @staticmethod
    def _layout(problem: VarlenProblem, inputs: VarlenInputs) -> TndLayout:
        layout = tnd_layout(problem, inputs.cu_seqlens_q, inputs.cu_seqlens_k)
        if problem.window == (-1, 0) and any(
                layout.seqlens_q[b] > layout.seqlens_k[b] for b in layout.active):
            raise ValueError("causal attention with sq > sk in some sequence cannot run on "
                             "npu_fusion_attention (sparse_mode 3 requires sq <= sk)"
                             + translate.UNKNOWN_LENGTHS_HINT)
        return layout

    @staticmethod
    def _rows(rows: tuple[int, ...], device: torch.device) -> torch.Tensor:
        return torch.tensor(rows, dtype=torch.int64).to(device, non_blocking=True)
