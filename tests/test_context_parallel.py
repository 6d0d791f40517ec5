"""attnhub.distributed over gloo in spawned processes (world sizes 2, 3, 4; one spawn each,
many cases per spawn), plus the host-side pieces: zigzag shard, step plans, strategy rule."""

from __future__ import annotations

import pytest
import torch
import torch.multiprocessing as mp
from context_parallel_worker import Case, schedule, worker

import attnhub
from attnhub.distributed import (
    ContextShard,
    choose_strategy,
    chunk_bounds,
    context_parallel_attention,
    zigzag_shard,
)
from attnhub.distributed.step_plan import ring_step_calls

UNEVEN = (37, 0, 64, 5, 1, 23)  # zero-length, shorter than 2 x world, not divisible
SHORT = (21, 0, 5, 1, 14)

CASES = [
    Case(UNEVEN),  # causal, GQA 4/2
    Case(SHORT, causal=False, heads=(2, 2)),
    Case(UNEVEN, window=(9, 0)),
    Case(SHORT, causal=False, window=(5, 3), heads=(4, 1), softcap=20.0),
    Case(SHORT, strategy="all_gather", lse_grad=True),
    Case(SHORT, causal=False, window=(0, 6), strategy="all_gather"),
    Case((40, 17), lse_grad=True, deterministic=True),
    Case((40, 17), strategy="all_gather", deterministic=True),
    Case((33, 0, 12), dtype=torch.bfloat16),
]


def _spawn(world: int, plan: list[tuple[int, list[Case]]], tmp_path) -> None:
    mp.spawn(worker, args=(world, str(tmp_path / "init"), schedule(plan)), nprocs=world,
             join=True)


def test_gloo_world_sizes_2_3_4(tmp_path, monkeypatch):
    """One spawn of 4 processes (process start-up dominates on 2 cores); world sizes 2 and 3
    run on subgroups, which also covers a non-default group."""
    # The npu backend's CPU simulator takes out and lse like flash kernels do: it runs the
    # ring backward's merged-statistics path, which the reference (it recomputes) does not.
    monkeypatch.setenv("ATTNHUB_NPU_SIMULATOR", "1")
    extra = [Case(UNEVEN, backend="npu"), Case(SHORT, causal=False, window=(7, -1), backend="npu"),
             Case((30, 9), compile=True)]
    # 2 cores: world 2 runs every case, 3 and 4 the ones whose step layout changes with the
    # world size (ring causal / window / two-sided, all-gather, determinism, bf16); (3, 2)
    # over 4 ranks leaves rank 3 without a token.
    _spawn(4, [(2, [*CASES, *extra]), (3, [CASES[i] for i in (0, 3, 4, 6)]),
               (4, [CASES[i] for i in (0, 2, 5, 7, 8)] + [Case((3, 2))])], tmp_path)


@pytest.mark.slow
@pytest.mark.parametrize("world", [5, 8])
def test_sweep(tmp_path, world):
    cases = [Case(lengths, causal=causal, window=window, strategy=strategy)
             for lengths in ((200, 3, 0, 77), (1, 2, 3, 4, 5, 6, 7, 8), (128,))
             for causal, window in ((True, None), (True, (16, 0)), (True, (1, 0)),
                                    (False, (4, 4)), (False, None), (False, (30, 0)))
             for strategy in ("ring", "all_gather")]
    _spawn(world, [(2, cases), (3, cases), (world, cases)], tmp_path)


def test_chunk_bounds_uneven():
    assert chunk_bounds(10, 4) == (0, 3, 6, 8, 10)  # the first 10 % 4 chunks are longer
    assert chunk_bounds(0, 4) == (0, 0, 0, 0, 0)
    assert chunk_bounds(3, 6) == (0, 1, 2, 3, 3, 3, 3)


def test_zigzag_layout_round_trip():
    shards = [zigzag_shard(UNEVEN, world_size=3, rank=r) for r in range(3)]
    assert shards[0].spans()[0] == ((0, 7), (31, 37))  # chunks 0 and 5 of 37 tokens
    assert shards[1].spans()[0] == ((7, 13), (25, 31))
    assert sum(s.total for s in shards) == sum(UNEVEN)
    x = torch.arange(sum(UNEVEN))
    parts = [s.shard(x) for s in shards]
    assert torch.equal(shards[0].unshard(parts), x)
    pos = shards[2].positions()
    assert pos[: shards[2].local_seqlens()[0]].tolist() == [*range(13, 19), *range(19, 25)]
    assert shards[1].info.cu_seqlens_host[-1] == shards[1].total


def test_causal_ring_steps_are_one_call_each():
    for world in (2, 3, 4):
        for rank in range(world):
            shard = ContextShard(UNEVEN, world, rank)
            for src in range(world):
                calls = ring_step_calls(shard, src, -1, 0)
                assert len(calls) == 1
                assert calls[0].causal == (src == rank)


def test_window_skips_empty_steps():
    shard = ContextShard((64,), 4, 0)  # chunks of 8 tokens; rank 0 holds 0-7 and 56-63
    live = [bool(ring_step_calls(shard, src, 4, 0)) for src in range(4)]
    assert live == [True, True, False, False]  # only rank 1's chunk 6 (48-55) is in reach


def test_strategy_rule():
    shard = ContextShard((1000,), 4, 0)
    k = torch.empty(shard.total, 8, 128, dtype=torch.bfloat16)
    assert choose_strategy(shard, k) == "all_gather"  # 4 MB of K/V
    assert choose_strategy(shard, k, all_gather_max_bytes=1 << 20) == "ring"
    assert choose_strategy(ContextShard((1000,), 1, 0), k) == "ring"
    with pytest.raises(attnhub.InvalidArgumentError, match="strategy"):
        choose_strategy(shard, k, "tree")


def test_world_one_without_process_group():
    shard = zigzag_shard(UNEVEN, world_size=1, rank=0)
    q, k, v = (torch.randn(shard.total, h, 8, requires_grad=True) for h in (4, 2, 2))
    out = context_parallel_attention(q, k, v, shard, causal=True, window_size=(5, 0))
    info = attnhub.VarlenInfo.from_lengths(UNEVEN)
    ref = attnhub.attention_forward_varlen(*(shard.shard(t) for t in (q, k, v)), info, info,
                                           causal=True, window_size=(5, 0))
    torch.testing.assert_close(shard.shard(out), ref)
    out.sum().backward()
    grads = [t.grad for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    again = context_parallel_attention(q, k, v, shard, causal=True, window_size=(5, 0),
                                       strategy="all_gather")
    torch.testing.assert_close(again, out)
    again.sum().backward()
    for t, g in zip((q, k, v), grads, strict=True):
        torch.testing.assert_close(t.grad, g)


def test_errors_name_the_argument():
    shard = zigzag_shard((8, 4), world_size=2, rank=1)
    q = torch.randn(shard.total + 1, 2, 8)
    with pytest.raises(attnhub.InvalidArgumentError, match="'group'"):
        context_parallel_attention(q, q, q, shard)  # no process group, world size 2
    with pytest.raises(attnhub.InvalidArgumentError, match="rank"):
        zigzag_shard((8,), world_size=2, rank=2)
    with pytest.raises(attnhub.InvalidArgumentError, match="'q'"):
        context_parallel_attention(q, q, q, zigzag_shard((8, 4), world_size=1, rank=0))


def test_backward_conventions_of_the_builtin_backends():
    """Flash-style backends are handed the merged out / lse in a ring backward; the
    reference and sdpa, which recompute the softmax (sdpa for dtypes other than fp32), are
    not (their path is the recompute one, with dlse)."""
    flags = {n: b.backward_uses_forward_stats for n, b in attnhub.get_registry().backends.items()}
    assert flags.pop("reference") is False
    assert flags.pop("sdpa") is False
    assert all(flags.values()), flags


@pytest.mark.slow
def test_compile_aot_eager_around_the_call():
    """AOTAutograd (what inductor builds on) on both sides of the documented graph break."""
    shard = zigzag_shard((30, 9), world_size=1, rank=0)
    lin = torch.nn.Linear(8, 8)

    def model(q, k, v):
        return lin(context_parallel_attention(lin(q), k, v, shard, causal=True)).sum()

    q, k, v = (torch.randn(shard.total, h, 8, requires_grad=True) for h in (4, 2, 2))
    ref = model(q, k, v)
    ref.backward()
    expected = [t.grad.clone() for t in (q, k, v)]
    for t in (q, k, v):
        t.grad = None
    got = torch.compile(model, backend="aot_eager")(q, k, v)
    got.backward()
    torch.testing.assert_close(got, ref)
    for t, g in zip((q, k, v), expected, strict=True):
        torch.testing.assert_close(t.grad, g)


def test_sinks_join_after_the_merge(monkeypatch):
    """sinks= on one rank equals the single-device call with sinks (out, lse, dq/dk/dv,
    dsinks), for the ring and the all-gather strategies."""
    monkeypatch.setenv("ATTNHUB_FALLBACK", "allow")  # the steps run no sinks: sdpa or the
    # reference, by measured cost; the call with sinks on one device needs the reference
    shard = zigzag_shard(UNEVEN, world_size=1, rank=0)
    gen = torch.Generator().manual_seed(3)
    # float32: lse (which the sinks join) is float32 for every dtype
    q, k, v = (torch.randn(shard.total, h, 8, generator=gen).requires_grad_(True)
               for h in (4, 2, 2))
    sinks = torch.randn(4, generator=gen).requires_grad_(True)
    info = attnhub.VarlenInfo.from_lengths(UNEVEN)
    leaves = (q, k, v, sinks)
    ref, ref_lse = attnhub.attention_forward_varlen(
        *(shard.shard(t) for t in (q, k, v)), info, info, causal=True, window_size=(5, 0),
        sinks=sinks, return_lse=True, backend="reference")
    dout = torch.randn_like(ref)
    want = torch.autograd.grad((ref * dout).sum() + ref_lse[torch.isfinite(ref_lse)].sum(),
                               leaves)
    for strategy in ("ring", "all_gather"):
        out, lse = context_parallel_attention(q, k, v, shard, causal=True, window_size=(5, 0),
                                              sinks=sinks, return_lse=True, strategy=strategy)
        torch.testing.assert_close(shard.shard(out), ref)
        torch.testing.assert_close(shard.shard(lse.T).T, ref_lse)
        got = torch.autograd.grad((shard.shard(out) * dout).sum()
                                  + lse[torch.isfinite(lse)].sum(), leaves)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
