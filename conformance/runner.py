"""Run cases on backends and judge them against the reference in float64."""

from __future__ import annotations

import math
import time
import traceback
from collections.abc import Callable, Iterable
from dataclasses import dataclass, field

import torch

import attnhub
from attnhub import dispatch
from attnhub.registry import get_registry

from . import dense, inputs, tolerance
from .cases import Case
from .surfaces import Surface, get_surface
from .tolerance import Check

ORACLE = "reference"


@dataclass
class CaseResult:
    """status: 'pass', 'fail', 'unsupported' (``reasons`` are the backend's own) or 'error'
    (the backend raised; ``reasons`` holds the exception)."""

    backend: str
    case: Case
    status: str
    reasons: list[str] = field(default_factory=list)
    checks: list[Check] = field(default_factory=list)
    forward_only: bool = False
    seconds: float = 0.0
    surface: str | None = None

    @property
    def label(self) -> str:
        """The report's row name: the backend, and the surface the case went through."""
        return self.backend if self.surface is None else f"{self.backend} via {self.surface}"

    @property
    def failed(self) -> bool:
        return self.status in ("fail", "error")

    def describe(self) -> str:
        lines = [f"{self.label} {self.case.id}: {self.status}"
                 + (" (forward only)" if self.forward_only else "")]
        lines += [f"  {r}" for r in self.reasons]
        lines += [f"  {c.output}: {c.failure}" for c in self.checks if not c.ok]
        return "\n".join(lines)

    def to_dict(self) -> dict:
        return {"backend": self.backend, "surface": self.surface, "case": self.case.id,
                "feature": self.case.feature,
                "status": self.status, "reasons": self.reasons, "forward_only": self.forward_only,
                "seconds": round(self.seconds, 4), "checks": [c.to_dict() for c in self.checks]}


def _leaves(tensors: Iterable[torch.Tensor], dtype: torch.dtype | None, grad: bool
            ) -> list[torch.Tensor]:
    out = []
    for t in tensors:
        t = t.detach() if dtype is None else t.detach().to(dtype)
        out.append(t.requires_grad_(grad))
    return out


def _call(backend: str, case: Case, kwargs: dict, q: torch.Tensor, k: torch.Tensor,
          v: torch.Tensor, surface: Surface | None
          ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """(out, lse) of one call, direct or through ``surface`` (lse None where it gives none)."""
    if surface is None:
        return attnhub.attention_forward_varlen(q, k, v, **kwargs, return_lse=True,
                                                backend=backend)
    with dispatch.use_backend(backend):
        return surface.call(case, kwargs, q, k, v)


def _run(backend: str, case: Case, data: inputs.CaseInputs, dtype: torch.dtype | None,
         grad: bool, surface: Surface | None = None
         ) -> tuple[torch.Tensor, torch.Tensor | None, tuple[torch.Tensor, ...] | None]:
    """out, lse and (dq, dk, dv[, dsinks]) of one run; ``dtype`` upcasts q, k, v (the
    oracle)."""
    q, k, v = _leaves(data.tensors(), dtype, grad)
    kwargs = data.kwargs(case)
    if dtype is not None and kwargs["alibi_slopes"] is not None:
        kwargs["alibi_slopes"] = kwargs["alibi_slopes"].detach()
    leaves = (q, k, v)
    if kwargs["sinks"] is not None:  # float32 for every run (the API's dtype), a leaf
        kwargs["sinks"] = _leaves((kwargs["sinks"],), None, grad)[0]
        leaves += (kwargs["sinks"],)
    out, lse = _call(backend, case, kwargs, q, k, v, surface)
    grads = None
    if grad:
        dout = data.dout if dtype is None else data.dout.to(dtype)
        grads = torch.autograd.grad(out, leaves, dout)
    return out.detach(), None if lse is None else lse.detach(), grads


def verdict(backend: str, case: Case, data: inputs.CaseInputs, grad: bool) -> list[str]:
    q, k, v = _leaves(data.tensors(), None, grad)
    problem, _ = attnhub.normalize(q, k, v, **data.kwargs(case))
    return dispatch.verdict(get_registry().backends[backend], problem)


def run_case(case: Case, backend: str, device: torch.device | str,
             surface: str | None = None) -> CaseResult:
    """One case on one backend: unsupported (its reasons), pass, fail (error figures) or
    error (it raised). ``surface`` (a name in conformance.surfaces.SURFACES) runs the case
    through that drop-in surface instead of attention_forward_varlen."""
    start = time.perf_counter()
    result = _run_case(case, backend, device, get_surface(surface) if surface else None)
    result.surface = surface
    result.seconds = time.perf_counter() - start
    return result


def _run_case(case: Case, backend: str, device: torch.device | str,
              surface: Surface | None) -> CaseResult:
    if surface is not None and (gaps := surface.why_not(case)):
        return CaseResult(backend, case, "unsupported", [f"surface {surface.name}: {r}"
                                                         for r in gaps])
    data = inputs.build(case, device)
    reasons = verdict(backend, case, data, case.grad)
    forward_only = False
    if reasons and case.grad and not verdict(backend, case, data, False):
        forward_only = True
    elif reasons:
        return CaseResult(backend, case, "unsupported", reasons)
    grad = case.grad and not forward_only
    try:
        if case.dropout_p > 0:
            result = _dropout_case(case, backend, data, grad, device, surface)
        else:
            result = _plain_case(case, backend, data, grad, device, surface)
    except Exception as exc:
        tail = traceback.format_exception_only(type(exc), exc)[-1].strip()
        result = CaseResult(backend, case, "error", [tail])
    if forward_only:
        result.forward_only = True
        result.reasons = [f"backward not checked: {r}" for r in reasons] + result.reasons
    return result


def _plain_case(case: Case, backend: str, data: inputs.CaseInputs, grad: bool,
                device: torch.device | str, surface: Surface | None = None) -> CaseResult:
    o_out, o_lse, o_grads = _run(ORACLE, case, data, torch.float64, grad)
    r_out, r_lse, r_grads = _run(ORACLE, case, data, None, grad)
    with inputs.poisoned(device, _shapes(r_out, r_lse, *(r_grads or ()))):
        out, lse, grads = _run(backend, case, data, None, grad, surface)
    checks = [tolerance.check("out", out, o_out, r_out, case.dtype)]
    if lse is not None:  # a surface without lse is judged on out and the gradients
        checks.append(tolerance.check("lse", lse, o_lse, r_lse, case.dtype))
    if grad:
        assert grads is not None and o_grads is not None and r_grads is not None
        names = GRAD_NAMES[:len(grads)]  # dsinks when the case has sinks
        for name, g, og, rg in zip(names, grads, o_grads, r_grads, strict=True):
            extra = 0.0
            if name == "dsinks":
                extra = tolerance.stored_output_slack(o_out, o_lse, data.dout,
                                                      data.kwargs(case)["sinks"], case.dtype)
            checks.append(tolerance.check(name, g, og, rg, case.dtype, extra=extra))
    status = "pass" if all(c.ok for c in checks) else "fail"
    return CaseResult(backend, case, status, checks=checks)


GRAD_NAMES = ("dq", "dk", "dv", "dsinks")


def _shapes(*tensors: torch.Tensor) -> list[tuple[tuple[int, ...], torch.dtype]]:
    return [(tuple(t.shape), t.dtype) for t in tensors]


def _one_hot_values(case: Case, data: inputs.CaseInputs) -> torch.Tensor:
    """v whose key j of each sequence is the unit vector e_j: out then equals the row of
    dropped-and-rescaled probabilities, which reveals the backend's dropout mask."""
    v = torch.zeros_like(data.v)
    start = 0
    for n in case.seqlens_k:
        v[start + torch.arange(n), :, torch.arange(n)] = 1.0
        start += n
    return v


def _dropout_case(case: Case, backend: str, data: inputs.CaseInputs, grad: bool,
                  device: torch.device | str, surface: Surface | None = None) -> CaseResult:
    assert case.page_size is None and case.alibi is None and not case.softcap
    assert max(case.seqlens_k) <= case.head_dim, "dropout cases need sk <= head_dim"
    data.v = inputs._padded(_one_hot_values(case, data))
    kwargs = data.kwargs(case)
    window = (case.window or (-1, -1))
    window = (window[0], 0) if case.causal else window
    scale = case.head_dim ** -0.5
    checks: list[Check] = []
    reasons: list[str] = []

    def backend_run(seed: int) -> tuple[torch.Tensor, tuple[torch.Tensor, ...] | None]:
        torch.manual_seed(seed)
        q, k, v = _leaves(data.tensors(), None, grad)
        with inputs.poisoned(device, _shapes(q, k, v)):
            out, _ = _call(backend, case, kwargs, q, k, v, surface)
            grads = torch.autograd.grad(out, (q, k, v), data.dout) if grad else None
        return out.detach(), grads

    out, grads = backend_run(case.seed)
    out_again, _ = backend_run(case.seed)
    out_other, _ = backend_run(case.seed + 1)
    if not torch.equal(out, out_again):
        reasons.append("not reproducible: two runs after torch.manual_seed(s) differ")
    if torch.equal(out, out_other):
        reasons.append("the mask ignores the seed: runs with different seeds are identical")

    keep, kept, total = [], 0, 0
    q0 = 0
    for sq, sk in zip(case.seqlens_q, case.seqlens_k, strict=True):
        rows = out[q0:q0 + sq, :, :sk].permute(1, 0, 2).cpu()  # (nheads, sq, sk)
        vis = dense.visible(sq, sk, window)
        m = (rows != 0) & vis
        keep.append(m)
        kept += int(m.sum())
        total += int(vis.sum()) * case.nheads
        q0 += sq
    rate, expected = kept / max(total, 1), 1.0 - case.dropout_p
    sigma = math.sqrt(case.dropout_p * expected / max(total, 1))
    if abs(rate - expected) > 5 * sigma + 1e-3:
        reasons.append(f"keep rate {rate:.4f} over {total} entries, expected {expected:.4f} "
                       f"+- {5 * sigma:.4f}")
    checks.append(Check("keep-rate", abs(rate - expected), 5 * sigma + 1e-3, 0.0,
                        reasons[-1] if reasons and reasons[-1].startswith("keep") else None))

    def oracle(dtype: torch.dtype, compute: torch.dtype):
        q, k, v = _leaves(data.tensors(), dtype, grad)
        o = dense.attention_with_mask(q, k, v, case.seqlens_q, case.seqlens_k, scale, window,
                                      keep, case.dropout_p, compute)
        g = torch.autograd.grad(o, (q, k, v), data.dout.to(dtype)) if grad else None
        return o.detach(), g

    o_out, o_grads = oracle(torch.float64, torch.float64)
    r_out, r_grads = oracle(case.dtype, torch.float32)
    checks.append(tolerance.check("out", out, o_out, r_out, case.dtype))
    if grad:
        assert grads is not None and o_grads is not None and r_grads is not None
        for name, g, og, rg in zip(("dq", "dk", "dv"), grads, o_grads, r_grads, strict=True):
            checks.append(tolerance.check(name, g, og, rg, case.dtype))
    failed = reasons or not all(c.ok for c in checks)
    return CaseResult(backend, case, "fail" if failed else "pass", reasons, checks)


def run_suite(cases: list[Case], backends: list[str], device: torch.device | str,
              progress: Callable[[int, int, CaseResult], None] | None = None,
              surface: str | None = None) -> list[CaseResult]:
    """Every case on every backend, in order; ``progress(done, total, result)`` after each.
    ``surface``: run every case through that drop-in surface (see run_case)."""
    results = []
    total = len(cases) * len(backends)
    for backend in backends:
        for case in cases:
            res = run_case(case, backend, device, surface)
            results.append(res)
            if progress is not None:
                progress(len(results), total, res)
    return results
