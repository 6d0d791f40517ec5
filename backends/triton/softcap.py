"""The softcap's tanh, shared by the tl kernels (forward.score_tile, the backward through
it) and the Gluon forward (hopper_forward.py), so that both compute the same scores: `tanh`
for fp32 inputs, `tanh_half` for fp16 / bf16 (the Gluon kernel's only dtypes)."""

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


@triton.jit
def tanh_half(x):
    """tanh for scores of fp16 / bf16 inputs, relative error < 3e-6 at every x, so the
    softcapped logit cap * tanh(s / cap) is off by under 3e-6 of itself whatever the cap (far
    below the inputs' rounding): 1 - 2 / (2^(2x log2 e) + 1), one exp2 and one division, and
    below |x| = 0.1, where that form's absolute error (~2e-7) would be large relative to x,
    tanh's Taylor series to x^5 (truncation < 6e-8 relative). Cheaper than `tanh`'s
    polynomial of degree 11."""
    z = x * x
    small = (0.13333333333333333 * z - 0.3333333333333333) * z * x + x
    large = 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)
    return tl.where(tl.abs(x) < 0.1, small, large)
