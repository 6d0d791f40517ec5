"""The Gluon Hopper kernels stay out of calls they cannot serve: the modules import with any
Triton, and CPU tensors (or a Triton without Gluon) take the tl kernels."""

import torch

import attnhub
from attnhub.backends.triton import hopper_backward, hopper_forward
from attnhub.normalize import normalize


def test_cpu_calls_never_reach_the_gluon_kernels():
    lengths = [5, 0, 9]
    q = torch.randn(14, 4, 64, dtype=torch.float16)
    k = v = torch.randn(14, 2, 64, dtype=torch.float16)
    info = attnhub.VarlenInfo.from_lengths(lengths, "cpu")
    problem, _ = normalize(q, k, v, info, info, causal=True)
    assert not hopper_forward.supports(problem, q, k, v, True)
    assert not hopper_backward.supports(problem, q, k, v, q, True)
