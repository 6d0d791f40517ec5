"""Causal attention on the CPU as blocked matrix products against torch's fused CPU kernels
(what the sdpa backend calls), forward and backward: could query blocks multiplied against
only the keys they see beat the fused kernels? (docs/performance.md v19: no.)

    python benchmarks/cpu_blocked_attention.py [--tokens 256 512 1024 2048] [--blocks 64 128 256]

One causal sequence, 8 query heads over 2 K/V heads (GQA's query heads of one K/V head
stacked into one product), head dim 128, float32. Prints the median of 7 timings (ms) of the
fused kernel and of each block size, the fused kernel timed before and after the blocks;
every blocked result is checked against the fused kernel's first.
"""

from __future__ import annotations

import argparse
import time
from functools import partial

import torch

_forward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu.default
_backward_op = torch.ops.aten._scaled_dot_product_flash_attention_for_cpu_backward.default


def _diagonal(n: int) -> torch.Tensor:
    return torch.ones(n, n, dtype=torch.bool).triu_(1)


def blocked_forward(q, k, v, scale: float, block: int) -> torch.Tensor:
    """out (1, h, s, d) of causal attention; q (1, h, s, d), k and v (1, hk, s, d)."""
    _, h, s, d = q.shape
    hk = k.shape[1]
    g = h // hk
    qh = q[0].view(hk, g, s, d)
    out = torch.empty_like(qh)
    for i0 in range(0, s, block):
        i1 = min(i0 + block, s)
        n = i1 - i0
        scores = torch.bmm(qh[:, :, i0:i1].reshape(hk, g * n, d),
                           k[0, :, :i1].transpose(1, 2)).mul_(scale)
        scores.view(hk, g, n, i1)[..., i0:i1].masked_fill_(_diagonal(n), float("-inf"))
        scores.sub_(scores.amax(-1, keepdim=True)).exp_()
        total = scores.sum(-1, keepdim=True)
        out[:, :, i0:i1] = torch.bmm(scores, v[0, :, :i1]).div_(total).view(hk, g, n, d)
    return out.view(1, h, s, d)


def blocked_backward(q, k, v, out, lse, dout, scale: float, block: int):
    """dq, dk, dv of causal attention from the forward's out and lse (1, h, s)."""
    _, h, s, d = q.shape
    hk = k.shape[1]
    g = h // hk
    qh, doh = q[0].view(hk, g, s, d), dout[0].view(hk, g, s, d)
    lseh = lse[0].view(hk, g, s)
    delta = (doh * out[0].view(hk, g, s, d)).sum(-1)
    dq = torch.empty_like(qh)
    dk, dv = torch.zeros_like(k[0]), torch.zeros_like(v[0])
    for i0 in range(0, s, block):
        i1 = min(i0 + block, s)
        n = i1 - i0
        qb = qh[:, :, i0:i1].reshape(hk, g * n, d)
        dob = doh[:, :, i0:i1].reshape(hk, g * n, d)
        p = torch.bmm(qb, k[0, :, :i1].transpose(1, 2)).mul_(scale)
        p.view(hk, g, n, i1).sub_(lseh[:, :, i0:i1, None])
        p.view(hk, g, n, i1)[..., i0:i1].masked_fill_(_diagonal(n), float("-inf"))
        p.exp_()
        dv[:, :i1] += torch.bmm(p.transpose(1, 2), dob)
        ds = torch.bmm(dob, v[0, :, :i1].transpose(1, 2))
        ds.view(hk, g, n, i1).sub_(delta[:, :, i0:i1, None])
        ds.mul_(p)
        dq[:, :, i0:i1] = torch.bmm(ds, k[0, :, :i1]).view(hk, g, n, d).mul_(scale)
        dk[:, :i1] += torch.bmm(ds.transpose(1, 2), qb).mul_(scale)
    return dq.view(1, h, s, d), dk[None], dv[None]


def median_ms(fn, rounds: int = 7) -> float:
    times = []
    for _ in range(rounds):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return sorted(times)[rounds // 2] * 1e3


def rows_for(tokens: int, blocks: list[int]) -> list[tuple[str, list[float]]]:
    """(pass, [fused, each block size, fused again] ms) for one sequence of ``tokens``."""
    q = torch.randn(1, 8, tokens, 128)
    k, v = torch.randn(1, 2, tokens, 128), torch.randn(1, 2, tokens, 128)
    scale = 128 ** -0.5
    out, lse = _forward_op(q, k, v, 0.0, True, scale=scale)[:2]
    dout = torch.randn_like(q)
    grads = _backward_op(dout, q, k, v, out, lse, 0.0, True, scale=scale)
    runs = {
        "forward": (partial(_forward_op, q, k, v, 0.0, True, scale=scale),
                    partial(blocked_forward, q, k, v, scale), (out,)),
        "backward": (partial(_backward_op, dout, q, k, v, out, lse, 0.0, True, scale=scale),
                     partial(blocked_backward, q, k, v, out, lse, dout, scale), grads),
    }
    rows = []
    for name, (fused, blocked, expected) in runs.items():
        for b in blocks:
            got = blocked(b)
            for x, y in zip(got if isinstance(got, tuple) else (got,), expected, strict=True):
                torch.testing.assert_close(x, y, atol=2e-3, rtol=1e-3)
        times = [median_ms(fused), *(median_ms(partial(blocked, b)) for b in blocks),
                 median_ms(fused)]
        rows.append((name, times))
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--tokens", type=int, nargs="*", default=[256, 512, 1024, 2048])
    parser.add_argument("--blocks", type=int, nargs="*", default=[64, 128, 256])
    args = parser.parse_args()
    torch.manual_seed(0)
    print(f"torch {torch.__version__}, {torch.get_num_threads()} threads")
    print("| tokens | pass | fused (ms) | " + " | ".join(f"blocks of {b}" for b in args.blocks)
          + " | fused again |")
    print("|---" * (len(args.blocks) + 4) + "|")
    for tokens in args.tokens:
        for name, times in rows_for(tokens, args.blocks):
            print(f"| {tokens} | {name} | " + " | ".join(f"{t:.2f}" for t in times) + " |",
                  flush=True)


if __name__ == "__main__":
    main()
