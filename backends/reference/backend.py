"""ReferenceBackend: pure PyTorch on any device, every feature; the conformance oracle."""

from __future__ import annotations

from typing import ClassVar

import torch

from attnhub.backend import Backend, ForwardResult, Gradients
from attnhub.capabilities import Capabilities
from attnhub.inputs import VarlenInputs
from attnhub.problem import VarlenProblem

from . import kernel


class ReferenceBackend(Backend):
    """Computes docs/semantics.md directly, one sequence and one query chunk at a time,
    accumulating in fp32 (fp64 for fp64 inputs). Slow, exact, memory bounded."""

    name: ClassVar[str] = "reference"
    device_types: ClassVar[frozenset[str]] = frozenset({"*"})  # every device torch runs on
    priority: ClassVar[int] = -1000
    fallback: ClassVar[bool] = True
    description: ClassVar[str] = "pure PyTorch, fp32 math, every feature; the oracle"
    capabilities: ClassVar[Capabilities] = Capabilities(
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        custom_mask=True, sinks=True)

    def why_not(self, problem: VarlenProblem) -> list[str]:
        reasons = super().why_not(problem)
        if problem.device_type == "meta":
            reasons.append("meta tensors hold no data to compute on")
        return reasons

    def forward(self, problem: VarlenProblem, inputs: VarlenInputs) -> ForwardResult:
        return kernel.forward(problem, inputs)

    def backward(self, problem: VarlenProblem, inputs: VarlenInputs, out: torch.Tensor,
                 lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None = None
                 ) -> Gradients:
        return kernel.backward(problem, inputs, dout, dlse)
