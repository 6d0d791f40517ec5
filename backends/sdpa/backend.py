"""SdpaBackend: PyTorch's fused CPU attention kernel for devices without a dedicated one."""

from __future__ import annotations

from typing import ClassVar

import torch

from attnhub.backend import Backend, ForwardResult, Gradients
from attnhub.capabilities import Capabilities
from attnhub.inputs import VarlenInputs
from attnhub.problem import VarlenProblem

from . import kernel


class SdpaBackend(Backend):
    """Runs ``aten::_scaled_dot_product_flash_attention_for_cpu`` (the kernel behind
    ``torch.nn.functional.scaled_dot_product_attention`` on the CPU) once per run of
    consecutive equal-length sequences, GQA read natively, masks as an additive bias built
    from attnhub's geometry. Ranked above the reference on the CPU; not a fallback."""

    name: ClassVar[str] = "sdpa"
    device_types: ClassVar[frozenset[str]] = frozenset({"cpu"})
    priority: ClassVar[int] = 0
    description: ClassVar[str] = ("PyTorch's fused CPU attention (the kernel behind "
                                  "scaled_dot_product_attention), per group of sequences")
    capabilities: ClassVar[Capabilities] = Capabilities(
        dtypes=frozenset({torch.float16, torch.bfloat16, torch.float32, torch.float64}),
        softcap=False,
        dropout=False,
        page_size_multiple=None,
        return_probs=False,
        custom_mask=True)

    def forward(self, problem: VarlenProblem, inputs: VarlenInputs) -> ForwardResult:
        return kernel.forward(problem, inputs)

    def forward_out(self, problem: VarlenProblem, inputs: VarlenInputs) -> torch.Tensor:
        return kernel.forward(problem, inputs, need_lse=False).out

    def backward(self, problem: VarlenProblem, inputs: VarlenInputs, out: torch.Tensor,
                 lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None = None
                 ) -> Gradients:
        return kernel.backward(problem, inputs, out, lse, dout, dlse)
