"""The Triton forward's two ways of reading K/V for fully visible key blocks (TMA descriptors
and pointer loads) give the same output up to float32 rounding, on the CPU (TRITON_INTERPRET=1)."""

import pytest
import torch

import attnhub
from attnhub.backends.triton import configs, forward

pytestmark = pytest.mark.skipif(not configs.interpreting(),
                                reason="CPU tensors reach the Triton kernels only in the "
                                       "interpreter (TRITON_INTERPRET=1)")

LENGTHS = [70, 5, 0, 130, 33]


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window_size": (40, 3)},
                                {"softcap": 5.0}])
def test_tma_and_pointer_loads_agree(kw):
    gen = torch.Generator().manual_seed(0)
    total = sum(LENGTHS)
    q = torch.randn(total, 6, 32, generator=gen)
    k, v = (torch.randn(total, 3, 32, generator=gen) for _ in range(2))
    info = attnhub.VarlenInfo.from_lengths(LENGTHS, "cpu")
    assert forward.tma_ready(32, k, v)
    problem, inputs = attnhub.normalize(q, k, v, info, info, **kw)
    outs = [forward.forward(problem, inputs, None, tma=tma)[0] for tma in (True, False)]
    ref = attnhub.attention_forward_varlen(q, k, v, info, info, backend="reference", **kw)
    # the TMA path transposes its K tile after the load, the pointer path gathers K^T: the
    # interpreter's matmul (numpy) of the two layouts may round differently (Triton 3.9), so
    # the paths agree to float32 rounding, far below what a wrong row or mask would change
    torch.testing.assert_close(outs[0], outs[1], rtol=1e-6, atol=1e-6)
    torch.testing.assert_close(outs[0], ref, rtol=1e-4, atol=1e-4)


def test_tma_needs_heads_contiguous_in_a_row():
    k = torch.randn(16, 32, 2).transpose(1, 2)  # (rows, heads, d) with head stride 1
    assert not forward.tma_ready(32, k, k)


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window_size": (40, 3)}])
def test_no_sequence_reads_another_sequences_rows(kw):
    """Non-finite K/V rows of one sequence change no other sequence's output: every key block
    a program reads lies inside its own sequence, or is read with masked loads."""
    gen = torch.Generator().manual_seed(1)
    total = sum(LENGTHS)
    q = torch.randn(total, 4, 32, generator=gen)
    k, v = (torch.randn(total, 2, 32, generator=gen) for _ in range(2))
    info = attnhub.VarlenInfo.from_lengths(LENGTHS, "cpu")
    clean = attnhub.attention_forward_varlen(q, k, v, info, info, backend="triton", **kw)
    poisoned = 75  # the third non-empty sequence, rows [75, 205)
    k[poisoned:poisoned + 130] = float("inf")
    v[poisoned:poisoned + 130] = float("nan")
    out = attnhub.attention_forward_varlen(q, k, v, info, info, backend="triton", **kw)
    others = torch.ones(total, dtype=torch.bool)
    others[poisoned:poisoned + 130] = False
    torch.testing.assert_close(out[others], clean[others], rtol=0, atol=0)
