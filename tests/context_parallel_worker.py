"""Spawned-process side of tests/test_context_parallel.py: every rank runs a list of cases
through attnhub.distributed.context_parallel_attention over gloo and checks out, lse and
the gradients of its shard against the single-process reference on the same global batch,
with the conformance rule (attnhub.conformance.tolerance.check)."""

from __future__ import annotations

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

import attnhub
from attnhub.conformance.tolerance import check
from attnhub.distributed import context_parallel_attention, zigzag_shard


@dataclass(frozen=True)
class Case:
    lengths: tuple[int, ...]
    causal: bool = True
    window: tuple[int, int] | None = None
    heads: tuple[int, int] = (4, 2)
    head_dim: int = 16
    strategy: str = "ring"
    dtype: torch.dtype = torch.float32
    softcap: float | None = None
    lse_grad: bool = False
    backend: str = "reference"
    deterministic: bool = False
    compile: bool = False


def _global_batch(case: Case, seed: int):
    gen = torch.Generator().manual_seed(seed)
    total = sum(case.lengths)
    hq, hk = case.heads
    q = torch.randn(total, hq, case.head_dim, generator=gen, dtype=torch.float64)
    k = torch.randn(total, hk, case.head_dim, generator=gen, dtype=torch.float64)
    v = torch.randn(total, hk, case.head_dim, generator=gen, dtype=torch.float64)
    dout = torch.randn(total, hq, case.head_dim, generator=gen, dtype=torch.float64)
    dlse = torch.randn(hq, total, generator=gen, dtype=torch.float64)
    return q, k, v, dout, dlse


def _single_process(case: Case, q, k, v, dout, dlse, dtype):
    q, k, v = (t.detach().to(dtype, copy=True).requires_grad_() for t in (q, k, v))
    info = attnhub.VarlenInfo.from_lengths(case.lengths)
    out, lse = attnhub.attention_forward_varlen(
        q, k, v, info, info, causal=case.causal, window_size=case.window, softcap=case.softcap,
        return_lse=True, backend="reference")
    loss = (out.double() * dout).sum()
    if case.lse_grad:
        loss = loss + (lse.double() * dlse).sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def _distributed(case: Case, shard, group, q, k, v, dout, dlse):
    q, k, v = (shard.shard(t.detach()).to(case.dtype).requires_grad_() for t in (q, k, v))

    def attend(q, k, v):
        return context_parallel_attention(
            q, k, v, shard, group, causal=case.causal, window_size=case.window,
            softcap=case.softcap, return_lse=True, backend=case.backend, strategy=case.strategy,
            deterministic=case.deterministic)

    if case.compile:
        proj = torch.nn.Linear(q.shape[-1], q.shape[-1], dtype=case.dtype)
        torch.nn.init.eye_(proj.weight)
        torch.nn.init.zeros_(proj.bias)

        def model(q, k, v):  # identity projections around the call: compiled pieces
            out, lse = attend(proj(q), k, v)
            return proj(out), lse

        out, lse = torch.compile(model, backend="eager")(q, k, v)
    else:
        out, lse = attend(q, k, v)
    loss = (out.double() * shard.shard(dout)).sum()
    if case.lse_grad:
        loss = loss + (lse.double() * shard.shard(dlse.T).T).sum()
    loss.backward()
    return out.detach(), lse.detach(), q.grad, k.grad, v.grad


def expected(case: Case, seed: int) -> tuple[tuple, tuple]:
    """(oracle, reference): the single-process results in float64 and in the case's dtype,
    computed once in the parent process for every rank."""
    batch = _global_batch(case, seed)
    return (_single_process(case, *batch, torch.float64),
            _single_process(case, *batch, case.dtype))


def run_case(case: Case, seed: int, group, oracle: tuple, ref: tuple) -> list[str]:
    """Failures (empty = the case passed) of one case on this rank of ``group``."""
    shard = zigzag_shard(case.lengths, group)
    batch = _global_batch(case, seed)
    got = _distributed(case, shard, group, *batch)
    failures = []
    for name, g, o, r in zip(("out", "lse", "dq", "dk", "dv"), got, oracle, ref, strict=True):
        if name == "lse":
            o, r = shard.shard(o.T).T, shard.shard(r.T).T
        else:
            o, r = shard.shard(o), shard.shard(r)
        result = check(name, g, o, r, case.dtype)
        if not result.ok:
            failures.append(f"world {shard.world_size} rank {shard.rank} {case}: {name}: "
                            f"{result.failure}")
    if case.deterministic:  # a second run must give the same bits
        again = _distributed(case, shard, group, *batch)
        for name, a, b in zip(("out", "lse", "dq", "dk", "dv"), got, again, strict=True):
            if not torch.equal(a, b):
                failures.append(f"world {shard.world_size} rank {shard.rank} {case}: {name} "
                                "differs between two runs")
    return failures


def schedule(plan: list[tuple[int, list[Case]]]) -> list[tuple[int, list[tuple]]]:
    """(world size, cases) pairs -> (world size, [(case, seed, oracle, reference)])."""
    return [(size, [(case, 1000 + i, *expected(case, 1000 + i)) for i, case in enumerate(cases)])
            for size, cases in plan]


def worker(rank: int, world: int, init_file: str, plan: list[tuple[int, list[tuple]]]) -> None:
    """One process of a ``world``-process gloo job. ``plan``: what ``schedule`` returns; each
    world size runs on a subgroup of the first ranks (the others idle), so one spawn covers
    several world sizes."""
    os.environ.setdefault("ATTNHUB_FALLBACK", "allow")
    dist.init_process_group("gloo", init_method=f"file://{init_file}", rank=rank,
                            world_size=world)
    try:
        failures = []
        for size, cases in plan:
            group = dist.new_group(list(range(size)))  # every rank must create every group
            if rank < size:
                for case, seed, oracle, ref in cases:
                    failures.extend(run_case(case, seed, group, oracle, ref))
        if failures:
            raise AssertionError("\n".join(failures))
    finally:
        dist.destroy_process_group()
