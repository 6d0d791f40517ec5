"""CudaAdapter: the skeleton the four CUDA adapters share (torch-flash, flash-attn, fa3, fa4).

The kernels reject a batch of no sequences, so the skeleton answers it without a launch (out
zeros, lse -inf, zero gradients); it refuses a gradient through lse for kernels whose backward
takes none; ``forward_out`` asks the kernel for out only. An adapter holds its capabilities
and its kernel calls (``run_forward`` / ``run_backward``), nothing else.
"""

from __future__ import annotations

from typing import ClassVar

import torch

from attnhub.backend import Backend, ForwardResult, Gradients
from attnhub.inputs import VarlenInputs
from attnhub.problem import VarlenProblem

from .tensors import empty_batch, reject_dlse


class CudaAdapter(Backend):
    """A Backend over one CUDA kernel family whose backward rebuilds the probabilities from
    the forward's out and lse (flash kernels). Subclasses set ``name``, ``priority``,
    ``description``, ``capabilities`` and ``dlse_unsupported_by``, and implement
    ``run_forward`` and ``run_backward``."""

    device_types: ClassVar[frozenset[str]] = frozenset({"cuda"})
    backward_uses_forward_stats: ClassVar[bool] = True
    # Whose backward takes no gradient of lse, for the error message (e.g. "FA3"); None: the
    # kernel's backward takes dlse.
    dlse_unsupported_by: ClassVar[str | None] = None

    def run_forward(self, problem: VarlenProblem, inputs: VarlenInputs,
                    return_lse: bool) -> ForwardResult:
        """The kernel's forward of a call with at least one sequence. With ``return_lse`` the
        result's lse is attnhub's (float32 (nheads, total_q), -inf on rows that see no key);
        without it only ``out`` is read, and the adapter may skip computing or converting lse
        (lse may then be None)."""
        raise NotImplementedError(f"backend {self.name!r} has no forward")

    def run_backward(self, problem: VarlenProblem, inputs: VarlenInputs, out: torch.Tensor,
                     lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None
                     ) -> Gradients:
        """The kernel's backward of a call with at least one sequence (``dlse`` is None when
        ``dlse_unsupported_by`` is set)."""
        raise NotImplementedError(f"backend {self.name!r} has no backward")

    def forward(self, problem: VarlenProblem, inputs: VarlenInputs) -> ForwardResult:
        if problem.batch == 0:
            return empty_batch(problem, inputs.q)
        return self.run_forward(problem, inputs, True)

    def forward_out(self, problem: VarlenProblem, inputs: VarlenInputs) -> torch.Tensor:
        if problem.batch == 0:
            return inputs.q.new_zeros(inputs.q.shape)
        return self.run_forward(problem, inputs, False).out

    def backward(self, problem: VarlenProblem, inputs: VarlenInputs, out: torch.Tensor,
                 lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None = None
                 ) -> Gradients:
        if self.dlse_unsupported_by is not None:
            reject_dlse(dlse, self.name, self.dlse_unsupported_by)
        if problem.batch == 0:
            q, k, v, sinks = inputs.q, inputs.k, inputs.v, inputs.sinks
            return Gradients(torch.zeros_like(q), torch.zeros_like(k), torch.zeros_like(v),
                             None if sinks is None else torch.zeros_like(sinks))
        return self.run_backward(problem, inputs, out, lse, dout, dlse)
