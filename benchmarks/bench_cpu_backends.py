"""The reference vs the sdpa backend on the CPU, side by side in one process.

    python benchmarks/bench_cpu_backends.py [--repeats 3] [--threads N] [--clock wall|cpu]
        [--quick] [--dtypes float32,bfloat16] [--output docs/benchmarks/DATE-cpu-backends-v2.md]

A matrix of CPU-sized cells: lengths short (32 mixed sequences of 16..256 tokens), medium (6 of
384..1024) and long-ish (2 of 1536 and 2048); head_dim 64 / 128; MHA (8/8 heads) / GQA (8/2);
causal or not; float32 everywhere, bfloat16 on a subset. Each cell times forward (out and lse)
and forward+backward (inputs requiring grad, out's gradient), the two backends alternating
within every repeat, and keeps each one's fastest repeat (the least disturbed by other load
on the machine). The ratio is reference time / sdpa time. ``--clock cpu`` measures the
process's CPU time instead of wall-clock time: with ``--threads 1`` on a machine loaded by
other work, that is the computation's own time, which the wall clock is not.

Next to the ratios: sdpa's attained GFLOP/s (4 * head_dim * heads per visible (query, key)
pair forward, 2.5x that for the backward) and the ceiling ratio, the ratio sdpa would reach if
it ran at the float32 matrix-product rate measured at the start (a 2048^3 product on the same
threads): where the ceiling is below 3x, no exact kernel can be 3x faster than the reference
on that cell on this machine. The machine's load average is recorded at start and end.
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import time
from dataclasses import dataclass

import torch

from attnhub import VarlenInfo, attention_forward_varlen

LENGTHS = {
    "short": (16, 200, 64, 128, 33, 256, 90, 17, 145, 240, 64, 77, 180, 31, 222, 100,
              48, 160, 20, 256, 70, 128, 99, 200, 40, 111, 250, 66, 150, 24, 190, 88),
    "medium": (1024, 384, 777, 512, 901, 640),
    "long-ish": (2048, 1536),
}
BACKENDS = ("reference", "sdpa")


@dataclass(frozen=True)
class Cell:
    lengths: str
    head_dim: int
    heads: tuple[int, int]
    causal: bool
    dtype: torch.dtype = torch.float32


def matrix(quick: bool) -> list[Cell]:
    """float32: every length mix x head_dim x heads x causal (long-ish: GQA only); bfloat16:
    short and medium, head_dim 128, GQA. ``quick``: short and medium, float32, GQA."""
    cells = []
    for lengths in LENGTHS:
        if quick and lengths == "long-ish":
            continue
        for d in (64, 128):
            for heads in ((8, 8), (8, 2)):
                if (quick or lengths == "long-ish") and heads != (8, 2):
                    continue
                for causal in (False, True):
                    cells.append(Cell(lengths, d, heads, causal))
    if not quick:
        cells += [Cell(lengths, 128, (8, 2), causal, torch.bfloat16)
                  for lengths in ("short", "medium") for causal in (False, True)]
    return cells


def cpu_name() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


CLOCKS = {"wall": time.perf_counter, "cpu": time.process_time}
_clock = time.perf_counter


def _time(fn) -> float:
    start = _clock()
    fn()
    return (_clock() - start) * 1e3


def matmul_gflops(repeats: int = 5) -> float:
    """The float32 rate of a 2048^3 matrix product on the current threads (fastest repeat)."""
    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    torch.mm(a, b)
    return 2 * 2048 ** 3 / min(_time(lambda: torch.mm(a, b)) for _ in range(repeats)) / 1e6


def visible_pairs(lengths: tuple[int, ...], causal: bool) -> int:
    """(query, key) pairs that attention computes (sq == sk per sequence)."""
    return sum(n * (n + 1) // 2 if causal else n * n for n in lengths)


def bench_cell(cell: Cell, repeats: int) -> dict[tuple[str, str], float]:
    """Fastest of ``repeats`` (ms) for (backend, "fwd" / "fwd+bwd")."""
    gen = torch.Generator().manual_seed(0)
    info = VarlenInfo.from_lengths(LENGTHS[cell.lengths], torch.device("cpu"))
    h, hk = cell.heads
    d = cell.head_dim

    def rand(heads: int) -> torch.Tensor:
        return torch.randn(info.total, heads, d, generator=gen).to(cell.dtype)

    q, k, v, dout = rand(h), rand(hk), rand(hk), rand(h)
    leaves = [t.clone().requires_grad_(True) for t in (q, k, v)]

    def fwd(name: str) -> None:
        attention_forward_varlen(q, k, v, info, info, causal=cell.causal, return_lse=True,
                                 backend=name)

    def fwd_bwd(name: str) -> None:
        out = attention_forward_varlen(*leaves, info, info, causal=cell.causal, backend=name)
        torch.autograd.grad(out, leaves, dout)

    best: dict[tuple[str, str], float] = {}
    for name in BACKENDS:  # warm-up
        fwd(name)
    for _ in range(repeats):
        for name in BACKENDS:
            for kind, fn in (("fwd", fwd), ("fwd+bwd", fwd_bwd)):
                ms = _time(lambda fn=fn, name=name: fn(name))
                best[name, kind] = min(best.get((name, kind), float("inf")), ms)
    return best


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--repeats", type=int, default=3)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads (default: torch's, one per core)")
    parser.add_argument("--clock", choices=tuple(CLOCKS), default="wall",
                        help="wall: elapsed time; cpu: the process's CPU time (all threads)")
    parser.add_argument("--quick", action="store_true",
                        help="short and medium lengths, float32, GQA only (8 cells)")
    parser.add_argument("--dtypes", default="float32,bfloat16",
                        help="comma-separated: only the cells of these dtypes")
    parser.add_argument("--output", help="also write the markdown report to this file")
    args = parser.parse_args()
    if args.threads:
        torch.set_num_threads(args.threads)
    global _clock
    _clock = CLOCKS[args.clock]
    load_start = os.getloadavg()
    peak = matmul_gflops()
    lines = [
        "# CPU backends: reference vs sdpa",
        "",
        f"date {datetime.date.today().isoformat()}, {cpu_name()}, {os.cpu_count()} CPUs, "
        f"torch {torch.__version__} ({torch.get_num_threads()} threads), "
        f"python {platform.python_version()}; {args.clock} clock, fastest of {args.repeats} "
        "repeats, the two "
        "backends alternating; ratio = reference / sdpa (higher is better for sdpa). "
        f"float32 matrix-product rate at the start: {peak:.0f} GFLOP/s (2048^3, same "
        f"threads). Load average (1 / 5 / 15 min) at the start: "
        + " / ".join(f"{x:.1f}" for x in load_start) + ".",
        "",
        "Produced by `python benchmarks/bench_cpu_backends.py"
        + (f" --threads {args.threads}" if args.threads else "")
        + (f" --clock {args.clock}" if args.clock != "wall" else "")
        + (" --quick" if args.quick else "")
        + (f" --dtypes {args.dtypes}" if args.dtypes != "float32,bfloat16" else "")
        + "`. GF/s: sdpa's attained rate (4 x head_dim "
        "x heads FLOP per visible (query, key) pair forward, 3.5x that forward+backward). "
        "ceiling: the ratio sdpa would reach at the matrix-product rate.",
        "",
        "| lengths | tokens | dtype | head_dim | heads | causal | ref fwd ms | sdpa fwd ms "
        "| fwd ratio | sdpa fwd GF/s | fwd ceiling | ref fwd+bwd ms | sdpa fwd+bwd ms "
        "| fwd+bwd ratio | sdpa fwd+bwd GF/s | fwd+bwd ceiling |",
        "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|",
    ]
    print("\n".join(lines), flush=True)
    ratios: dict[str, dict[str, list[float]]] = {}
    dtypes = {getattr(torch, name.strip()) for name in args.dtypes.split(",")}
    for cell in (c for c in matrix(args.quick) if c.dtype in dtypes):
        lengths = LENGTHS[cell.lengths]
        flops = 4 * cell.head_dim * cell.heads[0] * visible_pairs(lengths, cell.causal)
        t = bench_cell(cell, args.repeats)
        cells = []
        for kind, factor in (("fwd", 1.0), ("fwd+bwd", 3.5)):
            ref, sdpa = t["reference", kind], t["sdpa", kind]
            ratios.setdefault(cell.lengths, {}).setdefault(kind, []).append(ref / sdpa)
            ideal_ms = factor * flops / peak / 1e6
            cells += [f"{ref:.1f}", f"{sdpa:.1f}", f"{ref / sdpa:.2f}x",
                      f"{factor * flops / sdpa / 1e6:.0f}", f"{ref / ideal_ms:.1f}x"]
        dtype = str(cell.dtype).removeprefix("torch.")
        row = (f"| {cell.lengths} ({len(lengths)} seqs) | {sum(lengths)} | {dtype} | "
               f"{cell.head_dim} | {cell.heads[0]}/{cell.heads[1]} | {cell.causal} | "
               + " | ".join(cells) + " |")
        lines.append(row)
        print(row, flush=True)
    summary = ["", "| lengths | ratio | min | median | max | cells >= 3x |",
               "|---|---|---|---|---|---|"]
    for lengths, by_kind in ratios.items():
        for kind, values in by_kind.items():
            values = sorted(values)
            summary.append(
                f"| {lengths} | {kind} | {values[0]:.2f}x | {values[len(values) // 2]:.2f}x | "
                f"{values[-1]:.2f}x | {sum(r >= 3 for r in values)} of {len(values)} |")
    summary += ["", "Load average at the end: "
                + " / ".join(f"{x:.1f}" for x in os.getloadavg()) + "."]
    lines += summary
    print("\n".join(summary))
    if args.output:
        with open(args.output, "w") as f:
            f.write("\n".join(lines) + "\n")


if __name__ == "__main__":
    main()
