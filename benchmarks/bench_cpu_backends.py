"""The reference vs the sdpa backend on the CPU, side by side in one process.

    python benchmarks/bench_cpu_backends.py [--repeats 5] [--output docs/benchmarks/cpu-backends.md]

A small matrix of CPU-sized cells (fp32): head_dim 64 / 128, MHA (8/8 heads) / GQA (8/2),
causal or not, short (32 mixed sequences of 16..256 tokens) or medium (6 of 384..1024)
lengths. Each cell times forward (out and lse) and forward+backward, the two backends
alternating within every repeat, and keeps each one's fastest repeat (the least disturbed
by other load on the machine). The ratio is reference time / sdpa time.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time

import torch

from attnhub import VarlenInfo, attention_forward_varlen

LENGTHS = {
    "short": (16, 200, 64, 128, 33, 256, 90, 17, 145, 240, 64, 77, 180, 31, 222, 100,
              48, 160, 20, 256, 70, 128, 99, 200, 40, 111, 250, 66, 150, 24, 190, 88),
    "medium": (1024, 384, 777, 512, 901, 640),
}
BACKENDS = ("reference", "sdpa")


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _time(fn) -> float:
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) * 1e3


def bench_cell(lengths: tuple[int, ...], d: int, heads: tuple[int, int], causal: bool,
               repeats: int) -> dict[tuple[str, str], float]:
    """Fastest of ``repeats`` (ms) for (backend, "fwd" / "fwd+bwd")."""
    gen = torch.Generator().manual_seed(0)
    info = VarlenInfo.from_lengths(lengths, torch.device("cpu"))
    h, hk = heads
    q = torch.randn(info.total, h, d, generator=gen)
    k = torch.randn(info.total, hk, d, generator=gen)
    v = torch.randn(info.total, hk, d, generator=gen)
    dout = torch.randn(info.total, h, d, generator=gen)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]

    def fwd(name: str) -> None:
        attention_forward_varlen(q, k, v, info, info, causal=causal, return_lse=True,
                                 backend=name)

    def fwd_bwd(name: str) -> None:
        out = attention_forward_varlen(*leaves, info, info, causal=causal, backend=name)
        torch.autograd.grad(out, leaves, dout)

    best: dict[tuple[str, str], float] = {}
    for name in BACKENDS:  # warm-up
        fwd(name)
        fwd_bwd(name)
    for _ in range(repeats):
        for name in BACKENDS:
            for kind, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                ms = _time(lambda fn=fn, name=name: fn(name))
                best[name, kind] = min(best.get((name, kind), float("inf")), ms)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--output", help="also write the markdown table to this file")
    args = parser.parse_args()
    lines = [
        "# CPU backends: reference vs sdpa",
        "",
        f"date {datetime.date.today().isoformat()}, {cpu_name()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"python {platform.python_version()}; fp32; fastest of {args.repeats} repeats, the two "
        "backends alternating; ratio = reference / sdpa (higher is better for sdpa).",
        "",
        "Produced by `python benchmarks/bench_cpu_backends.py`.",
        "",
        "| lengths | tokens | head_dim | heads | causal | ref fwd ms | sdpa fwd ms | fwd ratio "
        "| ref fwd+bwd ms | sdpa fwd+bwd ms | fwd+bwd ratio |",
        "|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    ratios: dict[str, list[float]] = {"fwd": [], "fwd+bwd": []}
    for length_name, lengths in LENGTHS.items():
        for d in (64, 128):
            for heads in ((8, 8), (8, 2)):
                for causal in (False, True):
                    t = bench_cell(lengths, d, heads, causal, args.repeats)
                    cells = []
                    for kind in ("fwd", "fwd+bwd"):
                        ref, sdpa = t["reference", kind], t["sdpa", kind]
                        ratios[kind].append(ref / sdpa)
                        cells += [f"{ref:.1f}", f"{sdpa:.1f}", f"{ref / sdpa:.2f}x"]
                    row = (f"| {length_name} ({len(lengths)} seqs) | {sum(lengths)} | {d} | "
                           f"{heads[0]}/{heads[1]} | {causal} | " + " | ".join(cells) + " |")
                    lines.append(row)
                    print(row, flush=True)
    summary = ["", "| ratio | min | median | max | cells >= 3x |", "|---|---|---|---|---|"]
    for kind, values in ratios.items():
        values = sorted(values)
        summary.append(f"| {kind} | {values[0]:.2f}x | {values[len(values) // 2]:.2f}x | "
                       f"{values[-1]:.2f}x | {sum(r >= 3 for r in values)} of {len(values)} |")
    lines += summary
    print("\n".join(summary))
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
