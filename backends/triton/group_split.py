"""Splitting a GQA group's query heads over several dK/dV programs.

The dK/dV kernels (backward.py, hopper_backward.py) run one program per (key tile, kv head)
and loop over the query heads of the group, so GQA gradients are reduced in registers. With
few kv heads (MQA: one) that leaves too few programs to fill the GPU: 16k tokens in 128-row
key tiles are ~130 programs for an H200's 132 SMs, and under a causal mask their work differs
by up to the sequence length. Split s divides each group's query heads over s programs,
each writing float32 partial dK/dV (total_k, nheads_k * s, head_dim); the s partials are then
summed in a fixed order (deterministic, as before) and rounded once to K's dtype.
"""

from __future__ import annotations

import functools

import torch

# Split until the dK/dV grid has this many programs per SM; calls with fewer than MIN_WORK
# (key token, query head) pairs are latency-bound and keep one program per group (the extra
# reduction would cost more host time than the split saves).
PROGRAMS_PER_SM = 4
MIN_WORK = 1 << 18
KEY_ROWS = 128  # the key tile the estimate counts (the dK/dV kernels' for head dims <= 128)


@functools.cache
def _sm_count(device_index: int) -> int:
    return torch.cuda.get_device_properties(device_index).multi_processor_count


def split_for(problem, device: torch.device) -> int:
    """How many programs share each group's query heads in dK/dV: a power of two dividing
    the group size, 1 for MHA, paged K/V, small calls and devices other than CUDA.

    Depends on the problem's sizes only (no device tensor is read), so a replay of the
    problem's launches splits as its recording did."""
    group = problem.group_size
    if (group == 1 or problem.paged is not None or device.type != "cuda"
            or problem.total_k * problem.nheads < MIN_WORK):
        return 1
    programs = (problem.total_k // KEY_ROWS + problem.batch) * problem.nheads_k
    target = PROGRAMS_PER_SM * _sm_count(device.index if device.index is not None
                                         else torch.cuda.current_device())
    split = 1
    while group % (2 * split) == 0 and programs * split < target:
        split *= 2
    return split


def partials(k: torch.Tensor, nheads_k: int, split: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Float32 (total_k, nheads_k * split, head_dim) buffers for the partial dK and dV of
    packed K (total_k, nheads_k, head_dim): kv head j's s-th share at head j * split + s."""
    shape = (k.shape[0], nheads_k * split, k.shape[-1])
    return (torch.empty(shape, dtype=torch.float32, device=k.device),
            torch.empty(shape, dtype=torch.float32, device=k.device))


def reduce(part: torch.Tensor, nheads_k: int, split: int, dtype: torch.dtype) -> torch.Tensor:
    """(total_k, nheads_k, head_dim) in ``dtype``: the sum of a partial buffer's shares."""
    return part.view(part.shape[0], nheads_k, split, part.shape[-1]).sum(2).to(dtype)
