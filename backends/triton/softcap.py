"""The softcap's tanh, shared by the tl kernels (forward.score_tile, the backward through
it) and the Gluon forward (hopper_forward.py), so that both compute the same scores."""

from __future__ import annotations

import triton
import triton.language as tl


@triton.jit
def tanh(x):
    """tanh without libdevice (absent in the interpreter), relative error < 2e-7 in fp32.
    |x| > 0.625: 1 - 2 / (exp(2x) + 1); below, where that form cancels (its error is
    absolute, ~1e-7, and softcap multiplies t by the cap), Cephes tanhf's odd polynomial."""
    z = x * x
    small = ((((-5.70498872745e-3 * z + 2.06390887954e-2) * z - 5.37397155531e-2) * z
              + 1.33314422036e-1) * z - 3.33332819422e-1) * z * x + x
    large = 1.0 - 2.0 / (tl.exp(2.0 * x) + 1.0)
    return tl.where(tl.abs(x) > 0.625, large, small)
