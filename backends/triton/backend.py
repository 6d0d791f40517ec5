"""TritonBackend: attnhub's own varlen FlashAttention kernels (forward and backward)."""

from __future__ import annotations

import importlib.util
from typing import ClassVar

import torch

from attnhub.backend import Backend, ForwardResult, Gradients
from attnhub.capabilities import Capabilities
from attnhub.inputs import VarlenInputs
from attnhub.problem import VarlenProblem

from . import configs


class TritonBackend(Backend):
    """Varlen FlashAttention-2-style kernels written in Triton: flat tile lists (no idle
    programs on skewed batches), GQA without expanded K/V, deterministic backward."""

    name: ClassVar[str] = "triton"
    device_types: ClassVar[frozenset[str]] = frozenset({"cuda", "xpu"})
    priority: ClassVar[int] = 100
    backward_uses_forward_stats: ClassVar[bool] = True
    description: ClassVar[str] = "attnhub's Triton kernels: fwd + bwd, flat tile scheduling"
    capabilities: ClassVar[Capabilities] = Capabilities(
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32}),
        head_dims=(16, 512),  # > 256: forward only (why_not)
        page_size_multiple=1,  # per-key page lookups: any page size (FlashInfer uses 1)
        return_probs=False,
        custom_mask=True,  # bits read from the packed mask in the kernels (fwd and bwd)
        sinks=True,  # joined in every forward's epilogue; dsinks from the delta pass
    )

    def __init__(self) -> None:
        if configs.interpreting():
            # TRITON_INTERPRET=1: the kernels run on CPU tensors, for testing. Ranked below
            # the reference there, so only calls that ask for "triton" get the interpreter.
            self.device_types = frozenset({*type(self).device_types, "cpu"})
            self.priority = -2000

    def unavailable_reasons(self) -> list[str]:
        if importlib.util.find_spec("triton") is None:
            return ["triton is not installed (pip install triton)"]
        if configs.interpreting():
            return []
        if not (torch.cuda.is_available() or (hasattr(torch, "xpu")
                                              and torch.xpu.is_available())):
            return ["no GPU for Triton here (set TRITON_INTERPRET=1 to run the kernels on "
                    "the CPU, slowly, for testing)"]
        return []

    def why_not(self, problem: VarlenProblem) -> list[str]:
        reasons = super().why_not(problem)
        if problem.head_dim > 256 and problem.requires_grad:
            reasons.append(f"backward for head_dim {problem.head_dim} > 256 is not implemented "
                           "(forward only)")
        if configs.interpreting() and problem.dtype == torch.bfloat16:
            reasons.append("bfloat16 dot products are wrong in the Triton interpreter "
                           "(TRITON_INTERPRET=1); run bfloat16 on a GPU")
        return reasons

    def prepare(self, problem: VarlenProblem, inputs: VarlenInputs) -> object | None:
        """A plan's forward tile list, when the host lengths are known and the call takes the
        tiled (not the split-KV decode) path."""
        from . import decode
        from .forward import planned_rows, tile_list

        if not problem.lengths_known or decode.eligible(problem):
            return None
        return tile_list(problem, inputs.cu_seqlens_q,
                         planned_rows(problem, inputs.q.device), True)

    def forward(self, problem: VarlenProblem, inputs: VarlenInputs) -> ForwardResult:
        from . import decode
        from .forward import forward

        with configs.launch_guard():
            if decode.eligible(problem):
                out, lse = decode.forward(problem, inputs, sinks=inputs.sinks)
                return ForwardResult(out, lse, None, None)
            seed = None
            if problem.dropout_p > 0:
                seed = inputs.rng_state if inputs.rng_state is not None else torch.randint(
                    0, 2**31 - 1, (2,), dtype=torch.int64, device=inputs.q.device)
            out, lse = forward(problem, inputs, seed, sinks=inputs.sinks)
            return ForwardResult(out, lse, None, seed)

    def out_only_runner(self, problem: VarlenProblem):
        """Repeats of a plan's call replay the recorded launch first (forward.replay_out):
        none of the generic path's per-call objects or checks (about half of a tiny call's
        host time on the H200 machine, docs/performance.md)."""
        from . import decode
        from .forward import replay_out

        generic = super().out_only_runner(problem)
        if configs.interpreting() or problem.dropout_p > 0 or problem.paged is not None \
                or problem.custom_mask or problem.alibi is not None or problem.sinks \
                or decode.eligible(problem):
            return generic

        def run(q, k, v, cu_seqlens_q, cu_seqlens_k):
            out = replay_out(problem, q, k, v, cu_seqlens_q, cu_seqlens_k)
            return generic(q, k, v, cu_seqlens_q, cu_seqlens_k) if out is None else out

        return run

    def backward(self, problem: VarlenProblem, inputs: VarlenInputs, out: torch.Tensor,
                 lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None = None
                 ) -> Gradients:
        from .backward import backward

        if problem.paged is not None:
            # No Triton backward reads page pools: the reference kernel's backward (it
            # recomputes the softmax from q and the pools) gives these gradients (and
            # dsinks), exactly.
            from attnhub.backends.reference import kernel

            return kernel.backward(problem, inputs, dout, dlse)
        with configs.launch_guard():
            dq, dk, dv, dsinks = backward(problem, inputs, out, lse, dout, dlse,
                                          inputs.rng_state, sinks=inputs.sinks)
        return Gradients(dq, dk, dv, dsinks)
