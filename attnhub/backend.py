"""Backend: the interface every attention backend (built-in or third-party) implements."""

from __future__ import annotations

from collections.abc import Callable
from typing import ClassVar, NamedTuple

import torch

from .capabilities import Capabilities
from .inputs import VarlenInputs
from .problem import VarlenProblem


class ForwardResult(NamedTuple):
    """out: q's shape and dtype. lse: float32 (nheads, total_q), natural log, -inf on rows
    that see no key; with sinks the sink's logit joins the sum (a row that sees no key has
    lse = its head's sink, docs/semantics.md). probs: float32 (batch, nheads, max_seqlen_q,
    max_seqlen_k) when requested. rng_state: whatever the backend's backward needs to
    regenerate the dropout mask (an int64 tensor), when dropout_p > 0."""

    out: torch.Tensor
    lse: torch.Tensor
    probs: torch.Tensor | None = None
    rng_state: torch.Tensor | None = None


class _QKVGradients(NamedTuple):
    dq: torch.Tensor
    dk: torch.Tensor
    dv: torch.Tensor


class Gradients(_QKVGradients):
    """dq, dk, dv with the shapes and dtypes of q, k, v. dsinks: float32 (nheads,), the
    gradient of the attention sinks for a call with sinks (None otherwise).

    It unpacks and iterates as the 3-tuple (dq, dk, dv), as before sinks existed; dsinks is
    an attribute (``Gradients(dq, dk, dv, dsinks)`` or ``dsinks=``)."""

    dsinks: torch.Tensor | None = None  # (the instance's value; _make builds none)

    def __new__(cls, dq: torch.Tensor, dk: torch.Tensor, dv: torch.Tensor,
                dsinks: torch.Tensor | None = None) -> Gradients:
        self = super().__new__(cls, dq, dk, dv)
        self.dsinks = dsinks
        return self

    def __getnewargs__(self) -> tuple:
        return (*self, self.dsinks)

    def _replace(self, **fields: torch.Tensor | None) -> Gradients:
        dsinks = fields.pop("dsinks", self.dsinks)
        return Gradients(*super()._replace(**fields), dsinks=dsinks)

    def __repr__(self) -> str:
        return f"{super().__repr__()[:-1]}, dsinks={self.dsinks!r})"


class Backend:
    """One kernel family. Subclasses set the class attributes and implement the methods.

    ``priority``: higher is tried first among the backends of a device type. ``fallback``:
    True for a backend of last resort (the reference); choosing it while accelerated backends
    exist for the device follows the ATTNHUB_FALLBACK policy. ``backward_uses_forward_stats``:
    True when ``backward`` builds the probabilities as exp(s - lse) from the ``lse`` it is
    handed and delta = rowsum(dout * out) - dlse from the ``out`` it is handed, as flash
    kernels do; context parallelism (attnhub.distributed) then hands it the merged out and
    lse of several calls. False (the safe default, and the reference): backward recomputes
    the softmax itself, and context parallelism recomputes each call's out and lse and
    passes the merge's gradients, which needs a backward that takes dlse.

    ``why_not`` must depend only on the problem's static part (``problem.signature()``):
    selections are cached by it.
    """

    name: ClassVar[str]
    device_types: ClassVar[frozenset[str]]
    priority: ClassVar[int] = 0
    fallback: ClassVar[bool] = False
    backward_uses_forward_stats: ClassVar[bool] = False
    description: ClassVar[str] = ""
    capabilities: ClassVar[Capabilities]

    def unavailable_reasons(self) -> list[str]:
        """Why this backend cannot run at all in this process (missing package, no device).
        Called once per process and cached by the registry. Empty = available."""
        return []

    def why_not(self, problem: VarlenProblem) -> list[str]:
        """Plain sentences saying why this backend cannot compute ``problem`` exactly.
        Empty = it can. Device type and availability are checked by the dispatcher; the
        default derives the reasons from ``capabilities``; override to add more."""
        return self.capabilities.reasons(problem)

    def prepare(self, problem: VarlenProblem, inputs: VarlenInputs) -> object | None:
        """Launch metadata for a planned layout (``attnhub.plan``), computed once and handed
        back as ``inputs.schedule`` on every ``run`` of the plan (host work is fine here): a
        tuple of at most two device tensors (they travel through the custom op, so a planned
        call runs the same kernel with autograd or torch.compile as without). None (the
        default): nothing to precompute. A backend must also run correctly with
        ``inputs.schedule`` None (calls outside a plan)."""
        return None

    def forward(self, problem: VarlenProblem, inputs: VarlenInputs) -> ForwardResult:
        raise NotImplementedError(f"backend {self.name!r} has no forward")

    def forward_out(self, problem: VarlenProblem, inputs: VarlenInputs) -> torch.Tensor:
        """Only ``out``, for calls that use neither lse nor autograd (eager, no grad, no
        return_lse). The default runs ``forward``; a backend whose lse costs extra work (a
        layout or convention fix-up) overrides it to skip that work."""
        return self.forward(problem, inputs).out

    def out_only_runner(self, problem: VarlenProblem
                        ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor,
                                       torch.Tensor], torch.Tensor]:
        """``forward_out`` for ``problem`` bound once, as ``run(q, k, v, cu_seqlens_q,
        cu_seqlens_k) -> out`` with int32 offsets on q's device: what the dispatch fast path
        (attnhub.plans) calls for every repeat of a call. A backend may resolve its static
        launch arguments here, so repeats pay only for the launch."""
        def run(q, k, v, cu_seqlens_q, cu_seqlens_k):
            return self.forward_out(problem, VarlenInputs(q, k, v, cu_seqlens_q, cu_seqlens_k))
        return run

    def autograd_out_runner(self, problem: VarlenProblem
                            ) -> Callable[[torch.Tensor, torch.Tensor, torch.Tensor,
                                           torch.Tensor, torch.Tensor], torch.Tensor] | None:
        """For eager calls of ``problem`` that need gradients of out only (no lse, no probs):
        ``run(q, k, v, cu_seqlens_q, cu_seqlens_k) -> out`` computed under the kernel's own
        autograd, which torch runs as a C++ node with no Python in the backward, bound once
        as ``out_only_runner`` is (call plans keep it). None (the default) when the kernel
        has no such node for ``problem``, or the problem has feature tensors (ALiBi slopes,
        block table, custom mask, sinks), which ``run`` does not take; attnhub's autograd
        Function then pairs ``forward`` and ``backward``."""
        return None

    def backward(self, problem: VarlenProblem, inputs: VarlenInputs, out: torch.Tensor,
                 lse: torch.Tensor, dout: torch.Tensor, dlse: torch.Tensor | None = None
                 ) -> Gradients:
        """Gradients for q, k, v given dout (out's shape) and dlse ((nheads, total_q) float32,
        None when lse was not used). ``inputs.rng_state`` is the rng_state that forward
        returned. A backend that cannot take dlse raises when it is not None."""
        raise NotImplementedError(f"backend {self.name!r} has no backward")

    def __repr__(self) -> str:
        return f"<attnhub backend {self.name!r} ({', '.join(sorted(self.device_types))})>"
