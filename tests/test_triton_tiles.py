"""Tile lookup inside the Triton kernels (calls without host lengths), on the CPU
(TRITON_INTERPRET=1): ``tiles.find_tile`` against a Python model, and forward + backward
with device-only offsets against the reference."""

import itertools
import random

import pytest
import torch
import triton
import triton.language as tl

import attnhub
from attnhub import host_copies
from attnhub.backends.triton import configs, tiles

pytestmark = pytest.mark.skipif(not configs.interpreting(),
                                reason="CPU tensors reach the Triton kernels only in the "
                                       "interpreter (TRITON_INTERPRET=1)")


@triton.jit(do_not_specialize=["batch"])
def _find_tile_kernel(Cu, OutSeq, OutBlk, batch, BLOCK: tl.constexpr, CHUNK: tl.constexpr):
    pid = tl.program_id(0)
    b, blk = tiles.find_tile(Cu, batch, pid, BLOCK, CHUNK)
    tl.store(OutSeq + pid, b)
    tl.store(OutBlk + pid, blk)


def _model(lengths: list[int], block: int, programs: int) -> list[tuple[int, int | None]]:
    """(sequence, block) of each program: tiles in sequence order, then (batch, None)."""
    order = [(b, t) for b, n in enumerate(lengths) for t in range(-(-n // block))]
    return [order[p] if p < len(order) else (len(lengths), None) for p in range(programs)]


_LENGTHS = {
    "single": [70],
    "single-empty": [0],
    "leading-empties": [0, 0, 17],
    "mixed": [33, 0, 1, 64, 0, 16],
    "many": [random.Random(0).choice([0, 0, 1, 15, 16, 17, 40]) for _ in range(37)],
}


@pytest.mark.parametrize("chunk", [4, 32, tiles.FIND_CHUNK.value])
@pytest.mark.parametrize("name", list(_LENGTHS))
def test_find_tile_matches_python_model(name, chunk):
    lengths = _LENGTHS[name]
    block = 16
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    programs = -(-sum(lengths) // block) + len(lengths)  # the launches' upper bound
    seq = torch.full((programs,), -1, dtype=torch.int32)
    blk = torch.full((programs,), -1, dtype=torch.int32)
    _find_tile_kernel[(programs,)](cu, seq, blk, len(lengths), BLOCK=block, CHUNK=chunk)
    got = [(b, t if b < len(lengths) else None) for b, t in zip(seq.tolist(), blk.tolist(),
                                                                 strict=True)]
    assert got == _model(lengths, block, programs)


def test_find_tile_over_more_sequences_than_a_chunk():
    lengths = [random.Random(1).choice([0, 1, 3, 9]) for _ in range(tiles.FIND_CHUNK.value + 44)]
    block = 4
    cu = torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)
    programs = -(-sum(lengths) // block) + len(lengths)
    seq = torch.full((programs,), -1, dtype=torch.int32)
    blk = torch.full((programs,), -1, dtype=torch.int32)
    _find_tile_kernel[(programs,)](cu, seq, blk, len(lengths), BLOCK=block,
                                   CHUNK=tiles.FIND_CHUNK)
    got = [(b, t if b < len(lengths) else None) for b, t in zip(seq.tolist(), blk.tolist(),
                                                                 strict=True)]
    assert got == _model(lengths, block, programs)


LQ, LK = [40, 0, 3, 70, 0], [33, 5, 0, 70, 0]  # empty rows, empty keys, both empty


def _qkv(gen: torch.Generator):
    q = torch.randn(sum(LQ), 4, 32, generator=gen, requires_grad=True)
    k = torch.randn(sum(LK), 2, 32, generator=gen, requires_grad=True)
    v = torch.randn(sum(LK), 2, 32, generator=gen, requires_grad=True)
    return q, k, v


def _offsets(lengths: list[int]) -> torch.Tensor:
    return torch.tensor([0, *itertools.accumulate(lengths)], dtype=torch.int32)


def _no_host_lengths(monkeypatch):
    """Calls from here on read no offsets back (as under torch.compile or graph capture), and
    any host-planned tile list fails the test."""
    monkeypatch.setattr(host_copies, "can_read_back", lambda: False)

    def planned(*args, **kwargs):
        raise AssertionError("a tile list was planned on the host")

    monkeypatch.setattr(tiles, "host_tiles", planned)


@pytest.mark.parametrize("kw", [{}, {"causal": True}, {"window_size": (20, 3)}])
def test_device_offsets_forward_and_backward_match_reference(kw, monkeypatch):
    gen = torch.Generator().manual_seed(0)
    q, k, v = _qkv(gen)
    dout = torch.randn(q.shape, generator=gen)
    cu_q, cu_k = _offsets(LQ), _offsets(LK)
    want = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, max(LQ), max(LK),
                                            backend="reference", return_lse=True, **kw)
    want_grads = torch.autograd.grad(want[0], (q, k, v), dout)
    _no_host_lengths(monkeypatch)
    problem, _ = attnhub.normalize(q, k, v, cu_q, cu_k, max_seqlen_q=max(LQ),
                                   max_seqlen_k=max(LK), **kw)
    assert not problem.lengths_known
    got = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, max(LQ), max(LK),
                                           backend="triton", return_lse=True, **kw)
    got_grads = torch.autograd.grad(got[0], (q, k, v), dout)
    torch.testing.assert_close(got[0], want[0], rtol=1e-4, atol=1e-4)
    finite = torch.isfinite(want[1])
    assert torch.equal(finite, torch.isfinite(got[1]))
    torch.testing.assert_close(got[1][finite], want[1][finite], rtol=1e-4, atol=1e-4)
    for g, w in zip(got_grads, want_grads, strict=True):
        torch.testing.assert_close(g, w, rtol=1e-4, atol=1e-4)


def test_device_offsets_build_no_tile_list_with_torch_ops(monkeypatch):
    # The former device tile list came from torch ops (cumsum, searchsorted, ...) on every
    # call; the kernels now find their tiles from the offsets themselves.
    gen = torch.Generator().manual_seed(1)
    q, k, v = _qkv(gen)
    cu_q, cu_k = _offsets(LQ), _offsets(LK)
    _no_host_lengths(monkeypatch)

    def forbidden(*args, **kwargs):
        raise AssertionError("a torch op built a tile list")

    for op in ("cumsum", "searchsorted", "repeat_interleave", "bucketize"):
        monkeypatch.setattr(torch, op, forbidden)
    out = attnhub.attention_forward_varlen(q, k, v, cu_q, cu_k, max(LQ), max(LK),
                                           backend="triton", causal=True)
    out.sum().backward()
    assert q.grad is not None and k.grad is not None
