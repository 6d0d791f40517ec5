"""Block sizes and launch settings of the Triton kernels, by head dim and mode.

One fixed BLOCK_M / BLOCK_N per (head dim, direction) so that tile tables can be planned
before launch; nothing depends on max_seqlen or the token count (no recompiles per batch).
Under TRITON_INTERPRET=1 (CPU tests) small blocks keep the interpreter fast.
"""

from __future__ import annotations

import contextlib
import functools
import os
import threading

# (inner block, num_warps, num_stages[, maxnreg]) per kernel, head-dim bucket and outer tile
# (the rows a program owns: query rows for fwd and dq, key rows for dkdv): the config a launch
# uses unless ATTNHUB_TRITON_AUTOTUNE=1 asks the autotuner to try them all. Chosen from
# benchmarks on an H200 (docs/performance.md). maxnreg 128 on the head-dim-128 forward lets two
# 8-warp programs share an SM, so one's softmax overlaps the other's matmuls.
DEFAULTS: dict[str, dict[tuple[int, int], tuple[int, ...]]] = {
    "fwd": {(64, 128): (64, 4, 3), (128, 128): (64, 8, 2, 128), (256, 128): (64, 8, 2),
            (512, 32): (32, 4, 1)},
    "dkdv": {(64, 64): (64, 4, 2), (128, 64): (64, 4, 1), (128, 128): (64, 8, 1),
             (256, 64): (32, 8, 2)},
    "dq": {(64, 64): (64, 4, 2), (128, 64): (64, 4, 2), (256, 64): (32, 4, 1)},
}

INNER = {"fwd": "BLOCK_N", "dkdv": "BLOCK_M", "dq": "BLOCK_N"}
OUTER = {"fwd": "BLOCK_M", "dkdv": "BLOCK_N", "dq": "BLOCK_M"}

# Configs Triton 3.6 miscompiles on Hopper (wrong dK, seen on an H200 on 2026-11-21): never
# offered to the autotuner. tests/test_triton_gpu.py checks every offered config.
BROKEN: dict[str, set[tuple[int, int, int]]] = {"dkdv": {(16, 4, 2), (32, 4, 2)}}


def candidates(kernel: str, inner: str, pre_hook=None) -> list:
    """Every config the autotuner may try for ``kernel`` (``inner``: the tuned block name;
    ``pre_hook`` runs before each launch with the named arguments)."""
    import triton

    if interpreting():
        return [triton.Config({inner: 16}, num_warps=1, num_stages=1, pre_hook=pre_hook)]
    if kernel == "fwd":
        grid = [(n, w, s) for n in (32, 64, 128) for w in (4, 8) for s in (2, 3)]
    else:
        grid = [(x, w, s) for x in (16, 32, 64) for w in (4, 8) for s in (1, 2)]
    return [triton.Config({inner: n}, num_warps=w, num_stages=s, pre_hook=pre_hook)
            for n, w, s in grid
            if (n, w, s) not in BROKEN.get(kernel, set())]


def autotuning() -> bool:
    return os.environ.get("ATTNHUB_TRITON_AUTOTUNE", "0") not in ("", "0") and not interpreting()


def launch(kernel: str, jit_kernel, grid: tuple, *args, record: tuple[str, ...] = (),
           **kwargs):
    """Launch ``jit_kernel`` (an autotuned Triton kernel): through the autotuner when
    autotuning (or interpreting), else straight with the head-dim bucket's default config,
    so that no launch pays for the autotuner's benchmarking. With ``record`` (the names of
    the arguments a replay replaces), returns the launch's ``replay.LaunchRecord``, or None
    where it cannot be replayed (the autotuner's or the interpreter's launches)."""
    if autotuning() or interpreting():
        jit_kernel[grid](*args, **kwargs)
        return None
    n, w, s, regs = default(kernel, kwargs["BLOCK_D"], kwargs[OUTER[kernel]])
    kwargs.update({INNER[kernel]: n}, num_warps=w, num_stages=s,
                  **({"maxnreg": regs} if regs else {}))
    if record:
        from .replay import LaunchRecord

        return LaunchRecord.launch(jit_kernel.fn, grid, args, kwargs, record)
    jit_kernel.fn[grid](*args, **kwargs)
    return None


def default(kernel: str, block_d_: int, outer: int) -> tuple[int, int, int, int]:
    """(inner block, warps, stages, maxnreg or 0) for a launch; an outer tile without an entry
    of its own (benchmarks/tune_backward.py tries any) takes its head-dim bucket's first."""
    bucket = 64 if block_d_ <= 64 else 128 if block_d_ <= 128 else 256 if block_d_ <= 256 \
        else 512
    table = DEFAULTS[kernel]
    entry = table.get((bucket, outer)) or next(v for (b, _), v in table.items() if b == bucket)
    return (*entry, 0)[:4]


def pick(kernel: str, configs_: list, block_d_: int, outer: int, inner: str) -> list:
    """Configs to try for a launch: the default, or (autotuning) every config that fits the
    head dim."""
    fits = [c for c in configs_ if block_d_ <= 128 or (c.kwargs[inner] <= 64
                                                       and c.num_stages <= 2)]
    if autotuning() or interpreting():
        return fits or configs_[:1]
    n, w, s, _ = default(kernel, block_d_, outer)
    chosen = [c for c in configs_ if c.kwargs[inner] == n and c.num_warps == w
              and c.num_stages == s]
    return chosen or (fits or configs_)[:1]


@functools.cache
def interpreting() -> bool:
    """TRITON_INTERPRET=1: the kernels run in Triton's CPU interpreter (tests). Read once, as
    Triton decides it when the kernels are defined."""
    return os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")


_interpreter_lock = threading.Lock()


def launch_guard() -> contextlib.AbstractContextManager:
    """Held around a call's launches: Triton's interpreter is not thread-safe (two threads
    in it corrupt the heap), so under TRITON_INTERPRET=1 calls run one at a time; on a GPU
    this is a no-op."""
    return _interpreter_lock if interpreting() else contextlib.nullcontext()


def dot_precision(dtype) -> str:
    """fp32 inputs are multiplied in true fp32 ('ieee'), never silently in tf32."""
    import torch

    return "ieee" if dtype == torch.float32 else "tf32"


def block_d(head_dim: int) -> int:
    """Head dims are padded to a power of two (loads are masked beyond head_dim)."""
    return max(16, 1 << (head_dim - 1).bit_length())


def forward_block_m(head_dim: int) -> int:
    """BLOCK_M, the query rows per forward program: fixed per head dim so that the tile list
    can be planned before launch (the key block, warps and stages come from DEFAULTS)."""
    if interpreting():  # 32 rows against the interpreter's 16-key blocks: the tests
        return 32       # exercise BLOCK_M != BLOCK_N
    d = block_d(head_dim)
    # head dims 257-512 (forward only): 32-row tiles keep the fp32 accumulator in registers
    return 128 if d <= 256 else 32


def backward_tiles(head_dim: int, causal: bool) -> tuple[int, int]:
    """(key rows per dK/dV program, query rows per dQ program); the inner block sizes come
    from DEFAULTS. Causal calls take 128-row key tiles for head dims up to 128 (faster on
    W1 and W3, docs/performance.md); only DEFAULTS' configs are known correct with them."""
    if interpreting():
        return 32, 32
    return (128 if causal and 64 < block_d(head_dim) <= 128 else 64), 64
