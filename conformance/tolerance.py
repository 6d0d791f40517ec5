"""The pass rule: error against the fp64 oracle <= 2 x the reference's own low-dtype error
plus a rounding slack; NaN never passes."""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

FACTOR = 2.0
# The smallest slack: fp32 accumulation noise that the reference's own error can miss. Where
# the oracle is exactly 0 by symmetry (a query that sees a single key has dq = 0 and gives
# its key dk = 0), the reference computes an exact 0 too, while a kernel that takes
# delta = rowsum(dO * O) from the stored output, as flash kernels do, lands near 1e-6.
ABS_FLOOR = 1e-5
# lse is float32 for every dtype; kernels reorder its fp32 sums, so it gets this floor.
LSE_FLOOR = 1e-4


@dataclass(frozen=True)
class Check:
    """One output of one case: its max abs error, the tolerance, and why it failed."""

    output: str
    error: float
    tolerance: float
    reference_error: float
    failure: str | None = None

    @property
    def ok(self) -> bool:
        return self.failure is None

    def to_dict(self) -> dict:
        return {"output": self.output, "error": self.error, "tolerance": self.tolerance,
                "reference_error": self.reference_error, "failure": self.failure}


def rounding_slack(values: torch.Tensor, dtype: torch.dtype) -> float:
    """2 x the rounding error of ``dtype`` at the magnitude of ``values``: the larger of
    flash-attn's `(x + 0.3 - 0.3) - x` trick and one unit in the last place of ``dtype`` at
    the largest |value| (twice the half-unit rounding error). The trick alone can give 0 on a
    few values that happen to round exactly (dsinks has one per head)."""
    if values.numel() == 0:
        return 0.0
    x = values.to(dtype)
    trick = 2.0 * ((x + 0.3 - 0.3) - x).abs().max().item()
    top = values.abs().max().item()
    if not 0 < top < float("inf"):
        return trick
    _, exponent = math.frexp(top)  # top = m * 2**exponent, 0.5 <= m < 1
    return max(trick, torch.finfo(dtype).eps * 2.0 ** (exponent - 1))


def stored_output_slack(out: torch.Tensor, lse: torch.Tensor, dout: torch.Tensor,
                        sinks: torch.Tensor, dtype: torch.dtype) -> float:
    """The dsinks error of a backward that takes delta_i = rowsum(dout_i * out_i) from the
    output stored in ``dtype`` (as flash kernels do, FA4's learnable-sink backward and
    Ascend's grad operators among them) instead of the exact output: max over heads of
    sum_i exp(sinks[h] - lse_i) * |rowsum(dout_i * (round(out_i) - out_i))|, computed from the
    oracle's out (total_q, nheads, head_dim), lse (nheads, total_q) and the case's dout. One
    sink sums this over every row of its head, so dsinks needs it where dq, dk, dv (one
    row or key each) do not."""
    exact = out.detach().double()
    delta_err = (dout.detach().double() * (exact.to(dtype).double() - exact)).sum(-1).abs()
    p_sink = torch.exp(sinks.detach().double()[:, None] - lse.detach().double())
    return float((p_sink * delta_err.T).sum(-1).max()) if p_sink.numel() else 0.0


def check(output: str, got: torch.Tensor, oracle: torch.Tensor, reference: torch.Tensor,
          dtype: torch.dtype, factor: float = FACTOR, extra: float = 0.0) -> Check:
    """Compare ``got`` (the backend) and ``reference`` (the reference in the case's dtype) with
    ``oracle`` (the reference in fp64). ``extra``: a further slack the output's computation
    admits (``stored_output_slack`` for dsinks), counted ``factor`` times."""
    if got.shape != oracle.shape:
        return Check(output, float("inf"), 0.0, 0.0,
                     f"shape {tuple(got.shape)}, expected {tuple(oracle.shape)}")
    got64, ref64 = got.detach().double(), reference.detach().double()
    oracle = oracle.detach().double()
    if torch.isnan(got64).any():
        n = int(torch.isnan(got64).sum())
        return Check(output, float("nan"), 0.0, 0.0, f"{n} NaN values (unwritten memory or "
                     "an out-of-bounds read of the NaN padding)")
    neginf = torch.isneginf(oracle)
    if not torch.equal(torch.isneginf(got64), neginf):
        return Check(output, float("inf"), 0.0, 0.0, "-inf where the oracle is finite, or "
                     "finite where a row sees no key (-inf expected)")
    finite = ~neginf
    err = (got64 - oracle)[finite].abs().max().item() if finite.any() else 0.0
    ref_err = (ref64 - oracle)[finite].abs().max().item() if finite.any() else 0.0
    slack = rounding_slack(oracle[finite], dtype if output != "lse" else torch.float32)
    slack = max(slack, LSE_FLOOR if output == "lse" else ABS_FLOOR)
    tol = factor * (ref_err + extra) + slack
    failure = None if err <= tol else (
        f"error {err:.3e} > {factor:g} x {ref_err:.3e} + {slack:.1e}" if not extra else
        f"error {err:.3e} > {factor:g} x ({ref_err:.3e} + {extra:.1e} stored-output) "
        f"+ {slack:.1e}")
    return Check(output, err, tol, ref_err, failure)
