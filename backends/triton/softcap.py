"""The softcap's tanh, shared by the tl kernels (forward.score_tile, the backward through
it) and the Gluon forward (hopper_forward.py), so that both compute the same scores: `tanh`
for fp32 inputs, `tanh_half` for fp16 / bf16 (the Gluon kernel's only dtypes). Kernels take
the cap's `mode` as their HAS_SOFTCAP constexpr."""

from __future__ import annotations

import triton
import triton.language as tl

# Caps above this take tanh_half's small-argument branch. Below, the one-branch form's
# absolute error in tanh (< 2.5e-7 with the GPU's exp2) times the cap keeps the softcapped
# logit within 6.4e-5 of its value, under a tenth of fp16's rounding of probabilities.
SMALL_ARGUMENT_CAP = 256.0


def mode(cap: float) -> int:
    """A kernel's HAS_SOFTCAP: 0 without softcap, 1 for a cap up to SMALL_ARGUMENT_CAP,
    2 above it (tanh_half then adds its small-argument branch)."""
    if cap <= 0:
        return 0
    return 2 if cap > SMALL_ARGUMENT_CAP else 1


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
def tanh_half(x, SMALL_ARGUMENTS: tl.constexpr):
    """tanh for scores of fp16 / bf16 inputs: 1 - 2 / (2^(2x log2 e) + 1), one exp2 and one
    division, absolute error < 2.5e-7. With SMALL_ARGUMENTS (caps above SMALL_ARGUMENT_CAP,
    where x = s / cap is small and that error times the cap is not), tanh's Taylor series to
    x^5 below |x| = 0.1 (truncation < 6e-8 relative), so that the softcapped logit
    cap * tanh(s / cap) is off by under 3e-6 of itself whatever the cap. Cheaper than
    `tanh`'s polynomial of degree 11; the branch costs ~20% of a softcapped forward."""
    large = 1.0 - 2.0 / (tl.exp2(x * 2.8853900817779268) + 1.0)
    if SMALL_ARGUMENTS:
        z = x * x
        small = (0.13333333333333333 * z - 0.3333333333333333) * z * x + x
        large = tl.where(tl.abs(x) < 0.1, small, large)
    return large
