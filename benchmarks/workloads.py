"""The benchmark workloads W1-W4, described in docs/performance.md (bf16, nheads 32,
nheads_k 8, head_dim 128, seed fixed)."""

from __future__ import annotations

import random
from dataclasses import dataclass

import torch

NHEADS, NHEADS_K, HEAD_DIM = 32, 8, 128


@dataclass(frozen=True)
class Workload:
    name: str
    seqlens_q: tuple[int, ...]
    seqlens_k: tuple[int, ...]
    page_size: int | None = None

    def flops(self, causal: bool, backward: bool = False) -> float:
        """4 * sq * sk * head_dim * nheads per sequence, halved for causal; backward 2.5x."""
        f = sum(4.0 * q * k * HEAD_DIM * NHEADS for q, k in zip(self.seqlens_q, self.seqlens_k,
                                                                 strict=True))
        if causal:
            f /= 2
        return f * (3.5 if backward else 1.0)  # forward + backward = 1 + 2.5


def _uniform(total: int, lo: int, hi: int, seed: int) -> tuple[int, ...]:
    rng = random.Random(seed)
    out: list[int] = []
    while sum(out) < total:
        out.append(min(rng.randint(lo, hi), total - sum(out)))
    return tuple(out)


def workloads() -> list[Workload]:
    w1 = _uniform(32768, 256, 4096, 1)
    w2 = _uniform(32768, 16, 1024, 2)
    w3 = _uniform(131072, 1024, 16384, 3)
    return [
        Workload("W1", w1, w1),
        Workload("W2", w2, w2),
        Workload("W3", w3, w3),
        Workload("W4", (1,) * 64, (4096,) * 64, page_size=16),
    ]


def workload_inputs(w: Workload, requires_grad: bool
                    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor, torch.Tensor]:
    """Random bf16 q (total_q, NHEADS, HEAD_DIM), k and v (total_k, NHEADS_K, HEAD_DIM) and
    dout (like q) on the GPU, from a fixed seed, so every script times the same data."""
    g = torch.Generator(device="cuda").manual_seed(0)
    tq, tk = sum(w.seqlens_q), sum(w.seqlens_k)

    def rand(*shape):
        return torch.randn(*shape, device="cuda", dtype=torch.bfloat16, generator=g)

    q = rand(tq, NHEADS, HEAD_DIM).requires_grad_(requires_grad)
    k = rand(tk, NHEADS_K, HEAD_DIM).requires_grad_(requires_grad)
    v = rand(tk, NHEADS_K, HEAD_DIM).requires_grad_(requires_grad)
    dout = rand(tq, NHEADS, HEAD_DIM)
    return q, k, v, dout
